//! Egress to third parties under `outboundTrafficPolicy: REGISTRY_ONLY`
//! (issue 12): the agent's ways out of the mesh against the same client
//! outside it, and the in-memory costs of the decisions on the way.
//!
//! One node; a meshed pod (`client`) and one outside the mesh (`direct`,
//! the baselines); on the external host, at a third party's address, the
//! lab's echo protocol in plain text (9000) and in TLS (9443, a
//! certificate for `pim.example.com` from the third parties' CA). The
//! registry names them so:
//! - `echo.example.com`: STATIC, its endpoint the third party's address,
//!   TCP 9000 — named by address, then spliced (`l4`);
//! - `pim.example.com`: resolution NONE (the address the app chose), TLS
//!   on 9443 — the pod resolves the name (through the agent's DNS capture),
//!   the agent peeks the SNI and checks the pod resolved it to that
//!   address, then splices (`app_tls`); and HTTP on 9080 with `targetPort:
//!   9443` and a DestinationRule `tls: SIMPLE` for that port — the app
//!   speaks plain text and the agent originates TLS (`originated`).
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{Runner, SETTLE};
use crate::{
    cluster::{Cluster, ClusterSpec, PodSpec},
    thirdparty::ThirdPartySpec,
};

const PIM: &str = "pim.example.com";
const PLAIN_PORT: u16 = 9000;
const TLS_PORT: u16 = 9443;
/// The plain-text port the agent originates TLS from, to `TLS_PORT`.
const ORIGINATED_PORT: u16 = 9080;
/// What each route measures (of `ALL_TESTS`).
const TESTS: [&str; 3] = ["stream_1", "rr", "crr"];

fn spec(agent_config: &str) -> ClusterSpec {
    ClusterSpec {
        nodes: 1,
        pods: vec![
            PodSpec::new("client", 0),
            PodSpec::new("direct", 0).unenrolled(),
        ],
        services: vec![],
        agent: crate::AgentOptions {
            workloads_file: true,
            extra: format!("outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n{agent_config}\n"),
            ..Default::default()
        },
    }
}

