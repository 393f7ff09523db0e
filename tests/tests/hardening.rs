//! One node's mesh against hostile clients, half-written files and vanished
//! peers, on the virtual cluster: each test is a finding of the hardening
//! review, reproduced. Root; fails, never skips, when the cluster cannot be
//! built.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use nodemesh_lab::{Cluster, ClusterSpec, cluster::wait_for, http};
use serde_json::Value;

fn cluster(extra: &str) -> Cluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.agent.extra = extra.into();
    // The findings of half-written files are the file sources'.
    spec.agent.workloads_file = true;
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    for pod in ["server-remote", "server-local"] {
        c.spawn_in_pod(pod, &["serve", "--port", "8080"]).unwrap();
    }
    c
}

fn remote(c: &Cluster) -> String {
    format!("{}:8080", c.pod("server-remote").ip4)
}

fn local(c: &Cluster) -> String {
    format!("{}:8080", c.pod("server-local").ip4)
}

fn ok(c: &Cluster, pod: &str, to: &str) -> bool {
    c.probe(pod, to)["result"] == "ok"
}

/// Descriptors node k's agent holds now.
fn agent_fds(c: &Cluster, k: usize) -> usize {
    let pid = c.agent_pid(k).expect("agent running");
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A `client hold` child: opens `n` connections to `to` and holds them for
/// `secs`; returns once all are opened, with what its first line said.
fn hold(mut cmd: std::process::Command, to: &str, n: usize, secs: u64) -> (Child, Value) {
    cmd.args([
        "client",
        "hold",
        "--to",
        to,
        "--n",
        &n.to_string(),
        "--secs",
        &secs.to_string(),
    ]);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let first: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("hold said {line:?}"));
    // The rest (the outcome) is read when the child is done.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    (child, first)
}

/// The lab command line for a pod's process, without the subcommand.
fn in_pod(c: &Cluster, pod: &str) -> std::process::Command {
    c.pod_command(pod, &[])
}

