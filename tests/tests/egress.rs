//! Third parties through the mesh (issue 12): the egress registry under
//! REGISTRY_ONLY and ALLOW_ANY, TLS origination, and L4 resilience, with
//! real clients (curl through glibc's resolver, so the pod's DNS goes
//! through the agent's capture) in meshed pods, real TLS servers on the
//! external host, and a real DNS server (dnsmasq) answering their names.
//! Root; fails, never skips, when the cluster cannot be built.
use std::time::{Duration, Instant};

use nodemesh_lab::{
    Cluster, ClusterSpec, PodSpec,
    cluster::wait_for,
    thirdparty::{CertKind, Fault, ThirdParty, ThirdPartySpec},
};
use serde_json::Value;

const PIM: &str = "pim.example.com";

/// Two nodes; meshed clients on node 0; a pod out of the mesh beside them.
/// Workloads and policies from files (the registry is the same set either
/// way; Kubernetes mode has its own tests).
fn cluster(extra: &str) -> Cluster {
    let mut spec = ClusterSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0),
            PodSpec::new("client2", 0),
            PodSpec::new("remote-client", 1),
            PodSpec::new("outsider", 0).unenrolled(),
        ],
        services: vec![],
        agent: Default::default(),
    };
    spec.agent.workloads_file = true;
    spec.agent.extra = extra.to_owned();
    Cluster::start(spec).expect("building the virtual cluster (needs root)")
}

const REGISTRY_ONLY: &str = "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";

fn start(c: &Cluster, spec: ThirdPartySpec) -> ThirdParty {
    c.start_third_party(&spec)
        .unwrap_or_else(|e| panic!("starting third party {}: {e:#}", spec.name))
}

#[derive(Debug)]
struct Curl {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Curl {
    fn ok(&self) -> bool {
        self.code == 0 && self.stderr.is_empty()
    }

