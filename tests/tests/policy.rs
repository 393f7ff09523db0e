//! Authorization policy enforced by the destination's agent, on the virtual
//! cluster. Root; fails, never skips, when the cluster cannot be built.
use std::{process::Stdio, time::Duration};

use nodemesh_lab::{Cluster, ClusterSpec, PodSpec, cluster::wait_for};
use serde_json::Value;

fn cluster() -> Cluster {
    let spec = ClusterSpec {
        nodes: 2,
        pods: vec![
            PodSpec::new("client", 0),
            PodSpec::new("promo", 0),
            PodSpec::new("server-local", 0),
            PodSpec::new("server-remote", 1),
        ],
        services: vec![],
        agent: Default::default(),
    };
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
    assert!(
        c.agent_log(1).contains("broken.yaml:4:"),
        "no file:line in the log"
    );
    assert_eq!(c.probe("client", &to)["result"], "ok");
    assert_ne!(c.probe("promo", &to)["result"], "ok");
}
