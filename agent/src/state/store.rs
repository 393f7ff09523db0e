//! The workload state: pods and services, updated one object at a time and
//! indexed incrementally.
//!
//! Sources (a file, the Kubernetes API) send updates; they never build a
//! whole new state. While pods churn, two pods may briefly share an IP and a
//! pod may have none yet: both are normal, never an error. For a shared IP
//! (or a VIP:port claimed by two services) the last writer wins, with a
//! warning and a metric; when it goes, the earlier claimant has it again.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::model::{Endpoint, Pod, PodKey, Resolved, Service, ServiceKey};

/// One change to the state.
#[derive(Debug, Clone)]
pub enum WorkloadUpdate {
    /// Adds the pod or replaces the pod with the same key.
    Pod(Arc<Pod>),
    RemovePod(PodKey),
    /// Adds the service or replaces the service with the same key.
    Service(Arc<Service>),
    RemoveService(ServiceKey),
    /// A pod known to run outside the mesh (opted out): never enrolled, and
    /// a CNI request for it (for its UID, where both know one) is answered
    /// at once. `Pod` or `RemovePod` for the same key ends it.
    OutOfMesh(Arc<Pod>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The state's own metrics.
#[derive(Default)]
pub struct StateMetrics {
    conflicts: Family<KindLabels, Counter>,
    pods: Gauge,
    services: Gauge,
}

impl StateMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "workload_conflicts",
            "Updates that claimed an address already claimed (kind: pod_ip, service_vip); the last writer wins",
            m.conflicts.clone(),
        );
        registry.register(
            "workload_pods",
            "Pods in the workload state",
            m.pods.clone(),
        );
        registry.register(
            "workload_services",
            "Services in the workload state",
            m.services.clone(),
        );
        m
    }
}

#[derive(Default)]
struct Index {
    pods: HashMap<PodKey, Arc<Pod>>,
    /// Pods claiming each IP, oldest claim first; the last one owns it.
    by_ip: HashMap<IpAddr, Vec<PodKey>>,
    services: HashMap<ServiceKey, Arc<Service>>,
    /// Services claiming each (VIP, port), oldest first; the last owns it.
    by_vip: HashMap<(IpAddr, u16), Vec<ServiceKey>>,
    /// Services that list a pod among their endpoints.
    backing: HashMap<PodKey, BTreeSet<ServiceKey>>,
    /// Pods known to run outside the mesh (not in `pods`), with their UID.
    out_of_mesh: HashMap<PodKey, Option<String>>,
}

pub struct WorkloadStore {
    node: String,
    index: RwLock<Index>,
    /// Bumped once per applied batch.
    generation: watch::Sender<u64>,
    metrics: StateMetrics,
}

impl WorkloadStore {
    /// An empty state for the node named `node` (pods with this `node` are
    /// local).
    pub fn new(node: &str, metrics: StateMetrics) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            node: node.to_owned(),
            index: RwLock::new(Index::default()),
            generation,
            metrics,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes after every applied batch (for enrolment and re-checks).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Applies a batch of updates, then tells subscribers once.
    pub fn apply(&self, updates: impl IntoIterator<Item = WorkloadUpdate>) {
        let mut index = self.write();
        let mut changed = false;
        for u in updates {
            changed |= match u {
                WorkloadUpdate::Pod(p) => index.upsert_pod(p, &self.metrics),
                WorkloadUpdate::RemovePod(k) => index.remove_pod(&k),
                WorkloadUpdate::Service(s) => index.upsert_service(s, &self.metrics),
                WorkloadUpdate::RemoveService(k) => index.remove_service(&k),
                WorkloadUpdate::OutOfMesh(p) => {
                    let removed = index.remove_pod(&p.key());
                    index.out_of_mesh.insert(p.key(), p.uid.clone()) != Some(p.uid.clone())
                        || removed
                }
            };
        }
        self.metrics.pods.set(index.pods.len() as i64);
        self.metrics.services.set(index.services.len() as i64);
        drop(index);
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    pub fn pod(&self, key: &PodKey) -> Option<Arc<Pod>> {
        self.read().pods.get(key).cloned()
    }

    /// Whether the source said this pod runs outside the mesh: the pod of
    /// this name, and of UID `uid` where both the source and the caller
    /// know it (a pod recreated meshed under an opted-out name is another
    /// pod).
    pub fn is_out_of_mesh(&self, key: &PodKey, uid: Option<&str>) -> bool {
        match self.read().out_of_mesh.get(key) {
            None => false,
            Some(known) => match (known.as_deref(), uid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            },
        }
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        let index = self.read();
        index.owner_of(ip).cloned()
    }

    pub fn pods(&self) -> Vec<Arc<Pod>> {
        self.read().pods.values().cloned().collect()
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.read().services.values().cloned().collect()
    }

    /// Pods that run on this agent's node.
    pub fn local_pods(&self) -> Vec<Arc<Pod>> {
        self.read()
            .pods
            .values()
            .filter(|p| p.node == self.node)
            .cloned()
            .collect()
    }

    pub fn is_local(&self, pod: &Pod) -> bool {
        pod.node == self.node
    }

    /// A service `pod` backs on `target_port` (the first by name, if
    /// several), as the destination agent labels a connection it cannot ask
    /// the source about (ztunnel guesses the inbound service the same way).
    pub fn service_of(&self, pod: &PodKey, target_port: u16) -> Option<ServiceKey> {
        let index = self.read();
        index.backing.get(pod)?.iter().find_map(|key| {
            let svc = index.services.get(key)?;
            svc.ports
                .iter()
                .any(|p| p.target() == target_port)
                .then(|| key.clone())
        })
    }

    /// What `dst` is: a service VIP (with its endpoints, in the client's
    /// family where the pod has one), a pod, or something outside the mesh.
    pub fn resolve(&self, dst: SocketAddr) -> Resolved {
        let index = self.read();
        if let Some(key) = index
            .by_vip
            .get(&(dst.ip(), dst.port()))
            .and_then(|c| c.last())
            && let Some(svc) = index.services.get(key)
        {
            let target = svc
                .ports
                .iter()
                .find(|p| p.port == dst.port())
                .map_or(dst.port(), |p| p.target());
            let endpoints = svc
                .endpoints
                .iter()
                .filter_map(|k| index.pods.get(k))
                .filter_map(|pod| {
                    let ip = pod.ip_like(dst.ip())?;
                    Some(Endpoint {
                        pod: pod.clone(),
                        addr: SocketAddr::new(ip, target),
                    })
                })
                .collect();
            return Resolved::Service {
                service: key.clone(),
                endpoints,
            };
        }
        match index.owner_of(dst.ip()) {
            Some(pod) => Resolved::Pod {
                pod: pod.clone(),
                addr: dst,
            },
            None => Resolved::External { addr: dst },
        }
    }
}

impl Index {
    fn owner_of(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        let key = self.by_ip.get(&ip)?.last()?;
        self.pods.get(key)
    }

