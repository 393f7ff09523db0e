//! The Kubernetes API as a source of workload updates: five kube-runtime
//! watchers feed a [`KubeCache`], whose batches go to the store.
//!
//! Watched: this node's pods (`spec.nodeName=<node>`), all pods (remote
//! peers' identities and addresses), Services, the EndpointSlices of
//! Services, and Namespaces (metadata only: their labels enable the mesh).
//! Each object is translated to a compact record as it arrives and
//! dropped: no reflector store of full objects.
use std::sync::Arc;

use ::kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        watcher::{self, watcher},
    },
};
use futures_util::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    cache::{KubeCache, WatchEvent},
    translate::SERVICE_NAME_LABEL,
};
use crate::state::WorkloadStore;

/// One event of one of the five watches.
#[derive(Debug)]
enum SourceEvent {
    LocalPod(WatchEvent<Pod>),
    Pod(WatchEvent<Pod>),
    Service(WatchEvent<Service>),
    Slice(WatchEvent<EndpointSlice>),
    Namespace(WatchEvent<ObjectMeta>),
}

impl<K> From<watcher::Event<K>> for WatchEvent<K> {
    fn from(event: watcher::Event<K>) -> Self {
        match event {
            watcher::Event::Init => Self::Init,
            watcher::Event::InitApply(o) => Self::InitApply(o),
            watcher::Event::InitDone => Self::InitDone,
            watcher::Event::Apply(o) => Self::Apply(o),
            watcher::Event::Delete(o) => Self::Delete(o),
        }
    }
}

impl<K> WatchEvent<K> {
    fn map<U>(self, f: impl FnOnce(K) -> U) -> WatchEvent<U> {
        match self {
            Self::Init => WatchEvent::Init,
            Self::InitApply(o) => WatchEvent::InitApply(f(o)),
            Self::InitDone => WatchEvent::InitDone,
            Self::Apply(o) => WatchEvent::Apply(f(o)),
            Self::Delete(o) => WatchEvent::Delete(f(o)),
        }
    }
}

type Item = Result<SourceEvent, (&'static str, watcher::Error)>;

/// One watch, retried with kube-runtime's default backoff (exponential,
/// 0.8 s to 30 s, with jitter): a failed watch resumes, a `410 Gone`
/// relists.
fn watch<K: Send + 'static>(
    kind: &'static str,
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    wrap: fn(WatchEvent<K>) -> SourceEvent,
) -> BoxStream<'static, Item> {
    stream
        .default_backoff()
        .map(move |r| r.map(|e| wrap(e.into())).map_err(|e| (kind, e)))
        .boxed()
}

/// Keeps the store in line with the Kubernetes API while it is kept.
pub struct KubeWorkloadSource {
    task: tokio::task::JoinHandle<()>,
    synced: watch::Receiver<bool>,
}

impl Drop for KubeWorkloadSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeWorkloadSource {
    /// Starts watching with `client` (e.g. `Client::try_default()`: in a
    /// pod, its service account) for the agent on the store's node. The
    /// store stays empty until every watch has listed.
    pub fn start(client: Client, store: Arc<WorkloadStore>) -> Self {
        let (synced_tx, synced) = watch::channel(false);
        let task = tokio::spawn(run(client, store, synced_tx));
        Self { task, synced }
    }

    /// Turns true once every watch has listed and the state is in the
    /// store (a readiness condition).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }
}

/// Watches until aborted (the watches retry errors forever).
async fn run(client: Client, store: Arc<WorkloadStore>, synced: watch::Sender<bool>) {
    let node = store.node().to_owned();
    let config = watcher::Config::default;
    let local = config().fields(&format!("spec.nodeName={node}"));
    // Slices of Services only (others have no service to join).
    let slices = config().labels(SERVICE_NAME_LABEL);
    let mut events = futures_util::stream::select_all([
        watch(
            "local pods",
            watcher(Api::<Pod>::all(client.clone()), local),
            SourceEvent::LocalPod,
        ),
        watch(
            "pods",
            watcher(Api::<Pod>::all(client.clone()), config()),
            SourceEvent::Pod,
        ),
        watch(
            "services",
            watcher(Api::<Service>::all(client.clone()), config()),
            SourceEvent::Service,
        ),
        watch(
            "endpointslices",
            watcher(Api::<EndpointSlice>::all(client.clone()), slices),
            SourceEvent::Slice,
        ),
        watch(
            "namespaces",
            // Metadata-only requests: labels are all a namespace is needed for.
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client), config()),
            |e| SourceEvent::Namespace(e.map(|o| o.metadata)),
        ),
    ]);
    let mut cache = KubeCache::new(&node);
    info!(%node, "watching the Kubernetes API");
    while let Some(item) = events.next().await {
        let event = match item {
            Ok(event) => event,
            Err((kind, err)) => {
                // The watch retries by itself; the state stays as it was.
                warn!(watch = kind, "Kubernetes watch failed (retrying): {err}");
                continue;
            }
        };
        let updates = match event {
            SourceEvent::LocalPod(e) => cache.local_pod_event(e),
            SourceEvent::Pod(e) => cache.pod_event(e),
            SourceEvent::Service(e) => cache.service_event(e),
            SourceEvent::Slice(e) => cache.slice_event(e),
            SourceEvent::Namespace(e) => cache.namespace_event(e),
        };
        if !updates.is_empty() {
            store.apply(updates);
        }
        if cache.synced() && !*synced.borrow() {
            synced.send_replace(true);
        }
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
