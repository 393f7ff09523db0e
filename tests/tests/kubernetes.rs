//! The agents as they run on a Kubernetes node, on the virtual cluster:
//! pods, services and policies from the API, pods created through each
//! node's CNI chain. The API server is the lab's FAKE (there is none on
//! this machine; `nodemesh_lab::apiserver`): list, watch, field and label
//! selectors, discovery and Events as the real one serves them, no
//! admission, no schema validation. What a real cluster must still check
//! is in the README ("Install on Kubernetes").
use std::time::Duration;

use nodemesh_lab::{Cluster, ClusterSpec, PodSpec, ServiceSpec, cluster::wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// `cart` (node 0) and `catalogue` (node 1), Deployment pods named as
/// Kubernetes names them; a `catalogue` Service; `outsider` opted out.
fn cluster() -> Cluster {
    let deployment_pod = |workload: &str, node| {
        let mut p = PodSpec::new(&format!("{workload}-7d9f8c6b5-x2k9p"), node);
        p.app = workload.into();
        p.service_account = workload.into();
        p.workload = Some(workload.into());
        p
    };
    let mut c = Cluster::start(ClusterSpec {
        nodes: 2,
        pods: vec![
            deployment_pod("cart", 0),
            deployment_pod("catalogue", 1),
            PodSpec::new("outsider", 0).unenrolled(),
        ],
        services: vec![ServiceSpec::new(
            "catalogue",
            80,
            8080,
            &["catalogue-7d9f8c6b5-x2k9p"],
        )],
        agent: Default::default(),
    })
    .expect("building the virtual cluster (needs root)");
    assert!(c.kubernetes());
    c.spawn_in_pod("catalogue-7d9f8c6b5-x2k9p", &["serve", "--port", "8080"])
        .unwrap();
    c
}

const CART: &str = "cart-7d9f8c6b5-x2k9p";
const CATALOGUE: &str = "catalogue-7d9f8c6b5-x2k9p";

fn result(c: &Cluster, from: &str, to: &str) -> String {
    c.probe(from, to)["result"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

fn deny_cart(api_version: &str) -> String {
    format!(
        "apiVersion: {api_version}
kind: AuthorizationPolicy
metadata: {{name: deny-cart, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: catalogue}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/cart]}}}}]
"
    )
}

const PIM_EGRESS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pim, namespace: shop}
spec:
  hosts: [pim.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pim, namespace: shop}
spec:
  host: pim.example.com
  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 2s}}}
";

fn config_dump(c: &Cluster, k: usize) -> Value {
    let body = c.admin_get(k, "/config_dump", None).unwrap().body;
    serde_json::from_str(&body).unwrap_or_default()
}