    fn upsert_pod(&mut self, pod: Arc<Pod>, metrics: &StateMetrics) -> bool {
        let key = pod.key();
        self.out_of_mesh.remove(&key);
        if let Some(old) = self.pods.get(&key) {
            if **old == *pod {
                return false;
            }
            let old_ips = old.ips.clone();
            for ip in old_ips.iter().filter(|ip| !pod.ips.contains(ip)) {
                self.unclaim_ip(*ip, &key);
            }
        }
        for ip in &pod.ips {
            let claims = self.by_ip.entry(*ip).or_default();
            if claims.last() == Some(&key) {
                continue;
            }
            claims.retain(|k| *k != key);
            if let Some(previous) = claims.last() {
                warn!(%ip, pod = %key, also = %previous, "two pods claim one IP; the last written wins");
                metrics
                    .conflicts
                    .get_or_create(&KindLabels { kind: "pod_ip" })
                    .inc();
            }
            claims.push(key.clone());
        }
        if pod.ips.is_empty() {
            info!(pod = %key, "pod has no IP yet");
        }
        self.pods.insert(key, pod);
        true
    }

    fn unclaim_ip(&mut self, ip: IpAddr, key: &PodKey) {
        if let Some(claims) = self.by_ip.get_mut(&ip) {
            claims.retain(|k| k != key);
            if claims.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    fn remove_pod(&mut self, key: &PodKey) -> bool {
        let was_out = self.out_of_mesh.remove(key).is_some();
        let Some(old) = self.pods.remove(key) else {
            return was_out;
        };
        for ip in &old.ips {
            self.unclaim_ip(*ip, key);
        }
        true
    }

    fn upsert_service(&mut self, svc: Arc<Service>, metrics: &StateMetrics) -> bool {
        let key = svc.key();
        if let Some(old) = self.services.get(&key) {
            if **old == *svc {
                return false;
            }
            let old = old.clone();
            self.unindex_service(&key, &old);
        }
        for vip in &svc.vips {
            for port in &svc.ports {
                let claims = self.by_vip.entry((*vip, port.port)).or_default();
                claims.retain(|k| *k != key);
                if let Some(previous) = claims.last() {
                    warn!(%vip, port = port.port, service = %key, also = %previous,
                        "two services claim one VIP and port; the last written wins");
                    metrics
                        .conflicts
                        .get_or_create(&KindLabels {
                            kind: "service_vip",
                        })
                        .inc();
                }
                claims.push(key.clone());
            }
        }
        for ep in &svc.endpoints {
            self.backing
                .entry(ep.clone())
                .or_default()
                .insert(key.clone());
        }
        self.services.insert(key, svc);
        true
    }

    fn unindex_service(&mut self, key: &ServiceKey, svc: &Service) {
        for vip in &svc.vips {
            for port in &svc.ports {
                if let Some(claims) = self.by_vip.get_mut(&(*vip, port.port)) {
                    claims.retain(|k| k != key);
                    if claims.is_empty() {
                        self.by_vip.remove(&(*vip, port.port));
                    }
                }
            }
        }
        for ep in &svc.endpoints {
            if let Some(set) = self.backing.get_mut(ep) {
                set.remove(key);
                if set.is_empty() {
                    self.backing.remove(ep);
                }
            }
        }
    }

    fn remove_service(&mut self, key: &ServiceKey) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        self.unindex_service(key, &old);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ServicePort;

    fn pod(name: &str, ips: &[&str], node: &str) -> Arc<Pod> {
        Arc::new(Pod {
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            labels: Default::default(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            node: node.into(),
            netns: None,
            uid: None,
            workload: None,
        })
    }

    fn key(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn service(name: &str, vip: &str, endpoints: &[&str]) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: Some(8080),
            }],
            endpoints: endpoints.iter().map(|e| key(e)).collect(),
        })
    }

