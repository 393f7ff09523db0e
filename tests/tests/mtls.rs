//! Mutual TLS between nodes (HBONE) on the virtual cluster. Root; fails,
//! never skips, when the cluster cannot be built.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use nodemesh_lab::{Cluster, ClusterSpec, PodSpec, ServiceSpec, cluster::wait_for};
use serde_json::Value;

fn cluster(cert_lifetime_seconds: Option<u64>) -> Cluster {
    let mut spec = ClusterSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0),
            PodSpec::new("outsider", 0).unenrolled(),
            PodSpec::new("server-remote", 1),
        ],
        services: vec![ServiceSpec::new("web", 80, 8080, &["server-remote"])],
        agent: Default::default(),
    };
    spec.agent.cert_lifetime_seconds = cert_lifetime_seconds;
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    c
}

/// A slow transfer (64 KiB per `pace_ms`) from the client to the remote
/// server, as a child process.
fn paced_send(c: &Cluster, bytes: u64, pace_ms: u64) -> std::process::Child {
    c.pod_command(
        "client",
        &[
            "client",
            "send",
            "--to",
            &remote(c),
            "--bytes",
            &bytes.to_string(),
            "--pace-ms",
            &pace_ms.to_string(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn remote(c: &Cluster) -> String {
    format!("{}:8080", c.pod("server-remote").ip4)
}

fn probe(c: &Cluster, pod: &str, to: &str) -> Value {
    c.probe(pod, to)
}

/// Captures on the node-to-node link while `pod` sends a canary.
fn capture_while_sending(c: &mut Cluster, pod: &str, canary: &str) -> Value {
    let out = c
        .spawn_in_fabric(&[
            "capture",
            "--secs",
            "3",
            "--canary",
            canary,
            "--ports",
            "15008,8080",
        ])
        .unwrap();
    let to = remote(c);
    let r = c
        .run_in_pod(
            pod,
            &[
                "client", "canary", "--to", &to, "--text", canary, "--repeat", "2000",
            ],
        )
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let mut result = Value::Null;
    wait_for("the capture result", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        match text.lines().last().map(serde_json::from_str::<Value>) {
            Some(Ok(v)) if v.get("frames").is_some() => {
                result = v;
                true
            }
            _ => false,
        }
    });
    result
}

#[test]
fn the_node_link_carries_only_tls_for_meshed_pods() {
    let mut c = cluster(None);
    let canary = "NODEMESH-PLAINTEXT-CANARY-7f3a";
    let meshed = capture_while_sending(&mut c, "client", canary);
    assert_eq!(
        meshed["canary_frames"], 0,
        "plaintext crossed the link: {meshed}"
    );
    assert!(
        meshed["tcp_by_port"]["15008"].as_u64() > Some(10),
        "{meshed}"
    );
    assert_eq!(meshed["tcp_by_port"]["8080"], 0, "{meshed}");
    // The control: the same bytes from a pod outside the mesh are visible,
    // so the capture does see what crosses the link.
    let plain = capture_while_sending(&mut c, "outsider", canary);
    assert!(plain["canary_frames"].as_u64() > Some(0), "{plain}");
    assert!(plain["tcp_by_port"]["8080"].as_u64() > Some(0), "{plain}");
}

fn hbone_probe(c: &Cluster, mode: &str) -> Value {
    c.hbone_probe("outsider", "server-remote", mode, &remote(c))
}

/// A peer offering only the post-quantum key exchange (ztunnel with
/// `COMPLIANCE_POLICY=pqc`) gets HBONE served; the agent's own pool agrees
/// on it too (its client offers it first).
#[test]
fn a_post_quantum_only_peer_is_served() {
    let c = cluster(None);
    let r = hbone_probe(&c, "connect-pqc-only");
    assert_eq!(r["status"], "200", "{r}");
    assert_eq!(r["key_exchange"], "X25519MLKEM768", "{r}");
    // The server's suite preference holds against a client listing
    // AES-256 first.
    assert_eq!(r["suite"], "TLS13_AES_128_GCM_SHA256", "{r}");
    assert_eq!(probe(&c, "client", &remote(&c))["result"], "ok");
    let log = c.agent_log(0);
    let opened = log
        .lines()
        .find(|l| l.contains("HBONE connection opened"))
        .expect("node 0's agent logged its HBONE connection");
    assert!(
        opened.contains("X25519MLKEM768") && opened.contains("TLS13_AES_128_GCM_SHA256"),
        "{opened}"
    );
}

#[test]
fn bad_peers_on_15008_are_refused_with_the_reason_logged() {
    let c = cluster(None);
    for (mode, reason) in [
        ("plaintext", "TLS handshake refused"),
        ("http1", "TLS handshake refused"),
        ("no-cert", "peer sent no certificates"),
        ("other-ca", "BadSignature"),
    ] {
        let before = c.agent_log(1).matches(reason).count();
        let r = hbone_probe(&c, mode);
        eprintln!("{mode}: {r}");
        assert_ne!(
            r["ended"], "open",
            "{mode}: the agent kept the connection: {r}"
        );
        wait_for(
            &format!("{mode}: '{reason}' in the log"),
            Duration::from_secs(5),
            || c.agent_log(1).matches(reason).count() > before,
        );
        // Nothing else was harmed.
        assert_eq!(
            probe(&c, "client", &remote(&c))["result"],
            "ok",
            "after {mode}"
        );
    }
}

#[test]
fn http2_abuse_leaves_memory_bounded_and_others_served() {
    let c = cluster(None);
    assert_eq!(probe(&c, "client", &remote(&c))["result"], "ok");
    let rss_before = c.agent_rss_kib(1);
    for mode in ["rapid-reset", "continuation-flood", "big-header"] {
        let r = hbone_probe(&c, mode);
        eprintln!("{mode}: {r}");
        assert_ne!(r["ended"], "open", "{mode}: {r}");
        assert_eq!(
            probe(&c, "client", &remote(&c))["result"],
            "ok",
            "after {mode}: {r}"
        );
    }
    let rss_after = c.agent_rss_kib(1);
    eprintln!("agent RSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "agent RSS grew from {rss_before} to {rss_after} KiB"
    );
}

#[test]
fn certificate_rotation_does_not_break_a_long_transfer() {
    // 2 s certificates renew every second; the transfer takes over 4 s.
    let c = cluster(Some(2));
    let to = remote(&c);
    let child = paced_send(&c, 48 << 20, 6);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["seconds"].as_f64() > Some(4.0),
        "the transfer was too short to span a renewal: {r}"
    );
    for k in [0, 1] {
        let renewed = c.agent_log(k).matches("certificate renewed").count();
        assert!(renewed >= 2, "agent {k} renewed {renewed} times");
    }
    // New connections handshake with the new certificates.
    assert_eq!(probe(&c, "client", &to)["result"], "ok");
}

#[test]
fn trust_bundle_rotation_with_overlapping_roots_keeps_traffic_flowing() {
    let mut c = cluster(None);
    let to = remote(&c);
    assert_eq!(probe(&c, "client", &to)["result"], "ok");
    // A new root, trusted next to the old one by every agent.
    let new_cert = c.state_dir.join("ca-new.pem");
    let new_key = c.state_dir.join("ca-new.key");
    let out = std::process::Command::new(&c.agent_bin)
        .args(["create-ca", "--cert"])
        .arg(&new_cert)
        .arg("--key")
        .arg(&new_key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (old_cert, _) = c.ca_files();
    let bundle = [
        std::fs::read_to_string(&old_cert).unwrap(),
        std::fs::read_to_string(&new_cert).unwrap(),
    ]
    .concat();
    std::fs::write(c.trust_bundle_file(), bundle).unwrap();
    for k in [0, 1] {
        wait_for("the bundle reload", Duration::from_secs(5), || {
            c.agent_log(k).contains("trust bundle reloaded roots=2")
        });
    }
    // Node 1 moves to the new CA; node 0 still issues from the old one.
    let cfg = std::fs::read_to_string(&c.agents[1].config).unwrap();
    let cfg = cfg
        .replace(old_cert.to_str().unwrap(), new_cert.to_str().unwrap())
        .replace(c.ca_files().1.to_str().unwrap(), new_key.to_str().unwrap());
    c.stop_agent(1).unwrap();
    std::fs::write(&c.agents[1].config, cfg).unwrap();
    c.start_agent(1).unwrap();
    assert_eq!(probe(&c, "client", &to)["result"], "ok");
    // A bundle that does not parse is refused; the roots in force stay.
    std::fs::write(c.trust_bundle_file(), "not a certificate").unwrap();
    wait_for("the rejection", Duration::from_secs(5), || {
        c.agent_log(0).contains("trust bundle rejected")
    });
    assert_eq!(probe(&c, "client", &to)["result"], "ok");
}

#[test]
fn a_peer_agent_killed_mid_stream_resets_the_client() {
    let mut c = cluster(None);
    let started = Instant::now();
    let mut child = paced_send(&c, 64 << 20, 10);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the transfer ended before the kill"
    );
    c.kill_agent(1).unwrap();
    let killed_at = Instant::now();
    // The client must see a failure soon, not hang until its pacing ends.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "the client hangs"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("client after the kill ({:?}): {err}", killed_at.elapsed());
    assert!(!status.success(), "the transfer claims success");
    assert!(
        err.contains("reset") || err.contains("Broken pipe"),
        "not a reset: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_draining_destination_sends_goaway_instead_of_waiting_for_idle_peers() {
    let mut spec = ClusterSpec {
        nodes: 2,
        pods: vec![PodSpec::new("client", 0), PodSpec::new("server-remote", 1)],
        services: vec![],
        agent: Default::default(),
    };
    spec.agent.drain_timeout_seconds = Some(30);
    let mut c = Cluster::start(spec).unwrap();
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    // Leaves a pooled, idle HBONE connection from node 0 to node 1.
    assert_eq!(probe(&c, "client", &remote(&c))["result"], "ok");
    let started = Instant::now();
    let status = c.stop_agent(1).unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the drain waited {:?} for an idle pooled connection",
        started.elapsed()
    );
}
