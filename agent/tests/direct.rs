//! The proxy paths in-process, without root (as ztunnel's `tests/direct.rs`):
//! two agents — two "nodes" — run in this process on the loopback
//! substitute of the kernel programs and pod namespaces
//! (`datapath::loopback`): each pod is a 127.77.n.x address. Real rustls,
//! real HTTP/2, real sockets; what the substitute cannot show (the eBPF
//! programs, capture, namespaces) the root tests on the virtual cluster do.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use nodemesh_agent::{
    admin::Server,
    app::{self, Components},
    config::Config,
    datapath::loopback::{LoopbackDatapath, LoopbackNetworks},
    identity::ca::new_root,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    time::Instant,
};

/// Each test gets its own 127.77.<n>.0/24, so tests run side by side.
static NEXT_NET: AtomicU8 = AtomicU8::new(1);

struct Pod {
    name: &'static str,
    node: usize,
}

struct Agent {
    datapath: Arc<LoopbackDatapath>,
    admin: SocketAddr,
    access_log: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

struct Lab {
    net: u8,
    dir: PathBuf,
    pods: Vec<Pod>,
    agents: Vec<Agent>,
}

impl Lab {
    /// Two nodes with agents (node-2, if used, has none); `pods` with their node; `services` as (name, port,
    /// target port, endpoint pods).
    async fn start(pods: Vec<Pod>, services: &[(&str, u16, u16, &[&str])], extra: &str) -> Self {
        let net = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nm-direct-{}-{net}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let (cert, key) = new_root("cluster.local").unwrap();
        std::fs::write(dir.join("ca.pem"), cert).unwrap();
        std::fs::write(dir.join("ca.key"), key).unwrap();
        let mut lab = Lab {
            net,
            dir,
            pods,
            agents: Vec::new(),
        };
        for node in 0..2 {
            lab.write_workloads(node, services);
            let d = lab.dir.display().to_string();
            let config = format!(
                "workloadsFile: {d}/workloads-{node}.yaml\nstateDir: {d}/state-{node}\ncgroupPath: /sys/fs/cgroup\ncaCertFile: {d}/ca.pem\ncaKeyFile: {d}/ca.key\npolicyDir: {d}/policies\naccessLog: {d}/access-{node}.log\nadminAddress: 127.0.0.1:0\nstatsAddress: 127.0.0.1:0\nreadinessAddress: 127.0.0.1:0\ndrainTimeoutSeconds: 1\n{extra}"
            );
            let path = lab.dir.join(format!("agent-{node}.yaml"));
            std::fs::write(&path, config).unwrap();
            let config = Config::load(&path).unwrap();
            let datapath = LoopbackDatapath::new();
            let bound = app::build(
                config,
                Components {
                    datapath: Some(datapath.clone()),
                    networks: Some(Arc::new(LoopbackNetworks)),
                    ca: None,
                },
            )
            .await
            .unwrap();
            let admin = bound.address(Server::Admin);
            let (stop, stopped) = oneshot::channel();
            let done = tokio::spawn(bound.wait_termination(async {
                let _ = stopped.await;
            }));
            lab.agents.push(Agent {
                datapath,
                admin,
                access_log: lab.dir.join(format!("access-{node}.log")),
                stop: Some(stop),
                done: Some(done),
            });
        }
        lab
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        let i = self.pods.iter().position(|p| p.name == pod).unwrap();
        Ipv4Addr::new(127, 77, self.net, 10 + i as u8)
    }

