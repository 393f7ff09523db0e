//! Authorization policy enforced by the destination's agent, on the virtual
//! cluster. Root; fails, never skips, when the cluster cannot be built.
use std::{process::Stdio, time::Duration};

use nodemesh_lab::{Cluster, ClusterSpec, cluster::wait_for};
use serde_json::Value;

fn cluster() -> Cluster {
    let spec = ClusterSpec::two_nodes();
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    c.spawn_in_pod("server-local", &["serve", "--port", "8080"])
        .unwrap();
    c
}

fn remote(c: &Cluster) -> String {
    format!("{}:8080", c.pod("server-remote").ip4)
}

fn local(c: &Cluster) -> String {
    format!("{}:8080", c.pod("server-local").ip4)
}

/// Writes a policy file and waits until both agents run the new set.
fn apply(c: &Cluster, name: &str, yaml: &str) {
    let before: Vec<usize> = (0..2)
        .map(|k| c.agent_log(k).matches("policies loaded").count())
        .collect();
    c.write_policy(name, yaml).unwrap();
    for (k, seen) in before.into_iter().enumerate() {
        wait_for("the policy reload", Duration::from_secs(5), || {
            c.agent_log(k).matches("policies loaded").count() > seen
        });
    }
}

const ONLY_CLIENT_TO_REMOTE: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server-remote}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

const DENY_PROMO: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-promo, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: [\"*/sa/promo\"]}}]
";

#[test]
fn denied_connections_get_401_and_a_reset_with_the_policy_named() {
    let c = cluster();
    apply(&c, "allow.yaml", ONLY_CLIENT_TO_REMOTE);
    assert_eq!(c.probe("client", &remote(&c))["result"], "ok");
    let r = c.probe("promo", &remote(&c));
    assert!(r["result"] == "reset" || r["result"] == "eof", "{r}");
    // The destination decided: no ALLOW matched.
    let d = c.log_entries(1, |e| e["result"] == "denied");
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        d[0]["src_identity"],
        "spiffe://cluster.local/ns/shop/sa/promo"
    );
    assert!(
        d[0]["error"].as_str().unwrap().contains("none matched"),
        "{d:?}"
    );
    // The source saw the 401.
    let s = c.log_entries(0, |e| e["result"] == "denied");
    assert!(s[0]["error"].as_str().unwrap().contains("401"), "{s:?}");
    // Allowed ones name the policy that allowed them.
    let a = c.log_entries(1, |e| e["result"] == "ok");
    assert_eq!(a[0]["policy"], "shop/only-client");

    // A DENY for everything from promo, same node: this agent is the
    // destination's agent too.
    apply(&c, "deny.yaml", DENY_PROMO);
    assert_eq!(c.probe("client", &local(&c))["result"], "ok");
    let r = c.probe("promo", &local(&c));
    assert!(r["result"] == "reset" || r["result"] == "eof", "{r}");
    let d = c.log_entries(0, |e| e["policy"] == "shop/no-promo");
    assert!(
        d[0]["error"]
            .as_str()
            .unwrap()
            .contains("policy shop/no-promo"),
        "{d:?}"
    );
}

