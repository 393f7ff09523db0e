//! The allow/deny matrix, from YAML fixtures as users write them.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use super::*;
use crate::identity::Identity;

/// Writes `files` into a fresh directory and loads it.
fn load(files: &[(&str, &str)]) -> Result<Loaded, LoadError> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nodemesh-policy-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let r = load_dir(&dir, DEFAULT_ROOT_NAMESPACE);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn policies(yaml: &str) -> Loaded {
    load(&[("p.yaml", yaml)]).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(yaml: &str) -> String {
    load(&[("p.yaml", yaml)]).unwrap_err().to_string()
}

struct Conn {
    src: Option<Identity>,
    src_ip: IpAddr,
    ns: &'static str,
    labels: BTreeMap<String, String>,
    dst_ip: IpAddr,
    port: u16,
}

fn conn(src_ns: &str, src_sa: &str) -> Conn {
    Conn {
        src: Some(Identity::new("cluster.local", src_ns, src_sa)),
        src_ip: "10.244.0.10".parse().unwrap(),
        ns: "shop",
        labels: [("app".to_string(), "orders".to_string())].into(),
        dst_ip: "10.244.1.10".parse().unwrap(),
        port: 8080,
    }
}

impl Conn {
    fn decide(&self, l: &Loaded) -> Decision {
        l.authorization.decide(&Request {
            src_identity: self.src.as_ref(),
            src_ip: self.src_ip,
            dst_namespace: self.ns,
            dst_labels: &self.labels,
            dst_ip: self.dst_ip,
            dst_port: self.port,
        })
    }
    fn allowed(&self, l: &Loaded) -> bool {
        self.decide(l).allowed()
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn ip(mut self, ip: &str) -> Self {
        self.src_ip = ip.parse().unwrap();
        self
    }
    fn plaintext(mut self) -> Self {
        self.src = None;
        self
    }
    fn ns(mut self, ns: &'static str) -> Self {
        self.ns = ns;
        self
    }
    fn labels(mut self, app: &str) -> Self {
        self.labels = [("app".to_string(), app.to_string())].into();
        self
    }
}

fn allow(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: orders}}\n  action: ALLOW\n  rules:\n{rules}"
    )
}

#[test]
fn no_policy_allows_everything() {
    let l = policies("");
    assert_eq!(
        conn("shop", "cart").decide(&l),
        Decision::Allow { policy: None }
    );
}

