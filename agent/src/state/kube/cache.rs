//! Watch events of the five watched kinds in, store updates out. No HTTP
//! here: a source feeds the events (kube-runtime's watchers in production,
//! event sequences in tests).
//!
//! Nothing is published until every kind has been listed once: a store
//! holding the pods but not yet the namespaces that mesh them would unenrol
//! running pods. Then the whole state goes out as one batch, and each later
//! event as the smallest batch that brings the store to the cache's view.
//! A relist (after a watch error or `410 Gone`) replaces that kind's
//! records at its end; until then the last listed state stays in force.
use std::{
    collections::{BTreeSet, HashMap},
    hash::Hash,
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use tracing::{info, warn};

use super::translate::{
    self, Labels, PodPlacement, PodRecord, ServiceRecord, SliceKey, SliceRecord, TranslateError,
};
use crate::state::{
    WorkloadUpdate,
    model::{PodKey, Service, ServiceKey},
};

/// One event of a watch: kube-runtime's `watcher::Event`, mirrored so the
/// cache needs no client. `Init` … `InitApply`* … `InitDone` is a (re)list:
/// objects it does not name are gone.
#[derive(Debug, Clone)]
pub enum WatchEvent<K> {
    Init,
    InitApply(K),
    InitDone,
    Apply(K),
    Delete(K),
}

/// An object kind as the cache keeps it: its key and its compact record.
trait Watched {
    type Key: Clone + Eq + Hash + Ord;
    type Record: Clone + PartialEq;
    const KIND: &'static str;

    fn key(&self) -> Option<Self::Key>;
    fn translate(&self) -> Result<Option<Self::Record>, TranslateError>;
    /// Whether a Delete of `self` is of the object `record` came from.
    fn is(&self, _record: &Self::Record) -> bool {
        true
    }
}

fn meta_key(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

impl Watched for core::Pod {
    type Key = PodKey;
    type Record = Arc<PodRecord>;
    const KIND: &'static str = "Pod";

    fn key(&self) -> Option<PodKey> {
        meta_key(&self.metadata).map(|(namespace, name)| PodKey { namespace, name })
    }

    fn translate(&self) -> Result<Option<Arc<PodRecord>>, TranslateError> {
        Ok(translate::translate_pod(self)?.map(Arc::new))
    }

    /// A pod recreated under its name is another pod: a late Delete of the
    /// old one must not remove the new one.
    fn is(&self, record: &Arc<PodRecord>) -> bool {
        match (self.metadata.uid.as_deref(), record.pod.uid.as_deref()) {
            (Some(deleted), Some(kept)) => deleted == kept,
            _ => true,
        }
    }
}

impl Watched for core::Service {
    type Key = ServiceKey;
    type Record = ServiceRecord;
    const KIND: &'static str = "Service";

    fn key(&self) -> Option<ServiceKey> {
        meta_key(&self.metadata).map(|(namespace, name)| ServiceKey { namespace, name })
    }

    fn translate(&self) -> Result<Option<ServiceRecord>, TranslateError> {
        translate::translate_service(self)
    }
}

impl Watched for discovery::EndpointSlice {
    type Key = SliceKey;
    type Record = SliceRecord;
    const KIND: &'static str = "EndpointSlice";

    fn key(&self) -> Option<SliceKey> {
        meta_key(&self.metadata)
    }

    fn translate(&self) -> Result<Option<SliceRecord>, TranslateError> {
        translate::translate_slice(self)
    }
}

/// Namespaces are watched for their metadata alone.
impl Watched for ObjectMeta {
    type Key = String;
    type Record = Labels;
    const KIND: &'static str = "Namespace";

    fn key(&self) -> Option<String> {
        self.name.clone()
    }

    fn translate(&self) -> Result<Option<Labels>, TranslateError> {
        translate::translate_namespace(self).map(|(_, labels)| Some(labels))
    }
}

/// The records of one watched kind.
struct Records<W: Watched> {
    current: HashMap<W::Key, W::Record>,
    /// A list in progress: replaces `current` at its InitDone.
    relist: Option<HashMap<W::Key, W::Record>>,
    /// Listed once at least.
    listed: bool,
}

impl<W: Watched> Default for Records<W> {
    fn default() -> Self {
        Self {
            current: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

/// A record that changed: its key and what it was.
type Changed<W> = Vec<(<W as Watched>::Key, Option<<W as Watched>::Record>)>;

impl<W: Watched> Records<W> {
    fn get(&self, key: &W::Key) -> Option<&W::Record> {
        self.current.get(key)
    }

    /// Applies an event; returns the records it changed.
    fn apply(&mut self, event: WatchEvent<W>) -> Changed<W> {
        match event {
            WatchEvent::Init => {
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            WatchEvent::InitApply(object) => match (self.relist.as_mut(), translated(&object)) {
                (Some(relist), Some((key, record))) => {
                    match record {
                        Some(record) => relist.insert(key, record),
                        None => relist.remove(&key),
                    };
                    Vec::new()
                }
                // Not in a list (a source that skipped Init): as an Apply.
                (None, Some((key, record))) => self.set(key, record),
                (_, None) => Vec::new(),
            },
            WatchEvent::InitDone => {
                self.listed = true;
                let Some(mut listed) = self.relist.take() else {
                    return Vec::new();
                };
                let mut changed: Changed<W> = Vec::new();
                for (key, old) in &self.current {
                    if listed.get(key) != Some(old) {
                        changed.push((key.clone(), Some(old.clone())));
                    }
                }
                changed.extend(
                    listed
                        .keys()
                        .filter(|k| !self.current.contains_key(*k))
                        .map(|k| (k.clone(), None)),
                );
                std::mem::swap(&mut self.current, &mut listed);
                changed
            }
            WatchEvent::Apply(object) => match translated(&object) {
                Some((key, record)) => self.set(key, record),
                None => Vec::new(),
            },
            WatchEvent::Delete(object) => {
                let Some(key) = object.key() else {
                    return Vec::new();
                };
                if let Some(relist) = self.relist.as_mut()
                    && relist.get(&key).is_some_and(|r| object.is(r))
                {
                    relist.remove(&key);
                }
                match self.current.get(&key) {
                    Some(r) if object.is(r) => {
                        let old = self.current.remove(&key);
                        vec![(key, old)]
                    }
                    _ => Vec::new(),
                }
            }
        }
    }

    fn set(&mut self, key: W::Key, record: Option<W::Record>) -> Changed<W> {
        // An Apply during a list (not sent by kube-runtime) counts for both.
        if let Some(relist) = self.relist.as_mut() {
            match &record {
                Some(r) => relist.insert(key.clone(), r.clone()),
                None => relist.remove(&key),
            };
        }
        let old = match record {
            Some(r) => {
                if self.current.get(&key) == Some(&r) {
                    return Vec::new();
                }
                self.current.insert(key.clone(), r)
            }
            None => match self.current.remove(&key) {
                Some(old) => Some(old),
                None => return Vec::new(),
            },
        };
        vec![(key, old)]
    }
}

/// An object's key and record (None: an object the mesh leaves out, or one
/// it cannot use, which is logged and left out as well).
fn translated<W: Watched>(object: &W) -> Option<(W::Key, Option<W::Record>)> {
    let Some(key) = object.key() else {
        warn!(
            kind = W::KIND,
            "object without a name (or namespace) ignored"
        );
        return None;
    };
    match object.translate() {
        Ok(record) => Some((key, record)),
        Err(err) => {
            warn!("{err}; left out");
            Some((key, None))
        }
    }
}

/// The Kubernetes view of one node's agent: compact records of the
/// watched objects, and what was published from them to the store.
pub struct KubeCache {
    node: String,
    /// Pods on this node (a watch with `spec.nodeName=<node>`).
    local_pods: Records<core::Pod>,
    /// All pods of the cluster.
    pods: Records<core::Pod>,
    services: Records<core::Service>,
    slices: Records<discovery::EndpointSlice>,
    namespaces: Records<ObjectMeta>,
    slices_by_service: HashMap<ServiceKey, BTreeSet<SliceKey>>,
    /// What the store holds from this cache (never `Absent`).
    published_pods: HashMap<PodKey, PodPlacement>,
    published_services: HashMap<ServiceKey, Arc<Service>>,
    synced: bool,
}

impl KubeCache {
    /// An empty cache for the agent on `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            local_pods: Records::default(),
            pods: Records::default(),
            services: Records::default(),
            slices: Records::default(),
            namespaces: Records::default(),
            slices_by_service: HashMap::new(),
            published_pods: HashMap::new(),
            published_services: HashMap::new(),
            synced: false,
        }
    }

    /// Whether every kind has been listed and the state published: the
    /// readiness of the Kubernetes source.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The kinds not listed yet (for logs while waiting).
    pub fn unlisted(&self) -> Vec<&'static str> {
        [
            ("local pods", self.local_pods.listed),
            ("pods", self.pods.listed),
            ("services", self.services.listed),
            ("endpointslices", self.slices.listed),
            ("namespaces", self.namespaces.listed),
        ]
        .into_iter()
        .filter_map(|(kind, listed)| (!listed).then_some(kind))
        .collect()
    }

    /// The workload name of a pod the cache knows (for `*_workload`
    /// metric labels).
    pub fn workload_name(&self, key: &PodKey) -> Option<&str> {
        self.pod_record(key).map(|r| r.workload_name.as_str())
    }

    /// An event of the watch of this node's pods; returns the updates to
    /// apply to the store (none before every kind is listed).
    pub fn local_pod_event(&mut self, event: WatchEvent<core::Pod>) -> Vec<WorkloadUpdate> {
        let changed = self.local_pods.apply(event);
        let pods = changed.into_iter().map(|(k, _)| k).collect();
        self.publish(pods, BTreeSet::new())
    }

    /// An event of the watch of all pods.
    pub fn pod_event(&mut self, event: WatchEvent<core::Pod>) -> Vec<WorkloadUpdate> {
        let changed = self.pods.apply(event);
        let pods = changed.into_iter().map(|(k, _)| k).collect();
        self.publish(pods, BTreeSet::new())
    }

    pub fn service_event(&mut self, event: WatchEvent<core::Service>) -> Vec<WorkloadUpdate> {
        let changed = self.services.apply(event);
        let services = changed.into_iter().map(|(k, _)| k).collect();
        self.publish(BTreeSet::new(), services)
    }

    pub fn slice_event(
        &mut self,
        event: WatchEvent<discovery::EndpointSlice>,
    ) -> Vec<WorkloadUpdate> {
        let changed = self.slices.apply(event);
        let mut services = BTreeSet::new();
        for (key, old) in changed {
            if let Some(old) = old
                && let Some(set) = self.slices_by_service.get_mut(&old.service)
            {
                set.remove(&key);
                if set.is_empty() {
                    self.slices_by_service.remove(&old.service);
                }
                services.insert(old.service);
            }
            if let Some(new) = self.slices.get(&key) {
                let service = new.service.clone();
                self.slices_by_service
                    .entry(service.clone())
                    .or_default()
                    .insert(key);
                services.insert(service);
            }
        }
        self.publish(BTreeSet::new(), services)
    }

    /// An event of the watch of namespaces (their metadata): a label change
    /// can mesh or unmesh every pod of the namespace.
    pub fn namespace_event(&mut self, event: WatchEvent<ObjectMeta>) -> Vec<WorkloadUpdate> {
        let changed = self.namespaces.apply(event);
        let namespaces: BTreeSet<String> = changed.into_iter().map(|(k, _)| k).collect();
        // A scan of all pods: namespace labels change rarely.
        let pods = match namespaces.is_empty() {
            true => BTreeSet::new(),
            false => self
                .pod_keys()
                .into_iter()
                .filter(|k| namespaces.contains(&k.namespace))
                .collect(),
        };
        self.publish(pods, BTreeSet::new())
    }

    fn pod_keys(&self) -> BTreeSet<PodKey> {
        self.local_pods
            .current
            .keys()
            .chain(self.pods.current.keys())
            .cloned()
            .collect()
    }

    /// The record a pod key stands for. Two watches report pods of this
    /// node and may briefly disagree: of two different pods (a pod
    /// recreated under its name), the newer; of one pod, the local watch's
    /// view. Either converges once both watches have caught up.
    fn pod_record(&self, key: &PodKey) -> Option<&Arc<PodRecord>> {
        match (self.local_pods.get(key), self.pods.get(key)) {
            (Some(local), Some(any))
                if local.pod.uid != any.pod.uid && any.created > local.created =>
            {
                Some(any)
            }
            (Some(local), _) => Some(local),
            (None, any) => any,
        }
    }

    fn placement(&self, key: &PodKey) -> PodPlacement {
        translate::place_pod(
            self.pod_record(key).map(|r| &**r),
            self.namespaces.get(&key.namespace),
            &self.node,
        )
    }

    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        let record = self.services.get(key)?;
        let slices = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k));
        Some(Arc::new(translate::build_service(record, slices)))
    }

    /// The updates that bring the store to the cache's view of `pods` and
    /// `services`; all of it at the first moment every kind is listed.
    fn publish(
        &mut self,
        mut pods: BTreeSet<PodKey>,
        mut services: BTreeSet<ServiceKey>,
    ) -> Vec<WorkloadUpdate> {
        let first = !self.synced;
        if first {
            let unlisted = self.unlisted();
            if !unlisted.is_empty() {
                return Vec::new();
            }
            self.synced = true;
            pods = self.pod_keys();
            services = self.services.current.keys().cloned().collect();
        }
        // Removals first: an address a removed pod leaves may be the one
        // an added pod takes.
        let mut removals = Vec::new();
        let mut upserts = Vec::new();
        for key in pods {
            let placement = self.placement(&key);
            if self.published_pods.get(&key) == Some(&placement) {
                continue;
            }
            match &placement {
                PodPlacement::Meshed(pod) => upserts.push(WorkloadUpdate::Pod(pod.clone())),
                PodPlacement::OutOfMesh(pod) => {
                    removals.push(WorkloadUpdate::OutOfMesh(pod.clone()))
                }
                PodPlacement::Absent => {
                    if self.published_pods.remove(&key).is_some() {
                        removals.push(WorkloadUpdate::RemovePod(key));
                    }
                    continue;
                }
            }
            self.published_pods.insert(key, placement);
        }
        for key in services {
            match self.service(&key) {
                Some(service) => {
                    if self.published_services.get(&key) != Some(&service) {
                        self.published_services.insert(key, service.clone());
                        upserts.push(WorkloadUpdate::Service(service));
                    }
                }
                None => {
                    if self.published_services.remove(&key).is_some() {
                        removals.push(WorkloadUpdate::RemoveService(key));
                    }
                }
            }
        }
        removals.extend(upserts);
        if first {
            info!(
                pods = self.published_pods.len(),
                services = self.published_services.len(),
                "Kubernetes state listed: publishing it"
            );
        }
        removals
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