#[test]
fn a_reload_closes_newly_denied_connections_and_keeps_allowed_ones() {
    let c = cluster();
    let to = remote(&c);
    let send_to = |pod: &str, to: &str| {
        c.pod_command(
            pod,
            &[
                "client",
                "send",
                "--to",
                to,
                "--bytes",
                &(24u64 << 20).to_string(),
                "--pace-ms",
                "8",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let send = |pod: &str| send_to(pod, &to);
    let client = send("client");
    let promo = send("promo");
    let promo_same_node = send_to("promo", &local(&c));
    std::thread::sleep(Duration::from_millis(700));
    apply(&c, "deny.yaml", DENY_PROMO);
    let promo = promo.wait_with_output().unwrap();
    assert!(
        !promo.status.success(),
        "promo's transfer survived its denial"
    );
    let promo_same_node = promo_same_node.wait_with_output().unwrap();
    assert!(
        !promo_same_node.status.success(),
        "promo's same-node transfer survived its denial"
    );
    let client = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&client.stdout);
    let r: Value = serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(r["ok"], true, "the allowed transfer was disturbed: {r}");
    let d = c.log_entries(1, |e| e["result"] == "denied");
    assert!(
        d[0]["error"]
            .as_str()
            .unwrap()
            .contains("after a policy reload"),
        "{d:?}"
    );

    // A broken file is rejected; the set in force stays.
    c.write_policy("broken.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{to: [{operation: {ports: [\"0\"]}}]}]}\n")
        .unwrap();
    wait_for("the rejection", Duration::from_secs(5), || {
        c.agent_log(1).contains("policy set rejected")
    });
    // Applied as a custom resource: the log names the object, and an
    // Event on the object (what `kubectl describe` shows its author) names
    // the field.
    assert!(
        c.agent_log(1)
            .contains("AuthorizationPolicy default/x (security.istio.io/v1)"),
        "the object is not named in the log"
    );
    wait_for("the Event on the object", Duration::from_secs(5), || {
        c.events_about("AuthorizationPolicy", "default", "x")
            .iter()
            .any(|e| {
                e["type"] == "Warning"
                    && e["reason"] == "InvalidPolicy"
                    && e["reportingInstance"] == "node-1"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("spec.rules[0].to[0].operation.ports[0]"))
            })
    });
    assert_eq!(c.probe("client", &to)["result"], "ok");
    assert_ne!(c.probe("promo", &to)["result"], "ok");
}

fn ok(c: &Cluster, pod: &str, to: &str) -> bool {
    let r = c.probe(pod, to);
    match r["result"].as_str() {
        Some("ok") => true,
        Some("reset" | "eof" | "refused") => false,
        _ => panic!("{pod} -> {to}: neither allowed nor refused: {r}"),
    }
}

const STRICT_SHOP: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
";

const REMOTE_8080_PERMISSIVE: &str = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: remote-legacy-port, namespace: shop}
spec:
  selector: {matchLabels: {app: server-remote}}
  mtls: {mode: UNSET}
  portLevelMtls:
    \"8080\": {mode: PERMISSIVE}
";