fn registry_yaml(third_party: std::net::Ipv4Addr, ca: &std::path::Path) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.example.com]
  resolution: STATIC
  ports: [{{number: {PLAIN_PORT}, name: tcp, protocol: TCP}}]
  endpoints: [{{address: "{third_party}"}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [{PIM}]
  resolution: NONE
  ports:
  - {{number: {TLS_PORT}, name: tls, protocol: TLS}}
  - {{number: {ORIGINATED_PORT}, name: http, protocol: HTTP, targetPort: {TLS_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: {PIM}
  trafficPolicy:
    portLevelSettings:
    - port: {{number: {ORIGINATED_PORT}}}
      tls: {{mode: SIMPLE, caCertificates: "{ca}"}}
"#,
        ca = ca.display()
    )
}

/// One way out: which pod, to where, with which client options, and
/// whether the agent's CPU counts.
struct Route {
    key: &'static str,
    pod: &'static str,
    to: String,
    args: Vec<String>,
    meshed: bool,
}

/// The egress runs; their results under `egress/<route>`.
pub(super) fn run(secs: f64, agent_config: &str) -> Result<serde_json::Map<String, Value>> {
    let mut c = Cluster::start(spec(agent_config))?;
    // A third party's address and certificates on the external host; its
    // HTTPS server (443) stays idle, the lab's echo servers beside it.
    let tp = c.start_third_party(&ThirdPartySpec::new("pim-1", &[PIM]))?;
    // The lab's DNS server names it; pods resolve with it, the meshed one
    // through the agent's DNS capture (which records what it resolved).
    c.start_dns(&[(PIM, &tp.ip4.to_string())])?;
    let ca = c.third_party_ca()?.ca_cert;
    let (cert, key) = (tp.cert_dir.join("good.pem"), tp.cert_dir.join("good.key"));
    let path = |p: &PathBuf| p.display().to_string();
    c.spawn_external(&["serve", "--port", &PLAIN_PORT.to_string()])?;
    c.spawn_external(&[
        "serve",
        "--port",
        &TLS_PORT.to_string(),
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
    ])?;
    c.write_policy("egress.yaml", &registry_yaml(tp.ip4, &ca))?;
    wait_for_registry(&c)?;
    std::thread::sleep(SETTLE);
    let ca = path(&ca);
    let at = |port: u16| format!("{}:{port}", tp.ip4);
    let by_name = |port: u16| format!("{PIM}:{port}");
    let tls = || vec!["--tls-ca".to_owned(), ca.clone()];
    let routes = [
        Route {
            key: "direct_plain",
            pod: "direct",
            to: at(PLAIN_PORT),
            args: vec![],
            meshed: false,
        },
        Route {
            key: "direct_tls",
            pod: "direct",
            to: by_name(TLS_PORT),
            args: tls(),
            meshed: false,
        },
        Route {
            key: "l4",
            pod: "client",
            to: at(PLAIN_PORT),
            args: vec![],
            meshed: true,
        },
        Route {
            key: "app_tls",
            pod: "client",
            to: by_name(TLS_PORT),
            args: tls(),
            meshed: true,
        },
        Route {
            key: "originated",
            pod: "client",
            to: by_name(ORIGINATED_PORT),
            args: vec![],
            meshed: true,
        },
    ];
    // Each route works before any is measured: a refusal fails here, with
    // the agent's reason, not as a table of zeros.
    for r in &routes {
        let args: Vec<&str> = r.args.iter().map(String::as_str).collect();
        let mut argv = vec!["bench-client", "crr", "--to", &r.to, "--secs", "0.3"];
        argv.extend(["--parallel", "1"]);
        argv.extend(&args);
        let v = c.run_in_pod(r.pod, &argv);
        let ok = v
            .as_ref()
            .is_ok_and(|v| v["connections"].as_u64() > Some(0) && v["failed"] == 0);
        if !ok {
            let log: Vec<String> = c
                .access_log(0)
                .iter()
                .rev()
                .take(3)
                .map(ToString::to_string)
                .collect();
            bail!(
                "egress/{}: {} to {} does not work: {v:?}\nthe agent's last access-log entries: {log:#?}",
                r.key,
                r.pod,
                r.to
            );
        }
    }
    let runner = Runner { c: &c, secs };
    let agent = c.agent_pid(0);
    let mut results = serde_json::Map::new();
    // Test by test, every route in turn: what a ratio compares is measured
    // close together (this machine's speed drifts with its other load).
    for test in TESTS {
        eprintln!("bench: egress {test} ...");
        for r in &routes {
            let args: Vec<&str> = r.args.iter().map(String::as_str).collect();
            let pid = if r.meshed { agent } else { None };
            let v = runner.suite_of(r.pod, &r.to, &args, &[test], pid, None)?;
            let failed = v["crr"]["failed"].as_u64().unwrap_or(0);
            if failed > 0 {
                eprintln!("bench: egress {}: {failed} new connections failed", r.key);
            }
            let entry = results
                .entry(format!("egress/{}", r.key))
                .or_insert_with(|| json!({}));
            super::merge(entry, v);
        }
    }
    // The agent named and handled each as meant.
    let log = c.access_log(0);
    let seen = |host: &str, security: &str| {
        log.iter()
            .any(|e| e["host"] == host && e["security"] == security && e["result"] == "ok")
    };
    let sni_checked = log
        .iter()
        .any(|e| e["sni"] == PIM && e["host"] == PIM && e["result"] == "ok");
    results.insert(
        "egress/checks".into(),
        json!({
            "originated_logged_as_tls_originated": seen(PIM, "tls_originated"),
            "app_tls_named_by_its_sni": sni_checked,
            "sni_peeks": metric_sum(&c, "nodemesh_sni_peeks_total"),
            "registry_denials": metric_sum(&c, "nodemesh_registry_denials_total"),
        }),
    );
    drop(tp);
    drop(c);
    Ok(results)
}

/// Until the agent's registry holds the set (or 10 s).
fn wait_for_registry(c: &Cluster) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dump = c
            .admin_get(0, "/config_dump", None)
            .map(|r| r.body)
            .unwrap_or_default();
        if dump.contains(PIM) && dump.contains("echo.example.com") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the agent did not load the egress registry in 10 s:\n{}",
                c.agent_log(0)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of a counter's series in node 0's agent's metrics.
fn metric_sum(c: &Cluster, name: &str) -> f64 {
    c.admin_get(0, "/metrics", None)
        .map(|r| {
            r.body
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .fold(0.0, |a, b| a + b)
        })
        .unwrap_or(0.0)
}

/// In memory, one thread: what a REGISTRY_ONLY decision costs with 1,000
/// ServiceEntries (the lookups by address and by name the egress path
/// makes, hit and miss — a miss is a refusal — and the pod's DNS records
/// asked for the names of an address), and reading the SNI of a real
/// ClientHello (rustls with the agent's provider: X25519MLKEM768's key
/// share makes it ~1.5 KB).
pub(super) fn costs() -> Result<Value> {
    costs_with(20_000, 200_000)
}

/// [`costs`] with `lookups` calls per registry measurement and `parses`
/// ClientHellos read.
fn costs_with(lookups: usize, parses: usize) -> Result<Value> {
    use std::{
        hint::black_box,
        net::{IpAddr, Ipv4Addr, SocketAddr},
        time::Instant,
    };

    use nodemesh_agent::{dns::DnsRecords, policy, proxy::sni};

    const ENTRIES: usize = 1000;
    // A quarter each: STATIC with a VIP and two endpoints, NONE with a TLS
    // port, DNS, and wildcards (NONE, TLS).
    let vip = |i: usize| Ipv4Addr::new(10, 50, (i >> 8) as u8, i as u8);
    let endpoint = |i: usize, k: u8| Ipv4Addr::new(10, 60 + k, (i >> 8) as u8, i as u8);
    let mut text = String::new();
    for i in 0..ENTRIES {
        let doc = match i % 4 {
            0 => format!(
                "  hosts: [api{i}.static.example.com]\n  addresses: [\"{}\"]\n  resolution: STATIC\n  ports: [{{number: 8080, name: tcp, protocol: TCP}}, {{number: 443, name: tls, protocol: TLS}}]\n  endpoints: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n",
                vip(i),
                endpoint(i, 0),
                endpoint(i, 1)
            ),
            1 => format!(
                "  hosts: [api{i}.none.example.com]\n  resolution: NONE\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n"
            ),
            2 => format!(
                "  hosts: [api{i}.dns.example.com]\n  resolution: DNS\n  ports: [{{number: 443, name: https, protocol: HTTPS}}, {{number: 80, name: http, protocol: HTTP}}]\n"
            ),
            _ => format!(
                "  hosts: [\"*.tenant{i}.example.net\"]\n  resolution: NONE\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n"
            ),
        };
        text += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se{i}, namespace: ns{}}}\nspec:\n{doc}",
            i % 10
        );
    }
    let started = Instant::now();
    let loaded = policy::compile_texts(
        &vec![(PathBuf::from("registry-bench.yaml"), text)],
        policy::DEFAULT_ROOT_NAMESPACE,
    )
    .context("compiling the registry bench's ServiceEntries")?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let registry = loaded.registry;
    anyhow::ensure!(
        registry.entries().len() == ENTRIES,
        "not every entry compiled"
    );

    /// ns per call of `f(i)`, i running over `n` calls.
    fn per_call<T>(n: usize, mut f: impl FnMut(usize) -> T) -> f64 {
        let started = Instant::now();
        for i in 0..n {
            black_box(f(black_box(i)));
        }
        started.elapsed().as_nanos() as f64 / n as f64
    }
    let n = lookups;
    // Hits spread over every STATIC entry (the average scan: half).
    let statics: Vec<SocketAddr> = (0..ENTRIES)
        .step_by(4)
        .map(|i| SocketAddr::from((vip(i), 8080)))
        .collect();
    let names: Vec<String> = (0..ENTRIES)
        .map(|i| match i % 4 {
            0 => format!("api{i}.static.example.com"),
            1 => format!("api{i}.none.example.com"),
            2 => format!("api{i}.dns.example.com"),
            _ => format!("x.tenant{i}.example.net"),
        })
        .collect();
    let stranger = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 7), 8080));
    anyhow::ensure!(
        statics.iter().all(|a| registry.by_address(*a).is_some())
            && names.iter().all(|n| registry.by_name(n, 443).is_some())
            && registry.by_address(stranger).is_none(),
        "the registry bench's lookups do not find what they should"
    );
    let by_address_hit = per_call(n, |i| registry.by_address(statics[i % statics.len()]));
    let by_address_miss = per_call(n, |_| registry.by_address(stranger));
    let by_name_hit = per_call(n, |i| registry.by_name(&names[i % names.len()], 443));
    let by_name_miss = per_call(n, |_| registry.by_name("evil.example.org", 443));
    let is_tls_port = per_call(n, |_| registry.is_tls_port(8443));
    // A pod that resolved 100 names (a name for each of 100 addresses).
    let records = DnsRecords::default();
    for k in 0..100u8 {
        let ip = IpAddr::from([192, 0, 2, k]);
        records.record(
            7,
            &format!("host{k}.example.com"),
            &[ip],
            Duration::from_secs(300),
        );
    }
    let names_of = per_call(n, |i| {
        records.names_of(7, IpAddr::from([192, 0, 2, (i % 100) as u8]))
    });
    // A whole refusal on a port no entry makes TLS, as the egress path
    // decides it: not an address of the registry, no name the pod
    // resolved it by.
    let refusal = per_call(n, |_| {
        registry.by_address(stranger).is_none()
            && !registry.is_tls_port(stranger.port())
            && records
                .names_of(7, stranger.ip())
                .iter()
                .all(|name| registry.by_name(name, stranger.port()).is_none())
    });

    // The SNI of a real ClientHello.
    let hello = {
        let config = rustls::ClientConfig::builder_with_provider(nodemesh_agent::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(PIM)?;
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        out
    };
    anyhow::ensure!(
        sni::parse(&hello) == sni::Hello::Sni(PIM.into()),
        "the ClientHello's SNI did not parse"
    );
    let sni_parse = per_call(parses, |_| sni::parse(&hello));

    Ok(json!({
        "registry": {
            "service_entries": ENTRIES,
            "load_ms": load_ms,
            "by_address_hit_ns": by_address_hit,
            "by_address_miss_ns": by_address_miss,
            "by_name_hit_ns": by_name_hit,
            "by_name_miss_ns": by_name_miss,
            "is_tls_port_ns": is_tls_port,
            "dns_names_of_ns": names_of,
            "refusal_ns": refusal,
        },
        "sni": {
            "client_hello_bytes": hello.len(),
            "parse_ns": sni_parse,
        },
    }))
}

