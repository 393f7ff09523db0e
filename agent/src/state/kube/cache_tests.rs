use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod as KubePod, Service as KubeService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};

use super::*;
use crate::state::{
    StateMetrics, WorkloadStore,
    kube::fixtures::{self, parse, remove, with},
};

const NODE: &str = "node-a";

fn key(name: &str) -> PodKey {
    PodKey {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// A running pod of namespace `shop` with one IPv4 address.
fn pod(name: &str, uid: &str, node: &str, ip: &str) -> KubePod {
    parse(with(
        fixtures::pod(),
        &[
            ("/metadata/name", json!(name)),
            ("/metadata/uid", json!(uid)),
            ("/spec/nodeName", json!(node)),
            ("/status/podIP", json!(ip)),
            ("/status/podIPs", json!([{"ip": ip}])),
        ],
    ))
}

fn local_pod() -> KubePod {
    pod("cart-1", "uid-cart-1", NODE, "10.244.1.17")
}

fn remote_pod() -> KubePod {
    pod("cart-2", "uid-cart-2", "node-b", "10.244.2.9")
}

fn service() -> KubeService {
    parse(fixtures::service())
}

fn slice_endpoint(name: &str, uid: &str, ip: &str) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "targetRef": {"kind": "Pod", "name": name, "namespace": "shop", "uid": uid}
    })
}

fn slice(endpoints: &[Value]) -> EndpointSlice {
    parse(with(fixtures::slice(), &[("/endpoints", json!(endpoints))]))
}

fn namespace(labels: Value) -> ObjectMeta {
    parse::<Namespace>(with(fixtures::namespace(), &[("/metadata/labels", labels)])).metadata
}

fn meshed_namespace() -> ObjectMeta {
    namespace(json!({"istio.io/dataplane-mode": "ambient", "kubernetes.io/metadata.name": "shop"}))
}

fn list<K>(objects: Vec<K>) -> Vec<WatchEvent<K>> {
    let mut events = vec![WatchEvent::Init];
    events.extend(objects.into_iter().map(WatchEvent::InitApply));
    events.push(WatchEvent::InitDone);
    events
}

/// A cache and the store it feeds; every batch is applied as it comes.
struct Agent {
    cache: KubeCache,
    store: WorkloadStore,
    batches: Vec<Vec<WorkloadUpdate>>,
}

impl Agent {
    fn new() -> Self {
        Self {
            cache: KubeCache::new(NODE),
            store: WorkloadStore::new(NODE, StateMetrics::default()),
            batches: Vec::new(),
        }
    }

    fn take(&mut self, updates: Vec<WorkloadUpdate>) -> Vec<WorkloadUpdate> {
        if !updates.is_empty() {
            self.store.apply(updates.clone());
            self.batches.push(updates.clone());
        }
        updates
    }

    fn local_pods(&mut self, events: Vec<WatchEvent<KubePod>>) -> Vec<WorkloadUpdate> {
        let mut all = Vec::new();
        for e in events {
            let u = self.cache.local_pod_event(e);
            all.extend(self.take(u));
        }
        all
    }

    fn pods(&mut self, events: Vec<WatchEvent<KubePod>>) -> Vec<WorkloadUpdate> {
        let mut all = Vec::new();
        for e in events {
            let u = self.cache.pod_event(e);
            all.extend(self.take(u));
        }
        all
    }

    fn services(&mut self, events: Vec<WatchEvent<KubeService>>) -> Vec<WorkloadUpdate> {
        let mut all = Vec::new();
        for e in events {
            let u = self.cache.service_event(e);
            all.extend(self.take(u));
        }
        all
    }

    fn slices(&mut self, events: Vec<WatchEvent<EndpointSlice>>) -> Vec<WorkloadUpdate> {
        let mut all = Vec::new();
        for e in events {
            let u = self.cache.slice_event(e);
            all.extend(self.take(u));
        }
        all
    }

    fn namespaces(&mut self, events: Vec<WatchEvent<ObjectMeta>>) -> Vec<WorkloadUpdate> {
        let mut all = Vec::new();
        for e in events {
            let u = self.cache.namespace_event(e);
            all.extend(self.take(u));
        }
        all
    }

    /// Every kind listed: two meshed pods (one local), a service with both
    /// as endpoints, the meshed namespace.
    fn synced() -> Self {
        let mut agent = Self::new();
        agent.local_pods(list(vec![local_pod()]));
        agent.pods(list(vec![local_pod(), remote_pod()]));
        agent.services(list(vec![service()]));
        agent.slices(list(vec![slice(&[
            slice_endpoint("cart-1", "uid-cart-1", "10.244.1.17"),
            slice_endpoint("cart-2", "uid-cart-2", "10.244.2.9"),
        ])]));
        agent.namespaces(list(vec![meshed_namespace()]));
        assert!(agent.cache.synced());
        agent.batches.clear();
        agent
    }