#[test]
fn peer_authentication_strict_refuses_plaintext_and_permissive_admits_it() {
    let mut c = cluster();
    // PERMISSIVE by default: a client outside the mesh reaches meshed pods,
    // through their agent, with no identity.
    assert!(ok(&c, "outsider", &remote(&c)));
    assert!(ok(&c, "outsider", &local(&c)));
    let e = c.log_entries(1, |e| e["security"] == "none" && e["result"] == "ok");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0]["src_identity"].is_null(), "{e:?}");

    // STRICT for the namespace: plaintext refused on both nodes, the policy
    // named; meshed clients unaffected (same node too: the agent connects
    // from inside the destination pod, which nothing captures).
    let long = c
        .pod_command(
            "outsider",
            &[
                "client",
                "send",
                "--to",
                &remote(&c),
                "--bytes",
                &(24u64 << 20).to_string(),
                "--pace-ms",
                "8",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    apply(&c, "strict.yaml", STRICT_SHOP);
    assert!(
        !long.wait_with_output().unwrap().status.success(),
        "an open plaintext transfer survived STRICT"
    );
    assert!(!ok(&c, "outsider", &remote(&c)));
    assert!(!ok(&c, "outsider", &local(&c)));
    let d = c.log_entries(1, |e| {
        e["policy"] == "shop/strict" && e["result"] == "denied"
    });
    assert!(d.len() >= 2, "{d:?}");
    assert!(
        d.iter().any(|e| e["error"]
            .as_str()
            .unwrap()
            .contains("after a policy reload")),
        "{d:?}"
    );
    let last = d.last().unwrap()["error"].as_str().unwrap();
    assert!(
        last.contains("STRICT") && last.contains("port 8080"),
        "{last}"
    );
    assert!(ok(&c, "client", &remote(&c)));
    assert!(ok(&c, "client", &local(&c)));

    // Port level beats the namespace: server-remote's 8080 takes plaintext
    // again; server-local (not selected) stays STRICT.
    apply(&c, "remote.yaml", REMOTE_8080_PERMISSIVE);
    assert!(ok(&c, "outsider", &remote(&c)));
    assert!(!ok(&c, "outsider", &local(&c)));

    // An exempt source (in Kubernetes: the node, for kubelet probes) passes
    // STRICT: server-local is still STRICT for the outsider.
    c.spec.agent.inbound_exempt_sources = vec![format!("{}/32", c.pod("outsider").ip4)];
    c.stop_agent(0).unwrap();
    c.rewrite_agent_config(0).unwrap();
    c.start_agent(0).unwrap();
    wait_for(
        "the restarted agent to capture again",
        Duration::from_secs(10),
        || c.probe("outsider", &local(&c))["result"] == "ok",
    );
    let e = c.log_entries(0, |e| e["policy"] == "inboundExemptSources");
    assert!(!e.is_empty(), "the exemption is not in the access log");

    // With the agent down the pinned sk_lookup link stays and there is no
    // listener: plaintext is refused, never let past policy.
    c.kill_agent(1).unwrap();
    assert!(!ok(&c, "outsider", &remote(&c)));
    c.start_agent(1).unwrap();
    wait_for(
        "the restarted agent to capture again",
        Duration::from_secs(10),
        || c.probe("outsider", &remote(&c))["result"] == "ok",
    );
    let maps = c.map_sizes(1).unwrap();
    // server-remote's IPv4 and IPv6 address.
    assert_eq!(maps["NM_CAPTURE"], 2, "{maps}");
}

/// A subset of the allow/deny matrix, end to end: each policy set replaces
/// the previous one, then meshed (client, promo) and plaintext (outsider)
/// sources probe both servers.
#[test]
fn matrix_subset_end_to_end() {
    let c = cluster();
    let outsider = c.pod("outsider").ip4;
    let doc = |ns: &str, name: &str, body: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
        )
    };
    let remote_only = "  selector: {matchLabels: {app: server-remote}}\n";
    let cases: Vec<(&str, String, [bool; 3], [bool; 3])> = vec![
        (
            "ALLOW namespaces: plaintext has none",
            doc(
                "shop",
                "ns",
                &format!(
                    "{remote_only}  rules: [{{from: [{{source: {{namespaces: [shop]}}}}]}}]\n"
                ),
            ),
            [true, true, false],
            [true, true, true],
        ),
        (
            "ALLOW notNamespaces lets no identity through",
            doc(
                "shop",
                "notns",
                &format!(
                    "{remote_only}  rules: [{{from: [{{source: {{notNamespaces: [other]}}}}]}}]\n"
                ),
            ),
            [true, true, true],
            [true, true, true],
        ),
        (
            "DENY ipBlocks + ports",
            doc(
                "shop",
                "ip",
                &format!(
                    "  action: DENY\n  rules: [{{from: [{{source: {{ipBlocks: [\"{outsider}/32\"]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]\n"
                ),
            ),
            [true, true, false],
            [true, true, false],
        ),
        (
            "ALLOW notPorts excludes the only port",
            doc(
                "shop",
                "notports",
                &format!(
                    "{remote_only}  rules: [{{to: [{{operation: {{notPorts: [\"8080\"]}}}}]}}]\n"
                ),
            ),
            [false, false, false],
            [true, true, true],
        ),
        (
            "root namespace DENY applies mesh-wide",
            doc(
                "istio-system",
                "no-promo",
                "  action: DENY\n  rules: [{when: [{key: source.principal, values: [\"*/sa/promo\"]}]}]\n",
            ),
            [true, false, true],
            [true, false, true],
        ),
        (
            "when destination.port and source.namespace",
            doc(
                "shop",
                "when",
                &format!(
                    "{remote_only}  rules: [{{when: [{{key: destination.port, values: [\"8080\"]}}, {{key: source.namespace, values: [shop]}}]}}]\n"
                ),
            ),
            [true, true, false],
            [true, true, true],
        ),
        (
            "AUDIT never decides",
            doc("shop", "audit", "  action: AUDIT\n  rules: [{}]\n"),
            [true, true, true],
            [true, true, true],
        ),
    ];
    for (name, yaml, at_remote, at_local) in cases {
        apply(&c, "matrix.yaml", &yaml);
        for (i, src) in ["client", "promo", "outsider"].into_iter().enumerate() {
            assert_eq!(
                ok(&c, src, &remote(&c)),
                at_remote[i],
                "{name}: {src} -> server-remote"
            );
            assert_eq!(
                ok(&c, src, &local(&c)),
                at_local[i],
                "{name}: {src} -> server-local"
            );
        }
    }
}
