//! End-to-end tests on the virtual cluster. They need root and fail (never
//! skip) when the cluster cannot be built.
use std::time::{Duration, Instant};

use nodemesh_lab::{
    Cluster, ClusterSpec, PodSpec, ServiceSpec, cluster::EXTERNAL_V4, cluster::wait_for,
};
use serde_json::Value;

fn spec(pods: Vec<PodSpec>, services: Vec<ServiceSpec>) -> ClusterSpec {
    ClusterSpec {
        nodes: 2,
        pods,
        services,
        agent: Default::default(),
    }
}

/// client on node 0, servers on both nodes, a service in front of the
/// remote one, an unenrolled pod beside the client. Kubernetes mode: the
/// pods made by the CNI chain, the state from the API.
fn standard() -> Cluster {
    standard_with(false)
}

fn standard_with(workloads_file: bool) -> Cluster {
    let mut spec = spec(
        vec![
            PodSpec::new("client", 0),
            PodSpec::new("outsider", 0).unenrolled(),
            PodSpec::new("server-local", 0),
            PodSpec::new("server-remote", 1),
        ],
        vec![ServiceSpec::new("web", 80, 8080, &["server-remote"])],
    );
    spec.agent.workloads_file = workloads_file;
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    c.spawn_in_pod("server-local", &["serve", "--port", "8080"])
        .unwrap();
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    c
}

fn probe(c: &Cluster, pod: &str, to: &str) -> Value {
    c.probe(pod, to)
}

#[test]
fn cross_node_service_and_external_land_with_original_destination() {
    let mut c = standard();
    c.spawn_external(&["serve", "--port", "8080"]).unwrap();
    let client_ip = c.pod("client").ip4.to_string();

    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    let r = probe(&c, "client", &remote);
    assert_eq!(r["result"], "ok", "{r}");
    let e = c.log_entries(0, |e| e["orig_dst"] == remote.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["src_workload"], "shop/client");
    assert_eq!(e[0]["dst_workload"], "shop/server-remote");
    assert_eq!(e[0]["security"], "mutual_tls");
    assert_eq!(e[0]["result"], "ok");
    // The destination's agent saw the client's identity from its
    // certificate, and its address from the forwarded header.
    let e = c.log_entries(1, |e| e["orig_dst"] == remote.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["reporter"], "destination");
    assert_eq!(
        e[0]["src_identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert!(
        e[0]["src_addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{client_ip}:")),
        "{e:?}"
    );

    // Same node: no HBONE; plain TCP from inside the server's netns, from
    // 127.0.0.6 (so its inbound capture leaves it alone), as across nodes;
    // the client is in the access log.
    let local = format!("{}:8080", c.pod("server-local").ip4);
    let r = probe(&c, "client", &local);
    assert_eq!(r["result"], "ok", "{r}");
    assert!(
        r["server_saw"].as_str().unwrap().starts_with("127.0.0.6:"),
        "{r}"
    );
    let e = c.log_entries(0, |e| e["orig_dst"] == local.as_str());
    assert_eq!(e[0]["security"], "none");
    assert_eq!(e[0]["src_workload"], "shop/client");

    let vip = format!("{}:80", c.service("web").vip4);
    let r = probe(&c, "client", &vip);
    assert_eq!(r["result"], "ok", "{r}");
    let e = c.log_entries(0, |e| e["orig_dst"] == vip.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["src_workload"], "shop/client");
    assert_eq!(e[0]["service"], "web.shop");
    assert_eq!(e[0]["upstream"], remote.as_str());

    let external = format!("{EXTERNAL_V4}:8080");
    let r = probe(&c, "client", &external);
    assert_eq!(r["result"], "ok", "{r}");
    let e = c.log_entries(0, |e| e["orig_dst"] == external.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["src_workload"], "shop/client");
    assert!(e[0]["dst_workload"].is_null());

    // A VIP with no agent in the path goes nowhere: only the mesh serves it.
    let r = probe(&c, "outsider", &vip);
    assert_ne!(r["result"], "ok", "{r}");
}

