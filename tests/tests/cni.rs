//! Enrolment by the chained CNI plugin, for real: Debian's reference
//! `bridge` + `host-local` plugins create each new pod's interface, then
//! `nodemesh-cni` runs with their result, exactly as a runtime chains
//! plugins from the node's conflist (which the agent installed itself into).
use std::time::{Duration, Instant};

use nodemesh_lab::{
    AgentOptions, Cluster, ClusterSpec, PodSpec,
    cluster::wait_for,
    cni::{pod_uid, result_ip4},
};
use serde_json::Value;

const STRICT: &str = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
";

fn cluster() -> Cluster {
    let mut c = Cluster::start(ClusterSpec {
        nodes: 2,
        pods: vec![PodSpec::new("client", 0), PodSpec::new("server-remote", 1)],
        services: vec![],
        agent: AgentOptions {
            cni: true,
            // Pods listed in a workloads file, without netns paths: CNI
            // enrolment with the file source (Kubernetes mode, the
            // default elsewhere, is tests/tests/kubernetes.rs and e2e).
            workloads_file: true,
            ..Default::default()
        },
    })
    .expect("building the virtual cluster (needs root)");
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    // Only meshed clients reach the server: a probe that succeeds went
    // through the mesh.
    let seen = c.agent_log(1).matches("policies loaded").count();
    c.write_policy("strict.yaml", STRICT).unwrap();
    wait_for("the STRICT policy", Duration::from_secs(5), || {
        c.agent_log(1).matches("policies loaded").count() > seen
    });
    c
}

fn remote(c: &Cluster) -> String {
    format!("{}:8080", c.pod("server-remote").ip4)
}

