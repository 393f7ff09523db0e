//! `cargo xtask bench`: direct TCP vs through the agent on the virtual
//! cluster, same-node and cross-node, sockmap fast path off and on, and
//! egress to third parties (`egress`). Prints ratios to direct and writes
//! JSON for later comparison.
use std::{fs, path::Path, time::Duration};

use anyhow::Result;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterSpec, PodSpec};

mod egress;

fn spec() -> ClusterSpec {
    ClusterSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0),
            PodSpec::new("direct", 0).unenrolled(),
            PodSpec::new("server-local", 0),
            PodSpec::new("server-remote", 1),
            // The baseline's servers: outside the mesh, so nothing captures
            // the direct client's connections to them.
            PodSpec::new("direct-server-local", 0).unenrolled(),
            PodSpec::new("direct-server-remote", 1).unenrolled(),
        ],
        services: vec![],
        // Workloads files: the data path is the same in Kubernetes mode, and
        // runs stay comparable with earlier commits' (memory with a large
        // API state is measured in Kubernetes mode, see `api_memory`).
        agent: crate::AgentOptions {
            workloads_file: true,
            ..Default::default()
        },
    }
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // utime, stime are fields 14, 15 (1-based) = 11, 12 after ')'.
    (ticks(11) + ticks(12)) / hz
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Starts a new peak (`VmHWM`) at the current resident size, so a peak
/// measures what came after, not the start-up.
fn reset_peak_rss(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// How long an agent is given after start (or a burst) to return freed
/// memory (jemalloc purges after its 1 s decay).
const SETTLE: Duration = Duration::from_secs(3);

/// What [`Runner::suite`] measures: bulk with one and eight streams, 64 B
/// request/response, new connections.
const ALL_TESTS: [&str; 4] = ["stream_1", "stream_8", "rr", "crr"];

struct Runner<'a> {
    c: &'a Cluster,
    secs: f64,
}

impl Runner<'_> {
    fn client(&self, pod: &str, args: &[&str]) -> Result<Value> {
        self.c.run_in_pod(pod, args)
    }

    /// All four measurements from `pod` to `to`, with the CPU use of the
    /// source's agent and, across nodes, the destination's: per GiB for
    /// the streams, per request or connection (µs) for the others.
    fn suite(
        &self,
        pod: &str,
        to: &str,
        agent_pid: Option<u32>,
        dst_agent_pid: Option<u32>,
    ) -> Result<Value> {
        self.suite_of(pod, to, &[], &ALL_TESTS, agent_pid, dst_agent_pid)
    }

    /// [`Self::suite`] with more client options (`--tls-ca`, `--sni`) and
    /// only the `tests` named (of [`ALL_TESTS`]).
    fn suite_of(
        &self,
        pod: &str,
        to: &str,
        client_args: &[&str],
        tests: &[&str],
        agent_pid: Option<u32>,
        dst_agent_pid: Option<u32>,
    ) -> Result<Value> {
        let secs = self.secs.to_string();
        let mut out = serde_json::Map::new();
        for &name in tests {
            let args: &[&str] = match name {
                "stream_1" => &["stream", "--streams", "1"],
                "stream_8" => &["stream", "--streams", "8"],
                "rr" => &["rr"],
                "crr" => &["crr"],
                other => anyhow::bail!("no bench test {other}"),
            };
            let cpu0 = agent_pid.map(cpu_seconds);
            let dst_cpu0 = dst_agent_pid.map(cpu_seconds);
            let mut argv = vec!["bench-client"];
            argv.extend(args);
            argv.extend(["--to", to, "--secs", &secs]);
            argv.extend(client_args);
            if name == "crr" {
                argv.extend(["--parallel", "16"]);
            }
            let mut v = self.client(pod, &argv)?;
            // The work done: GiB for streams, operations otherwise.
            let (work, unit, scale) = match name {
                "rr" => (v["requests"].as_f64(), "us_per_request", 1e6),
                "crr" => (v["connections"].as_f64(), "us_per_connection", 1e6),
                _ => (
                    v["bytes"].as_f64().map(|b| b / (1u64 << 30) as f64),
                    "s_per_gib",
                    1.0,
                ),
            };
            let work = work.unwrap_or(0.0);
            let per = |cpu: f64| if work > 0.0 { cpu * scale / work } else { 0.0 };
            if let (Some(pid), Some(c0)) = (agent_pid, cpu0) {
                v[format!("agent_cpu_{unit}")] = json!(per(cpu_seconds(pid) - c0));
            }
            if let (Some(pid), Some(c0)) = (dst_agent_pid, dst_cpu0) {
                v[format!("dst_agent_cpu_{unit}")] = json!(per(cpu_seconds(pid) - c0));
            }
            out.insert(name.into(), v);
        }
        Ok(Value::Object(out))
    }
}