#[test]
fn one_gib_intact_and_half_close_both_ways() {
    let c = standard();
    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    let gib = (1u64 << 30).to_string();
    // Client -> server, then the client's FIN; the server's checksum answer
    // can only arrive after that FIN crossed the agent.
    let r = c
        .run_in_pod(
            "client",
            &["client", "send", "--to", &remote, "--bytes", &gib],
        )
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    // Server -> client, then the server's FIN; afterwards the client still
    // sends, and the half-closed server must receive it.
    let mib64 = (64u64 << 20).to_string();
    let r = c
        .run_in_pod(
            "client",
            &["client", "fetch", "--to", &remote, "--bytes", &mib64],
        )
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let out = std::fs::read_dir(&c.state_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("server-remote-") && n.ends_with(".out"))
        })
        .expect("the server's output");
    let server_out = std::fs::read_to_string(out).unwrap();
    assert!(
        server_out.contains("\"after_shutdown\":\"after-eof\""),
        "{server_out}"
    );
    let e = c.log_entries(0, |e| e["bytes_sent"].as_u64() > Some(1 << 30));
    assert_eq!(e.len(), 1, "the 1 GiB connection is in the access log");
}

#[test]
fn unenrolled_namespaces_and_agent_sockets_are_never_redirected() {
    let c = standard();
    let remote = format!("{}:8080", c.pod("server-remote").ip4);

    // The agent runs inside the cgroup subtree the programs are attached to,
    // so its own sockets in pod netns pass through the hooks: its mark must
    // exempt them, or every proxied connection would loop back to it.
    let pid = c.agent_pid(0).unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.contains("/node-0/agent"),
        "agent not in the node cgroup: {cg}"
    );
    let r = probe(&c, "client", &remote);
    assert_eq!(r["result"], "ok", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let all = c.access_log(0);
    assert_eq!(
        all.len(),
        1,
        "one connection, one proxied connection: {all:?}"
    );

    // An enrolled cgroup but a netns that is not enrolled: not redirected at
    // the source. The meshed destination's agent captures it as plaintext
    // (PERMISSIVE by default) and connects from inside the server's pod, from
    // 127.0.0.6; the client's address is in the access log.
    let r = probe(&c, "outsider", &remote);
    assert_eq!(r["result"], "ok", "{r}");
    let outsider_ip = c.pod("outsider").ip4.to_string();
    assert!(
        r["server_saw"].as_str().unwrap().starts_with("127.0.0.6:"),
        "{r}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.access_log(0).len(), 1, "the outsider was redirected");
    let captured = c.log_entries(1, |e| e["security"] == "none");
    assert_eq!(captured.len(), 1, "{captured:?}");
    assert!(
        captured[0]["src_addr"]
            .as_str()
            .unwrap()
            .starts_with(&outsider_ip)
    );
    assert!(captured[0]["src_identity"].is_null());
    assert_eq!(captured[0]["reporter"], "destination");

    // An app talking to the agent's port directly is refused: the kernel
    // did not redirect it, so there is no original destination.
    let r = probe(&c, "client", "127.0.0.1:15001");
    assert!(r["result"] == "reset" || r["result"] == "eof", "{r}");
    wait_for(
        "the refusal in the agent log",
        Duration::from_secs(3),
        || c.agent_log(0).contains("not redirected by the kernel"),
    );
}

#[test]
fn thousand_concurrent_then_ten_thousand_and_maps_back_to_idle() {
    let c = standard();
    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    let r = c
        .run_in_pod(
            "client",
            &["client", "concurrent", "--to", &remote, "--n", "1000"],
        )
        .unwrap();
    let errors: Vec<Value> = c
        .access_log(0)
        .into_iter()
        .chain(c.access_log(1))
        .filter(|e| e["result"] != "ok")
        .take(5)
        .collect();
    assert_eq!(r["ok"], 1000, "{r} {errors:?}");
    assert_eq!(r["distinct_peers"], 1000, "{r}");
    // They shared a handful of pooled HBONE connections (100 streams each).
    let opened = c.agent_log(0).matches("HBONE connection opened").count();
    assert!(
        (1..=12).contains(&opened),
        "{opened} HBONE connections for 1000 streams"
    );
    let r = c
        .run_in_pod(
            "client",
            &[
                "client",
                "many",
                "--to",
                &remote,
                "--n",
                "10000",
                "--parallel",
                "16",
            ],
        )
        .unwrap();
    assert_eq!(r["ok"], 10000, "{r}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let last = c.map_sizes(0).unwrap();
        if last["NM_PENDING"] == 0 && last["NM_ORIG_DST"] == 0 && last["NM_SOCKHASH"] == 0 {
            break last;
        }
        assert!(Instant::now() < deadline, "maps not back to idle: {last}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // One enrolment per enrolled local pod (client, server-local).
    assert_eq!(last["NM_ENROLLED"], 2, "{last}");
}

#[test]
fn killed_agent_fails_closed_and_restart_reuses_pinned_state() {
    let mut c = standard();
    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    assert_eq!(probe(&c, "client", &remote)["result"], "ok");
    // The entry is written when the agent sees the close; a SIGKILL before
    // that would lose it, so wait for it.
    assert_eq!(
        c.log_entries(0, |e| e["orig_dst"] == remote.as_str()).len(),
        1
    );

    c.kill_agent(0).unwrap();
    // Programs stay attached (pinned links): no silent bypass of the mesh.
    let r = probe(&c, "client", &remote);
    assert_eq!(r["result"], "refused", "{r}");
    assert!(c.bpffs.join("node-0/links/nm_connect4").exists());
    assert!(c.bpffs.join("node-0/maps/NM_ENROLLED").exists());
    // Unenrolled pods are unaffected.
    assert_eq!(probe(&c, "outsider", &remote)["result"], "ok");

    c.start_agent(0).unwrap();
    let log = c.agent_log(0);
    assert!(log.contains("replaced the previous agent's link"), "{log}");
    let r = probe(&c, "client", &remote);
    assert_eq!(r["result"], "ok", "{r}");
    wait_for("the second entry", Duration::from_secs(3), || {
        c.access_log(0)
            .iter()
            .filter(|e| e["orig_dst"] == remote.as_str())
            .count()
            == 2
    });
}

#[test]
fn ipv6_end_to_end_and_v4_mapped() {
    let c = standard();
    let client6 = c.pod("client").ip6.to_string();
    let remote6 = format!("[{}]:8080", c.pod("server-remote").ip6);
    let r = probe(&c, "client", &remote6);
    assert_eq!(r["result"], "ok", "{r}");
    let e = c.log_entries(0, |e| e["orig_dst"] == remote6.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["src_workload"], "shop/client");
    assert_eq!(e[0]["security"], "mutual_tls");
    let e = c.log_entries(1, |e| e["orig_dst"] == remote6.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0]["src_addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("[{client6}]:")),
        "{e:?}"
    );
    let local6 = format!("[{}]:8080", c.pod("server-local").ip6);
    let r = probe(&c, "client", &local6);
    assert!(
        r["server_saw"].as_str().unwrap().starts_with("[::1]:"),
        "{r}"
    );

    let vip6 = format!("[{}]:80", c.service("web").vip6);
    let r = probe(&c, "client", &vip6);
    assert_eq!(r["result"], "ok", "{r}");
    let e = c.log_entries(0, |e| e["orig_dst"] == vip6.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["upstream"], remote6.as_str());

    // A dual-stack (AF_INET6) socket asking for an IPv4 peer.
    let mapped = format!("[::ffff:{}]:8080", c.pod("server-remote").ip4);
    let r = probe(&c, "client", &mapped);
    assert_eq!(r["result"], "ok", "{r}");
    let remote4 = format!("{}:8080", c.pod("server-remote").ip4);
    let e = c.log_entries(0, |e| e["orig_dst"] == remote4.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
}

#[test]
fn pods_enrol_and_unenrol_live() {
    // The workloads file's live updates (its pods have netns paths).
    let c = standard_with(true);
    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    c.set_enrolled(0, &|p| p.spec.enrolled && p.spec.name != "client")
        .unwrap();
    wait_for("unenrolment", Duration::from_secs(5), || {
        c.agent_log(0).contains("unenrolled pod=shop/client")
    });
    assert_eq!(probe(&c, "client", &remote)["result"], "ok");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        c.access_log(0).is_empty(),
        "an unenrolled pod was redirected"
    );

    c.set_enrolled(0, &|p| p.spec.enrolled).unwrap();
    wait_for("re-enrolment", Duration::from_secs(5), || {
        c.agent_log(0).matches(" enrolled pod=shop/client").count() >= 2
    });
    assert_eq!(probe(&c, "client", &remote)["result"], "ok");
    assert_eq!(c.log_entries(0, |_| true).len(), 1, "{}", c.agent_log(0));

    // A changed pod (new labels) is re-enrolled without a moment of bypass.
    let path = &c.agents[0].workloads;
    let text = std::fs::read_to_string(path).unwrap();
    let relabelled = text.replace(
        "labels: {app: client}",
        "labels: {app: client, version: v2}",
    );
    assert_ne!(text, relabelled);
    std::fs::write(path, relabelled).unwrap();
    wait_for("re-enrolment after relabel", Duration::from_secs(5), || {
        c.agent_log(0).matches(" enrolled pod=shop/client").count() >= 3
    });
    assert_eq!(
        c.agent_log(0).matches("unenrolled pod=shop/client").count(),
        1
    );
    assert_eq!(probe(&c, "client", &remote)["result"], "ok");
    wait_for("the entry after relabel", Duration::from_secs(3), || {
        c.access_log(0).len() == 2
    });

    // A broken file is rejected and the last good set stays in force.
    std::fs::write(&c.agents[0].workloads, "node: node-0\npods: [\n").unwrap();
    wait_for("the rejection", Duration::from_secs(5), || {
        c.agent_log(0).contains("workloads file rejected")
    });
    assert_eq!(probe(&c, "client", &remote)["result"], "ok");
    wait_for("the third entry", Duration::from_secs(3), || {
        c.access_log(0).len() == 3
    });
}

#[test]
fn sigterm_drains_then_exits_zero_and_keeps_pins() {
    let mut s = spec(
        vec![PodSpec::new("client", 0), PodSpec::new("server-remote", 1)],
        vec![],
    );
    s.agent.drain_timeout_seconds = Some(20);
    let mut c = Cluster::start(s).unwrap();
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    // A transfer in flight when SIGTERM arrives completes within the drain.
    let child = c
        .pod_command(
            "client",
            &[
                "client",
                "send",
                "--to",
                &remote,
                "--bytes",
                &(1u64 << 30).to_string(),
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let status = c.stop_agent(0).unwrap();
    assert!(status.success(), "agent exit status {status}");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let log = c.agent_log(0);
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained"), "{log}");
    assert_eq!(
        c.access_log(0).len(),
        1,
        "the transfer was logged before exit"
    );
    assert!(c.bpffs.join("node-0/links/nm_connect4").exists());
    // After exit the node fails closed until an agent is back.
    assert_eq!(probe(&c, "client", &remote)["result"], "refused");
}

#[test]
fn sockmap_fast_path_keeps_data_intact_and_programs_log() {
    let mut s = spec(
        vec![PodSpec::new("client", 0), PodSpec::new("server-local", 0)],
        vec![],
    );
    s.agent.sockmap = true;
    s.agent.ebpf_log_debug = true;
    let mut c = Cluster::start(s).unwrap();
    c.spawn_in_pod("server-local", &["serve", "--port", "8080"])
        .unwrap();
    let local = format!("{}:8080", c.pod("server-local").ip4);
    let size = (256u64 << 20).to_string();
    let r = c
        .run_in_pod(
            "client",
            &["client", "fetch", "--to", &local, "--bytes", &size],
        )
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let r = c
        .run_in_pod(
            "client",
            &["client", "send", "--to", &local, "--bytes", &size],
        )
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let r = c
        .run_in_pod(
            "client",
            &["client", "concurrent", "--to", &local, "--n", "200"],
        )
        .unwrap();
    assert_eq!(r["ok"], 200, "{r}");
    // aya-log lines from the connect hooks reach the agent's log.
    wait_for("the programs' log lines", Duration::from_secs(3), || {
        c.agent_log(0).contains("redirect workload")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.map_sizes(0).unwrap();
        if m["NM_SOCKHASH"] == 0 && m["NM_ORIG_DST"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "maps not back to idle: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn demo_runs_and_shows_the_shop() {
    let (lab, _) = nodemesh_lab::cluster::default_binaries().unwrap();
    let out = std::process::Command::new(lab)
        .args(["demo", "--duration", "4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pair in [
        "frontend",
        "catalogue",
        // Third parties: TLS originated by the agents; a tracker the
        // registry does not list, refused.
        "pim.example.com",
        "api.notify.example.com",
        "tls_originated",
        "outboundTrafficPolicy REGISTRY_ONLY",
        // Policies at work: a plaintext client refused by STRICT, a call
        // auth's ALLOW policy does not admit.
        "scraper (plain)",
        "PeerAuthentication istio-system/mesh-strict",
        "frontend -> auth",
    ] {
        assert!(
            text.contains(pair),
            "{pair} missing from the summary:\n{text}"
        );
    }
}

#[test]
fn a_killed_run_is_removed_by_the_next() {
    use std::io::BufRead as _;
    // The killed demo's children are orphaned; adopt them so that the ones
    // the sweep kills can be reaped here instead of lingering as zombies.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let (lab, _) = nodemesh_lab::cluster::default_binaries().unwrap();
    let mut child = std::process::Command::new(lab)
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    // The summary appears once the cluster, agents and shop are up.
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("agents on every node"))),
        "the demo never came up"
    );
    let owner = child.id().to_string();
    let run = std::fs::read_dir(nodemesh_lab::cluster::STATE_ROOT)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| std::fs::read_to_string(e.path().join("owner")).is_ok_and(|o| o.trim() == owner))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("the demo's state directory");
    child.kill().unwrap();
    child.wait().unwrap();
    let netns_left = || {
        nodemesh_lab::sys::netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&format!("nmlab-{run}-")))
            .count()
    };
    let procs_left = || {
        std::process::Command::new("pgrep")
            .args(["-f", &format!("/run/nodemesh-lab/{run}/")])
            .output()
            .map(|o| o.stdout.len())
            .unwrap_or(0)
    };
    assert!(
        netns_left() > 0,
        "nothing left to sweep: the test proves nothing"
    );

    let c = standard();
    assert_eq!(netns_left(), 0);
    let cgroup = nodemesh_lab::sys::cgroup2_root()
        .unwrap()
        .join(format!("nodemesh-lab-{run}"));
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(
        !std::path::Path::new(nodemesh_lab::cluster::STATE_ROOT)
            .join(&run)
            .exists()
    );
    assert_eq!(procs_left(), 0, "the killed run's agents still run");
    drop(c);
    // Every child of this test has been waited for: what is left are the
    // adopted orphans.
    while let Ok(status) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
    {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
    nix::sys::prctl::set_child_subreaper(false).unwrap();
}
