//! ServiceEntry and DestinationRule documents as users write them, through
//! the policy set's own checks, and the registry they compile into.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{DEFAULT_ROOT_NAMESPACE, LoadError, Loaded, compile_texts};
use crate::registry::*;

fn load(yaml: &str) -> Result<Loaded, LoadError> {
    compile_texts(
        &vec![(PathBuf::from("/policies/egress.yaml"), yaml.to_owned())],
        DEFAULT_ROOT_NAMESPACE,
    )
}

fn registry(yaml: &str) -> ServiceRegistry {
    load(yaml).unwrap_or_else(|e| panic!("{e}")).registry
}

fn errors(yaml: &str) -> String {
    load(yaml).unwrap_err().to_string()
}

const PIM: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pim, namespace: shop}
spec:
  hosts: [pim.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 443}
  - {number: 443, name: https, protocol: HTTPS}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: notify, namespace: shop}
spec:
  hosts: ["*.notify.example.com"]
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.com]
  addresses: [192.0.2.10/32]
  resolution: STATIC
  ports: [{number: 8443, name: tls, protocol: TLS}]
  endpoints:
  - {address: 10.240.0.211, ports: {tls: 9443}, locality: eu-west/a}
  - {address: 10.240.0.212}
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn entries_match_by_name_wildcard_and_address() {
    let r = registry(PIM);
    let m = r.by_name("PIM.example.com.", 80).unwrap();
    assert_eq!(m.host, "pim.example.com");
    assert_eq!(m.entry.resolution, Resolution::Dns);
    assert_eq!(m.port.target_port, Some(443));
    assert!(
        r.by_name("pim.example.com", 8080).is_none(),
        "port not declared"
    );
    assert!(r.by_name("evil-pim.example.com", 80).is_none());

    let w = r.by_name("api.notify.example.com", 443).unwrap();
    assert_eq!(w.host, "api.notify.example.com");
    assert!(w.port.is_tls());
    assert!(
        r.by_name("notify.example.com", 443).is_none(),
        "a wildcard needs a label"
    );

    // By a VIP of `addresses`, and by an endpoint (on the service port or
    // the endpoint's own).
    let v = r.by_address(addr("192.0.2.10:8443")).unwrap();
    assert_eq!(v.host, "payments.example.com");
    assert!(r.by_address(addr("10.240.0.212:8443")).is_some());
    assert!(r.by_address(addr("10.240.0.211:9443")).is_some());
    assert!(r.by_address(addr("10.240.0.211:22")).is_none());
    assert!(r.by_address(addr("10.240.0.213:8443")).is_none());
    let ep = &v.entry.endpoints[0];
    assert_eq!(ep.port_for(&v.port), 9443);
    assert_eq!(v.entry.endpoints[1].port_for(&v.port), 8443);
    assert!(r.is_tls_port(443) && r.is_tls_port(8443) && !r.is_tls_port(80));
    assert!(r.knows_host("pim.example.com") && r.knows_host("x.notify.example.com"));
    assert!(!r.knows_host("notify.example.com") && !r.knows_host("other.example.com"));
}

#[test]
fn exact_hosts_win_over_wildcards_and_longer_wildcards_over_shorter() {
    let r = registry(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide, namespace: shop}
spec: {hosts: ["*.example.com"], ports: [{number: 443, protocol: TLS}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow, namespace: shop}
spec: {hosts: ["*.api.example.com"], ports: [{number: 443, protocol: TLS}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exact, namespace: shop}
spec: {hosts: [eu.api.example.com], ports: [{number: 443, protocol: TLS}]}
"#,
    );
    let name = |h: &str| r.by_name(h, 443).unwrap().entry.name.clone();
    assert_eq!(name("eu.api.example.com"), "shop/exact");
    assert_eq!(name("us.api.example.com"), "shop/narrow");
    assert_eq!(name("www.example.com"), "shop/wide");
}

#[test]
fn destination_rules_merge_port_level_settings_over_their_own() {
    let ca = std::env::temp_dir().join(format!("nodemesh-registry-ca-{}.pem", std::process::id()));
    let cert = rcgen::generate_simple_self_signed(vec!["pim.example.com".into()]).unwrap();
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let yaml = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pim, namespace: shop}}
spec:
  host: pim.example.com
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 250ms
        tcpKeepalive: {{time: 30s, interval: 5s, probes: 3}}
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 2
      interval: 1s
      baseEjectionTime: 2s
      maxEjectionPercent: 50
    portLevelSettings:
    - port: {{number: 80}}
      connectionPool: {{tcp: {{connectTimeout: 1m30s}}}}
      tls: {{mode: SIMPLE, caCertificates: {ca}, sni: pim.example.com}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: orders, namespace: shop}}
spec:
  host: orders
  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 7}}}}}}