    fn pod_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.store.pods().iter().map(|p| p.name.clone()).collect();
        names.sort();
        names
    }

    fn endpoints(&self) -> Vec<PodKey> {
        self.store
            .services()
            .first()
            .map(|s| s.endpoints.clone())
            .unwrap_or_default()
    }
}

/// Updates by kind and name, for assertions.
fn summary(updates: &[WorkloadUpdate]) -> Vec<String> {
    updates
        .iter()
        .map(|u| match u {
            WorkloadUpdate::Pod(p) => format!("pod {}", p.key()),
            WorkloadUpdate::RemovePod(k) => format!("remove pod {k}"),
            WorkloadUpdate::Service(s) => format!("service {}", s.key()),
            WorkloadUpdate::RemoveService(k) => format!("remove service {k}"),
            WorkloadUpdate::OutOfMesh(p) => format!("out of mesh {}", p.key()),
        })
        .collect()
}

#[test]
fn nothing_is_published_before_every_kind_is_listed_then_all_at_once() {
    let mut agent = Agent::new();
    assert!(agent.local_pods(list(vec![local_pod()])).is_empty());
    assert!(agent.pods(list(vec![local_pod(), remote_pod()])).is_empty());
    assert!(agent.services(list(vec![service()])).is_empty());
    // Changes before the sync are absorbed, not published.
    assert!(
        agent
            .services(vec![WatchEvent::Apply(service())])
            .is_empty()
    );
    assert!(
        agent
            .slices(list(vec![slice(&[slice_endpoint(
                "cart-1",
                "uid-cart-1",
                "10.244.1.17"
            )])]))
            .is_empty()
    );
    // Namespaces: listing begun, not done.
    assert!(
        agent
            .namespaces(vec![
                WatchEvent::Init,
                WatchEvent::InitApply(meshed_namespace())
            ])
            .is_empty()
    );
    assert_eq!(agent.cache.unlisted(), vec!["namespaces"]);
    assert!(!agent.cache.synced());
    assert!(agent.store.pods().is_empty() && agent.store.services().is_empty());
    assert_eq!(agent.store.generation(), 0);

    let batch = agent.namespaces(vec![WatchEvent::InitDone]);
    assert_eq!(
        summary(&batch),
        vec!["pod shop/cart-1", "pod shop/cart-2", "service cart.shop"]
    );
    assert_eq!(agent.batches.len(), 1, "one batch");
    assert_eq!(agent.store.generation(), 1);
    assert!(agent.cache.synced());
    assert_eq!(agent.endpoints(), vec![key("cart-1")]);
    assert_eq!(agent.store.local_pods().len(), 1);
    assert_eq!(agent.cache.workload_name(&key("cart-1")), Some("cart"));
}

#[test]
fn unchanged_objects_publish_nothing() {
    let mut agent = Agent::synced();
    assert!(agent.pods(vec![WatchEvent::Apply(remote_pod())]).is_empty());
    assert!(agent.services(list(vec![service()])).is_empty());
    assert!(
        agent
            .namespaces(vec![WatchEvent::Apply(meshed_namespace())])
            .is_empty()
    );
    assert!(agent.batches.is_empty());
}

#[test]
fn last_good_state_is_kept_while_a_watch_is_down() {
    let mut agent = Agent::synced();
    let generation = agent.store.generation();
    // The watch of all pods fails and relists: a partial list, then
    // nothing (the error is the absence of events; kube-runtime retries).
    assert!(
        agent
            .pods(vec![WatchEvent::Init, WatchEvent::InitApply(local_pod())])
            .is_empty()
    );
    assert_eq!(agent.pod_names(), vec!["cart-1", "cart-2"]);
    assert_eq!(agent.store.generation(), generation);
    // Other kinds still publish their changes meanwhile.
    assert_eq!(
        summary(&agent.services(vec![WatchEvent::Delete(service())])),
        vec!["remove service cart.shop"]
    );
    // The relist completes with both pods: nothing to change.
    assert!(
        agent
            .pods(vec![
                WatchEvent::InitApply(remote_pod()),
                WatchEvent::InitDone
            ])
            .is_empty()
    );
    assert_eq!(agent.pod_names(), vec!["cart-1", "cart-2"]);
}

#[test]
fn relist_omitting_a_deleted_pod_removes_it() {
    let mut agent = Agent::synced();
    // cart-2 was deleted while the watch was down (410 Gone: relist).
    let updates = agent.pods(list(vec![local_pod()]));
    assert_eq!(summary(&updates), vec!["remove pod shop/cart-2"]);
    assert_eq!(agent.batches.len(), 1);
    assert_eq!(agent.pod_names(), vec!["cart-1"]);
}