    fn json(&self) -> Value {
        assert!(self.ok(), "curl failed: {self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// curl in a pod: names resolved by glibc with the pod's resolv.conf.
fn curl(c: &Cluster, pod: &str, args: &[&str]) -> Curl {
    let started = Instant::now();
    let out = c
        .pod_program(pod, "curl", args)
        .output()
        .expect("running curl (`cargo xtask setup` installs it)");
    Curl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

fn get(c: &Cluster, pod: &str, url: &str) -> Curl {
    let ca = c.third_party_ca().unwrap().ca_cert.display().to_string();
    curl(c, pod, &["-sS", "--max-time", "10", "--cacert", &ca, url])
}

/// Waits for the access log line of node 0 that `f` picks, and returns it.
fn entry(c: &Cluster, k: usize, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_for(what, Duration::from_secs(10), || {
        found = c.log_entries(k, &f).into_iter().next_back();
        found.is_some()
    });
    found.unwrap()
}

/// A metric's value on node k, summed over the series with every label.
fn metric(c: &Cluster, k: usize, name: &str, labels: &[&str]) -> f64 {
    let text = c
        .admin_get(k, "/metrics", None)
        .map(|r| r.body)
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Writes `yaml` as the egress policy and waits until node 0 has it in
/// force (its generation moved).
fn apply(c: &Cluster, name: &str, yaml: &str) {
    let before = generation(c);
    c.write_policy(name, yaml).unwrap();
    wait_for("the policy set applied", Duration::from_secs(10), || {
        generation(c) > before
    });
}

fn generation(c: &Cluster) -> f64 {
    c.admin_get(0, "/metrics", None)
        .map(|r| r.body)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("nodemesh_policy_generation "))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0)
}

fn ip(tp: &ThirdParty) -> String {
    tp.ip4.to_string()
}

#[test]
fn registry_only_passes_by_ip_name_and_sni_and_refuses_the_rest_each_with_its_reason() {
    let mut c = cluster(REGISTRY_ONLY);
    let ca = c.third_party_ca().unwrap();
    let payments = start(
        &c,
        ThirdPartySpec::new("payments-1", &["payments.example.com"])
            .port(8080)
            .plaintext(),
    );
    let pim = start(&c, ThirdPartySpec::new("pim-1", &[PIM]));
    let notify = start(
        &c,
        ThirdPartySpec::new(
            "notify-1",
            &["api.notify.example.com", "unknown.example.com"],
        ),
    );
    let stranger = start(
        &c,
        ThirdPartySpec::new("stranger-1", &["stranger.example.com"])
            .port(8080)
            .plaintext(),
    );
    c.start_dns(&[
        (PIM, ip(&pim).as_str()),
        ("api.notify.example.com", ip(&notify).as_str()),
        ("unknown.example.com", ip(&notify).as_str()),
        ("other.example.com", ip(&notify).as_str()),
        ("stranger.example.com", ip(&stranger).as_str()),
    ])
    .unwrap();
    apply(
        &c,
        "egress.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments, namespace: shop}}
spec:
  hosts: [payments.example.com]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: "{payments}"}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [{PIM}]
  resolution: DNS
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: notify, namespace: shop}}
spec:
  hosts: ["*.notify.example.com"]
  resolution: NONE
  ports: [{{number: 443, name: tls, protocol: TLS}}]
"#,
            payments = payments.ip4
        ),
    );
    // By IP (a STATIC endpoint), plain HTTP.
    let r = get(&c, "client", &format!("http://{}/by-ip", payments.addr4()));
    assert_eq!(r.json()["server"], "payments-1");
    let e = entry(&c, 0, "payments in the access log", |e| {
        e["host"] == "payments.example.com"
    });
    assert_eq!(e["result"], "ok", "{e}");
    // By name: resolved through the agent (answer recorded), TLS by the
    // app; the agent connects to its own resolution of the host.
    let r = get(&c, "client", &format!("https://{PIM}/by-name"));
    assert_eq!(r.json()["server"], "pim-1");
    assert_eq!(r.json()["sni"], PIM);
    let e = entry(&c, 0, "pim in the access log", |e| e["host"] == PIM);
    assert_eq!(e["result"], "ok", "{e}");
    assert_eq!(e["sni"], PIM);
    assert_eq!(e["upstream"], pim.addr4().to_string());
    // By SNI, under a wildcard host.
    let r = get(&c, "client", "https://api.notify.example.com/by-sni");
    assert_eq!(r.json()["server"], "notify-1");
    let e = entry(&c, 0, "notify in the access log", |e| {
        e["host"] == "api.notify.example.com"
    });
    assert_eq!(e["result"], "ok", "{e}");
    assert!(
        metric(
            &c,
            0,
            "istio_tcp_connections_opened_total",
            &["destination_service=\"api.notify.example.com\""]
        ) >= 1.0
    );