#[test]
fn source_fields_and_their_negations() {
    let cases: Vec<(&str, Vec<(Conn, bool)>)> = vec![
        (
            "  - from: [{source: {principals: [cluster.local/ns/shop/sa/cart]}}]\n",
            vec![
                (conn("shop", "cart"), true),
                (conn("shop", "promo"), false),
                (conn("shop", "cart").plaintext(), false),
            ],
        ),
        (
            "  - from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/cart]}}]\n",
            vec![
                (conn("shop", "cart"), false),
                (conn("shop", "promo"), true),
                (conn("shop", "x").plaintext(), true),
            ],
        ),
        (
            "  - from: [{source: {principals: [\"*\"]}}]\n",
            vec![
                (conn("shop", "cart"), true),
                (conn("shop", "cart").plaintext(), false),
            ],
        ),
        (
            "  - from: [{source: {principals: [\"cluster.local/ns/shop/*\"]}}]\n",
            vec![(conn("shop", "cart"), true), (conn("other", "cart"), false)],
        ),
        (
            "  - from: [{source: {principals: [\"*/sa/cart\"]}}]\n",
            vec![
                (conn("other", "cart"), true),
                (conn("other", "promo"), false),
            ],
        ),
        (
            "  - from: [{source: {namespaces: [shop]}}]\n",
            vec![(conn("shop", "a"), true), (conn("other", "a"), false)],
        ),
        (
            "  - from: [{source: {notNamespaces: [shop]}}]\n",
            vec![(conn("shop", "a"), false), (conn("other", "a"), true)],
        ),
        (
            "  - from: [{source: {ipBlocks: [10.244.0.0/24]}}]\n",
            vec![
                (conn("shop", "a"), true),
                (conn("shop", "a").ip("10.244.1.5"), false),
            ],
        ),
        (
            "  - from: [{source: {notIpBlocks: [10.244.0.10]}}]\n",
            vec![
                (conn("shop", "a"), false),
                (conn("shop", "a").ip("10.244.0.11"), true),
            ],
        ),
        (
            "  - from: [{source: {ipBlocks: [\"fd00:244::/48\"]}}]\n",
            vec![
                (conn("shop", "a").ip("fd00:244:0::a"), true),
                (conn("shop", "a"), false),
            ],
        ),
        (
            "  - to: [{operation: {ports: [\"8080\"]}}]\n",
            vec![
                (conn("shop", "a"), true),
                (conn("shop", "a").port(9090), false),
            ],
        ),
        (
            "  - to: [{operation: {notPorts: [\"8080\"]}}]\n",
            vec![
                (conn("shop", "a"), false),
                (conn("shop", "a").port(9090), true),
            ],
        ),
        (
            "  - when: [{key: source.ip, values: [10.244.0.0/16]}]\n",
            vec![
                (conn("shop", "a"), true),
                (conn("shop", "a").ip("192.0.2.1"), false),
            ],
        ),
        (
            "  - when: [{key: source.namespace, notValues: [other]}]\n",
            vec![(conn("shop", "a"), true), (conn("other", "a"), false)],
        ),
        (
            "  - when: [{key: source.principal, values: [cluster.local/ns/shop/sa/cart]}]\n",
            vec![(conn("shop", "cart"), true), (conn("shop", "promo"), false)],
        ),
        (
            "  - when: [{key: destination.ip, values: [10.244.1.10]}]\n",
            vec![(conn("shop", "a"), true)],
        ),
        (
            "  - when: [{key: destination.port, notValues: [\"8080\"]}]\n",
            vec![
                (conn("shop", "a"), false),
                (conn("shop", "a").port(81), true),
            ],
        ),
        (
            // Fields within a source AND; sources and rules OR.
            "  - from: [{source: {namespaces: [shop], principals: [\"*/sa/cart\"]}}]\n  - from: [{source: {namespaces: [ops]}}]\n",
            vec![
                (conn("shop", "cart"), true),
                (conn("shop", "x"), false),
                (conn("ops", "x"), true),
            ],
        ),
        (
            "  - {}\n",
            vec![
                (conn("any", "any"), true),
                (conn("x", "y").plaintext(), true),
            ],
        ),
    ];
    for (rules, expect) in cases {
        let l = policies(&allow("p", rules));
        for (c, allowed) in expect {
            assert_eq!(
                c.allowed(&l),
                allowed,
                "rules:\n{rules}src {:?} ip {} port {}",
                c.src,
                c.src_ip,
                c.port
            );
        }
    }
}

#[test]
fn deny_wins_over_allow_and_names_the_policy() {
    let text = format!(
        "{}\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {{name: no-promo, namespace: shop}}\nspec:\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/promo]}}}}]\n",
        allow("everyone", "  - {}\n")
    );
    let l = policies(&text);
    assert_eq!(
        conn("shop", "promo").decide(&l),
        Decision::Deny {
            policy: Some("shop/no-promo".into())
        }
    );
    assert_eq!(
        conn("shop", "cart").decide(&l),
        Decision::Allow {
            policy: Some("shop/everyone".into())
        }
    );
}

#[test]
fn allow_policies_that_do_not_match_deny_and_empty_rules_allow_nothing() {
    let l = policies(&allow(
        "only-cart",
        "  - from: [{source: {principals: [\"*/sa/cart\"]}}]\n",
    ));
    assert_eq!(
        conn("shop", "x").decide(&l),
        Decision::Deny { policy: None }
    );
    let l = policies(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: shop}\nspec: {}\n",
    );
    assert!(!conn("shop", "cart").allowed(&l));
    // AUDIT decides nothing.
    let l = policies(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit, namespace: shop}\nspec:\n  action: AUDIT\n  rules: [{}]\n",
    );
    assert_eq!(
        conn("shop", "x").decide(&l),
        Decision::Allow { policy: None }
    );
}