"#,
        ca = ca.display()
    );
    let r = registry(&yaml);
    let _ = std::fs::remove_file(&ca);
    let top = r.connect_policy("pim.example.com", 443);
    assert_eq!(top.rule.as_deref(), Some("shop/pim"));
    assert_eq!(top.max_connections, Some(100));
    assert_eq!(top.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(
        top.keepalive,
        Some(Keepalive {
            time: Some(Duration::from_secs(30)),
            interval: Some(Duration::from_secs(5)),
            probes: Some(3)
        })
    );
    let o = top.outlier.as_ref().unwrap();
    // The lower of the two thresholds ejects first at L4.
    assert_eq!(o.consecutive_errors, 2);
    assert_eq!(o.base_ejection_time, Duration::from_secs(2));
    assert_eq!(o.max_ejection_percent, 50);
    assert!(top.tls.is_none());
    let p80 = r.connect_policy("pim.example.com", 80);
    assert_eq!(p80.connect_timeout, Some(Duration::from_secs(90)));
    assert_eq!(
        p80.max_connections,
        Some(100),
        "inherited from the top level"
    );
    let tls = p80.tls.unwrap();
    assert_eq!(tls.mode, TlsMode::Simple);
    assert_eq!(tls.sni.as_deref(), Some("pim.example.com"));
    // A short host is a service of the rule's namespace.
    let orders = r.connect_policy("orders.shop.svc.cluster.local", 8080);
    assert_eq!(orders.max_connections, Some(7));
    assert!(r.connect_policy("other.example.com", 80).rule.is_none());
}

#[test]
fn bad_entries_and_rules_name_file_line_and_field() {
    let e = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad, namespace: shop}
spec:
  hosts: ["*"]
  resolution: STATIC
  ports:
  - {number: 70000, name: http, protocol: HTTP}
  - {number: 443, name: tls, protocol: QUIC}
  endpoints:
  - {address: pim.example.com}
"#,
    );
    assert!(
        e.contains("/policies/egress.yaml:6:") && e.contains("document 0: spec.hosts[0]"),
        "{e}"
    );
    assert!(
        e.contains("spec.ports[0].number: 70000 is not in 1..=65535"),
        "{e}"
    );
    assert!(e.contains("spec.ports[1].protocol: \"QUIC\""), "{e}");
    assert!(e.contains("spec.endpoints[0].address"), "{e}");

    let e = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec: {hosts: ["*.example.com"], resolution: DNS, ports: [{number: 443, protocol: TLS}]}
"#,
    );
    assert!(e.contains("is a wildcard"), "{e}");
    let e = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nothing, namespace: shop}
spec: {hosts: [a.example.com], resolution: STATIC, ports: [{number: 443}]}
"#,
    );
    assert!(e.contains("resolution STATIC needs endpoints"), "{e}");

    let e = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pim, namespace: shop}
spec:
  host: pim.example.com
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: soon, maxConnections: 0}}
    outlierDetection: {maxEjectionPercent: 150}
    tls: {mode: MUTUAL, caCertificates: /nonexistent/ca.pem}
"#,
    );
    assert!(
        e.contains(
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout: \"soon\" is not a duration"
        ),
        "{e}"
    );
    assert!(
        e.contains("connectionPool.tcp.maxConnections: 0 is not in"),
        "{e}"
    );
    assert!(
        e.contains("outlierDetection.maxEjectionPercent: 150"),
        "{e}"
    );
    assert!(
        e.contains("tls.clientCertificate: required with mode MUTUAL"),
        "{e}"
    );

    let e = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pim, namespace: shop}
spec:
  host: pim.example.com
  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /nonexistent/ca.pem}}
"#,
    );
    assert!(
        e.contains(":7:")
            && e.contains("spec.trafficPolicy.tls")
            && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );

    // Kinds and groups do not mix.
    let e = errors(
        r#"
apiVersion: security.istio.io/v1
kind: ServiceEntry
metadata: {name: x, namespace: shop}
spec: {hosts: [a.example.com], ports: [{number: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: y, namespace: shop}
spec: {host: a.example.com, action: DENY}
"#,
    );
    assert!(e.contains("is not one of networking.istio.io/v1"), "{e}");
    assert!(
        e.contains("document 1: spec.action: not a field of DestinationRule"),
        "{e}"
    );
}

#[test]
fn fields_not_honoured_are_warnings_that_name_them() {
    let loaded = load(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pim, namespace: shop}
spec:
  hosts: [pim.example.com]
  exportTo: ["."]
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS}]
  endpoints: [{address: 10.240.0.201, weight: 3}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pim, namespace: shop}
spec:
  host: pim.example.com
  subsets: [{name: v1, labels: {version: v1}}]
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {http: {http1MaxPendingRequests: 10}}
    outlierDetection: {minHealthPercent: 50}
"#,
    )
    .unwrap();
    let w: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    let has = |f: &str| w.iter().any(|x| x.contains(f));
    for field in [
        "spec.exportTo",
        "spec.endpoints[0].weight",
        "spec.subsets",
        "spec.trafficPolicy.loadBalancer",
        "spec.trafficPolicy.connectionPool.http",
        "spec.trafficPolicy.outlierDetection.minHealthPercent",
    ] {
        assert!(has(field), "no warning for {field}: {w:?}");
    }
    // Defaults of an outlierDetection block: Envoy's.
    let o = loaded
        .registry
        .connect_policy("pim.example.com", 443)
        .outlier
        .unwrap();
    assert_eq!(o.consecutive_errors, 5);
    assert_eq!(o.interval, Duration::from_secs(10));
    assert_eq!(o.base_ejection_time, Duration::from_secs(30));
    assert_eq!(o.max_ejection_percent, 10);
}

#[test]
fn durations_as_istio_writes_them() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    for bad in ["", "10", "s", "1x", "-1s", "1.2.3s", "ms10"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}