/// A metric's value from node k's stats server, asked from the node itself.
fn metric(c: &Cluster, k: usize, name: &str, labels: &[&str]) -> f64 {
    let r = http::get(&c.node_netns(k), c.stats_address(k), "/metrics", None).unwrap();
    r.body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && labels.iter().all(|w| l.contains(w))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn idle_clients_of_the_agent_servers_cannot_take_its_descriptors() {
    // Finding 1: 2 × 10,100 idle connections to the admin port put the
    // agent at its fd limit (20,000 here) and the node's mesh went down.
    let c = cluster("");
    let stats = c.stats_address(1).to_string();
    let ready = c.readiness_address(1).to_string();
    let (a, _) = hold(c.external_command(&[]), &stats, 10_000, 15);
    let (b, _) = hold(c.external_command(&[]), &ready, 10_000, 15);
    // Three more sources fill the readiness server for good (a quarter of
    // it each): the other node, a pod outside the mesh, a meshed pod.
    let more: Vec<Child> = [
        c.node_command(0, &[]),
        in_pod(&c, "outsider"),
        in_pod(&c, "promo"),
    ]
    .into_iter()
    .map(|cmd| hold(cmd, &ready, 100, 15).0)
    .collect();
    // While they hold: HBONE into the node, same-node traffic on the other
    // node, and the kubelet's view of readiness all work.
    assert!(
        ok(&c, "client", &remote(&c)),
        "meshed traffic into the flooded node failed"
    );
    assert!(ok(&c, "client", &local(&c)));
    // Full for every remote source; the kubelet, on the node itself, gets
    // its answer.
    let from_elsewhere = http::get(
        &c.external_netns(),
        c.readiness_address(1),
        "/healthz/ready",
        None,
    );
    assert!(
        from_elsewhere.is_err(),
        "{:?}",
        from_elsewhere.map(|r| r.status)
    );
    let r = http::get(
        &c.node_netns(1),
        c.readiness_address(1),
        "/healthz/ready",
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let per_source = metric(
        &c,
        1,
        "nodemesh_admin_connections_refused_total",
        &["server=\"readiness\"", "reason=\"per_source\""],
    );
    assert!(per_source >= 9_900.0, "{per_source}");
    let fds = agent_fds(&c, 1);
    assert!(fds < 1000, "the agent holds {fds} descriptors");
    let refused = metric(&c, 1, "nodemesh_admin_connections_refused_total", &[]);
    assert!(refused >= 19_000.0, "refused {refused}");
    // /config_dump is not on the ports other hosts reach.
    let dump = http::get(
        &c.external_netns(),
        c.stats_address(1),
        "/config_dump",
        None,
    );
    assert!(dump.is_err() || dump.unwrap().status == 404);
    assert_eq!(c.admin_get(1, "/config_dump", None).unwrap().status, 200);
    for mut child in more.into_iter().chain([a, b]) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn floods_of_connections_are_shed_per_source_and_per_workload_and_the_rest_is_served() {
    // Finding 1: 3,300 plaintext connections to one PERMISSIVE workload, or
    // ~3,300 same-node ones, took the agent to its fd limit. Limits set
    // here (the defaults are shares of what the machine's fd limit allows).
    let c = cluster("limits: {maxConnectionsPerWorkload: 1024, maxConnectionsPerSource: 512}\n");
    let (mut plain, first) = hold(in_pod(&c, "outsider"), &remote(&c), 3300, 20);
    assert!(first["holding"].as_u64().unwrap() >= 512, "{first}");
    let (mut same, _) = hold(in_pod(&c, "client"), &local(&c), 3300, 20);
    // Connections to HBONE that never start TLS: held in a budget of their
    // own, a quarter of it per source, never the one meshed traffic uses.
    let hbone_port = format!("{}:15008", c.pod("server-remote").ip4);
    let (mut silent, _) = hold(in_pod(&c, "outsider"), &hbone_port, 2000, 20);
    // Others are served: another pod on both nodes, across and on the node.
    assert!(ok(&c, "promo", &remote(&c)));
    assert!(ok(&c, "promo", &local(&c)));
    for k in 0..2 {
        let fds = agent_fds(&c, k);
        assert!(fds < 4000, "agent {k} holds {fds} descriptors");
    }
    let per_source = metric(
        &c,
        1,
        "nodemesh_connections_shed_total",
        &["limit=\"per_source\"", "inbound_plaintext"],
    );
    assert!(per_source >= 2700.0, "{per_source}");
    let per_workload = metric(
        &c,
        0,
        "nodemesh_connections_shed_total",
        &["limit=\"per_workload\"", "outbound"],
    );
    assert!(per_workload >= 2200.0, "{per_workload}");
    wait_for("silent handshakes shed", Duration::from_secs(5), || {
        metric(
            &c,
            1,
            "nodemesh_connections_shed_total",
            &["direction=\"hbone_handshake\"", "limit=\"per_source\""],
        ) >= 1800.0
    });
    // Refusals are counted, each logged only as sampled.
    let logged = c
        .access_log(1)
        .iter()
        .filter(|e| e["response_flags"] == "CONNECTION_LIMIT")
        .count();
    assert!(
        (1..600).contains(&logged),
        "{logged} refusals in the access log"
    );
    for child in [&mut plain, &mut same, &mut silent] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

/// Rewrites `path` in place, the way a non-atomic writer does: truncate,
/// write `cut`, pause, write `full`.
fn rewrite_in_place(path: &std::path::Path, cut: &str, full: &str, pause: Duration) {
    std::fs::write(path, cut).unwrap();
    std::thread::sleep(pause);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(full.as_bytes()).unwrap();
}

#[test]
fn files_cut_by_a_writer_that_was_not_done_never_drop_pods_or_rules() {
    // Finding 2: a workloads file cut to its first 200 bytes unenrolled
    // the other pods (and STRICT stopped applying to them); a half-written
    // DENY applied with a principal missing.
    let mut c = cluster("");
    c.write_policy("strict.yaml", STRICT).unwrap();
    wait_for("STRICT", Duration::from_secs(5), || {
        !ok(&c, "outsider", &remote(&c))
    });
    let path = c.agents[0].workloads.clone();
    let full = std::fs::read_to_string(&path).unwrap();
    let cuts: Vec<usize> = full.match_indices('\n').map(|(i, _)| i + 1).collect();
    for (n, cut) in cuts.iter().enumerate() {
        // Longer than the watcher's settle time: the cut file is read.
        rewrite_in_place(&path, &full[..*cut], &full, Duration::from_millis(300));
        if n % 8 == 0 {
            // A client outside the mesh never reaches a pod of node 0.
            assert!(
                !ok(&c, "outsider", &local(&c)),
                "plaintext reached a STRICT pod after cut {n}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let log = c.agent_log(0);
    assert_eq!(log.matches("unenrolled").count(), 0, "{log}");
    assert!(log.contains("changed while confirming"), "{log}");
    assert!(!ok(&c, "outsider", &local(&c)));
    assert!(ok(&c, "client", &local(&c)));

    // A writer that died half-way: the file stays cut after its first pod
    // (valid YAML, as the finding's was). The running pods it leaves out
    // stay in the mesh, kept while their netns exists, logged and counted.
    let cut = full.match_indices("\n  - name:").nth(1).unwrap().0 + 1;
    std::fs::write(&path, &full[..cut]).unwrap();
    wait_for("pods kept", Duration::from_secs(5), || {
        metric(&c, 0, "nodemesh_workload_pods_kept", &[]) >= 1.0
    });
    assert!(c.agent_log(0).contains("kept in the mesh"));
    assert!(
        !ok(&c, "outsider", &local(&c)),
        "plaintext reached a kept STRICT pod"
    );
    assert!(ok(&c, "client", &local(&c)));
    // The agent restarted while the cut file stays: the pods it leaves out
    // are enrolled again from what the agent saved, STRICT still holds.
    c.stop_agent(0).unwrap();
    c.start_agent(0).unwrap();
    wait_for(
        "pods kept after the restart",
        Duration::from_secs(10),
        || metric(&c, 0, "nodemesh_workload_pods_kept", &[]) >= 1.0,
    );
    assert!(
        !ok(&c, "outsider", &local(&c)),
        "plaintext reached a kept STRICT pod after a restart"
    );
    assert!(ok(&c, "client", &local(&c)));
    std::fs::write(&path, &full).unwrap();
    wait_for("the full file again", Duration::from_secs(5), || {
        metric(&c, 0, "nodemesh_workload_pods_kept", &[]) == 0.0
    });
    assert_eq!(c.agent_log(0).matches("unenrolled").count(), 0);

    // A DENY policy rewritten in place: never applied without its second
    // principal.
    let deny = |principals: &[&str]| {
        let mut y = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-promo, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals:\n".to_string();
        for p in principals {
            y += &format!("        - cluster.local/ns/shop/sa/{p}\n");
        }
        y
    };
    let one = deny(&["other"]);
    c.write_policy("deny.yaml", &one).unwrap();
    wait_for("the first DENY", Duration::from_secs(5), || {
        c.agent_log(1).matches("policies loaded").count() >= 3
    });
    // Cut at a line boundary, the cut is valid YAML: a DENY for nobody.
    let both = deny(&["nobody", "promo"]);
    let cut = &both[..both
        .find("        - cluster.local/ns/shop/sa/promo")
        .unwrap()];
    let loads = c.agent_log(1).matches("policies loaded").count();
    rewrite_in_place(
        &c.policy_dir().join("deny.yaml"),
        cut,
        &both,
        Duration::from_millis(300),
    );
    wait_for("the full DENY", Duration::from_secs(5), || {
        c.agent_log(1).matches("policies loaded").count() > loads
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.agent_log(1).matches("policies loaded").count(), loads + 1);
    assert!(!ok(&c, "promo", &remote(&c)));
    assert!(ok(&c, "client", &remote(&c)));
}

/// One CONNECT to node 1's agent with a valid mesh certificate.
fn connect_probe(c: &Cluster, authority: &str) -> Value {
    c.hbone_probe("outsider", "server-remote", "connect", authority)
}

#[test]
fn hbone_inside_hbone_and_other_ways_back_into_the_agent_are_refused() {
    // Finding 3: CONNECT <pod>:15008 was accepted, and the inner stream was
    // decided with the source 127.0.0.6, past an ipBlocks DENY.
    let c = cluster("");
    let ip = c.pod("server-remote").ip4;
    assert_eq!(connect_probe(&c, &format!("{ip}:8080"))["status"], "200");
    // Finding 6: a forged `forwarded` header was logged as the source. The
    // source is the TCP peer; the header is only a claim.
    let forged = |e: &Value| e["forwarded_for"] == "6.6.6.6:4444";
    wait_for("the forged request's entry", Duration::from_secs(5), || {
        !c.log_entries(1, forged).is_empty()
    });
    let forged = c.log_entries(1, forged);
    assert_eq!(forged.len(), 1, "{forged:?}");
    let outsider = c.pod("outsider").ip4.to_string();
    assert_eq!(
        forged[0]["src_addr"]
            .as_str()
            .and_then(|a| a.rsplit_once(':'))
            .map(|(ip, _)| ip),
        Some(outsider.as_str()),
        "{forged:?}"
    );
    for port in [15008, 15006, 15001, 15020, 15021, 15000] {
        let r = connect_probe(&c, &format!("{ip}:{port}"));
        assert_eq!(r["status"], "400", "CONNECT to {port}: {r}");
    }
    let refused = c.log_entries(1, |e| {
        e["error"]
            .as_str()
            .is_some_and(|s| s.contains("would re-enter the agent"))
    });
    assert!(refused.len() >= 6, "{refused:?}");
    // An app that dials an agent port of a mesh pod is refused at its own
    // agent, across nodes and on the node.
    assert!(!ok(&c, "client", &format!("{ip}:15008")));
    assert!(!ok(
        &c,
        "client",
        &format!("{}:15008", c.pod("server-local").ip4)
    ));
    let own = c.log_entries(0, |e| {
        e["error"]
            .as_str()
            .is_some_and(|s| s.contains("would re-enter the agent"))
    });
    assert_eq!(own.len(), 2, "{own:?}");
}

fn mkfifo(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn watchers_survive_fifos_swapped_directories_and_devices_and_sigterm_still_exits() {
    // Finding 4: a FIFO at the workloads or bundle path blocked a watcher
    // for good (SIGTERM never exited); a recreated or renamed policy dir was
    // never watched again; /dev/zero was read until memory ran out.
    let mut c = cluster("");
    let workloads = c.agents[0].workloads.clone();
    let full = std::fs::read_to_string(&workloads).unwrap();
    mkfifo(&workloads);
    wait_for("the FIFO refused", Duration::from_secs(5), || {
        c.agent_log(0).contains("is a FIFO, not a regular file")
    });
    std::os::unix::fs::symlink("/dev/zero", workloads.with_extension("zero")).unwrap();
    std::fs::rename(workloads.with_extension("zero"), &workloads).unwrap();
    wait_for("/dev/zero refused", Duration::from_secs(5), || {
        c.agent_log(0).contains("is a character device")
    });
    assert!(c.agent_rss_kib(0) < 100_000, "{} KiB", c.agent_rss_kib(0));
    // The watcher still acts on a change: promo goes out of the mesh.
    let without_promo = c.workloads_yaml(0, &|p| p.spec.enrolled && p.spec.name != "promo");
    assert_ne!(without_promo, full);
    let tmp = workloads.with_extension("new");
    std::fs::write(&tmp, &without_promo).unwrap();
    std::fs::rename(&tmp, &workloads).unwrap();
    wait_for("promo unenrolled", Duration::from_secs(5), || {
        c.agent_log(0).contains("unenrolled pod=shop/promo")
    });

    // The policy directory, deleted and recreated, then swapped by rename.
    let dir = c.policy_dir();
    let loads = |c: &Cluster| c.agent_log(1).matches("policies loaded").count();
    let before = loads(&c);
    std::fs::remove_dir_all(&dir).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::create_dir(&dir).unwrap();
    c.write_policy("strict.yaml", STRICT).unwrap();
    wait_for(
        "the recreated directory read",
        Duration::from_secs(6),
        || loads(&c) > before,
    );
    assert!(!ok(&c, "outsider", &remote(&c)));
    let swapped = dir.with_extension("new");
    std::fs::create_dir(&swapped).unwrap();
    std::fs::write(swapped.join("empty.yaml"), "").unwrap();
    let before = loads(&c);
    std::fs::rename(&dir, dir.with_extension("old")).unwrap();
    std::fs::rename(&swapped, &dir).unwrap();
    wait_for("the swapped directory read", Duration::from_secs(6), || {
        loads(&c) > before
    });
    assert!(
        ok(&c, "outsider", &remote(&c)),
        "STRICT stayed after the swap"
    );

    // A FIFO at the trust bundle: refused; a rotation after it is read.
    let bundle = c.trust_bundle_file();
    let roots = std::fs::read_to_string(&bundle).unwrap();
    mkfifo(&bundle);
    wait_for("the bundle FIFO refused", Duration::from_secs(5), || {
        c.agent_log(0).contains("trust bundle rejected")
    });
    let tmp = bundle.with_extension("new");
    std::fs::write(&tmp, format!("{roots}{roots}")).unwrap();
    std::fs::rename(&tmp, &bundle).unwrap();
    wait_for("the rotation read", Duration::from_secs(5), || {
        c.agent_log(0).contains("trust bundle reloaded roots=2")
    });
    let reloads = metric(&c, 0, "nodemesh_config_reloads_total", &["rejected"]);
    assert!(reloads >= 3.0, "{reloads}");

    // SIGTERM with a FIFO in place again: exits, in time, with 0.
    mkfifo(&workloads);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = c.stop_agent(0).unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_partitioned_peer_and_idle_hbone_connections_are_closed_in_bounded_time() {
    // Finding 5: no server-side PING, idle timeout or keepalive: a peer cut
    // off by a partition left both connections open for good.
    let c = cluster(
        "hbone: {pingIntervalSeconds: 1, pingTimeoutSeconds: 2, idleTimeoutSeconds: 3}\ntcpKeepalive: {timeSeconds: 2, intervalSeconds: 1, probes: 2}\n",
    );
    // A long, slow transfer across nodes.
    let mut send = c
        .pod_command(
            "client",
            &[
                "client",
                "send",
                "--to",
                &remote(&c),
                "--bytes",
                "100000000",
                "--pace-ms",
                "200",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("bytes flowing", Duration::from_secs(5), || {
        metric(
            &c,
            1,
            "istio_tcp_received_bytes_total",
            &["destination_workload=\"server-remote\""],
        ) > 0.0
    });
    let cut = Instant::now();
    // Node 1's port on the fabric bridge.
    let link = |state: &str| {
        let status = std::process::Command::new("ip")
            .args(["-n", &c.ns_fabric(), "link", "set", "n1", state])
            .status()
            .unwrap();
        assert!(status.success());
    };
    link("down");
    // Both agents close their side within ping interval + timeout (+ slack).
    let closed = |k: usize| {
        !c.access_log(k)
            .iter()
            .filter(|e| e["orig_dst"] == remote(&c).as_str() && e["result"] != "ok")
            .collect::<Vec<_>>()
            .is_empty()
    };
    wait_for("the source side closed", Duration::from_secs(10), || {
        closed(0)
    });
    wait_for(
        "the destination side closed",
        Duration::from_secs(10),
        || closed(1),
    );
    let took = cut.elapsed();
    link("up");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // Both closed for the reason: the PINGs went unanswered (no
    // TCP_USER_TIMEOUT here, it is off by default).
    for k in 0..2 {
        assert!(
            c.agent_log(k).contains("stopped answering PINGs"),
            "{}",
            c.agent_log(k)
        );
    }
    let _ = send.kill();
    let _ = send.wait();

    // An idle pooled connection is closed by the destination's idle timeout.
    wait_for("the link back", Duration::from_secs(10), || {
        ok(&c, "client", &remote(&c))
    });
    assert!(metric(&c, 0, "nodemesh_hbone_pool_connections", &[]) >= 1.0);
    wait_for("the idle connection closed", Duration::from_secs(8), || {
        metric(&c, 0, "nodemesh_hbone_pool_connections", &[]) == 0.0
    });
}