    // An address nothing names, even though the pod resolved a name for it.
    let r = get(&c, "client", "http://stranger.example.com:8080/");
    assert!(!r.ok(), "{r:?}");
    let e = entry(&c, 0, "the refusal", |e| {
        e["orig_dst"] == stranger.addr4().to_string()
    });
    assert_eq!(e["response_flags"], "REGISTRY_ONLY", "{e}");
    let why = e["error"].as_str().unwrap();
    assert!(
        why.contains("resolved by this pod as stranger.example.com"),
        "{why}"
    );
    assert!(c.agent_log(0).contains(&stranger.addr4().to_string()));
    // A TLS name not in the registry.
    let r = get(&c, "client", "https://unknown.example.com/");
    assert!(!r.ok(), "{r:?}");
    let e = entry(&c, 0, "the SNI refusal", |e| {
        e["sni"] == "unknown.example.com"
    });
    assert_eq!(e["response_flags"], "REGISTRY_ONLY", "{e}");
    // An allowed SNI sent to an address this pod resolved for another name
    // (client2 has resolved nothing else): SNI spoofing, refused.
    let resolved = c
        .pod_program("client2", "getent", &["hosts", "other.example.com"])
        .output()
        .unwrap();
    assert!(resolved.status.success(), "{resolved:?}");
    let spoof = format!("api.notify.example.com:443:{}", notify.ip4);
    let cacert = ca.ca_cert.display().to_string();
    let r = curl(
        &c,
        "client2",
        &[
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &cacert,
            "--resolve",
            &spoof,
            "https://api.notify.example.com/",
        ],
    );
    assert!(!r.ok(), "{r:?}");
    let e = entry(&c, 0, "the spoof refusal", |e| {
        e["sni"] == "api.notify.example.com" && e["result"] != "ok"
    });
    let why = e["error"].as_str().unwrap();
    assert!(
        why.contains("did not resolve api.notify.example.com"),
        "{why}"
    );
    assert!(why.contains("other.example.com"), "{why}");
    for reason in ["not_in_registry", "sni_not_in_registry", "sni_not_resolved"] {
        assert!(
            metric(
                &c,
                0,
                "nodemesh_registry_denials_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "{reason}"
        );
    }
    // The registry, the mode and what the pods resolved, in /config_dump.
    let dump = c.admin_get(0, "/config_dump", None).unwrap().body;
    assert!(dump.contains("*.notify.example.com") && dump.contains("REGISTRY_ONLY"));

    // ALLOW_ANY: the same agent config otherwise; everything passes, and a
    // registry host is still named.
    c.spec.agent.extra = String::new();
    for k in 0..2 {
        c.stop_agent(k).unwrap();
        c.rewrite_agent_config(k).unwrap();
        c.start_agent(k).unwrap();
    }
    let r = get(&c, "client", "http://stranger.example.com:8080/");
    assert_eq!(r.json()["server"], "stranger-1");
    let r = get(&c, "client", &format!("https://{PIM}/again"));
    assert_eq!(r.json()["server"], "pim-1");
    assert!(
        metric(
            &c,
            0,
            "istio_tcp_connections_opened_total",
            &[&format!("destination_service=\"{PIM}\"")]
        ) >= 1.0
    );
    assert_eq!(metric(&c, 0, "nodemesh_registry_denials_total", &[]), 0.0);
}

#[test]
fn tls_is_originated_for_plain_http_apps_and_bad_certificates_are_refused_with_their_reason() {
    let mut c = cluster(REGISTRY_ONLY);
    let ca = c.third_party_ca().unwrap();
    let pim = start(&c, ThirdPartySpec::new("pim-1", &[PIM]));
    let mtls = start(
        &c,
        ThirdPartySpec::new("mtls-1", &["mtls.example.com"]).require_client_cert(),
    );
    let mut bad = Vec::new();
    for (kind, host) in [
        (CertKind::WrongName, "wrong.example.com"),
        (CertKind::Expired, "expired.example.com"),
        (CertKind::UnknownCa, "unknown-ca.example.com"),
    ] {
        bad.push((
            host,
            start(
                &c,
                ThirdPartySpec::new(host.split('.').next().unwrap(), &[host]).cert(kind),
            ),
        ));
    }
    let mut records = vec![(PIM, ip(&pim)), ("mtls.example.com", ip(&mtls))];
    records.extend(bad.iter().map(|(h, tp)| (*h, ip(tp))));
    let records: Vec<(&str, &str)> = records.iter().map(|(h, a)| (*h, a.as_str())).collect();
    c.start_dns(&records).unwrap();
    let ca_file = ca.ca_cert.display().to_string();
    let mut yaml = String::new();
    for (host, mode) in [
        (PIM, format!("{{mode: SIMPLE, caCertificates: {ca_file}}}")),
        (
            "mtls.example.com",
            format!(
                "{{mode: MUTUAL, caCertificates: {ca_file}, clientCertificate: {}, privateKey: {}}}",
                ca.client_cert.display(),
                ca.client_key.display()
            ),
        ),
        (
            "wrong.example.com",
            format!("{{mode: SIMPLE, caCertificates: {ca_file}}}"),
        ),
        (
            "expired.example.com",
            format!("{{mode: SIMPLE, caCertificates: {ca_file}}}"),
        ),
        (
            "unknown-ca.example.com",
            format!("{{mode: SIMPLE, caCertificates: {ca_file}}}"),
        ),
    ] {
        let name = host.split('.').next().unwrap();
        yaml += &format!(
            r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{host}]
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: shop}}
spec:
  host: {host}
  trafficPolicy: {{tls: {mode}}}
"#
        );
    }
    apply(&c, "egress.yaml", &yaml);

    // Plain HTTP from the app (HTTP/1.1 and h2c-less HTTP/1.0), TLS on
    // the wire: the third party saw TLS with the SNI, and the body came
    // back intact.
    let body: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = curl(
        &c,
        "client",
        &[
            "-sS",
            "--max-time",
            "10",
            "--data-binary",
            &body,
            &format!("http://{PIM}/echo"),
        ],
    );
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.stdout, body, "the body changed on the way");
    let r = get(&c, "client", &format!("http://{PIM}/products"));
    let j = r.json();
    assert_eq!(j["tls"], true, "{j}");
    assert_eq!(j["sni"], PIM);
    assert_eq!(j["server"], "pim-1");
    let e = entry(&c, 0, "the originated connection", |e| {
        e["host"] == PIM && e["result"] == "ok"
    });
    assert_eq!(e["security"], "tls_originated", "{e}");
    assert_eq!(e["upstream"], pim.addr4().to_string());
    // MUTUAL: the client certificate from the rule's files.
    let j = get(&c, "client", "http://mtls.example.com/").json();
    assert_eq!(j["client_cert"], true, "{j}");

    // Each bad certificate: refused, its reason in the log and the metric.
    for (host, code) in [
        ("wrong.example.com", "wrong_name"),
        ("expired.example.com", "certificate_expired"),
        ("unknown-ca.example.com", "unknown_issuer"),
    ] {
        let r = get(&c, "client", &format!("http://{host}/"));
        assert!(!r.ok(), "{host}: {r:?}");
        let e = entry(&c, 0, host, |e| e["host"] == host && e["result"] != "ok");
        assert_eq!(e["response_flags"], "TLS_FAILURE", "{e}");
        let why = e["error"].as_str().unwrap();
        assert!(
            why.contains(&format!("TLS to {host}")) && why.contains(code),
            "{host}: {why}"
        );
        assert!(
            metric(
                &c,
                0,
                "nodemesh_tls_handshake_failures_total",
                &[&format!("reason=\"{code}\"")]
            ) >= 1.0
        );
    }
}