#[test]
fn scope_root_namespace_and_selectors() {
    let root = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mesh-deny-legacy, namespace: istio-system}\nspec:\n  action: DENY\n  rules: [{from: [{source: {namespaces: [legacy]}}]}]\n";
    let l = policies(root);
    assert!(!conn("legacy", "a").allowed(&l));
    assert!(
        !conn("legacy", "a").ns("billing").allowed(&l),
        "root policies apply mesh-wide"
    );
    let other_ns = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: billing-only, namespace: billing}\nspec:\n  action: DENY\n  rules: [{}]\n";
    let l = policies(other_ns);
    assert!(
        conn("shop", "a").allowed(&l),
        "a namespace's policy stays in its namespace"
    );
    assert!(!conn("shop", "a").ns("billing").allowed(&l));
    let l = policies(&allow(
        "orders-only",
        "  - from: [{source: {namespaces: [nowhere]}}]\n",
    ));
    assert!(
        conn("shop", "a").labels("cart").allowed(&l),
        "selector mismatch: not selected"
    );
    assert!(!conn("shop", "a").allowed(&l));
}

#[test]
fn l7_fields_behave_as_in_ztunnel_and_are_reported() {
    let l = policies(&allow(
        "get-only",
        "  - to: [{operation: {methods: [GET], ports: [\"8080\"]}}]\n",
    ));
    assert!(
        !conn("shop", "a").allowed(&l),
        "an ALLOW rule with L7 parts never matches"
    );
    assert_eq!(l.warnings.len(), 1);
    assert!(
        l.warnings[0]
            .field
            .ends_with("spec.rules[0].to[0].operation.methods"),
        "{:?}",
        l.warnings
    );
    assert_eq!(l.warnings[0].policy, "shop/get-only");
    let l = policies(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n    when: [{key: \"request.headers[x-user]\", values: [bob]}]\n",
    );
    assert!(
        !conn("shop", "a").allowed(&l),
        "a DENY rule ignores its L7 parts: it denies more"
    );
    assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
}

#[test]
fn peer_authentication_is_parsed() {
    let l = policies(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec:\n  selector: {matchLabels: {app: orders}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"9090\": {mode: PERMISSIVE}\n",
    );
    let orders: BTreeMap<String, String> = [("app".to_string(), "orders".to_string())].into();
    let req = l.peer_authentication.requirement("shop", &orders, 8080);
    assert_eq!(req.mode, MtlsMode::Strict);
    assert_eq!(req.policy.as_deref(), Some("shop/strict"));
    let req = l.peer_authentication.requirement("shop", &orders, 9090);
    assert_eq!(req.mode, MtlsMode::Permissive);
}

/// PeerAuthentication precedence: port level, then workload selector, then
/// namespace, then mesh-wide (root namespace); UNSET defers; default
/// PERMISSIVE.
#[test]
fn peer_authentication_matrix() {
    let pa = |ns: &str, name: &str, selector: &str, mode: &str, ports: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{selector}  mtls: {{mode: {mode}}}\n{ports}"
        )
    };
    let sel = "  selector: {matchLabels: {app: orders}}\n";
    let mesh_strict = pa("istio-system", "mesh", "", "STRICT", "");
    let ns_permissive = pa("shop", "ns", "", "PERMISSIVE", "");
    let ns_unset = pa("shop", "ns", "", "UNSET", "");
    let mesh_strict_empty_selector = pa(
        "istio-system",
        "mesh",
        "  selector: {matchLabels: {}}\n",
        "STRICT",
        "",
    );
    let wl_disable = pa("shop", "wl", sel, "DISABLE", "");
    let wl_unset_port_strict = pa(
        "shop",
        "wl",
        sel,
        "UNSET",
        "  portLevelMtls:\n    \"9090\": {mode: STRICT}\n",
    );
    let other_ns_strict = pa("other", "ns", "", "STRICT", "");
    let orders: BTreeMap<String, String> = [("app".to_string(), "orders".to_string())].into();
    let cart: BTreeMap<String, String> = [("app".to_string(), "cart".to_string())].into();
    use MtlsMode::*;
    type Labels = BTreeMap<String, String>;
    type Case<'a> = (
        &'a str,
        Vec<&'a String>,
        &'a Labels,
        u16,
        MtlsMode,
        Option<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "nothing: permissive",
            vec![],
            &orders,
            8080,
            Permissive,
            None,
        ),
        (
            "mesh-wide strict",
            vec![&mesh_strict],
            &orders,
            8080,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "empty selector is mesh-wide",
            vec![&mesh_strict_empty_selector],
            &orders,
            8080,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "namespace over mesh",
            vec![&mesh_strict, &ns_permissive],
            &orders,
            8080,
            Permissive,
            Some("shop/ns"),
        ),
        (
            "namespace UNSET defers to mesh",
            vec![&mesh_strict, &ns_unset],
            &orders,
            8080,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "workload over namespace",
            vec![&mesh_strict, &wl_disable],
            &orders,
            8080,
            Disable,
            Some("shop/wl"),
        ),
        (
            "selector mismatch",
            vec![&mesh_strict, &wl_disable],
            &cart,
            8080,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "port level",
            vec![&ns_permissive, &wl_unset_port_strict],
            &orders,
            9090,
            Strict,
            Some("shop/wl"),
        ),
        (
            "other port: workload UNSET defers to namespace",
            vec![&ns_permissive, &wl_unset_port_strict],
            &orders,
            8080,
            Permissive,
            Some("shop/ns"),
        ),
        (
            "another namespace's policy",
            vec![&other_ns_strict],
            &orders,
            8080,
            Permissive,
            None,
        ),
    ];
    for (name, docs, labels, port, mode, policy) in cases {
        let yaml: String = docs.iter().map(|d| d.as_str()).collect();
        let l = if yaml.is_empty() {
            load(&[]).unwrap()
        } else {
            policies(&yaml)
        };
        let req = l.peer_authentication.requirement("shop", labels, port);
        assert_eq!((req.mode, req.policy.as_deref()), (mode, policy), "{name}");
        assert_eq!(req.admits_plaintext(), mode != Strict, "{name}");
    }
}

