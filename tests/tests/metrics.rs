//! Metrics, health endpoints and access logs on the virtual cluster, read
//! by a real Prometheus scraping every agent. Root; fails, never skips,
//! when the cluster or Prometheus cannot be started.
//!
//! One cluster for the whole file (each step builds on the counts of the
//! ones before), so the steps run in order inside one test.
use std::{process::Stdio, time::Duration};

use nodemesh_lab::{
    Cluster, ClusterSpec, PodSpec, ServiceSpec,
    cluster::wait_for,
    prometheus::{Prometheus, Sample, promtool_check_metrics},
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER_REMOTE: &str = "spiffe://cluster.local/ns/shop/sa/server-remote";
const SERVER_LOCAL: &str = "spiffe://cluster.local/ns/shop/sa/server-local";

fn cluster() -> Cluster {
    let spec = ClusterSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0),
            PodSpec::new("promo", 0),
            PodSpec::new("server-local", 0),
            PodSpec::new("server-remote", 1),
            PodSpec::new("outsider", 1).unenrolled(),
        ],
        services: vec![ServiceSpec::new("remote", 80, 8080, &["server-remote"])],
        // Workloads files: readiness_follows_enrolment breaks one (the
        // metrics from the API's workload names: tests/tests/kubernetes.rs).
        agent: nodemesh_lab::AgentOptions {
            workloads_file: true,
            ..Default::default()
        },
    };
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    c.spawn_in_pod("server-local", &["serve", "--port", "8080"])
        .unwrap();
    c
}

