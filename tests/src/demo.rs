//! `cargo xtask demo`: an online store on a 2-node virtual cluster, its
//! traffic through the agents, and a live one-screen summary.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    cluster::{self, Cluster, ClusterSpec, PodSpec, ServiceSpec},
    workload,
};

/// A shop service: serves the test protocol and calls its dependencies.
pub async fn shop(port: u16, calls: Vec<String>, rate: f64) -> Result<()> {
    let mut deps = Vec::new();
    for c in &calls {
        let Some((name, addr)) = c.split_once('=') else {
            bail!("--call wants name=ip:port, got {c}");
        };
        deps.push((name.to_owned(), workload::parse_addr(addr)?));
    }
    for (_, addr) in deps {
        tokio::spawn(call_loop(addr, rate));
    }
    workload::serve(port).await
}

async fn call_loop(addr: SocketAddr, rate: f64) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    loop {
        tick.tick().await;
        // A small request and its response, as a shop's RPC would be.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"ECHO\n").await?;
            s.write_all(&[b'x'; 700]).await?;
            s.shutdown().await?;
            let mut b = Vec::new();
            s.read_to_end(&mut b).await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

fn spec() -> ClusterSpec {
    let pods = [
        ("frontend", 0),
        ("cart", 0),
        ("promotions", 0),
        ("catalogue", 1),
        ("orders", 1),
        ("auth", 1),
    ]
    .into_iter()
    .map(|(n, k)| PodSpec::new(n, k))
    // A legacy job outside the mesh, calling the catalogue in plaintext.
    .chain([PodSpec::new("scraper", 0).unenrolled()])
    .collect();
    let services = ["cart", "catalogue", "orders", "promotions", "auth"]
        .into_iter()
        .map(|n| ServiceSpec::new(n, 80, 8080, &[n]))
        .collect();
    ClusterSpec {
        nodes: 2,
        pods,
        services,
        agent: Default::default(),
    }
}

pub fn run(duration: Option<u64>) -> Result<()> {
    println!("nodemesh demo: building a 2-node virtual cluster (online store)...");
    let mut c = Cluster::start(spec())?;
    // Policies as a shop would write them (Istio's own documents): mutual
    // TLS required mesh-wide, and only orders may call auth.
    c.write_policy("mesh-strict.yaml", MESH_STRICT)?;
    c.write_policy("auth.yaml", AUTH_ONLY_ORDERS)?;
    c.spawn_external(&["serve", "--port", "8080"])?;
    let vip = |c: &Cluster, s: &str| format!("{s}={}:80", c.service(s).vip4);
    let notifications = format!("notifications={}:8080", cluster::EXTERNAL_V4);
    let catalogue_pod = format!("catalogue={}:8080", c.pod("catalogue").ip4);
    let plan: [(&str, Vec<String>); 7] = [
        ("catalogue", vec![]),
        ("auth", vec![]),
        ("promotions", vec![vip(&c, "catalogue")]),
        ("cart", vec![vip(&c, "catalogue"), vip(&c, "promotions")]),
        (
            "orders",
            vec![vip(&c, "cart"), vip(&c, "auth"), notifications],
        ),
        (
            "frontend",
            vec![
                vip(&c, "cart"),
                vip(&c, "catalogue"),
                vip(&c, "promotions"),
                vip(&c, "orders"),
                // Not allowed by auth.yaml: every call is denied.
                vip(&c, "auth"),
            ],
        ),
        ("scraper", vec![catalogue_pod]),
    ];
    for (pod, calls) in plan {
        let mut args = vec!["shop".to_owned(), "--port".into(), "8080".into()];
        for call in calls {
            args.push("--call".into());
            args.push(call);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.spawn_in_pod(pod, &args)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    print_summary(&c, started.elapsed());
                    if duration.is_some_and(|d| started.elapsed() >= Duration::from_secs(d)) {
                        break;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    });
    println!("\ntearing the cluster down...");
    drop(c);
    println!("done");
    Ok(())
}

const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh-strict, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";

const AUTH_ONLY_ORDERS: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: auth-only-orders, namespace: shop}
spec:
  selector: {matchLabels: {app: auth}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/orders]}}]
";

#[derive(Default)]
struct PairStats {
    connections: u64,
    sent: u64,
    received: u64,
    errors: u64,
    last_error: Option<String>,
    /// `mutual_tls` (HBONE across nodes) or `none`.
    security: String,
}