/// The agent's own TLS in memory (no sockets, one thread): the cost of a
/// full mutual-TLS handshake per key exchange and of moving bulk data per
/// suite — the agent's real configurations with other providers' groups
/// or suites. What the crypto costs of the cross-node figures.
fn tls_bench() -> Result<Value> {
    use std::{sync::Arc, time::Instant};

    use nodemesh_agent::{
        identity::{FileCa, Identity, ca::new_root},
        tls,
    };
    use rustls::{
        ClientConnection, ServerConnection,
        crypto::{CryptoProvider, aws_lc_rs, aws_lc_rs::kx_group},
    };

    let (cert_pem, key_pem) = new_root("cluster.local")?;
    let ca = FileCa::from_pem(
        &cert_pem,
        &key_pem,
        Path::new("ca.pem"),
        Path::new("ca.key"),
        Duration::from_secs(86400),
    )?;
    let bundle = Arc::new(tls::TrustBundle::new(&[ca.root().clone()])?);
    let client_id = Identity::new("cluster.local", "shop", "cart");
    let server_id = Identity::new("cluster.local", "shop", "orders");
    let client_cert = ca.sign(&client_id)?;
    let server_cert = ca.sign(&server_id)?;
    // Both sides with the agent's provider changed by `f`.
    type Configs = (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>);
    let with = |f: &dyn Fn(&mut CryptoProvider)| -> Result<Configs> {
        let mut p = (*tls::provider()).clone();
        f(&mut p);
        let p = Arc::new(p);
        let client =
            tls::client_config_with(p.clone(), &client_cert, bundle.clone(), server_id.clone())?;
        let server = tls::server_config_with(p, &server_cert, bundle.clone())?;
        Ok((Arc::new(client), Arc::new(server)))
    };
    let connect = |(client, server): &Configs| -> Result<(ClientConnection, ServerConnection)> {
        let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut c = ClientConnection::new(client.clone(), name)?;
        let mut s = ServerConnection::new(server.clone())?;
        let mut buf = Vec::new();
        while c.is_handshaking() || s.is_handshaking() {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf)?;
            }
            let mut r = &buf[..];
            while !r.is_empty() {
                s.read_tls(&mut r)?;
                s.process_new_packets()?;
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf)?;
            }
            let mut r = &buf[..];
            while !r.is_empty() {
                c.read_tls(&mut r)?;
                c.process_new_packets()?;
            }
        }
        Ok((c, s))
    };
    let mut out = serde_json::Map::new();
    // Handshakes the same way: the two key exchanges take turns.
    let groups = [
        ("handshake_x25519mlkem768", with(&|_| ())?),
        (
            "handshake_x25519",
            with(&|p| p.kx_groups = vec![kx_group::X25519])?,
        ),
    ];
    let (per_turn, turns) = (20, 10);
    let mut elapsed = [0f64; 2];
    for _ in 0..turns {
        for (k, (_, client)) in groups.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..per_turn {
                connect(client)?;
            }
            elapsed[k] += t.elapsed().as_secs_f64();
        }
    }
    for (k, (name, client)) in groups.iter().enumerate() {
        let (c, _) = connect(client)?;
        let group = c
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()));
        let us = elapsed[k] * 1e6 / (per_turn * turns) as f64;
        out.insert(
            (*name).into(),
            json!({"group": group, "us_per_handshake": us}),
        );
    }
    // Bulk: client to server in 64 KiB writes, both sides' CPU: the
    // agent's two suites, and AES-128 of aws-lc-rs (the provider the agent
    // takes all but its suites from) for comparison. They take turns,
    // 32 MiB at a time, so a machine whose speed drifts (this one's does)
    // slows all alike.
    let ours = |id: rustls::CipherSuite| {
        tls::provider()
            .cipher_suites
            .iter()
            .find(|s| s.suite() == id)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("the agent does not offer {id:?}"))
    };
    let suites = [
        (
            "bulk_aes_128_gcm",
            ours(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)?,
        ),
        (
            "bulk_aes_256_gcm",
            ours(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)?,
        ),
        (
            "bulk_aes_128_gcm_aws_lc_rs",
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ),
    ];
    let mut pairs = Vec::new();
    for (_, suite) in suites {
        pairs.push(connect(&with(&|p| p.cipher_suites = vec![suite])?)?);
    }
    let chunk = vec![0x5au8; 64 * 1024];
    let mut wire = Vec::with_capacity(128 * 1024);
    let mut plain = vec![0u8; 128 * 1024];
    let (turn, turns): (usize, usize) = (32 << 20, 16);
    let mut elapsed = [0f64; 3];
    for _ in 0..turns {
        for (k, (c, s)) in pairs.iter_mut().enumerate() {
            use std::io::{Read as _, Write as _};
            let t = Instant::now();
            let mut moved = 0;
            while moved < turn {
                c.writer().write_all(&chunk)?;
                wire.clear();
                while c.wants_write() {
                    c.write_tls(&mut wire)?;
                }
                let mut r = &wire[..];
                while !r.is_empty() {
                    s.read_tls(&mut r)?;
                    s.process_new_packets()?;
                    loop {
                        match s.reader().read(&mut plain) {
                            Ok(0) => break,
                            Ok(n) => moved += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            elapsed[k] += t.elapsed().as_secs_f64();
        }
    }
    let gib = (turn * turns) as f64 / (1u64 << 30) as f64;
    for (k, (name, _)) in suites.iter().enumerate() {
        out.insert(
            (*name).into(),
            json!({"s_per_gib_both_sides": elapsed[k] / gib}),
        );
    }
    Ok(Value::Object(out))
}

/// iperf3's and sockperf's servers, for the standard-tool runs.
const IPERF3_PORT: &str = "5201";
const SOCKPERF_PORT: &str = "11111";

fn start_standard_servers(c: &mut Cluster, pod: &str) -> Result<()> {
    let ip = c.pod(pod).ip4.to_string();
    c.spawn_program_in_pod(pod, "iperf3", &["-s", "-p", IPERF3_PORT])?;
    c.spawn_program_in_pod(
        pod,
        "sockperf",
        &["server", "--tcp", "-i", &ip, "-p", SOCKPERF_PORT],
    )?;
    // Listening before any client runs: both ports in the pod's table.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listening = tool_output(c, pod, "ss", &["-Hltn"])?;
        let has = |port: &str| {
            listening.lines().any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
        };
        if has(IPERF3_PORT) && has(SOCKPERF_PORT) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "iperf3 and sockperf were not listening in {pod} after 10 s:\n{listening}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a standard tool in a pod; its stdout, or why it failed.
fn tool_output(c: &Cluster, pod: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = c.pod_program(pod, program, args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Debian's iperf3 (one stream, then eight) and sockperf (64 B TCP
/// ping-pong, full round trips) from `pod` to `server_ip`: figures other
/// meshes publish with the same tools.
fn standard_tools(c: &Cluster, pod: &str, server_ip: &str, secs: f64) -> Result<Value> {
    // Whole seconds: both tools take no fractions.
    let t = (secs.ceil() as u64).max(1).to_string();
    let mut out = serde_json::Map::new();
    for (name, streams) in [("iperf3_1", "1"), ("iperf3_8", "8")] {
        let text = tool_output(
            c,
            pod,
            "iperf3",
            &[
                "-c",
                server_ip,
                "-p",
                IPERF3_PORT,
                "-t",
                &t,
                "-P",
                streams,
                "-J",
            ],
        )?;
        let v: Value = serde_json::from_str(&text)?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("iperf3 printed no end.sum_received: {text}"))?;
        out.insert(name.into(), json!({"gbit_per_s": bps / 1e9}));
    }
    let text = tool_output(
        c,
        pod,
        "sockperf",
        &[
            "ping-pong",
            "--tcp",
            "-i",
            server_ip,
            "-p",
            SOCKPERF_PORT,
            "-m",
            "64",
            "-t",
            &t,
            "--full-rtt",
        ],
    )?;
    out.insert("sockperf_pp".into(), parse_sockperf(&text)?);
    Ok(Value::Object(out))
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// sockperf's `---> percentile 50.000 =   25.967` lines, µs.
fn parse_sockperf(text: &str) -> Result<Value> {
    let pct = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| anyhow::anyhow!("sockperf printed no {p} percentile: {text}"))
    };
    Ok(json!({"p50_us": pct("50.000")?, "p99_us": pct("99.000")?}))
}

/// Policy decision time with 10,000 policies, and the time to load them.
fn policy_bench() -> Result<Value> {
    use std::{collections::BTreeMap, time::Instant};

    use nodemesh_agent::{identity::Identity, policy};
    let dir = std::env::temp_dir().join(format!("nodemesh-policy-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let (namespaces, apps, total) = (100usize, 20usize, 10_000usize);
    for file in 0..10 {
        let mut text = String::new();
        for i in (file * total / 10)..((file + 1) * total / 10) {
            let (ns, app) = (i % namespaces, (i / namespaces) % apps);
            let action = if i % 7 == 0 { "DENY" } else { "ALLOW" };
            text += &format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: ns{ns}}}\nspec:\n  selector: {{matchLabels: {{app: app{app}}}}}\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/ns{}/sa/sa{}\"], ipBlocks: [10.{}.0.0/16]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n",
                (i + 1) % namespaces,
                i % 13,
                i % 250,
                8000 + i % 50
            );
        }
        fs::write(dir.join(format!("policies-{file}.yaml")), text)?;
    }
    let started = Instant::now();
    let loaded = policy::load_dir(&dir, policy::DEFAULT_ROOT_NAMESPACE);
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = fs::remove_dir_all(&dir);
    let loaded = loaded?;
    let requests = 200_000u32;
    let ids: Vec<Identity> = (0..13)
        .map(|i| Identity::new("cluster.local", "ns1", &format!("sa{i}")))
        .collect();
    let labels: Vec<BTreeMap<String, String>> = (0..apps)
        .map(|a| [("app".to_string(), format!("app{a}"))].into())
        .collect();
    let namespace_names: Vec<String> = (0..namespaces).map(|n| format!("ns{n}")).collect();
    let mut allowed = 0u32;
    let started = Instant::now();
    for i in 0..requests as usize {
        let r = policy::Request {
            src_identity: Some(&ids[i % ids.len()]),
            src_ip: std::net::IpAddr::from([10, (i % 250) as u8, 1, 1]),
            dst_namespace: &namespace_names[i % namespaces],
            dst_labels: &labels[(i / 7) % apps],
            dst_ip: std::net::IpAddr::from([10, 244, 1, 10]),
            dst_port: 8000 + (i % 50) as u16,
        };
        allowed += u32::from(loaded.authorization.decide(&r).allowed());
    }
    let decide_ns = started.elapsed().as_nanos() as f64 / f64::from(requests);
    Ok(json!({
        "policies": loaded.authorization.len(),
        "load_ms": load_ms,
        "decision_ns": decide_ns,
        "allowed_fraction": f64::from(allowed) / f64::from(requests),
    }))
}

/// Agent memory under abuse, the hardening review's scenario: rounds of a
/// plaintext flood from outside the mesh (3,000 held connections, most shed
/// per source) and 1,000 concurrent HBONE streams into node 1, then quiet.
/// Peak and resident memory 10 s after, of node 1's agent.
fn abuse(c: &Cluster, rounds: usize) -> Result<Value> {
    let pid = c
        .agent_pid(1)
        .ok_or_else(|| anyhow::anyhow!("node 1's agent is not running"))?;
    // Settled after start-up (freed start-up memory returned).
    std::thread::sleep(SETTLE);
    let before = status_kib(pid, "VmRSS:");
    reset_peak_rss(pid);
    let to = format!("{}:8080", c.pod("server-remote").ip4);
    for round in 0..rounds {
        eprintln!("bench: abuse round {} of {rounds} ...", round + 1);
        let mut flood = c
            .pod_command(
                "direct",
                &["client", "hold", "--to", &to, "--n", "3000", "--secs", "3"],
            )
            .stdout(std::process::Stdio::null())
            .spawn()?;
        c.run_in_pod(
            "client",
            &["client", "concurrent", "--to", &to, "--n", "1000"],
        )?;
        c.run_in_pod(
            "client",
            &[
                "client",
                "many",
                "--to",
                &to,
                "--n",
                "3000",
                "--parallel",
                "16",
            ],
        )?;
        flood.wait()?;
    }
    let peak = status_kib(pid, "VmHWM:");
    std::thread::sleep(Duration::from_secs(10));
    Ok(json!({
        "rounds": rounds,
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "rss_after_kib": status_kib(pid, "VmRSS:"),
    }))
}

/// Pods and services of the large cluster `api_memory` puts in the API.
const API_PODS: usize = 10_000;
const API_SERVICES: usize = 2_000;
const API_NODES: usize = 100;
const ENDPOINTS_PER_SERVICE: usize = 5;

/// The agent's memory with a large cluster in the Kubernetes API (the
/// lab's fake): 10,000 pods on 100 other nodes and 2,000 services of 5
/// endpoints each, added to a running one-node cluster. Its RSS before,
/// once the store holds them all, and the peak while they arrived.
fn api_memory() -> Result<Value> {
    let c = Cluster::start(ClusterSpec {
        nodes: 1,
        pods: vec![PodSpec::new("client", 0)],
        services: vec![],
        agent: Default::default(),
    })?;
    let pid = c.agent_pid(0).ok_or_else(|| anyhow::anyhow!("no agent"))?;
    std::thread::sleep(SETTLE);
    let before = status_kib(pid, "VmRSS:");
    reset_peak_rss(pid);
    let api = c.api();
    let labels = |app: String| [("app".to_owned(), app)].into_iter().collect();
    let started = std::time::Instant::now();
    let pod_ip = |i: usize| -> std::net::IpAddr {
        std::net::Ipv4Addr::new(10, 128 + (i >> 16) as u8, (i >> 8) as u8, i as u8).into()
    };
    for n in 0..API_NODES {
        api.apply(&crate::apiserver::node(
            &format!("big-{n}"),
            &Default::default(),
        ))?;
    }
    for ns in 0..10 {
        api.apply(&crate::apiserver::namespace(
            &format!("big-{ns}"),
            &[("nodemesh.dev/mesh".to_owned(), "enabled".to_owned())]
                .into_iter()
                .collect(),
        ))?;
    }
    for i in 0..API_PODS {
        let app = format!("app-{}", i / ENDPOINTS_PER_SERVICE);
        api.apply(&crate::apiserver::pod(
            &format!("{app}-{i}"),
            &format!("big-{}", i % 10),
            &format!("00000000-0000-4000-8000-{i:012}"),
            &format!("big-{}", i % API_NODES),
            &app,
            &labels(app.clone()),
            &[pod_ip(i)],
            "Running",
        ))?;
    }
    for s in 0..API_SERVICES {
        let app = format!("app-{s}");
        let ns = format!("big-{}", s % 10);
        let vip: std::net::IpAddr = std::net::Ipv4Addr::new(10, 97, (s >> 8) as u8, s as u8).into();
        api.apply(&crate::apiserver::service(
            &app,
            &ns,
            &[vip],
            &[("http".to_owned(), 80, 8080)],
            &labels(app.clone()),
        ))?;
        let endpoints: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                let i = s * ENDPOINTS_PER_SERVICE + e;
                (
                    pod_ip(i),
                    format!("{app}-{i}"),
                    format!("big-{}", i % API_NODES),
                    true,
                )
            })
            .collect();
        api.apply(&crate::apiserver::endpoint_slice(
            &app,
            &ns,
            "IPv4",
            &endpoints,
            &[("http".to_owned(), 8080)],
        ))?;
    }
    // Every pod and service in the agent's store.
    let known = |metric: &str| -> f64 {
        c.admin_get(0, "/metrics", None)
            .ok()
            .and_then(|r| {
                r.body
                    .lines()
                    .find(|l| l.starts_with(metric))
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while known("nodemesh_workload_pods ") < (API_PODS + 1) as f64
        || known("nodemesh_workload_services ") < API_SERVICES as f64
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not take in the large cluster in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let synced_s = started.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    Ok(json!({
        "pods": API_PODS,
        "services": API_SERVICES,
        "rss_before_kib": before,
        "rss_peak_kib": status_kib(pid, "VmHWM:"),
        "rss_after_kib": status_kib(pid, "VmRSS:"),
        "seconds_to_take_in": synced_s,
    }))
}

/// What `run` measures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    All,
    /// Only the abuse phase (agent memory), printed as JSON.
    Abuse,
    /// Only the agent's memory with a large cluster in the API, as JSON.
    ApiMemory,
    /// Only the cross-node suites without sockmap, as a table and JSON.
    CrossNode,
    /// Only the agent's TLS in memory, as JSON.
    Tls,
    /// Only egress to third parties (`egress`), as a table and JSON.
    Egress,
}

pub fn run(secs: f64, out: &Path, part: Part, agent_config: &str) -> Result<()> {
    if part == Part::Tls {
        println!("{}", tls_bench()?);
        return Ok(());
    }
    if part == Part::ApiMemory {
        println!("{}", api_memory()?);
        return Ok(());
    }
    if part == Part::Abuse {
        let mut c = Cluster::start(spec())?;
        c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])?;
        let a = abuse(&c, 5)?;
        println!("{a}");
        return Ok(());
    }
    if part == Part::Egress {
        eprintln!("bench: registry and SNI costs in memory ...");
        let costs = egress::costs()?;
        let results = egress::run(secs, agent_config)?;
        let summary = json!({
            "egress_costs": costs,
            "seconds_per_measurement": secs,
            "results": results,
        });
        egress::print_table(&summary);
        return write_summary(out, &summary);
    }
    let all = part == Part::All;
    let (policy, api_memory) = if all {
        eprintln!("bench: policy decisions ...");
        let policy = policy_bench()?;
        eprintln!("bench: agent memory with 10,000 pods and 2,000 services in the API ...");
        (policy, api_memory()?)
    } else {
        (Value::Null, Value::Null)
    };
    eprintln!("bench: TLS in memory ...");
    let tls = tls_bench()?;
    // Egress on a cluster of its own, before the main one starts.
    let (egress_costs, egress_results) = if all {
        eprintln!("bench: registry and SNI costs in memory ...");
        let costs = egress::costs()?;
        (costs, egress::run(secs, agent_config)?)
    } else {
        (Value::Null, Default::default())
    };
    let mut spec = spec();
    if !agent_config.is_empty() {
        spec.agent.extra = format!("{agent_config}\n");
    }
    let mut c = Cluster::start(spec)?;
    c.spawn_in_pod("server-local", &["serve", "--port", "8080"])?;
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])?;
    c.spawn_in_pod("direct-server-local", &["serve", "--port", "8080"])?;
    c.spawn_in_pod("direct-server-remote", &["serve", "--port", "8080"])?;
    start_standard_servers(&mut c, "server-remote")?;
    start_standard_servers(&mut c, "direct-server-remote")?;
    let at = |pod: &str| format!("{}:8080", c.pod(pod).ip4);
    // (placement, meshed server, baseline server, the meshed server's node)
    let targets = [
        (
            "same_node",
            at("server-local"),
            at("direct-server-local"),
            0,
        ),
        (
            "cross_node",
            at("server-remote"),
            at("direct-server-remote"),
            1,
        ),
    ];
    let mut results = egress_results;
    std::thread::sleep(SETTLE);
    let idle_rss: Vec<u64> = (0..2)
        .map(|k| c.agent_pid(k).map(|p| status_kib(p, "VmRSS:")).unwrap_or(0))
        .collect();
    for pid in (0..2).filter_map(|k| c.agent_pid(k)) {
        reset_peak_rss(pid);
    }
    // Node 0's agent is restarted for the sockmap runs: its peak before.
    let mut peak0_before_restart = 0;
    let sockmap_runs: &[bool] = if all { &[false, true] } else { &[false] };
    for &sockmap in sockmap_runs {
        if sockmap {
            peak0_before_restart = c.agent_pid(0).map_or(0, |p| status_kib(p, "VmHWM:"));
            c.spec.agent.sockmap = true;
            c.stop_agent(0)?;
            c.rewrite_agent_config(0)?;
            c.start_agent(0)?;
            std::thread::sleep(SETTLE);
            if let Some(pid) = c.agent_pid(0) {
                reset_peak_rss(pid);
            }
        }
        let runner = Runner { c: &c, secs };
        for (placement, to, direct_to, server_node) in &targets {
            if !all && *placement != "cross_node" {
                continue;
            }
            eprintln!("bench: {placement} sockmap={sockmap} ...");
            if !sockmap {
                let mut direct = runner.suite("direct", direct_to, None, None)?;
                if *placement == "cross_node" {
                    let ip = c.pod("direct-server-remote").ip4.to_string();
                    merge(&mut direct, standard_tools(&c, "direct", &ip, secs)?);
                }
                results.insert(format!("{placement}/direct"), direct);
                // A client outside the mesh to a meshed server: the server's
                // agent captures it (sk_lookup) and proxies it in the pod.
                let captured = runner.suite("direct", to, c.agent_pid(*server_node), None)?;
                results.insert(format!("{placement}/captured"), captured);
            }
            let pid = c.agent_pid(0);
            let dst_pid = if *placement == "cross_node" {
                c.agent_pid(1)
            } else {
                None
            };
            let mut meshed = runner.suite("client", to, pid, dst_pid)?;
            if *placement == "cross_node" && !sockmap {
                let ip = c.pod("server-remote").ip4.to_string();
                merge(&mut meshed, standard_tools(&c, "client", &ip, secs)?);
            }
            let key = if sockmap { "meshed_sockmap" } else { "meshed" };
            results.insert(format!("{placement}/{key}"), meshed);
        }
    }
    // Peaks under load, start-ups left out.
    let peak_rss: Vec<u64> = (0..2)
        .map(|k| c.agent_pid(k).map(|p| status_kib(p, "VmHWM:")).unwrap_or(0))
        .collect();
    let peak_rss = vec![peak_rss[0].max(peak0_before_restart), peak_rss[1]];
    let abuse = if all { abuse(&c, 5)? } else { Value::Null };
    let summary = json!({
        "policy": policy,
        "tls": tls,
        "agent_rss_idle_kib": idle_rss,
        "agent_rss_peak_kib": peak_rss,
        "abuse": abuse,
        "api_memory": api_memory,
        "egress_costs": egress_costs,
        "seconds_per_measurement": secs,
        "results": results,
    });
    drop(c);
    print_table(&summary);
    egress::print_table(&summary);
    write_summary(out, &summary)
}