/// `client send`: `SINK\n` and `bytes` pattern bytes up, `<bytes> <sha256>\n` down.
fn send(c: &Cluster, from: &str, to: &str, bytes: u64) {
    let r = c
        .run_in_pod(
            from,
            &["client", "send", "--to", to, "--bytes", &bytes.to_string()],
        )
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

fn up_bytes(bytes: u64) -> f64 {
    (bytes + "SINK\n".len() as u64) as f64
}

fn down_bytes(bytes: u64) -> f64 {
    (bytes.to_string().len() + 1 + 64 + 1) as f64
}

/// The result as `reporter -> value`, asserting one series per reporter.
fn by_reporter(samples: &[Sample]) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = samples
        .iter()
        .map(|s| (s.labels["reporter"].clone(), s.value))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn both(value: f64) -> Vec<(String, f64)> {
    vec![("destination".into(), value), ("source".into(), value)]
}

/// Waits until `sum by (reporter) (expr)` is `value` from both reporters.
fn expect_both(p: &Prometheus, expr: &str, value: f64) -> Vec<Sample> {
    let q = format!("sum by (reporter) ({expr})");
    p.wait_until(&q, WAIT, |r| by_reporter(r) == both(value))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn one_value(p: &Prometheus, q: &str, check: impl Fn(f64) -> bool) -> f64 {
    let r = p
        .wait_until(q, WAIT, |r| r.len() == 1 && check(r[0].value))
        .unwrap_or_else(|e| panic!("{e:#}"));
    r[0].value
}

#[test]
fn metrics_health_and_access_logs() {
    let mut c = cluster();
    for k in 0..2 {
        wait_for("the agent to be ready", WAIT, || {
            c.admin_get(k, "/healthz/ready", None)
                .is_ok_and(|r| r.status == 200)
        });
        assert_eq!(c.admin_get(k, "/healthz/live", None).unwrap().status, 200);
    }
    let p = Prometheus::start(&c).unwrap_or_else(|e| panic!("{e:#}"));
    p.wait_until("sum(up{job=\"nodemesh-agent\"})", WAIT, |r| {
        r.len() == 1 && r[0].value == 2.0
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", p.log()));

    traffic_from_both_reporters(&c, &p);
    bytes_show_while_flowing(&c);
    exposition_formats(&c);
    own_metrics_and_config_dump(&c, &p);
    denials(&c, &p);
    plaintext_inbound(&c, &p);
    tls_failures(&c, &p);
    dashboard_queries_what_the_agents_emit(&c, &p);
    drop(p);
    readiness_follows_enrolment(&mut c);
}

/// A known number of connections and bytes, cross node (through a service)
/// and same node: exact counts with Istio's labels from both reporters.
fn traffic_from_both_reporters(c: &Cluster, p: &Prometheus) {
    let vip = format!("{}:80", c.service("remote").vip4);
    let local = format!("{}:8080", c.pod("server-local").ip4);
    let (remote_n, remote_bytes) = (3u64, 100_000u64);
    let (local_n, local_bytes) = (2u64, 50_000u64);
    for _ in 0..remote_n {
        send(c, "client", &vip, remote_bytes);
    }
    for _ in 0..local_n {
        send(c, "client", &local, local_bytes);
    }

    let remote = "{source_workload=\"client\",destination_workload=\"server-remote\"}";
    expect_both(
        p,
        &format!("istio_tcp_connections_opened_total{remote}"),
        remote_n as f64,
    );
    expect_both(
        p,
        &format!("istio_tcp_connections_closed_total{remote}"),
        remote_n as f64,
    );
    expect_both(
        p,
        &format!("istio_tcp_received_bytes_total{remote}"),
        remote_n as f64 * up_bytes(remote_bytes),
    );
    expect_both(
        p,
        &format!("istio_tcp_sent_bytes_total{remote}"),
        remote_n as f64 * down_bytes(remote_bytes),
    );
    // Every label, per reporter.
    let labelled = p
        .query(&format!("istio_tcp_connections_closed_total{remote}"))
        .unwrap();
    assert_eq!(labelled.len(), 2, "{labelled:#?}");
    for s in &labelled {
        let l = &s.labels;
        // HBONE is mutual TLS as both reporters see it (as ztunnel says).
        let security = match l["reporter"].as_str() {
            "source" | "destination" => "mutual_tls",
            other => panic!("reporter {other}"),
        };
        for (k, v) in [
            ("source_workload_namespace", "shop"),
            ("source_principal", CLIENT),
            ("source_app", "client"),
            ("source_canonical_service", "client"),
            ("source_canonical_revision", "latest"),
            ("source_version", "unknown"),
            ("destination_workload_namespace", "shop"),
            ("destination_principal", SERVER_REMOTE),
            ("destination_app", "server-remote"),
            ("destination_service", "remote.shop.svc.cluster.local"),
            ("destination_service_name", "remote"),
            ("destination_service_namespace", "shop"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", security),
            ("source_region", "unknown"),
            ("source_zone", "unknown"),
            ("destination_region", "unknown"),
            ("destination_zone", "unknown"),
        ] {
            assert_eq!(l.get(k).map(String::as_str), Some(v), "{k} in {l:#?}");
        }
    }

    // Same node: this agent reports as source and as destination.
    let same = "{source_workload=\"client\",destination_workload=\"server-local\"}";
    expect_both(
        p,
        &format!("istio_tcp_connections_closed_total{same}"),
        local_n as f64,
    );
    expect_both(
        p,
        &format!("istio_tcp_received_bytes_total{same}"),
        local_n as f64 * up_bytes(local_bytes),
    );
    expect_both(
        p,
        &format!("istio_tcp_sent_bytes_total{same}"),
        local_n as f64 * down_bytes(local_bytes),
    );
    let security = p
        .query(&format!(
            "sum by (reporter, connection_security_policy, destination_principal, instance) (istio_tcp_connections_opened_total{same})"
        ))
        .unwrap();
    let mut seen: Vec<(String, String)> = security
        .iter()
        .map(|s| {
            assert_eq!(s.labels["destination_principal"], SERVER_LOCAL);
            assert_eq!(s.labels["instance"], c.stats_address(0).to_string());
            assert_eq!(s.value, local_n as f64);
            (
                s.labels["reporter"].clone(),
                s.labels["connection_security_policy"].clone(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("destination".to_string(), "none".to_string()),
            ("source".to_string(), "unknown".to_string())
        ]
    );
    let failed = p
        .query("istio_tcp_connections_failed_total{source_workload=\"client\"}")
        .unwrap();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Reads one series' value from an agent's own `/metrics` (no Prometheus:
/// this is about what the agent shows at a given moment).
fn agent_value(c: &Cluster, k: usize, metric: &str, contains: &[&str]) -> Option<f64> {
    let body = c.admin_get(k, "/metrics", None).ok()?.body;
    body.lines()
        .filter(|l| l.starts_with(metric) && contains.iter().all(|s| l.contains(s)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A long, paced transfer shows bytes before it ends.
fn bytes_show_while_flowing(c: &Cluster) {
    let to = format!("{}:8080", c.pod("server-remote").ip4);
    let total = 3_000_000u64;
    let mut child = c
        .pod_command(
            "promo",
            &[
                "client",
                "send",
                "--to",
                &to,
                "--bytes",
                &total.to_string(),
                "--pace-ms",
                "100",
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let series = [
        "reporter=\"source\"",
        "source_workload=\"promo\"",
        "destination_workload=\"server-remote\"",
    ];
    let mut midway = None;
    wait_for("bytes counted mid-transfer", WAIT, || {
        midway = agent_value(c, 0, "istio_tcp_received_bytes_total{", &series);
        midway.is_some_and(|v| v > 0.0)
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "the transfer ended before its bytes were seen"
    );
    assert!(midway < Some(up_bytes(total)), "{midway:?}");
    assert!(child.wait().unwrap().success());
    wait_for("all bytes counted", WAIT, || {
        agent_value(c, 0, "istio_tcp_received_bytes_total{", &series) == Some(up_bytes(total))
    });
}

/// The classic text format passes promtool; OpenMetrics when asked for.
fn exposition_formats(c: &Cluster) {
    for k in 0..2 {
        let text = c.admin_get(k, "/metrics", None).unwrap();
        assert_eq!(text.status, 200);
        assert_eq!(
            text.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(text.body.contains("istio_tcp_connections_opened_total{"));
        promtool_check_metrics(&text.body).unwrap_or_else(|e| panic!("{e:#}\n{}", text.body));
        let om = c
            .admin_get(
                k,
                "/metrics",
                Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            )
            .unwrap();
        assert_eq!(
            om.header("content-type"),
            Some("application/openmetrics-text;charset=utf-8;version=1.0.0")
        );
        assert!(om.body.ends_with("# EOF\n"));
        assert!(om.body.contains("# TYPE istio_tcp_sent_bytes counter"));
    }
}

fn own_metrics_and_config_dump(c: &Cluster, p: &Prometheus) {
    let node0 = format!("instance=\"{}\"", c.stats_address(0));
    let node1 = format!("instance=\"{}\"", c.stats_address(1));
    one_value(p, &format!("nodemesh_enrolled_pods{{{node0}}}"), |v| {
        v == 3.0
    });
    one_value(p, &format!("nodemesh_enrolled_pods{{{node1}}}"), |v| {
        v == 1.0
    });
    // Every proxied connection was redirected by the kernel and found.
    let redirected = one_value(
        p,
        &format!("nodemesh_ebpf_events_total{{{node0},event=\"redirected\"}}"),
        |v| v >= 6.0,
    );
    let found = one_value(
        p,
        &format!("nodemesh_orig_dst_lookups_total{{{node0},result=\"found\"}}"),
        |v| v >= 6.0,
    );
    assert!(found <= redirected, "{found} > {redirected}");
    one_value(
        p,
        &format!("nodemesh_hbone_pool_connections_opened_total{{{node0}}}"),
        |v| v >= 1.0,
    );
    one_value(p, &format!("nodemesh_policy_generation{{{node0}}}"), |v| {
        v == 1.0
    });
    one_value(
        p,
        &format!("nodemesh_policy_reloads_total{{{node0},outcome=\"applied\"}}"),
        |v| v == 1.0,
    );
    one_value(
        p,
        &format!("nodemesh_certificate_expiry_seconds{{{node0},identity=\"{CLIENT}\"}}"),
        |v| v > 80_000.0 && v <= 86_460.0,
    );
    one_value(
        p,
        &format!("nodemesh_active_connections{{{node0},direction=\"outbound\"}}"),
        |v| v == 0.0,
    );
    one_value(p, "count(nodemesh_build_info)", |v| v == 2.0);

    let dump = c.admin_get(0, "/config_dump", None).unwrap();
    assert_eq!(dump.status, 200);
    assert!(
        !dump.body.contains("PRIVATE KEY") && !dump.body.contains("BEGIN"),
        "{}",
        dump.body
    );
    let v: Value = serde_json::from_str(&dump.body).unwrap();
    assert_eq!(v["config"]["adminAddress"], c.admin_address(0).to_string());
    assert_eq!(v["node"], "node-0");
    assert_eq!(v["policies"]["generation"], 1);
    assert_eq!(v["localWorkloads"].as_array().map(Vec::len), Some(3));
    assert!(
        v["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["identity"] == CLIENT),
        "{v}"
    );
}

const DENY_PROMO: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-promo, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: [\"*/sa/promo\"]}}]
";

/// A denial: DENY from both reporters, cross node and same node, and the
/// access logs name the policy.
fn denials(c: &Cluster, p: &Prometheus) {
    c.write_policy("deny.yaml", DENY_PROMO).unwrap();
    one_value(p, "min(nodemesh_policy_generation)", |v| v == 2.0);
    for to in [
        format!("{}:8080", c.pod("server-remote").ip4),
        format!("{}:8080", c.pod("server-local").ip4),
    ] {
        let r = c.probe("promo", &to);
        assert!(r["result"] == "reset" || r["result"] == "eof", "{r}");
    }
    for dst in ["server-remote", "server-local"] {
        let labels = format!(
            "{{source_workload=\"promo\",destination_workload=\"{dst}\",response_flags=\"DENY\"}}"
        );
        expect_both(
            p,
            &format!("istio_tcp_connections_closed_total{labels}"),
            1.0,
        );
        expect_both(
            p,
            &format!("istio_tcp_connections_failed_total{labels}"),
            1.0,
        );
    }
    let remote = c.log_entries(1, |e| e["response_flags"] == "DENY");
    assert_eq!(remote.len(), 1, "{remote:?}");
    assert_eq!(remote[0]["policy"], "shop/no-promo");
    assert_eq!(remote[0]["result"], "denied");
    let local = c.log_entries(0, |e| {
        e["response_flags"] == "DENY" && e["dst_workload"] == "shop/server-local"
    });
    assert_eq!(local.len(), 1, "{local:?}");
    assert_eq!(local[0]["policy"], "shop/no-promo");
    assert!(
        local[0]["error"]
            .as_str()
            .unwrap()
            .contains("policy shop/no-promo"),
        "{local:?}"
    );
}

const STRICT_SHOP: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
";

/// A client outside the mesh, captured at the destination: one report
/// (destination), no principal, security `none`, exact bytes; under STRICT
/// a DENY naming the PeerAuthentication.
fn plaintext_inbound(c: &Cluster, p: &Prometheus) {
    let (n, bytes) = (2u64, 100_000u64);
    let to = format!("{}:8080", c.pod("server-local").ip4);
    for _ in 0..n {
        send(c, "outsider", &to, bytes);
    }
    // The outsider is in no workloads file: nothing is known of the source.
    let plain = "{source_workload=\"unknown\",destination_workload=\"server-local\",source_principal=\"unknown\",connection_security_policy=\"none\"}";
    let only_destination = |metric: &str, value: f64| {
        let q = format!("sum by (reporter) ({metric}{plain})");
        p.wait_until(&q, WAIT, |r| {
            by_reporter(r) == vec![("destination".to_string(), value)]
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    };
    only_destination("istio_tcp_connections_closed_total", n as f64);
    only_destination("istio_tcp_received_bytes_total", n as f64 * up_bytes(bytes));
    only_destination("istio_tcp_sent_bytes_total", n as f64 * down_bytes(bytes));

    c.write_policy("strict.yaml", STRICT_SHOP).unwrap();
    one_value(p, "min(nodemesh_policy_generation)", |v| v == 3.0);
    let r = c.probe("outsider", &to);
    assert!(r["result"] == "reset" || r["result"] == "eof", "{r}");
    one_value(
        p,
        "sum(istio_tcp_connections_failed_total{reporter=\"destination\",source_principal=\"unknown\",destination_workload=\"server-local\",response_flags=\"DENY\"})",
        |v| v == 1.0,
    );
    let refused = c.log_entries(0, |e| e["policy"] == "shop/strict");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["response_flags"], "DENY");
    assert!(refused[0]["src_identity"].is_null(), "{refused:?}");
    std::fs::remove_file(c.policy_dir().join("strict.yaml")).unwrap();
    one_value(p, "min(nodemesh_policy_generation)", |v| v == 4.0);
}

fn hbone_probe(c: &Cluster, mode: &str) -> Value {
    let to = format!("{}:15008", c.pod("server-remote").ip4);
    c.run_in_pod("outsider", &["hbone-probe", "--to", &to, "--mode", mode])
        .unwrap()
}

/// Certificates the destination refuses: TLS_FAILURE with the reason in
/// the agent's counter and the access log.
fn tls_failures(c: &Cluster, p: &Prometheus) {
    for (mode, reason) in [
        // The other CA has the mesh CA's name but not its key.
        ("other-ca", "bad_signature"),
        ("no-cert", "no_client_certificate"),
    ] {
        let r = hbone_probe(c, mode);
        assert_ne!(r["ended"], "open", "{r}");
        let logged = c.log_entries(1, |e| {
            e["result"] == "tls" && e["error"].as_str().is_some_and(|s| s.contains(reason))
        });
        assert_eq!(logged.len(), 1, "{mode}: {:?}", c.access_log(1));
        assert_eq!(logged[0]["response_flags"], "TLS_FAILURE");
        assert_eq!(logged[0]["dst_workload"], "shop/server-remote");
        one_value(
            p,
            &format!(
                "nodemesh_tls_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}}"
            ),
            |v| v == 1.0,
        );
    }
    one_value(
        p,
        "sum(istio_tcp_connections_failed_total{reporter=\"destination\",destination_workload=\"server-remote\",response_flags=\"TLS_FAILURE\",source_principal=\"unknown\"})",
        |v| v == 2.0,
    );
}

/// Every query of the Grafana dashboard is valid PromQL and names only
/// metrics the agents emit.
fn dashboard_queries_what_the_agents_emit(c: &Cluster, p: &Prometheus) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/nodemesh-agent-dashboard.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let emitted: std::collections::BTreeSet<String> = (0..2)
        .flat_map(|k| {
            let body = c.admin_get(k, "/metrics", None).unwrap().body;
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in exprs {
        let names: Vec<&str> = expr
            .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .filter(|w| w.starts_with("nodemesh_") || w.starts_with("istio_"))
            .collect();
        assert!(!names.is_empty(), "{expr} names no metric");
        for name in names {
            assert!(emitted.contains(name), "{expr}: the agents emit no {name}");
        }
        p.query(&expr.replace("$__rate_interval", "1m"))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// Not ready while a local workload cannot be enrolled (its netns is not
/// there, so it has no certificate yet); ready once it can.
fn readiness_follows_enrolment(c: &mut Cluster) {
    let good = c.workloads_yaml(1, &|p| p.spec.enrolled);
    let netns = format!("/run/netns/{}", c.pod("server-remote").netns);
    let missing = format!("{netns}-not-yet");
    assert!(good.contains(&netns), "{good}");
    let path = c.agents[1].workloads.clone();
    let write = |yaml: &str| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    c.stop_agent(1).unwrap();
    write(&good.replace(&netns, &missing));
    c.start_agent(1).unwrap();
    let r = c.admin_get(1, "/healthz/ready", None).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.body.trim(),
        "not ready: waiting for local workload certificates issued"
    );
    write(&good);
    wait_for("ready once the pod is enrolled", WAIT, || {
        c.admin_get(1, "/healthz/ready", None)
            .is_ok_and(|r| r.status == 200)
    });
    assert_eq!(
        c.probe("client", &format!("{}:8080", c.pod("server-remote").ip4))["result"],
        "ok"
    );
}