#[test]
fn port_level_mtls_needs_a_selector() {
    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec:\n  portLevelMtls:\n    \"9090\": {mode: STRICT}\n",
    );
    assert!(
        e.contains("spec.portLevelMtls") && e.contains("selector"),
        "{e}"
    );
}

#[test]
fn errors_name_file_line_column_and_field() {
    let head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  rules:\n";
    for (rules, line, field, message) in [
        (
            "  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]\n",
            6,
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "prefix length",
        ),
        (
            "  - from: [{source: {ipBlocks: [banana]}}]\n",
            6,
            "ipBlocks[0]",
            "not an IP address",
        ),
        (
            "  - to: [{operation: {ports: [\"70000\"]}}]\n",
            6,
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port",
        ),
        (
            "  - from: [{source: {principals: [spiffe://cluster.local/ns/a/sa/b]}}]\n",
            6,
            "principals[0]",
            "without spiffe://",
        ),
        (
            "  - from: [{source: {principals: [\"a*b\"]}}]\n",
            6,
            "principals[0]",
            "'*' may only",
        ),
        (
            "  - when: [{key: source.zone, values: [a]}]\n",
            6,
            "when[0].key",
            "unknown condition key",
        ),
    ] {
        let e = errors(&format!("{head}{rules}"));
        assert!(e.contains(&format!("p.yaml:{line}:")), "{e}");
        assert!(e.contains(field) && e.contains(message), "{e}");
    }
    let e = errors(&format!(
        "{head}  - from: [{{source: {{principal: [x]}}}}]\n"
    ));
    assert!(
        e.contains("line 6") && e.contains("unknown field `principal`"),
        "{e}"
    );
    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nkind: PeerAuthentication\nmetadata: {name: p}\n",
    );
    assert!(e.contains("line 3") && e.contains("duplicate"), "{e}");
    let e = errors(&format!("{head}  - to: [{{operation: {{ports: 8080}}}}]\n"));
    assert!(e.contains("line 6"), "{e}");
    let e = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {mtls: {mode: STRICT}}\n",
    );
    assert!(
        e.contains("spec.mtls: not a field of AuthorizationPolicy"),
        "{e}"
    );
    let e = errors(
        "apiVersion: networking.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
    );
    assert!(e.contains("p.yaml:1:") && e.contains("apiVersion"), "{e}");
}