#[test]
fn relist_of_local_pods_keeps_a_pod_the_other_watch_still_has() {
    let mut agent = Agent::synced();
    // The local watch misses cart-1 for now; the watch of all pods has it.
    assert!(agent.local_pods(list(vec![])).is_empty());
    assert_eq!(agent.pod_names(), vec!["cart-1", "cart-2"]);
    assert_eq!(
        summary(&agent.pods(vec![WatchEvent::Delete(local_pod())])),
        vec!["remove pod shop/cart-1"]
    );
}

#[test]
fn deleted_service_is_removed() {
    let mut agent = Agent::synced();
    let updates = agent.services(vec![WatchEvent::Delete(service())]);
    assert_eq!(summary(&updates), vec!["remove service cart.shop"]);
    assert!(agent.store.services().is_empty());
    // Its slices going later changes nothing more.
    assert!(
        agent
            .slices(vec![WatchEvent::Delete(slice(&[]))])
            .is_empty()
    );
}

#[test]
fn slice_update_changes_the_endpoints() {
    let mut agent = Agent::synced();
    assert_eq!(agent.endpoints(), vec![key("cart-1"), key("cart-2")]);
    // cart-2 starts terminating: not ready any more.
    let terminating = with(
        slice_endpoint("cart-2", "uid-cart-2", "10.244.2.9"),
        &[(
            "/conditions",
            json!({"ready": false, "serving": true, "terminating": true}),
        )],
    );
    let updates = agent.slices(vec![WatchEvent::Apply(slice(&[
        slice_endpoint("cart-1", "uid-cart-1", "10.244.1.17"),
        terminating,
    ]))]);
    assert_eq!(summary(&updates), vec!["service cart.shop"]);
    assert_eq!(agent.endpoints(), vec![key("cart-1")]);
    // A second slice (the IPv6 one of a dual-stack service) adds to the first.
    let v6: EndpointSlice = parse(with(
        fixtures::slice(),
        &[
            ("/metadata/name", json!("cart-v6")),
            ("/addressType", json!("IPv6")),
            (
                "/endpoints",
                json!([slice_endpoint("cart-3", "uid-cart-3", "fd00::3")]),
            ),
        ],
    ));
    agent.slices(vec![WatchEvent::Apply(v6.clone())]);
    assert_eq!(agent.endpoints(), vec![key("cart-1"), key("cart-3")]);
    agent.slices(vec![WatchEvent::Delete(v6)]);
    assert_eq!(agent.endpoints(), vec![key("cart-1")]);
}

#[test]
fn namespace_label_flip_takes_pods_out_and_back() {
    let mut agent = Agent::synced();
    let plain = namespace(json!({"kubernetes.io/metadata.name": "shop"}));
    let updates = agent.namespaces(vec![WatchEvent::Apply(plain)]);
    // The local pod is known to run outside the mesh; the remote one is
    // just gone from the state.
    assert_eq!(
        summary(&updates),
        vec!["out of mesh shop/cart-1", "remove pod shop/cart-2"]
    );
    assert!(agent.store.is_out_of_mesh(&key("cart-1"), None));
    assert!(agent.store.pods().is_empty());
    // The service stays, its endpoints now outside the mesh.
    assert_eq!(agent.store.services().len(), 1);

    let updates = agent.namespaces(vec![WatchEvent::Apply(meshed_namespace())]);
    assert_eq!(
        summary(&updates),
        vec!["pod shop/cart-1", "pod shop/cart-2"]
    );
    assert!(!agent.store.is_out_of_mesh(&key("cart-1"), None));
    assert_eq!(agent.pod_names(), vec!["cart-1", "cart-2"]);
}

#[test]
fn pod_opting_out_leaves_and_its_deletion_ends_that() {
    let mut agent = Agent::synced();
    let mut out = with(
        fixtures::pod(),
        &[("/metadata/labels/istio.io~1dataplane-mode", json!("none"))],
    );
    for (pointer, value) in [
        ("/metadata/name", json!("cart-1")),
        ("/metadata/uid", json!("uid-cart-1")),
    ] {
        fixtures::set(&mut out, pointer, value);
    }
    let out: KubePod = parse(out);
    agent.local_pods(vec![WatchEvent::Apply(out.clone())]);
    let updates = agent.pods(vec![WatchEvent::Apply(out.clone())]);
    assert!(
        updates.is_empty(),
        "the first watch already told: {updates:?}"
    );
    assert!(agent.store.is_out_of_mesh(&key("cart-1"), None));
    agent.local_pods(vec![WatchEvent::Delete(out.clone())]);
    let updates = agent.pods(vec![WatchEvent::Delete(out)]);
    assert_eq!(summary(&updates), vec!["remove pod shop/cart-1"]);
    assert!(!agent.store.is_out_of_mesh(&key("cart-1"), None));
}