    fn vip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, 77, self.net, 200 + i as u8)
    }

    fn write_workloads(&self, node: usize, services: &[(&str, u16, u16, &[&str])]) {
        let mut y = format!("node: node-{node}\npods:\n");
        for p in &self.pods {
            y += &format!(
                "  - {{name: {0}, namespace: shop, serviceAccount: {0}, labels: {{app: {0}}}, ips: [\"{1}\"], node: node-{2}, netns: /loopback}}\n",
                p.name,
                self.ip(p.name),
                p.node
            );
        }
        y += "services:\n";
        for (i, (name, port, target, endpoints)) in services.iter().enumerate() {
            y += &format!(
                "  - {{name: {name}, namespace: shop, vips: [\"{}\"], ports: [{{port: {port}, targetPort: {target}}}], endpoints: [{}]}}\n",
                self.vip(i),
                endpoints.join(", ")
            );
        }
        if services.is_empty() {
            y += "  []\n";
        }
        std::fs::write(self.dir.join(format!("workloads-{node}.yaml")), y).unwrap();
    }

    /// `connect()` from an app in `from` to `to`, as the kernel redirects it.
    async fn connect(&self, from: &str, to: SocketAddr) -> TcpStream {
        self.try_connect(from, to).await.unwrap()
    }

    /// The same; a refusal may already show in the connect.
    async fn try_connect(&self, from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let node = self.pods.iter().find(|p| p.name == from).unwrap().node;
        self.agents[node]
            .datapath
            .connect_redirected(self.ip(from), to)
            .await
    }

    /// True when a round trip from `from` to `to` fails (at the connect
    /// or after it).
    async fn refused(&self, from: &str, to: SocketAddr) -> bool {
        match self.try_connect(from, to).await {
            Ok(s) => round_trip(s, 10).await.is_err(),
            Err(_) => true,
        }
    }

    fn access_log(&self, node: usize) -> Vec<Value> {
        std::fs::read_to_string(&self.agents[node].access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until node's access log has `n` entries for which `f` holds.
    async fn log_entries(&self, node: usize, n: usize, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<Value> = self.access_log(node).into_iter().filter(|e| f(e)).collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin_get(&self, node: usize, path: &str) -> String {
        let mut s = TcpStream::connect(self.agents[node].admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Sum of the samples of `metric` whose labels contain every `label`.
    async fn metric(&self, node: usize, metric: &str, labels: &[&str]) -> f64 {
        self.admin_get(node, "/metrics")
            .await
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) && labels.iter().all(|w| l.contains(w))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    fn write_policy(&self, name: &str, yaml: &str) {
        let tmp = self.dir.join("policies").join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.dir.join("policies").join(name)).unwrap();
    }

    async fn stop(mut self) {
        for a in &mut self.agents {
            let _ = a.stop.take().map(|s| s.send(()));
        }
        for a in &mut self.agents {
            if let Some(done) = a.done.take() {
                done.await.unwrap().unwrap();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An echo server in a pod; counts its connections.
async fn echo(ip: Ipv4Addr, port: u16) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind((ip, port)).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    accepted
}

/// Sends `bytes` and reads them back; Err when the connection fails.
async fn round_trip(mut s: TcpStream, bytes: usize) -> std::io::Result<Vec<u8>> {
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    s.write_all(&data).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    assert_eq!(back, data, "bytes changed on the way");
    Ok(back)
}

fn pods() -> Vec<Pod> {
    vec![
        Pod {
            name: "client",
            node: 0,
        },
        Pod {
            name: "local",
            node: 0,
        },
        Pod {
            name: "remote",
            node: 1,
        },
        Pod {
            name: "remote2",
            node: 1,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_across_nodes_and_plain_tcp_on_one_each_recorded_once() {
    let lab = Lab::start(pods(), &[], "").await;
    echo(lab.ip("remote"), 8080).await;
    echo(lab.ip("local"), 8080).await;
    let remote = SocketAddr::from((lab.ip("remote"), 8080));
    let local = SocketAddr::from((lab.ip("local"), 8080));
    for _ in 0..3 {
        round_trip(lab.connect("client", remote).await, 100_000)
            .await
            .unwrap();
    }
    round_trip(lab.connect("client", local).await, 5_000)
        .await
        .unwrap();

    // Source reports on node 0, destination reports on node 1: one line
    // per connection each, with the identities and bytes.
    let src = lab
        .log_entries(0, 3, |e| e["orig_dst"] == remote.to_string())
        .await;
    assert_eq!(src.len(), 3, "{src:?}");
    for e in &src {
        assert_eq!(e["reporter"], "source");
        assert_eq!(e["result"], "ok", "{e}");
        assert_eq!(e["security"], "mutual_tls");
        assert_eq!(
            e["src_identity"],
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        assert_eq!(
            e["dst_identity"],
            "spiffe://cluster.local/ns/shop/sa/remote"
        );
        assert_eq!(e["bytes_sent"], 100_000);
        assert_eq!(e["bytes_received"], 100_000);
    }
    let dst = lab
        .log_entries(1, 3, |e| e["reporter"] == "destination")
        .await;
    assert_eq!(dst.len(), 3, "{dst:?}");
    for e in &dst {
        assert_eq!(
            e["src_identity"],
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        assert!(
            e["src_addr"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", lab.ip("client"))),
            "{e}"
        );
        assert!(
            e["forwarded_for"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", lab.ip("client"))),
            "{e}"
        );
        assert_eq!(e["bytes_received"], 100_000);
    }
    // Same node: both reports from node 0.
    let same = lab
        .log_entries(0, 1, |e| e["orig_dst"] == local.to_string())
        .await;
    assert_eq!(same.len(), 1, "{same:?}");
    assert_eq!(same[0]["security"], "none");
    assert_eq!(same[0]["dst_workload"], "shop/local");

    // The metrics agree: opened and closed once per report.
    let hbone = ["destination_workload=\"remote\""];
    for node in 0..2 {
        assert_eq!(
            lab.metric(node, "istio_tcp_connections_opened_total", &hbone)
                .await,
            3.0
        );
        assert_eq!(
            lab.metric(node, "istio_tcp_connections_closed_total", &hbone)
                .await,
            3.0
        );
        assert_eq!(
            lab.metric(node, "istio_tcp_received_bytes_total", &hbone)
                .await,
            300_000.0
        );
    }
    assert_eq!(
        lab.metric(
            0,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "connection_security_policy=\"mutual_tls\""
            ]
        )
        .await,
        3.0
    );
    let local_labels = ["destination_workload=\"local\""];
    assert_eq!(
        lab.metric(0, "istio_tcp_connections_closed_total", &local_labels)
            .await,
        2.0
    );
    assert_eq!(
        lab.metric(0, "istio_tcp_connections_failed_total", &[])
            .await,
        0.0
    );
    // Three connections shared one pooled HBONE connection.
    assert_eq!(
        lab.metric(0, "nodemesh_hbone_pool_connections_opened_total", &[])
            .await,
        0.0
    );
    assert!(
        lab.admin_get(0, "/metrics")
            .await
            .contains("nodemesh_hbone_pool_connections_opened_total 1")
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_spreads_over_its_endpoints_and_skips_none() {
    let lab = Lab::start(pods(), &[("web", 80, 8080, &["remote", "remote2"])], "").await;
    let a = echo(lab.ip("remote"), 8080).await;
    let b = echo(lab.ip("remote2"), 8080).await;
    let vip = SocketAddr::from((lab.vip(0), 80));
    for _ in 0..6 {
        round_trip(lab.connect("client", vip).await, 1_000)
            .await
            .unwrap();
    }
    assert_eq!(a.load(Ordering::SeqCst), 3);
    assert_eq!(b.load(Ordering::SeqCst), 3);
    let logged = lab.log_entries(0, 6, |e| e["service"] == "web.shop").await;
    assert_eq!(logged.len(), 6);
    let dump: Value = {
        let text = lab.admin_get(0, "/config_dump").await;
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
    };
    let endpoints = dump["endpoints"]["web.shop"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2, "{dump}");
    assert!(
        endpoints
            .iter()
            .all(|e| e["connected"] == 3 && e["active"] == 0),
        "{dump}"
    );
    lab.stop().await;
}

const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_one_reset_and_a_reload_closes_what_it_now_denies() {
    let lab = Lab::start(pods(), &[], "").await;
    echo(lab.ip("remote"), 8080).await;
    echo(lab.ip("local"), 8080).await;
    let remote = SocketAddr::from((lab.ip("remote"), 8080));
    let local = SocketAddr::from((lab.ip("local"), 8080));
    // Open connections, one per path, with bytes flowing.
    let mut open = Vec::new();
    for to in [remote, local] {
        let mut s = lab.connect("client", to).await;
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        open.push(s);
    }
    let before = lab.access_log(1).len();
    lab.write_policy("deny.yaml", DENY_CLIENT);
    // Both open connections are closed by the reload...
    for mut s in open {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Err(_)) | Ok(Ok(0))),
            "still open after the reload: {r:?}"
        );
    }
    // ...and new ones are refused: a 401 at the destination, a reset here.
    for to in [remote, local] {
        assert!(
            lab.refused("client", to).await,
            "{to} reached despite the DENY"
        );
    }
    let reloaded = lab
        .log_entries(1, 1, |e| {
            e["error"]
                .as_str()
                .is_some_and(|s| s.contains("after a policy reload"))
        })
        .await;
    assert_eq!(reloaded.len(), 1, "{:?}", lab.access_log(1));
    assert_eq!(reloaded[0]["policy"], "shop/no-client");
    let denied = lab
        .log_entries(1, 1, |e| {
            e["result"] == "denied" && e["response_flags"] == "DENY"
        })
        .await;
    assert!(denied.len() >= 2, "{denied:?}");
    let src = lab
        .log_entries(0, 1, |e| {
            e["error"].as_str().is_some_and(|s| s.contains("401"))
        })
        .await;
    assert_eq!(src.len(), 1, "{:?}", lab.access_log(0));
    assert!(lab.access_log(1).len() > before);
    // Each failure is a closed and failed series with the DENY flag.
    assert!(
        lab.metric(
            1,
            "istio_tcp_connections_failed_total",
            &["response_flags=\"DENY\""]
        )
        .await
            >= 2.0
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_to_a_hung_peer_share_one_connect_and_one_timeout() {
    // "ghost" runs on a node whose agent hangs: its port 15008 accepts and
    // never answers the TLS handshake (no agent of this lab serves node-2).
    let mut pods = pods();
    pods.push(Pod {
        name: "ghost",
        node: 2,
    });
    let lab = Lab::start(pods, &[], "connectTimeoutSeconds: 1\n").await;
    let silent = TcpListener::bind((lab.ip("ghost"), 15008)).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let ghost = SocketAddr::from((lab.ip("ghost"), 8080));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let s = lab.connect("client", ghost).await;
        tasks.spawn(round_trip(s, 10));
    }
    let results = tasks.join_all().await;
    let took = started.elapsed();
    assert!(results.iter().all(Result::is_err));
    // One connect, one timeout for all twenty (not twenty in a row).
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(took < Duration::from_secs(4), "{took:?}");
    let timeouts = lab
        .log_entries(0, 20, |e| {
            e["orig_dst"] == ghost.to_string() && e["result"] == "hbone"
        })
        .await;
    assert_eq!(timeouts.len(), 20, "{:?}", lab.access_log(0));
    assert!(timeouts.iter().all(|e| e["response_flags"] == "CONNECT"));
    // Right after, within the failure memory, a new caller fails at once
    // without another connect...
    let quick = Instant::now();
    assert!(lab.refused("client", ghost).await);
    assert!(quick.elapsed() < Duration::from_millis(500));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let remembered = lab
        .log_entries(0, 1, |e| {
            e["error"]
                .as_str()
                .is_some_and(|s| s.contains("not retried for"))
        })
        .await;
    assert_eq!(remembered.len(), 1, "{:?}", lab.access_log(0));
    // ...and after it, one more connect is tried.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(lab.refused("client", ghost).await);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    lab.stop().await;
}

/// A third party outside the mesh: 127.78.<net>.<i> (no pod has it).
fn third_party(lab: &Lab, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 78, lab.net, i)
}

/// Agent settings of the egress tests: REGISTRY_ONLY; DNS capture has no
/// kernel to redirect here, and no upstream.
const REGISTRY_ONLY: &str =
    "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\ndns: {upstreams: [\"127.0.0.1:9\"]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_passes_what_the_registry_names_and_refuses_the_rest_with_its_reason() {
    let lab = Lab::start(pods(), &[], REGISTRY_ONLY).await;
    let (a, b, stranger) = (
        third_party(&lab, 1),
        third_party(&lab, 2),
        third_party(&lab, 50),
    );
    echo(a, 9000).await;
    echo(b, 9000).await;
    echo(stranger, 9000).await;
    lab.write_policy(
        "egress.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments, namespace: shop}}
spec:
  hosts: [payments.example.com]
  addresses: ["{vip}"]
  resolution: STATIC
  ports: [{{number: 9000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: "{a}"}}, {{address: "{b}"}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [pim.example.com]
  resolution: NONE
  ports: [{{number: 9443, name: tls, protocol: TLS}}]
"#,
            vip = third_party(&lab, 100)
        ),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // By the entry's VIP: balanced over its endpoints; by an endpoint.
    for _ in 0..4 {
        round_trip(
            lab.connect("client", (third_party(&lab, 100), 9000).into())
                .await,
            1000,
        )
        .await
        .unwrap();
    }
    round_trip(lab.connect("client", (a, 9000).into()).await, 1000)
        .await
        .unwrap();
    let named = lab
        .log_entries(0, 5, |e| {
            e["host"] == "payments.example.com" && e["result"] == "ok"
        })
        .await;
    assert_eq!(named.len(), 5, "{:?}", lab.access_log(0));
    let upstreams: std::collections::HashSet<_> = named
        .iter()
        .map(|e| e["upstream"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(upstreams.len(), 2, "both endpoints used: {upstreams:?}");
    assert!(
        lab.metric(
            0,
            "istio_tcp_connections_opened_total",
            &[
                "destination_service=\"payments.example.com\"",
                "destination_service_namespace=\"shop\""
            ]
        )
        .await
            >= 5.0
    );

    // An address nothing names: refused, with its reason, counted.
    assert!(lab.refused("client", (stranger, 9000).into()).await);
    let refused = lab
        .log_entries(0, 1, |e| e["orig_dst"] == format!("{stranger}:9000"))
        .await;
    assert_eq!(refused[0]["response_flags"], "REGISTRY_ONLY", "{refused:?}");
    assert_eq!(refused[0]["result"], "registry");
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap()
            .contains("neither in the mesh nor a ServiceEntry host")
    );
    assert_eq!(
        lab.metric(
            0,
            "nodemesh_registry_denials_total",
            &["reason=\"not_in_registry\""]
        )
        .await,
        1.0
    );

    // TLS to a TLS port: the SNI is read. A host not in the registry, and
    // a registry host this pod never resolved to that address (SNI
    // spoofing), are each refused with their own reason.
    for (sni, reason) in [
        ("evil.example.com", "sni_not_in_registry"),
        ("pim.example.com", "sni_not_resolved"),
    ] {
        let s = lab.connect("client", (stranger, 9443).into()).await;
        let name = rustls_pki_types::ServerName::try_from(sni).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(nodemesh_agent::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let handshake = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, s)
            .await;
        assert!(handshake.is_err(), "{sni} passed");
        assert_eq!(
            lab.metric(
                0,
                "nodemesh_registry_denials_total",
                &[&format!("reason=\"{reason}\"")]
            )
            .await,
            1.0,
            "{sni}"
        );
        let e = lab.log_entries(0, 1, |e| e["sni"] == sni).await;
        assert_eq!(e[0]["response_flags"], "REGISTRY_ONLY", "{e:?}");
    }
    // The registry and the mode are in /config_dump.
    let dump = lab.admin_get(0, "/config_dump").await;
    assert!(dump.contains("payments.example.com") && dump.contains("REGISTRY_ONLY"));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_retried_elsewhere_ejected_and_returns_after_its_ejection() {
    let lab = Lab::start(pods(), &[], REGISTRY_ONLY).await;
    let (up1, up2, down) = (
        third_party(&lab, 1),
        third_party(&lab, 2),
        third_party(&lab, 3),
    );
    echo(up1, 9000).await;
    echo(up2, 9000).await;
    lab.write_policy(
        "egress.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [pim.example.com]
  addresses: ["{vip}"]
  resolution: STATIC
  ports: [{{number: 9000, name: tcp}}]
  endpoints: [{{address: "{up1}"}}, {{address: "{up2}"}}, {{address: "{down}"}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: pim.example.com
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 34}}
"#,
            vip = third_party(&lab, 100)
        ),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let vip = SocketAddr::from((third_party(&lab, 100), 9000));
    // No failure reaches the app: the refusal is retried on another
    // endpoint, and the refusing one is ejected at once.
    for _ in 0..9 {
        round_trip(lab.connect("client", vip).await, 100)
            .await
            .unwrap();
    }
    let retried = lab
        .log_entries(0, 1, |e| {
            e["attempts"].as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    assert_eq!(
        retried.len(),
        1,
        "one retry, then ejected: {:?}",
        lab.access_log(0)
    );
    let attempts = &retried[0]["attempts"];
    assert_eq!(attempts[0]["endpoint"], format!("{down}:9000"));
    assert_eq!(attempts[0]["ejected"], true);
    assert!(
        attempts[0]["error"].as_str().unwrap().contains("refused"),
        "{attempts}"
    );
    assert!(attempts[1]["error"].is_null());
    assert_eq!(
        lab.metric(
            0,
            "nodemesh_outlier_ejections_total",
            &["destination=\"pim.example.com\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        lab.metric(
            0,
            "nodemesh_outlier_ejections_active",
            &["destination=\"pim.example.com\""]
        )
        .await,
        1.0
    );
    assert!(
        lab.admin_get(0, "/config_dump")
            .await
            .replace([' ', '\n'], "")
            .contains("\"timesEjected\":1")
    );
    // After baseEjectionTime it is tried again (and, still refusing,
    // ejected for twice as long).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        lab.metric(
            0,
            "nodemesh_outlier_ejections_active",
            &["destination=\"pim.example.com\""]
        )
        .await,
        0.0
    );
    for _ in 0..6 {
        round_trip(lab.connect("client", vip).await, 100)
            .await
            .unwrap();
    }
    let again = lab
        .log_entries(0, 2, |e| {
            e["attempts"].as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    assert_eq!(again.len(), 2, "{:?}", lab.access_log(0));
    assert!(
        lab.admin_get(0, "/config_dump")
            .await
            .replace([' ', '\n'], "")
            .contains("\"timesEjected\":2")
    );

    // Every endpoint down: one clear error naming each attempt.
    lab.write_policy(
        "egress.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [pim.example.com]
  addresses: ["{vip}"]
  resolution: STATIC
  ports: [{{number: 9000, name: tcp}}]
  endpoints: [{{address: "{d1}"}}, {{address: "{d2}"}}]
"#,
            vip = third_party(&lab, 100),
            d1 = third_party(&lab, 4),
            d2 = third_party(&lab, 5),
        ),
    );
    // A changed file is read twice, 500 ms apart, before it applies.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(lab.refused("client", vip).await);
    let failed = lab
        .log_entries(0, 1, |e| {
            e["error"]
                .as_str()
                .is_some_and(|s| s.contains("no endpoint could be reached"))
        })
        .await;
    assert_eq!(failed.len(), 1, "{:?}", lab.access_log(0));
    assert_eq!(failed[0]["response_flags"], "CONNECT");
    assert_eq!(failed[0]["attempts"].as_array().unwrap().len(), 2);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_fail_fast_with_their_flag() {
    let lab = Lab::start(pods(), &[], REGISTRY_ONLY).await;
    let up = third_party(&lab, 1);
    echo(up, 9000).await;
    lab.write_policy(
        "egress.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [pim.example.com]
  resolution: STATIC
  ports: [{{number: 9000, name: tcp}}]
  endpoints: [{{address: "{up}"}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: pim.example.com
  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 2}}}}}}
"#
        ),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let to = SocketAddr::from((up, 9000));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = lab.connect("client", to).await;
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let t = Instant::now();
    assert!(lab.refused("client", to).await);
    assert!(t.elapsed() < Duration::from_secs(1), "fails fast");
    let over = lab
        .log_entries(0, 1, |e| e["response_flags"] == "UPSTREAM_OVERFLOW")
        .await;
    assert_eq!(over.len(), 1, "{:?}", lab.access_log(0));
    assert!(
        over[0]["error"]
            .as_str()
            .unwrap()
            .contains("maxConnections (2)")
    );
    assert!(over[0]["error"].as_str().unwrap().contains("shop/pim"));
    assert_eq!(
        lab.metric(
            0,
            "nodemesh_upstream_overflows_total",
            &["destination=\"pim.example.com\""]
        )
        .await,
        1.0
    );
    // A closed connection frees its slot.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    round_trip(lab.connect("client", to).await, 10)
        .await
        .unwrap();
    lab.stop().await;
}

/// A TLS echo server for `names`, its certificate signed by a CA written
/// to `<dir>/<file>`; serves until the test ends.
async fn tls_echo(ip: Ipv4Addr, port: u16, names: &[&str], ca_file: &std::path::Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(ca_file, ca.pem()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(nodemesh_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_originated_for_plain_text_apps_and_a_wrong_name_is_refused_with_its_reason() {
    let lab = Lab::start(pods(), &[], REGISTRY_ONLY).await;
    let (good, wrong) = (third_party(&lab, 1), third_party(&lab, 2));
    tls_echo(
        good,
        9443,
        &["pim.example.com"],
        &lab.dir.join("pim-ca.pem"),
    )
    .await;
    tls_echo(
        wrong,
        9443,
        &["other.example.com"],
        &lab.dir.join("wrong-ca.pem"),
    )
    .await;
    let rules = |ca: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [pim.example.com]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP, targetPort: 9443}}]
  endpoints: [{{address: "{good}"}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: wrong, namespace: shop}}
spec:
  hosts: [wrong.example.com]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP, targetPort: 9443}}]
  endpoints: [{{address: "{wrong}"}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: pim.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 9080}}
      tls: {{mode: SIMPLE, caCertificates: ../pim-ca.pem}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: wrong, namespace: shop}}
spec:
  host: wrong.example.com
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}
"#
        )
    };
    lab.write_policy("egress.yaml", &rules("../wrong-ca.pem"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Plain bytes from the app, TLS on the wire, the same bytes back.
    let back = round_trip(lab.connect("client", (good, 9080).into()).await, 300_000)
        .await
        .unwrap();
    assert_eq!(back.len(), 300_000);
    let ok = lab
        .log_entries(0, 1, |e| {
            e["host"] == "pim.example.com" && e["result"] == "ok"
        })
        .await;
    assert_eq!(ok[0]["security"], "tls_originated", "{ok:?}");
    assert_eq!(ok[0]["upstream"], format!("{good}:9443"));
    assert_eq!(ok[0]["bytes_sent"], 300_000);
    // A certificate for another name: refused, the reason in the log.
    assert!(lab.refused("client", (wrong, 9080).into()).await);
    let refused = lab
        .log_entries(0, 1, |e| {
            e["host"] == "wrong.example.com" && e["result"] != "ok"
        })
        .await;
    assert_eq!(refused[0]["response_flags"], "TLS_FAILURE", "{refused:?}");
    let error = refused[0]["error"].as_str().unwrap();
    assert!(
        error.contains("TLS to wrong.example.com") && error.contains("wrong_name"),
        "{error}"
    );
    // A CA file that does not exist: the set is rejected, the last good
    // one stays (TLS still originated).
    lab.write_policy("egress.yaml", &rules("../missing-ca.pem"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    round_trip(lab.connect("client", (good, 9080).into()).await, 10)
        .await
        .unwrap();
    assert!(
        lab.metric(
            0,
            "nodemesh_policy_reloads_total",
            &["outcome=\"rejected\""]
        )
        .await
            >= 1.0
    );
    lab.stop().await;
}