fn short(workload: &str) -> &str {
    workload.rsplit('/').next().unwrap_or(workload)
}

/// Aggregates the agents' access logs per (source, destination) pair.
pub fn summarize(c: &Cluster) -> BTreeMap<(String, String), (u64, u64, u64, u64)> {
    table(c)
        .into_iter()
        .map(|(k, v)| (k, (v.connections, v.sent, v.received, v.errors)))
        .collect()
}

fn table(c: &Cluster) -> BTreeMap<(String, String), PairStats> {
    let mut pairs: BTreeMap<(String, String), PairStats> = BTreeMap::new();
    for k in 0..c.agents.len() {
        // Each connection once: as its source's agent reported it, or, for a
        // client outside the mesh, as the destination's agent captured it.
        for e in c.access_log(k).into_iter().filter(|e| {
            e["reporter"] == "source"
                || (e["reporter"] == "destination" && e["src_identity"].is_null())
        }) {
            let get = |f: &str| e.get(f).and_then(Value::as_str).unwrap_or("");
            let src = match e.get("src_workload").and_then(Value::as_str) {
                Some(w) => short(w).to_owned(),
                None => outside_client(c, get("src_addr")),
            };
            let dst = match e.get("dst_workload").and_then(Value::as_str) {
                Some(w) => short(w).to_owned(),
                None => format!("external {}", get("orig_dst")),
            };
            let p = pairs.entry((src, dst)).or_default();
            p.connections += 1;
            p.security = get("security").to_owned();
            p.sent += e.get("bytes_sent").and_then(Value::as_u64).unwrap_or(0);
            p.received += e.get("bytes_received").and_then(Value::as_u64).unwrap_or(0);
            if get("result") != "ok" {
                p.errors += 1;
                p.last_error = Some(get("error").to_owned());
            }
        }
    }
    pairs
}

/// A plaintext client by its address: the lab pod's name, marked as
/// outside the mesh.
fn outside_client(c: &Cluster, addr: &str) -> String {
    let ip = addr.parse::<SocketAddr>().map(|a| a.ip()).ok();
    c.pods
        .values()
        .find(|p| ip == Some(std::net::IpAddr::V4(p.ip4)))
        .map(|p| format!("{} (plain)", p.spec.name))
        .unwrap_or_else(|| addr.to_owned())
}

fn print_summary(c: &Cluster, elapsed: Duration) {
    let pairs = table(c);
    let mut out = String::new();
    out += "\x1b[2J\x1b[H";
    out += &format!(
        "nodemesh demo — 2 nodes, {} pods, agents on every node — {:>4}s (Ctrl-C to stop)\n\n",
        c.pods.len(),
        elapsed.as_secs()
    );
    out += &format!(
        "{:<12} {:<28} {:>8} {:>12} {:>12} {:>7}  {}\n",
        "SOURCE", "DESTINATION", "CONNS", "BYTES OUT", "BYTES IN", "ERRORS", "SECURITY"
    );
    for ((src, dst), p) in &pairs {
        out += &format!(
            "{:<12} {:<28} {:>8} {:>12} {:>12} {:>7}  {}\n",
            src, dst, p.connections, p.sent, p.received, p.errors, p.security
        );
    }
    let errors: Vec<_> = pairs
        .iter()
        .filter_map(|((s, d), p)| p.last_error.as_ref().map(|e| format!("  {s} -> {d}: {e}")))
        .collect();
    if !errors.is_empty() {
        out += "\nlast errors:\n";
        out += &errors.join("\n");
        out += "\n";
    }
    let policies = match c.kubernetes() {
        true => format!(
            "Istio custom resources in the lab's Kubernetes API fake, {}",
            c.api().dir.join("objects").display()
        ),
        false => c.policy_dir().display().to_string(),
    };
    out += &format!(
        "\npolicies ({policies}): mesh-wide STRICT mutual TLS; auth accepts only orders\n"
    );
    if c.kubernetes() {
        out += &format!(
            "pods: created through each node's CNI chain (bridge, host-local, nodemesh-cni); agents watch the API at https://{}:6443 (a lab fake)\n",
            crate::kube::API_SERVER
        );
    }
    for k in 0..c.agents.len() {
        out += &format!(
            "node {k} agent: curl -s http://{}/metrics (stats), http://{}/healthz/ready; ip netns exec {} curl -s http://{}/config_dump (admin, node-local)\n",
            c.stats_address(k),
            c.readiness_address(k),
            c.ns_node(k),
            c.admin_address(k)
        );
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}