/// The egress table: each meshed route beside its baseline outside the
/// mesh (L4 beside plain, the app's TLS and the agent's beside the app's
/// TLS without the mesh), then the in-memory costs.
pub(super) fn print_table(s: &Value) {
    let r = &s["results"];
    if r["egress/l4"].is_null() {
        return;
    }
    let metrics = [
        ("throughput 1 stream (Gbit/s)", "stream_1", "gbit_per_s"),
        ("64 B req/resp p50 (us)", "rr", "p50_us"),
        ("64 B req/resp p99 (us)", "rr", "p99_us"),
        ("new connections/s", "crr", "per_second"),
        (
            "agent CPU s/GiB (1 stream)",
            "stream_1",
            "agent_cpu_s_per_gib",
        ),
        (
            "agent CPU us/request (RR)",
            "rr",
            "agent_cpu_us_per_request",
        ),
        (
            "agent CPU us/new connection",
            "crr",
            "agent_cpu_us_per_connection",
        ),
    ];
    println!(
        "\n{:<30} {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} {:>10} {:>6}",
        "egress (REGISTRY_ONLY)",
        "dir.pln",
        "l4",
        "ratio",
        "dir.tls",
        "app_tls",
        "ratio",
        "originated",
        "ratio"
    );
    for (label, test, field) in metrics {
        let get = |route: &str| r[format!("egress/{route}")][test][field].as_f64();
        let fmt = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or("-".into());
        let ratio = |x: Option<f64>, base: Option<f64>| match (x, base) {
            (Some(x), Some(b)) if b > 0.0 => format!("{:.2}", x / b),
            _ => "-".into(),
        };
        let (plain, tls) = (get("direct_plain"), get("direct_tls"));
        let (l4, app, orig) = (get("l4"), get("app_tls"), get("originated"));
        println!(
            "{:<30} {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} {:>10} {:>6}",
            label,
            fmt(plain),
            fmt(l4),
            ratio(l4, plain),
            fmt(tls),
            fmt(app),
            ratio(app, tls),
            fmt(orig),
            ratio(orig, tls),
        );
    }
    println!(
        "dir.pln/dir.tls = a pod outside the mesh, plain / doing TLS itself; l4 = meshed, plain to a STATIC ServiceEntry's address (spliced);\napp_tls = meshed, doing TLS itself to a ServiceEntry TLS host by name (DNS capture, SNI peek and check, spliced);\noriginated = meshed, plain to the host, the agent originating TLS (DestinationRule SIMPLE); both TLS ratios are to dir.tls"
    );
    println!("checks: {}", r["egress/checks"]);
    let c = &s["egress_costs"];
    if !c.is_null() {
        let g = &c["registry"];
        let ns = |v: &Value| v.as_f64().unwrap_or(0.0);
        println!(
            "registry of {} ServiceEntries (in memory): by address {:.0} ns (hit) / {:.0} ns (miss), by name {:.0} / {:.0} ns, a pod's DNS names of an address {:.0} ns; a whole REGISTRY_ONLY refusal {:.0} ns",
            g["service_entries"],
            ns(&g["by_address_hit_ns"]),
            ns(&g["by_address_miss_ns"]),
            ns(&g["by_name_hit_ns"]),
            ns(&g["by_name_miss_ns"]),
            ns(&g["dns_names_of_ns"]),
            ns(&g["refusal_ns"]),
        );
        println!(
            "SNI of a {} B rustls ClientHello: {:.0} ns",
            c["sni"]["client_hello_bytes"],
            ns(&c["sni"]["parse_ns"])
        );
    }
}

#[cfg(test)]
mod tests {
    /// The registry of the cost measurement compiles whole, and the
    /// lookups find what they should (few calls: this is no measurement).
    #[test]
    fn the_cost_measurement_runs() {
        let v = super::costs_with(50, 50).unwrap();
        assert_eq!(v["registry"]["service_entries"], 1000);
        let hello = v["sni"]["client_hello_bytes"].as_u64().unwrap();
        assert!(hello > 1000, "X25519MLKEM768's key share: {hello} B");
        assert!(v["registry"]["refusal_ns"].as_f64().unwrap() > 0.0);
    }
}