#[test]
fn endpoints_that_refuse_or_blackhole_and_full_pools_fail_as_configured() {
    let mut c = cluster(REGISTRY_ONLY);
    let pims: Vec<ThirdParty> = (1..=3)
        .map(|i| {
            start(
                &c,
                ThirdPartySpec::new(&format!("pim-{i}"), &[PIM])
                    .port(8080)
                    .plaintext(),
            )
        })
        .collect();
    let slow = start(
        &c,
        ThirdPartySpec::new("slow-1", &["slow.example.com"])
            .port(8080)
            .plaintext(),
    );
    let hole = start(
        &c,
        ThirdPartySpec::new("hole-1", &["hole.example.com"])
            .port(8080)
            .plaintext(),
    );
    c.start_dns(&[
        (PIM, ip(&pims[0]).as_str()),
        ("slow.example.com", ip(&slow).as_str()),
        ("hole.example.com", ip(&hole).as_str()),
    ])
    .unwrap();
    let endpoints: Vec<String> = pims
        .iter()
        .map(|p| format!("{{address: \"{}\"}}", p.ip4))
        .collect();
    apply(
        &c,
        "egress.yaml",
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [{PIM}]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: {PIM}
  trafficPolicy:
    connectionPool: {{tcp: {{connectTimeout: 1s}}}}
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 34}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: slow, namespace: shop}}
spec:
  hosts: [slow.example.com]
  resolution: DNS
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: slow, namespace: shop}}
spec:
  host: slow.example.com
  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 1}}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: hole, namespace: shop}}
spec:
  hosts: [hole.example.com]
  resolution: DNS
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: hole, namespace: shop}}
spec:
  host: hole.example.com
  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: 700ms}}}}}}
