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
    thirdparty::{Fault, ThirdParty, ThirdPartySpec},
    workload,
};

/// A shop service: serves the test protocol and calls its dependencies:
/// `name=ip:port` (the test protocol) or `name=http://host:port/path` (an
/// HTTP GET, the host resolved for every call as glibc apps do).
pub async fn shop(port: u16, calls: Vec<String>, rate: f64) -> Result<()> {
    for c in &calls {
        let Some((_, target)) = c.split_once('=') else {
            bail!("--call wants name=ip:port or name=http://host:port/path, got {c}");
        };
        match target.strip_prefix("http://") {
            Some(url) => {
                let (authority, path) = url.split_once('/').unwrap_or((url, ""));
                let (host, port) = authority
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                    .unwrap_or((authority.to_owned(), 80));
                tokio::spawn(http_call_loop(host, port, format!("/{path}"), rate));
            }
            None => {
                tokio::spawn(call_loop(workload::parse_addr(target)?, rate));
            }
        }
    }
    workload::serve(port).await
}

/// GETs `path` from `host` at `rate` per second, as an app calling a third
/// party's HTTP API would (a new connection each time).
async fn http_call_loop(host: String, port: u16, path: String, rate: f64) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    loop {
        tick.tick().await;
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut b = Vec::new();
            s.read_to_end(&mut b).await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
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

/// The shop's third parties: a product-information SaaS on three
/// endpoints (one of them flaky: down half the time), a notifications API
/// on two (one of them slow), both spoken to in plain HTTP by the apps with
/// TLS originated by the agents; and an ad tracker no ServiceEntry lists.
struct ThirdParties {
    pim: Vec<ThirdParty>,
    _notify: Vec<ThirdParty>,
}

const PIM: &str = "pim.example.com";
const NOTIFY: &str = "api.notify.example.com";
const TRACKER: &str = "tracker.example.net";

fn third_parties(c: &mut Cluster) -> Result<ThirdParties> {
    let pim = (1..=3)
        .map(|i| c.start_third_party(&ThirdPartySpec::new(&format!("pim-{i}"), &[PIM])))
        .collect::<Result<Vec<_>>>()?;
    let notify = (1..=2)
        .map(|i| c.start_third_party(&ThirdPartySpec::new(&format!("notify-{i}"), &[NOTIFY])))
        .collect::<Result<Vec<_>>>()?;
    notify[1].set_fault(Fault::Delay(Duration::from_millis(1500)))?;
    let mut records: Vec<(&str, String)> = pim.iter().map(|p| (PIM, p.ip4.to_string())).collect();
    records.extend(notify.iter().map(|n| (NOTIFY, n.ip4.to_string())));
    records.push((TRACKER, cluster::EXTERNAL_V4.to_string()));
    let records: Vec<(&str, &str)> = records.iter().map(|(n, a)| (*n, a.as_str())).collect();
    c.start_dns(&records)?;
    let ca = c.third_party_ca()?.ca_cert.display().to_string();
    let endpoints: Vec<String> = pim
        .iter()
        .map(|p| format!("{{address: \"{}\"}}", p.ip4))
        .collect();
    c.write_policy(
        "third-parties.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [{PIM}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  endpoints: [{endpoints}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: {PIM}
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}}}
    connectionPool: {{tcp: {{connectTimeout: 1s, maxConnections: 100}}}}
    outlierDetection: {{consecutive5xxErrors: 1, interval: 5s, baseEjectionTime: 10s, maxEjectionPercent: 34}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: notifications, namespace: shop}}
spec:
  hosts: [{NOTIFY}]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: notifications, namespace: shop}}
spec:
  host: {NOTIFY}
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}}}
    connectionPool: {{tcp: {{connectTimeout: 1s}}}}
"#,
            endpoints = endpoints.join(", ")
        ),
    )?;
    Ok(ThirdParties {
        pim,
        _notify: notify,
    })
}

pub fn run(duration: Option<u64>) -> Result<()> {
    println!("nodemesh demo: building a 2-node virtual cluster (online store)...");
    let mut spec = spec();
    spec.agent.extra = "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n".into();
    let mut c = Cluster::start(spec)?;
    // Policies as a shop would write them (Istio's own documents): mutual
    // TLS required mesh-wide, and only orders may call auth.
    c.write_policy("mesh-strict.yaml", MESH_STRICT)?;
    c.write_policy("auth.yaml", AUTH_ONLY_ORDERS)?;
    println!("starting the third parties (TLS servers outside the cluster) and their DNS...");
    let mut third = third_parties(&mut c)?;
    let vip = |c: &Cluster, s: &str| format!("{s}={}:80", c.service(s).vip4);
    let catalogue_pod = format!("catalogue={}:8080", c.pod("catalogue").ip4);
    let plan: [(&str, Vec<String>); 7] = [
        ("catalogue", vec![format!("pim=http://{PIM}/v1/products")]),
        ("auth", vec![]),
        (
            "promotions",
            vec![
                vip(&c, "catalogue"),
                // Not in the registry: refused under REGISTRY_ONLY.
                format!("tracker=http://{TRACKER}/pixel"),
            ],
        ),
        ("cart", vec![vip(&c, "catalogue"), vip(&c, "promotions")]),
        (
            "orders",
            vec![
                vip(&c, "cart"),
                vip(&c, "auth"),
                format!("notifications=http://{NOTIFY}/v1/send"),
            ],
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
                    // pim-3 is flaky: down for 20 s of every 40.
                    let flaky = &mut third.pim[2];
                    let down = (started.elapsed().as_secs() / 20) % 2 == 1;
                    if down && flaky.is_running() {
                        let _ = flaky.stop();
                    } else if !down && !flaky.is_running() {
                        let _ = flaky.start();
                    }
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
    drop(third);
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
    /// Connections that needed another endpoint after a failed connect.
    retried: u64,
    last_error: Option<String>,
    /// `mutual_tls` (HBONE across nodes), `tls_originated` (to a third
    /// party) or `none`.
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
            let dst = match (
                e.get("dst_workload").and_then(Value::as_str),
                e.get("host").and_then(Value::as_str),
            ) {
                (Some(w), _) => short(w).to_owned(),
                (None, Some(host)) => host.to_owned(),
                (None, None) => format!("external {}", get("orig_dst")),
            };
            let p = pairs.entry((src, dst)).or_default();
            p.connections += 1;
            p.security = get("security").to_owned();
            p.sent += e.get("bytes_sent").and_then(Value::as_u64).unwrap_or(0);
            p.received += e.get("bytes_received").and_then(Value::as_u64).unwrap_or(0);
            if e["attempts"].as_array().is_some_and(|a| a.len() > 1) {
                p.retried += 1;
            }
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
        "{:<12} {:<28} {:>8} {:>12} {:>12} {:>7} {:>7}  {}\n",
        "SOURCE", "DESTINATION", "CONNS", "BYTES OUT", "BYTES IN", "ERRORS", "RETRIED", "SECURITY"
    );
    for ((src, dst), p) in &pairs {
        out += &format!(
            "{:<12} {:<28} {:>8} {:>12} {:>12} {:>7} {:>7}  {}\n",
            src, dst, p.connections, p.sent, p.received, p.errors, p.retried, p.security
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
    out += &format!(
        "egress: outboundTrafficPolicy REGISTRY_ONLY; ServiceEntries {PIM} (3 endpoints, pim-3 down 20 s of every 40: retried, ejected) and {NOTIFY} (notify-2 answers after 1.5 s), TLS originated by the agents; {TRACKER} is not in the registry\n"
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