    fn name_at(store: &WorkloadStore, ip: &str) -> Option<String> {
        store.pod_by_ip(ip.parse().unwrap()).map(|p| p.name.clone())
    }

    #[test]
    fn duplicate_ips_last_writer_wins_and_the_earlier_claim_returns() {
        let store = WorkloadStore::new("n0", StateMetrics::default());
        store.apply([WorkloadUpdate::Pod(pod("a", &["10.0.0.1"], "n0"))]);
        store.apply([WorkloadUpdate::Pod(pod("b", &["10.0.0.1"], "n1"))]);
        assert_eq!(name_at(&store, "10.0.0.1").as_deref(), Some("b"));
        assert_eq!(
            store
                .metrics
                .conflicts
                .get_or_create(&KindLabels { kind: "pod_ip" })
                .get(),
            1
        );
        store.apply([WorkloadUpdate::RemovePod(key("b"))]);
        assert_eq!(name_at(&store, "10.0.0.1").as_deref(), Some("a"));
        // A pod that moves to another IP gives up the old one.
        store.apply([WorkloadUpdate::Pod(pod("a", &["10.0.0.2"], "n0"))]);
        assert_eq!(name_at(&store, "10.0.0.1"), None);
        assert_eq!(name_at(&store, "10.0.0.2").as_deref(), Some("a"));
    }

    #[test]
    fn pods_without_ips_are_kept_and_skipped_as_endpoints() {
        let store = WorkloadStore::new("n0", StateMetrics::default());
        let gen0 = store.generation();
        store.apply([
            WorkloadUpdate::Pod(pod("pending", &[], "n0")),
            WorkloadUpdate::Pod(pod("ready", &["10.0.0.5"], "n1")),
            WorkloadUpdate::Service(service("web", "10.96.0.1", &["pending", "ready", "gone"])),
        ]);
        assert_eq!(store.generation(), gen0 + 1);
        assert_eq!(store.local_pods().len(), 1);
        match store.resolve("10.96.0.1:80".parse().unwrap()) {
            Resolved::Service { service, endpoints } => {
                assert_eq!(service.to_string(), "web.shop");
                assert_eq!(endpoints.len(), 1);
                assert_eq!(endpoints[0].addr, "10.0.0.5:8080".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.service_of(&key("ready"), 8080).map(|s| s.to_string()),
            Some("web.shop".into())
        );
        assert_eq!(store.service_of(&key("ready"), 9090), None);
        // The same object again is no change.
        store.apply([WorkloadUpdate::Pod(pod("ready", &["10.0.0.5"], "n1"))]);
        assert_eq!(store.generation(), gen0 + 1);
    }

    #[test]
    fn services_index_incrementally() {
        let store = WorkloadStore::new("n0", StateMetrics::default());
        store.apply([
            WorkloadUpdate::Pod(pod("a", &["10.0.0.1"], "n0")),
            WorkloadUpdate::Service(service("one", "10.96.0.1", &["a"])),
            WorkloadUpdate::Service(service("two", "10.96.0.1", &["a"])),
        ]);
        let owner = |store: &WorkloadStore| match store.resolve("10.96.0.1:80".parse().unwrap()) {
            Resolved::Service { service, .. } => Some(service.name),
            _ => None,
        };
        assert_eq!(owner(&store).as_deref(), Some("two"));
        store.apply([WorkloadUpdate::RemoveService(ServiceKey {
            namespace: "shop".into(),
            name: "two".into(),
        })]);
        assert_eq!(owner(&store).as_deref(), Some("one"));
        store.apply([WorkloadUpdate::Service(service("one", "10.96.0.2", &[]))]);
        assert_eq!(owner(&store), None);
        assert!(matches!(
            store.resolve("10.0.0.1:7".parse().unwrap()),
            Resolved::Pod { .. }
        ));
        assert!(matches!(
            store.resolve("192.0.2.1:443".parse().unwrap()),
            Resolved::External { .. }
        ));
        assert_eq!(store.service_of(&key("a"), 8080), None);
    }
}