fn write_summary(out: &Path, summary: &Value) -> Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(out, serde_json::to_string_pretty(summary)?)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}

fn print_table(s: &Value) {
    let r = &s["results"];
    let metrics = [
        ("throughput 1 stream (Gbit/s)", "stream_1", "gbit_per_s"),
        ("throughput 8 streams (Gbit/s)", "stream_8", "gbit_per_s"),
        ("64 B req/resp p50 (us)", "rr", "p50_us"),
        ("64 B req/resp p99 (us)", "rr", "p99_us"),
        ("new connections/s", "crr", "per_second"),
        (
            "agent CPU s/GiB (8 streams)",
            "stream_8",
            "agent_cpu_s_per_gib",
        ),
        (
            "dest agent CPU s/GiB (8 str.)",
            "stream_8",
            "dst_agent_cpu_s_per_gib",
        ),
        ("iperf3 1 stream (Gbit/s)", "iperf3_1", "gbit_per_s"),
        ("iperf3 8 streams (Gbit/s)", "iperf3_8", "gbit_per_s"),
        ("sockperf 64 B RTT p50 (us)", "sockperf_pp", "p50_us"),
        ("sockperf 64 B RTT p99 (us)", "sockperf_pp", "p99_us"),
        (
            "agent CPU us/request (RR)",
            "rr",
            "agent_cpu_us_per_request",
        ),
        (
            "dest agent CPU us/request (RR)",
            "rr",
            "dst_agent_cpu_us_per_request",
        ),
        (
            "agent CPU us/new connection",
            "crr",
            "agent_cpu_us_per_connection",
        ),
        (
            "dest agent CPU us/new conn.",
            "crr",
            "dst_agent_cpu_us_per_connection",
        ),
    ];
    println!(
        "\n{:<11} {:<30} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}",
        "placement",
        "metric",
        "direct",
        "meshed",
        "ratio",
        "+sockmap",
        "ratio",
        "captured",
        "ratio"
    );
    for placement in ["same_node", "cross_node"] {
        for (label, test, field) in metrics {
            let get = |mode: &str| r[format!("{placement}/{mode}")][test][field].as_f64();
            let d = get("direct");
            let m = get("meshed");
            let sm = get("meshed_sockmap");
            let cap = get("captured");
            if m.is_none() {
                continue;
            }
            let ratio = |x: Option<f64>| match (x, d) {
                (Some(x), Some(d)) if d > 0.0 => format!("{:.2}", x / d),
                _ => "-".into(),
            };
            let fmt = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or("-".into());
            println!(
                "{:<11} {:<30} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}",
                placement,
                label,
                fmt(d),
                fmt(m),
                ratio(m),
                fmt(sm),
                ratio(sm),
                fmt(cap),
                ratio(cap)
            );
        }
    }
    println!(
        "\nagent RSS (node 0, node 1): idle {} KiB, peak under load {} KiB",
        s["agent_rss_idle_kib"], s["agent_rss_peak_kib"]
    );
    if !s["api_memory"].is_null() {
        let m = &s["api_memory"];
        println!(
            "agent RSS with {} pods and {} services in the Kubernetes API: before {} KiB, peak {} KiB, after {} KiB (taken in within {:.1} s)",
            m["pods"],
            m["services"],
            m["rss_before_kib"],
            m["rss_peak_kib"],
            m["rss_after_kib"],
            m["seconds_to_take_in"].as_f64().unwrap_or(0.0)
        );
        let a = &s["abuse"];
        println!(
            "agent RSS under abuse (node 1, {} rounds): before {} KiB, peak {} KiB, 10 s after {} KiB",
            a["rounds"], a["rss_before_kib"], a["rss_peak_kib"], a["rss_after_kib"]
        );
    }
    println!(
        "cross_node meshed = HBONE (mutual TLS, HTTP/2 CONNECT); same_node meshed = plain TCP through the agent;\ncaptured = a client outside the mesh to a meshed server (plaintext, PERMISSIVE), through the server's agent;\nCPU columns of captured rows are the server's agent"
    );
    let t = &s["tls"];
    println!(
        "TLS in memory (both sides, one core): handshake {:.0} us with X25519MLKEM768, {:.0} us with X25519; bulk {:.2} s/GiB AES-128-GCM, {:.2} s/GiB AES-256-GCM (aws-lc-rs AES-128-GCM: {:.2})",
        t["handshake_x25519mlkem768"]["us_per_handshake"]
            .as_f64()
            .unwrap_or(0.0),
        t["handshake_x25519"]["us_per_handshake"]
            .as_f64()
            .unwrap_or(0.0),
        t["bulk_aes_128_gcm"]["s_per_gib_both_sides"]
            .as_f64()
            .unwrap_or(0.0),
        t["bulk_aes_256_gcm"]["s_per_gib_both_sides"]
            .as_f64()
            .unwrap_or(0.0),
        t["bulk_aes_128_gcm_aws_lc_rs"]["s_per_gib_both_sides"]
            .as_f64()
            .unwrap_or(0.0),
    );
    if !s["policy"].is_null() {
        let p = &s["policy"];
        println!(
            "policy: {} policies load (parse, check, index) in {:.0} ms; a decision takes {:.0} ns",
            p["policies"],
            p["load_ms"].as_f64().unwrap_or(0.0),
            p["decision_ns"].as_f64().unwrap_or(0.0)
        );
    }
}