#[test]
fn recreated_pod_replaces_the_old_one_and_a_late_delete_is_ignored() {
    let mut agent = Agent::synced();
    let mut new = with(
        serde_json::to_value(local_pod()).expect("serialises"),
        &[
            ("/metadata/uid", json!("uid-cart-1-new")),
            ("/metadata/creationTimestamp", json!("2026-11-30T11:00:02Z")),
            ("/status/podIP", json!("10.244.1.40")),
            ("/status/podIPs", json!([{"ip": "10.244.1.40"}])),
        ],
    );
    remove(&mut new, "/status/containerStatuses");
    let new: KubePod = parse(new);
    // The watch of all pods sees the new pod first: it is newer than what
    // the local watch still holds.
    let updates = agent.pods(vec![WatchEvent::Apply(new.clone())]);
    assert_eq!(summary(&updates), vec!["pod shop/cart-1"]);
    let pod = agent.store.pod(&key("cart-1")).expect("a pod");
    assert_eq!(pod.uid.as_deref(), Some("uid-cart-1-new"));
    assert_eq!(
        pod.ips,
        vec!["10.244.1.40".parse::<std::net::IpAddr>().expect("ip")]
    );
    // The old pod's Delete, late, removes nothing.
    assert!(agent.pods(vec![WatchEvent::Delete(local_pod())]).is_empty());
    assert!(
        agent
            .local_pods(vec![WatchEvent::Delete(local_pod())])
            .is_empty()
    );
    assert!(agent.local_pods(vec![WatchEvent::Apply(new)]).is_empty());
    assert_eq!(
        agent
            .store
            .pod(&key("cart-1"))
            .and_then(|p| p.uid.clone())
            .as_deref(),
        Some("uid-cart-1-new")
    );
}

#[test]
fn pod_that_terminates_is_removed() {
    let mut agent = Agent::synced();
    let done: KubePod = parse(with(
        serde_json::to_value(remote_pod()).expect("serialises"),
        &[("/status/phase", json!("Succeeded"))],
    ));
    assert_eq!(
        summary(&agent.pods(vec![WatchEvent::Apply(done)])),
        vec!["remove pod shop/cart-2"]
    );
}

#[test]
fn pod_that_gets_its_address_is_updated() {
    let mut agent = Agent::synced();
    let mut starting = serde_json::to_value(pod("cart-4", "uid-cart-4", "node-b", "10.0.0.1"))
        .expect("serialises");
    remove(&mut starting, "/status/podIP");
    remove(&mut starting, "/status/podIPs");
    agent.pods(vec![WatchEvent::Apply(parse(starting))]);
    assert!(
        agent
            .store
            .pod(&key("cart-4"))
            .expect("a pod")
            .ips
            .is_empty()
    );
    agent.pods(vec![WatchEvent::Apply(pod(
        "cart-4",
        "uid-cart-4",
        "node-b",
        "10.244.2.30",
    ))]);
    assert_eq!(agent.store.pod(&key("cart-4")).expect("a pod").ips.len(), 1);
}

#[test]
fn the_last_kind_to_list_publishes_even_when_its_list_is_empty() {
    let mut agent = Agent::new();
    agent.namespaces(list(vec![meshed_namespace()]));
    agent.pods(list(vec![remote_pod()]));
    agent.services(list(vec![service()]));
    agent.slices(list(vec![]));
    // No pod on this node yet: an empty list, the last one.
    let batch = agent.local_pods(list(vec![]));
    assert_eq!(
        summary(&batch),
        vec!["pod shop/cart-2", "service cart.shop"]
    );
    assert!(agent.cache.synced());
    assert!(agent.endpoints().is_empty());
}

#[test]
fn an_object_that_cannot_be_used_is_left_out() {
    let mut agent = Agent::synced();
    let bad: KubePod = parse(with(
        serde_json::to_value(remote_pod()).expect("serialises"),
        &[(
            "/status/podIPs",
            json!([{"ip": "10.244.2.9"}, {"ip": "not-an-ip"}]),
        )],
    ));
    assert_eq!(
        summary(&agent.pods(vec![WatchEvent::Apply(bad)])),
        vec!["remove pod shop/cart-2"]
    );
    // Fixed by the next update.
    assert_eq!(
        summary(&agent.pods(vec![WatchEvent::Apply(remote_pod())])),
        vec!["pod shop/cart-2"]
    );
}