"#,
            endpoints.join(", ")
        ),
    );
    let mut pims = pims;
    // One of three refusing: no failure reaches the app; it is retried
    // on another endpoint once, then ejected.
    pims[2].stop().unwrap();
    let url = format!("http://{PIM}:8080/");
    for i in 0..12 {
        let r = get(&c, "client", &url);
        assert!(r.ok(), "request {i}: {r:?}");
    }
    let retried: Vec<Value> = c.log_entries(0, |e| {
        e["attempts"].as_array().is_some_and(|a| a.len() == 2)
    });
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(
        retried[0]["attempts"][0]["endpoint"],
        pims[2].addr4().to_string()
    );
    assert_eq!(retried[0]["attempts"][0]["ejected"], true);
    assert_eq!(
        metric(
            &c,
            0,
            "nodemesh_outlier_ejections_active",
            &[&format!("destination=\"{PIM}\"")]
        ),
        1.0
    );
    // It comes back after baseEjectionTime: started again, it serves.
    pims[2].start().unwrap();
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(
        metric(
            &c,
            0,
            "nodemesh_outlier_ejections_active",
            &[&format!("destination=\"{PIM}\"")]
        ),
        0.0
    );
    let served: std::collections::HashSet<String> = (0..6)
        .map(|_| {
            get(&c, "client", &url).json()["server"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(served.contains("pim-3"), "{served:?}");

    // Every endpoint down: one clear error, each attempt named.
    for p in &mut pims {
        p.stop().unwrap();
    }
    let r = get(&c, "client", &url);
    assert!(!r.ok());
    let e = entry(&c, 0, "the all-down error", |e| {
        e["error"]
            .as_str()
            .is_some_and(|s| s.contains("no endpoint could be reached"))
    });
    assert_eq!(e["response_flags"], "CONNECT", "{e}");

    // A blackholed endpoint: the app's error comes within connectTimeout,
    // logged as a timeout.
    c.blackhole(hole.ip4).unwrap();
    let r = get(&c, "client", "http://hole.example.com:8080/");
    assert!(!r.ok());
    assert!(r.elapsed < Duration::from_secs(3), "{r:?}");
    let e = entry(&c, 0, "the timeout", |e| e["host"] == "hole.example.com");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 700 ms"),
        "{e}"
    );
    c.unblackhole(hole.ip4).unwrap();

    // maxConnections 1: a second connection while one is held fails fast.
    slow.set_fault(Fault::Delay(Duration::from_secs(4)))
        .unwrap();
    let mut held = c
        .pod_program(
            "client2",
            "curl",
            &["-sS", "--max-time", "10", "http://slow.example.com:8080/"],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the held connection", Duration::from_secs(5), || {
        slow.connections() >= 1
    });
    let t = Instant::now();
    let r = get(&c, "client", "http://slow.example.com:8080/");
    assert!(!r.ok());
    assert!(t.elapsed() < Duration::from_secs(2), "fails fast: {r:?}");
    let e = entry(&c, 0, "the overflow", |e| {
        e["response_flags"] == "UPSTREAM_OVERFLOW"
    });
    assert!(
        e["error"].as_str().unwrap().contains("maxConnections (1)"),
        "{e}"
    );
    assert!(
        held.wait().unwrap().success(),
        "the held connection completes"
    );
}

#[test]
fn an_invalid_service_entry_or_destination_rule_keeps_the_last_good_set() {
    let c = cluster(REGISTRY_ONLY);
    let pim = start(
        &c,
        ThirdPartySpec::new("pim-1", &[PIM]).port(8080).plaintext(),
    );
    let good = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pim, namespace: shop}}
spec:
  hosts: [{PIM}]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: "{}"}}]
"#,
        pim.ip4
    );
    apply(&c, "egress.yaml", &good);
    assert!(get(&c, "client", &format!("http://{}/", pim.addr4())).ok());
    for (bad, field) in [
        (
            good.replace("number: 8080", "number: 80800"),
            "spec.ports[0].number",
        ),
        (good.replace("STATIC", "STATICALLY"), "spec.resolution"),
        (
            format!(
                "{good}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: pim, namespace: shop}}\nspec:\n  host: {PIM}\n  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: soon}}}}}}\n"
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        ),
    ] {
        c.write_policy("egress.yaml", &bad).unwrap();
        wait_for("the rejection logged", Duration::from_secs(10), || {
            c.agent_log(0).contains(field)
        });
        let log = c.agent_log(0);
        let line = log.lines().rev().find(|l| l.contains(field)).unwrap();
        assert!(line.contains("egress.yaml:"), "{line}");
        // The last good set stays: the endpoint still passes.
        assert!(get(&c, "client", &format!("http://{}/", pim.addr4())).ok());
    }
    assert!(
        metric(
            &c,
            0,
            "nodemesh_policy_reloads_total",
            &["outcome=\"rejected\""]
        ) >= 3.0
    );
}