#[test]
fn state_and_policies_come_from_the_api() {
    let c = cluster();
    // Each agent watches its own node's pods (for enrolment) by field
    // selector.
    let requests = c.api().requests();
    for k in 0..2 {
        assert!(
            requests.iter().any(|r| r.contains("/api/v1/pods")
                && r.contains(&format!("spec.nodeName%3Dnode-{k}"))
                || r.contains(&format!("spec.nodeName=node-{k}"))),
            "no watch of node-{k}'s pods: {requests:?}"
        );
    }

    // Pod to pod across nodes and through the Service's VIP (its
    // EndpointSlices): over HBONE, the identities from the API.
    let pod = format!("{}:8080", c.pod(CATALOGUE).ip4);
    let vip = format!("{}:80", c.service("catalogue").vip4);
    assert_eq!(result(&c, CART, &pod), "ok");
    assert_eq!(result(&c, CART, &vip), "ok");
    let entries = c.log_entries(1, |e| e["dst_identity"].as_str().is_some());
    assert!(
        entries
            .iter()
            .any(|e| e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/cart"),
        "{entries:?}"
    );
    // Istio's workload labels: the Deployment, not the pod.
    let metrics = c.admin_get(0, "/metrics", None).unwrap().body;
    let opened: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .collect();
    assert!(
        opened.iter().any(|l| l.contains("source_workload=\"cart\"")
            && l.contains("destination_workload=\"catalogue\"")
            && l.contains("destination_service=\"catalogue.shop.svc.cluster.local\"")),
        "{opened:#?}"
    );

    // Policies as custom resources: Istio's group, unchanged, then ours.
    for api_version in ["security.istio.io/v1", "security.nodemesh.dev/v1"] {
        c.write_policy("deny.yaml", &deny_cart(api_version))
            .unwrap();
        wait_for(&format!("the DENY ({api_version})"), WAIT, || {
            result(&c, CART, &pod) != "ok"
        });
        let denied = c.log_entries(1, |e| e["policy"] == "shop/deny-cart");
        assert!(!denied.is_empty(), "{}", c.agent_log(1));
        // Deleting the object lifts it.
        c.write_policy("deny.yaml", "").unwrap();
        wait_for("the DENY deleted", WAIT, || result(&c, CART, &pod) == "ok");
    }

    // The egress registry from Istio's networking group: a ServiceEntry
    // and a DestinationRule applied through the API are in every agent's
    // /config_dump; deleted, they are gone.
    c.write_policy("egress.yaml", PIM_EGRESS).unwrap();
    wait_for("the ServiceEntry in /config_dump", WAIT, || {
        (0..2).all(|k| {
            let registry = &config_dump(&c, k)["registry"];
            registry["serviceEntries"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["hosts"][0] == "pim.example.com"))
                && registry["destinationRules"][0]["name"] == "shop/pim"
        })
    });
    c.write_policy("egress.yaml", "").unwrap();
    wait_for("the ServiceEntry deleted", WAIT, || {
        config_dump(&c, 1)["registry"]["serviceEntries"] == serde_json::json!([])
    });

    // An invalid object keeps the last good set in force, also for an agent
    // restarted meanwhile: it starts with the set it saved.
    let mut c = c;
    c.write_policy("deny.yaml", &deny_cart("security.istio.io/v1"))
        .unwrap();
    wait_for("the DENY again", WAIT, || result(&c, CART, &pod) != "ok");
    c.write_policy(
        "broken.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: shop}\nspec: {action: DENY, rules: [{to: [{operation: {ports: [\"0\"]}}]}]}\n",
    )
    .unwrap();
    wait_for("the rejection", WAIT, || {
        c.agent_log(1).contains("AuthorizationPolicy shop/broken")
    });
    c.stop_agent(1).unwrap();
    c.start_agent(1).unwrap();
    assert!(
        c.agent_log(1)
            .contains("starting with the last good set a previous agent applied"),
        "{}",
        c.agent_log(1)
    );
    c.wait_for_agents_to_know_pods().unwrap();
    assert_ne!(result(&c, CART, &pod), "ok", "the saved DENY is in force");
    c.write_policy("broken.yaml", "").unwrap();
    c.write_policy("deny.yaml", "").unwrap();
    wait_for("both deleted", WAIT, || result(&c, CART, &pod) == "ok");

    // A pod opted out is created through the chain but never captured by
    // its own node's agent.
    assert_eq!(result(&c, "outsider", &pod), "ok");
    std::thread::sleep(Duration::from_millis(300));
    let outsider = format!("{}:", c.pod("outsider").ip4);
    let captured: Vec<_> = c
        .access_log(0)
        .into_iter()
        .filter(|e| {
            e["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&outsider))
        })
        .collect();
    assert!(
        captured.is_empty(),
        "the opted-out pod was captured: {captured:?}"
    );
}

#[test]
fn until_the_api_answers_the_agent_is_not_ready_and_new_pods_wait() {
    let mut c = cluster();
    c.stop_agent(0).unwrap();
    // The API server unreachable from the nodes.
    let fabric = c.ns_fabric();
    let api = format!("{}/24", nodemesh_lab::kube::API_SERVER);
    nodemesh_lab::sys::ip_in(&fabric, &["addr", "del", &api, "dev", "br0"]).unwrap();
    c.spawn_agent(0).unwrap();
    wait_for("the readiness server", WAIT, || {
        c.admin_get(0, "/healthz/ready", None)
            .is_ok_and(|r| r.status == 503)
    });
    std::thread::sleep(Duration::from_secs(2));
    let r = c.admin_get(0, "/healthz/ready", None).unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("policy set loaded")
            && r.body.contains("workloads synced from the Kubernetes API"),
        "{}",
        r.body
    );
    // A pod created now is not started outside the mesh: its ADD fails
    // (the runtime would retry).
    let err = c
        .cni_add_pod(PodSpec::new("late", 0), "late-sandbox-1")
        .expect_err("ADD with the agent not serving");
    assert!(format!("{err:#}").contains("nodemesh"), "{err:#}");

    nodemesh_lab::sys::ip_in(&fabric, &["addr", "add", &api, "dev", "br0"]).unwrap();
    wait_for(
        "ready once the API answers",
        Duration::from_secs(40),
        || {
            c.admin_get(0, "/healthz/ready", None)
                .is_ok_and(|r| r.status == 200)
        },
    );
    // The runtime's retry: enrolled before ADD returns, so the first
    // connection is already meshed.
    c.cni_add_pod(PodSpec::new("late", 0), "late-sandbox-1")
        .expect("ADD once the agent is ready");
    let pod = format!("{}:8080", c.pod(CATALOGUE).ip4);
    let r: Value = c.probe("late", &pod);
    assert_eq!(r["result"], "ok", "{r}");
    assert!(
        !c.log_entries(0, |e| e["src_workload"] == "shop/late")
            .is_empty(),
        "the new pod's connection was not proxied"
    );
}