fn plugins(config: &Value) -> Vec<String> {
    config["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str().map(String::from))
        .collect()
}

fn enrolled_count(c: &Cluster, k: usize) -> u64 {
    c.map_sizes(k).unwrap()["NM_ENROLLED"].as_u64().unwrap_or(0)
}

#[test]
fn pods_created_through_the_cni_chain_are_meshed_before_they_run() {
    let mut c = cluster();

    // The agent installed the plugin into the node's primary conflist, after
    // the cluster's own plugin, and its binary into the CNI bin dir.
    wait_for(
        "nodemesh-cni in the conflist",
        Duration::from_secs(5),
        || plugins(&c.cni_config(0).unwrap()) == ["bridge", "nodemesh-cni"],
    );
    assert!(c.cni_bin_dir(0).join("nodemesh-cni").is_file());
    // The cluster's CNI rewrites its config: the entry is put back.
    c.write_cni_primary(0, &c.cni_primary_config(0)).unwrap();
    wait_for(
        "nodemesh-cni inserted again",
        Duration::from_secs(5),
        || plugins(&c.cni_config(0).unwrap()) == ["bridge", "nodemesh-cni"],
    );

    // A plaintext client outside the mesh is refused by STRICT, so a probe
    // that succeeds below went through the mesh.
    let before = enrolled_count(&c, 0);

    // ADD returns only once the pod is enrolled: the first connect after it
    // is meshed.
    let started = Instant::now();
    let cart = c
        .cni_add_pod(PodSpec::new("cart", 0), "sandbox-cart-1")
        .expect("ADD through the chain");
    let add_took = started.elapsed();
    let r = c.probe("cart", &remote(&c));
    assert_eq!(r["result"], "ok", "first connect after ADD: {r}");
    assert_eq!(enrolled_count(&c, 0), before + 1);
    let e = c.log_entries(1, |e| {
        e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/cart"
    });
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0]["src_addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", cart.ip4)),
        "{e:?}"
    );
    let log = c.agent_log(0);
    assert!(log.contains("CNI ADD answered: enrolled"), "{log}");
    eprintln!("ADD through bridge + host-local + nodemesh-cni took {add_took:?}");

    // CHECK agrees.
    c.cni_run("CHECK", "cart", "sandbox-cart-1")
        .expect("CHECK of an enrolled sandbox");

    // A pod out of the mesh (opted out by label) starts at once, outside
    // the mesh: STRICT refuses its plaintext.
    let started = Instant::now();
    c.cni_add_pod(PodSpec::new("visitor", 0).unenrolled(), "sandbox-visitor")
        .expect("ADD of a pod out of the mesh");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(enrolled_count(&c, 0), before + 1);
    let r = c.probe("visitor", &remote(&c));
    assert_ne!(
        r["result"], "ok",
        "a pod out of the mesh got through STRICT: {r}"
    );

    // The opted-out pod is recreated in the mesh (a new UID), and the ADD
    // of its new sandbox comes before the source has the new pod: the old
    // pod's opt-out does not answer for it; the ADD waits, and enrols it
    // once the source lists it.
    c.cni_run("DEL", "visitor", "sandbox-visitor").expect("DEL");
    let netns = c.pod("visitor").netns.clone();
    nodemesh_lab::sys::ip(&["netns", "del", &netns]).unwrap();
    nodemesh_lab::sys::ip(&["netns", "add", &netns]).unwrap();
    // As a runtime does (containerd runs the loopback plugin first).
    nodemesh_lab::sys::ip_in(&netns, &["link", "set", "lo", "up"]).unwrap();
    let mut visitor = c.pod("visitor").clone();
    visitor.spec.enrolled = true;
    visitor.spec.uid = Some(pod_uid("sandbox-visitor-2"));
    c.pods.insert("visitor".into(), visitor);
    let listed = c.workloads_yaml(0, &|p| p.spec.enrolled);
    let file = c.agents[0].workloads.clone();
    let source = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        let tmp = file.with_extension("late");
        std::fs::write(&tmp, listed).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    });
    let started = Instant::now();
    let result = c
        .cni_run("ADD", "visitor", "sandbox-visitor-2")
        .expect("ADD of the recreated pod, listed while it waits");
    source.join().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    c.pods.get_mut("visitor").unwrap().ip4 = result_ip4(&result).unwrap();
    c.rewrite_workloads().unwrap();
    assert_eq!(enrolled_count(&c, 0), before + 2);
    let r = c.probe("visitor", &remote(&c));
    assert_eq!(r["result"], "ok", "the recreated pod is meshed: {r}");
    c.cni_delete_pod("visitor", "sandbox-visitor-2")
        .expect("DEL");
    wait_for("visitor unenrolled", Duration::from_secs(5), || {
        enrolled_count(&c, 0) == before + 1
    });

    // A pod the workload source does not know (yet) is refused after the
    // agent's wait, and its sandbox torn down: the runtime retries.
    c.pods.insert(
        "ghost".into(),
        nodemesh_lab::cluster::PodInfo {
            spec: PodSpec::new("ghost", 0).via_cni(),
            netns: format!("{}-ghost", c.ns_node(0)),
            cgroup: c.cgroup_dir.join("node-0/pod-ghost"),
            ip4: std::net::Ipv4Addr::UNSPECIFIED,
            ip6: std::net::Ipv6Addr::UNSPECIFIED,
        },
    );
    nodemesh_lab::sys::ip(&["netns", "add", &c.pod("ghost").netns]).unwrap();
    let started = Instant::now();
    let err = c
        .cni_run("ADD", "ghost", "sandbox-ghost")
        .expect_err("ADD of a pod the agent does not know");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.plugin, "nodemesh-cni", "{err}");
    assert_eq!(err.error["code"], 11, "{err}");
    assert!(
        err.error["msg"]
            .as_str()
            .unwrap_or("")
            .contains("not in the workload source"),
        "{err}"
    );
    c.pods.remove("ghost");

    // The agent restarts: the pod it enrolled through CNI is enrolled again
    // from its saved record (no new ADD comes for a running pod).
    c.kill_agent(0).unwrap();
    // With the agent down, a new pod cannot start: ADD fails, at once.
    let started = Instant::now();
    let err = c
        .cni_add_pod(PodSpec::new("late", 0), "sandbox-late")
        .expect_err("ADD with the agent down");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains("\"code\":11") && text.contains("not running"),
        "{text}"
    );
    c.pods.remove("late");
    c.rewrite_workloads().unwrap();
    c.start_agent(0).unwrap();
    let r = c.probe("cart", &remote(&c));
    assert_eq!(r["result"], "ok", "after the agent's restart: {r}");
    assert!(
        c.agent_log(0)
            .contains("pod enrolled by CNI before the restart: enrolling it again"),
        "{}",
        c.agent_log(0)
    );

    // DEL unenrols; the pod recreated under the same name in a new sandbox
    // is enrolled again by its ADD.
    c.cni_delete_pod("cart", "sandbox-cart-1").expect("DEL");
    wait_for("cart unenrolled", Duration::from_secs(5), || {
        enrolled_count(&c, 0) == before
    });
    let cart = c
        .cni_add_pod(PodSpec::new("cart", 0), "sandbox-cart-2")
        .expect("ADD of the recreated pod");
    let r = c.probe("cart", &remote(&c));
    assert_eq!(r["result"], "ok", "recreated pod: {r}");
    assert_eq!(enrolled_count(&c, 0), before + 1);
    let e = c.log_entries(1, |e| {
        e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/cart"
            && e["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{}:", cart.ip4)))
    });
    assert!(!e.is_empty());

    // Something outside the agent removes the pod's capture link: the
    // periodic check against the kernel finds it and enrols the pod again.
    let cookie = netns_cookie_of(&c, "shop/cart");
    let pin = find_pin(&c.bpffs, &format!("capture-{cookie}")).expect("cart's capture link pin");
    std::fs::remove_file(&pin).unwrap();
    wait_for("the lost enrolment found", Duration::from_secs(15), || {
        c.agent_log(0)
            .contains("the kernel no longer has this pod's enrolment")
    });
    wait_for("the capture link restored", Duration::from_secs(5), || {
        pin.exists()
    });
    assert_eq!(c.probe("cart", &remote(&c))["result"], "ok");

    // A netns unmounted without a DEL (a runtime that crashed): the pod
    // leaves the mesh by itself.
    let netns = c.pod("cart").netns.clone();
    nodemesh_lab::sys::ip(&["netns", "del", &netns]).unwrap();
    wait_for(
        "cart unenrolled after its netns went",
        Duration::from_secs(5),
        || enrolled_count(&c, 0) == before,
    );
    c.pods.remove("cart");
    c.rewrite_workloads().unwrap();

    // Pods that run while the agent knows nothing of them (its saved state
    // lost): found by their processes' cgroup (the pod UID) and enrolled in
    // their netns, which must hold the pod's address.
    c.cni_add_pod(PodSpec::new("cart", 0), "sandbox-cart-3")
        .expect("ADD of cart again");
    c.spawn_in_pod("cart", &["serve", "--port", "8080"])
        .unwrap();
    c.kill_agent(0).unwrap();
    std::fs::remove_file(c.state_dir.join("agent-state-0/cni-pods.json")).unwrap();
    c.start_agent(0).unwrap();
    assert!(
        c.agent_log(0)
            .contains("running pod found by its processes: enrolling it in their netns"),
        "{}",
        c.agent_log(0)
    );
    assert_eq!(c.probe("cart", &remote(&c))["result"], "ok");
    assert_eq!(enrolled_count(&c, 0), before + 1);

    // Only root may enrol pods: with the socket's mode opened up, another
    // user's connection is closed unanswered (its peer credentials).
    use std::os::unix::fs::PermissionsExt as _;
    let socket = c.cni_socket(0);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dirs: Vec<_> = socket.ancestors().skip(1).map(|d| d.to_owned()).collect();
    let modes: Vec<_> = dirs
        .iter()
        .map(|d| std::fs::metadata(d).unwrap().permissions().mode())
        .collect();
    for d in &dirs {
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o001)).unwrap();
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"])
        .arg("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ntry:\n    s.sendall(b'{}')\n    print('closed' if s.recv(100) == b'' else 'answered')\nexcept OSError:\n    print('closed')")
        .arg(&socket)
        .output()
        .unwrap();
    for (d, mode) in dirs.iter().zip(modes) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the refusal logged", Duration::from_secs(3), || {
        c.agent_log(0)
            .contains("refusing a connection from uid 65534")
    });

    // Uninstalling takes the plugin out of the node's config first: left
    // there without an agent, it would keep every new pod from starting.
    c.stop_agent(0).unwrap();
    let out = std::process::Command::new(&c.agent_bin)
        .arg("uninstall")
        .arg("--config")
        .arg(&c.agents[0].config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(plugins(&c.cni_config(0).unwrap()), ["bridge"]);
    assert!(!c.cni_bin_dir(0).join("nodemesh-cni").exists());
}

/// The netns cookie the agent last logged enrolling `pod` with.
fn netns_cookie_of(c: &Cluster, pod: &str) -> u64 {
    let log = c.agent_log(0);
    let line = log
        .lines()
        .rev()
        .find(|l| {
            l.contains(" enrolled")
                && l.contains("netns_cookie=")
                && l.contains(&format!("pod={pod}"))
        })
        .unwrap_or_else(|| panic!("no enrolment of {pod} in the log"));
    line.split("netns_cookie=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cookie in {line}"))
}

fn find_pin(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir()
            && let Some(found) = find_pin(&p, name)
        {
            return Some(found);
        }
    }
    None
}
