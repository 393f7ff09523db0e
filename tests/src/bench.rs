//! `cargo xtask bench`: direct TCP vs through the agent on the virtual
//! cluster, same-node and cross-node, sockmap fast path off and on. Prints
//! ratios to direct and writes JSON for later comparison.
use std::{fs, path::Path, time::Duration};

use anyhow::Result;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterSpec, PodSpec};

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

struct Runner<'a> {
    c: &'a Cluster,
    secs: f64,
}

impl Runner<'_> {
    fn client(&self, pod: &str, args: &[&str]) -> Result<Value> {
        self.c.run_in_pod(pod, args)
    }

    /// All four measurements from `pod` to `to`, with the CPU use of the
    /// source's agent and, across nodes, the destination's.
    fn suite(
        &self,
        pod: &str,
        to: &str,
        agent_pid: Option<u32>,
        dst_agent_pid: Option<u32>,
    ) -> Result<Value> {
        let secs = self.secs.to_string();
        let mut out = serde_json::Map::new();
        for (name, streams) in [("stream_1", "1"), ("stream_8", "8")] {
            let cpu0 = agent_pid.map(cpu_seconds);
            let dst_cpu0 = dst_agent_pid.map(cpu_seconds);
            let v = self.client(
                pod,
                &[
                    "bench-client",
                    "stream",
                    "--to",
                    to,
                    "--secs",
                    &secs,
                    "--streams",
                    streams,
                ],
            )?;
            let mut v = v;
            if let (Some(pid), Some(c0)) = (agent_pid, cpu0) {
                let cpu = cpu_seconds(pid) - c0;
                let gib = v["bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
                v["agent_cpu_s_per_gib"] = json!(if gib > 0.0 { cpu / gib } else { 0.0 });
                if let (Some(dpid), Some(d0)) = (dst_agent_pid, dst_cpu0) {
                    let dcpu = cpu_seconds(dpid) - d0;
                    v["dst_agent_cpu_s_per_gib"] = json!(if gib > 0.0 { dcpu / gib } else { 0.0 });
                }
            }
            out.insert(name.into(), v);
        }
        out.insert(
            "rr".into(),
            self.client(pod, &["bench-client", "rr", "--to", to, "--secs", &secs])?,
        );
        out.insert(
            "crr".into(),
            self.client(pod, &["bench-client", "crr", "--to", to, "--secs", &secs])?,
        );
        Ok(Value::Object(out))
    }
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

pub fn run(secs: f64, out: &Path, abuse_only: bool, api_memory_only: bool) -> Result<()> {
    if api_memory_only {
        println!("{}", api_memory()?);
        return Ok(());
    }
    if abuse_only {
        let mut c = Cluster::start(spec())?;
        c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])?;
        let a = abuse(&c, 5)?;
        println!("{a}");
        return Ok(());
    }
    eprintln!("bench: policy decisions ...");
    let policy = policy_bench()?;
    eprintln!("bench: agent memory with 10,000 pods and 2,000 services in the API ...");
    let api_memory = api_memory()?;
    let mut c = Cluster::start(spec())?;
    c.spawn_in_pod("server-local", &["serve", "--port", "8080"])?;
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])?;
    c.spawn_in_pod("direct-server-local", &["serve", "--port", "8080"])?;
    c.spawn_in_pod("direct-server-remote", &["serve", "--port", "8080"])?;
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
    let mut results = serde_json::Map::new();
    std::thread::sleep(SETTLE);
    let idle_rss: Vec<u64> = (0..2)
        .map(|k| c.agent_pid(k).map(|p| status_kib(p, "VmRSS:")).unwrap_or(0))
        .collect();
    for pid in (0..2).filter_map(|k| c.agent_pid(k)) {
        reset_peak_rss(pid);
    }
    // Node 0's agent is restarted for the sockmap runs: its peak before.
    let mut peak0_before_restart = 0;
    for sockmap in [false, true] {
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
            eprintln!("bench: {placement} sockmap={sockmap} ...");
            if !sockmap {
                let direct = runner.suite("direct", direct_to, None, None)?;
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
            let meshed = runner.suite("client", to, pid, dst_pid)?;
            let key = if sockmap { "meshed_sockmap" } else { "meshed" };
            results.insert(format!("{placement}/{key}"), meshed);
        }
    }
    // Peaks under load, start-ups left out.
    let peak_rss: Vec<u64> = (0..2)
        .map(|k| c.agent_pid(k).map(|p| status_kib(p, "VmHWM:")).unwrap_or(0))
        .collect();
    let peak_rss = vec![peak_rss[0].max(peak0_before_restart), peak_rss[1]];
    let abuse = abuse(&c, 5)?;
    let summary = json!({
        "policy": policy,
        "agent_rss_idle_kib": idle_rss,
        "agent_rss_peak_kib": peak_rss,
        "abuse": abuse,
        "api_memory": api_memory,
        "seconds_per_measurement": secs,
        "results": results,
    });
    drop(c);
    print_table(&summary);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(out, serde_json::to_string_pretty(&summary)?)?;
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
    println!(
        "cross_node meshed = HBONE (mutual TLS, HTTP/2 CONNECT); same_node meshed = plain TCP through the agent;\ncaptured = a client outside the mesh to a meshed server (plaintext, PERMISSIVE), through the server's agent;\nCPU columns of captured rows are the server's agent"
    );
    let p = &s["policy"];
    println!(
        "policy: {} policies load (parse, check, index) in {:.0} ms; a decision takes {:.0} ns",
        p["policies"],
        p["load_ms"].as_f64().unwrap_or(0.0),
        p["decision_ns"].as_f64().unwrap_or(0.0)
    );
}