#[test]
fn one_bad_file_rejects_the_whole_set() {
    let good = allow("good", "  - {}\n");
    let r = load(&[("a.yaml", &good), ("b.yaml", "apiVersion: [\n")]);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("b.yaml"), "{e}");
    // Hidden entries (a ConfigMap's ..data) and other files are not read.
    let r = load(&[
        ("a.yaml", &good),
        (".hidden.yaml", "garbage: ["),
        ("notes.txt", "x"),
    ])
    .unwrap();
    assert_eq!(r.files.len(), 1);
    let _: PathBuf = r.files[0].clone();
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let good = allow("good", "  - {}\n");
    let big = format!("{good}# {}\n", "x".repeat(10 << 20));
    let e = load(&[("big.yaml", &big)]).unwrap_err().to_string();
    assert!(e.contains("big.yaml") && e.contains("limit"), "{e}");
    let nested = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let e = load(&[("deep.yaml", &nested)]).unwrap_err().to_string();
    assert!(e.contains("deep.yaml"), "{e}");
    let half = &good[..good.len() / 2];
    let e = load(&[("half.yaml", half)]).unwrap_err().to_string();
    assert!(e.contains("half.yaml"), "{e}");
    let dir = std::env::temp_dir().join(format!("nodemesh-policy-utf8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bin.yaml"), b"kind: \xff\xfe\n").unwrap();
    let e = load_dir(&dir, DEFAULT_ROOT_NAMESPACE)
        .unwrap_err()
        .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(e.contains("bin.yaml") && e.contains("not UTF-8"), "{e}");
}

#[test]
fn ten_thousand_documents_in_one_file_load_and_more_are_refused_by_name() {
    // The limit was serde-saphyr's undocumented 1,024; now the README's.
    let doc = |i: usize| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: shop}}\nspec: {{action: ALLOW, rules: [{{}}]}}\n"
        )
    };
    let many = |n: usize| (0..n).map(doc).collect::<Vec<_>>().join("---\n");
    let l =
        load(&[("many.yaml", &many(crate::yaml::MAX_DOCUMENTS))]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(l.authorization.len(), crate::yaml::MAX_DOCUMENTS);
    let e = load(&[("many.yaml", &many(crate::yaml::MAX_DOCUMENTS + 1))])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&std::env::temp_dir().display().to_string()) && e.contains("many.yaml"),
        "{e}"
    );
    assert!(e.contains("at most 10000 documents"), "{e}");
}

#[test]
fn service_accounts_match_any_trust_domain_and_exclude_principals() {
    let l = policies(&allow(
        "by-sa",
        "  - {from: [{source: {serviceAccounts: [shop/cart]}}]}\n",
    ));
    assert!(conn("shop", "cart").allowed(&l));
    let mut other_domain = conn("shop", "cart");
    other_domain.src = Some(Identity::new("other.example", "shop", "cart"));
    assert!(other_domain.allowed(&l));
    assert!(!conn("shop", "carts").allowed(&l));
    assert!(!conn("other", "cart").allowed(&l));
    let l = policies(&allow(
        "not-sa",
        "  - {from: [{source: {notServiceAccounts: [shop/cart]}}]}\n",
    ));
    assert!(!conn("shop", "cart").allowed(&l));
    assert!(conn("shop", "orders").allowed(&l));
    let l = policies(&allow(
        "when-sa",
        "  - {when: [{key: source.serviceAccount, values: [shop/orders]}]}\n",
    ));
    assert!(conn("shop", "orders").allowed(&l));
    assert!(!conn("shop", "cart").allowed(&l));

    let e = errors(&allow(
        "both",
        "  - {from: [{source: {serviceAccounts: [shop/cart], namespaces: [shop]}}]}\n",
    ));
    assert!(
        e.contains("serviceAccounts: cannot be set with namespaces or principals"),
        "{e}"
    );
    for bad in ["shop", "shop/*", "*/cart", "a/b/c"] {
        let e = errors(&allow(
            "bad",
            &format!("  - {{from: [{{source: {{serviceAccounts: [\"{bad}\"]}}}}]}}\n"),
        ));
        assert!(
            e.contains("namespace/name, without wildcards"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn waypoint_and_custom_policies_are_left_out_with_a_warning() {
    let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
";
    let l = policies(text);
    assert!(l.authorization.is_empty(), "{:?}", l.authorization.names());
    let warnings: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("spec.targetRefs") && w.contains("left out")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("spec.action") && w.contains("CUSTOM")),
        "{warnings:?}"
    );
    // Everyone is still allowed: nothing was enforced.
    assert!(conn("shop", "cart").allowed(&l));
    let e =
        errors(&allow("provider", "  - {}\n").replace("spec:", "spec:\n  provider: {name: opa}"));
    assert!(e.contains("only with action CUSTOM"), "{e}");
}
