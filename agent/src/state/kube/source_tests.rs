//! The source with the real kube-rs client against a FAKE API server
//! (`fake_apiserver`): what it proves is the client side (config, TLS,
//! token, the requests and selectors sent, relist on `410 Gone`), not the
//! API server's semantics.
use std::{sync::Arc, time::Duration};

use ::kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::*;
use crate::state::{
    PodKey, StateMetrics,
    kube::{
        fake_apiserver::{FakeApiServer, Recorded, WatchScript},
        fixtures::{self, with},
    },
};

const PODS: &str = "/api/v1/pods";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const LOCAL: &str = "spec.nodeName=node-a";
const WAIT: Duration = Duration::from_secs(20);

/// A client configured as from a kubeconfig file: the fake's CA file and a
/// bearer token.
async fn client_for(fake: &FakeApiServer, ca_file: &std::path::Path) -> Client {
    std::fs::write(ca_file, &fake.ca_pem).expect("CA file written");
    let kubeconfig = Kubeconfig::from_yaml(&format!(
        r#"
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: https://{addr}
    certificate-authority: {ca}
users:
- name: nodemesh-agent
  user:
    token: fake-token
contexts:
- name: fake
  context: {{cluster: fake, user: nodemesh-agent}}
current-context: fake
"#,
        addr = fake.addr,
        ca = ca_file.display()
    ))
    .expect("kubeconfig");
    let config = ::kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

fn remote_pod() -> Value {
    with(
        fixtures::pod(),
        &[
            ("/metadata/name", json!("cart-7d9f8b6c5-r7t8u")),
            (
                "/metadata/uid",
                json!("6c5b4a39-2817-4f06-9e5d-4c3b2a190817"),
            ),
            ("/spec/nodeName", json!("node-b")),
            ("/status/podIP", json!("10.244.2.9")),
            ("/status/podIPs", json!([{"ip": "10.244.2.9"}])),
        ],
    )
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 1000 (1500)", "reason": "Expired", "code": 410
    }})
}

fn of<'a>(requests: &'a [Recorded], path: &str, fields: &str) -> Vec<&'a Recorded> {
    requests
        .iter()
        .filter(|r| {
            r.path == path
                && r.query
                    .get("fieldSelector")
                    .map(String::as_str)
                    .unwrap_or("")
                    == fields
        })
        .collect()
}

#[tokio::test]
async fn real_client_lists_watches_and_relists_after_410() {
    let fake = FakeApiServer::start().await;
    fake.list(PODS, LOCAL, "", "PodList", vec![fixtures::pod()]);
    // All pods: the first list has the remote pod; its watch ends with
    // 410 Gone (when the test says); the relist no longer has it.
    fake.list(PODS, "", "", "PodList", vec![fixtures::pod(), remote_pod()]);
    fake.list(PODS, "", "", "PodList", vec![fixtures::pod()]);
    let expire = Arc::new(Notify::new());
    fake.watch(
        PODS,
        "",
        "",
        WatchScript {
            wait: Some(expire.clone()),
            events: vec![gone()],
            end: true,
        },
    );
    fake.list(
        "/api/v1/services",
        "",
        "",
        "ServiceList",
        vec![fixtures::service()],
    );
    fake.list(
        SLICES,
        "",
        "kubernetes.io/service-name",
        "EndpointSliceList",
        vec![fixtures::slice()],
    );
    fake.list(
        "/api/v1/namespaces",
        "",
        "",
        "NamespaceList",
        vec![fixtures::namespace()],
    );

    let ca_file = std::env::temp_dir().join(format!(
        "nodemesh-fake-apiserver-{}-{}.pem",
        std::process::id(),
        fake.addr.port()
    ));
    let client = client_for(&fake, &ca_file).await;
    let store = Arc::new(WorkloadStore::new("node-a", StateMetrics::default()));
    let source = KubeWorkloadSource::start(client, store.clone());
    let mut synced = source.synced();
    tokio::time::timeout(WAIT, synced.wait_for(|s| *s))
        .await
        .unwrap_or_else(|_| panic!("not synced; requests: {:#?}", fake.requests()))
        .expect("source running");
    let local = PodKey {
        namespace: "shop".into(),
        name: "cart-7d9f8b6c5-x2k4q".into(),
    };
    let remote = PodKey {
        namespace: "shop".into(),
        name: "cart-7d9f8b6c5-r7t8u".into(),
    };
    assert!(store.pod(&local).is_some() && store.pod(&remote).is_some());
    assert_eq!(store.local_pods().len(), 1);
    let services = store.services();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].endpoints, vec![local.clone()]);
    assert_eq!(services[0].ports[0].target(), 8080, "named port resolved");

    // 410 Gone on the watch of all pods: the client relists, and the pod
    // missing from the new list leaves the state.
    expire.notify_one();
    let mut generation = store.subscribe();
    tokio::time::timeout(WAIT, async {
        while store.pod(&remote).is_some() {
            generation.changed().await.expect("store alive");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not relisted; requests: {:#?}", fake.requests()));
    assert!(store.pod(&local).is_some());
    drop(source);
    let _ = std::fs::remove_file(&ca_file);

    let requests = fake.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.authorization == "Bearer fake-token"),
        "{requests:#?}"
    );
    // The local watch selects this node's pods on the server.
    let local_requests = of(&requests, PODS, LOCAL);
    assert!(!local_requests.is_empty() && local_requests.iter().any(|r| r.is_watch()));
    // All pods: list, watch from the list's version, 410, list again.
    let all: Vec<&Recorded> = of(&requests, PODS, "");
    let lists: Vec<usize> = (0..all.len()).filter(|i| !all[*i].is_watch()).collect();
    assert!(lists.len() >= 2, "{all:#?}");
    let first_watch = all
        .iter()
        .position(|r| r.is_watch())
        .expect("a watch of all pods");
    assert!(lists[0] < first_watch && first_watch < lists[1], "{all:#?}");
    assert_eq!(
        all[first_watch]
            .query
            .get("resourceVersion")
            .map(String::as_str),
        Some("1000")
    );
    assert_eq!(
        all[lists[0]].query.get("limit").map(String::as_str),
        Some("500"),
        "paged lists"
    );
    // Slices of services only; namespaces as metadata.
    assert!(of(&requests, SLICES, "").iter().all(|r| {
        r.query.get("labelSelector").map(String::as_str) == Some("kubernetes.io/service-name")
    }));
    let namespaces = of(&requests, "/api/v1/namespaces", "");
    assert!(
        !namespaces.is_empty()
            && namespaces
                .iter()
                .all(|r| r.accept.contains("as=PartialObjectMetadata")),
        "{namespaces:#?}"
    );
}
