//! The workloads file: a hand-written (or generated) list of pods and
//! services, for the virtual cluster and for use outside Kubernetes. It is
//! one producer of workload updates: each reload is compared with the last
//! one applied and only what changed is sent to the store.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use serde::Deserialize;
use tracing::{error, info, warn};

use super::{
    WorkloadStore, WorkloadUpdate,
    model::{Pod, PodKey, Service, ServiceKey, ServicePort},
};
use crate::{
    files,
    fswatch::{self, ReloadMetrics},
    yaml::{self, YamlError},
};

/// How long a reload that removes or changes pods or services waits to
/// read the file again: it applies only if both reads agree, so a file cut
/// by a writer that was not done yet is never applied.
pub const CONFIRM_CHANGE: std::time::Duration = std::time::Duration::from_millis(500);

/// Istio's label that takes a pod out of ambient mode. With `none`, the
/// pod is listed but not in the mesh: the one explicit way to take a
/// running local pod out (its absence from the file is not enough).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// The file as users write it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    /// The node this agent runs on; pods with this `node` are local.
    node: String,
    #[serde(default)]
    pods: Vec<Pod>,
    #[serde(default)]
    services: Vec<ServiceDocument>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceDocument {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    /// Pods backing the service: `name` (same namespace) or `namespace/name`.
    #[serde(default)]
    endpoints: Vec<String>,
}

/// A parsed workloads file. Objects that cannot be used are left out with
/// a warning naming the file and field; the rest stays usable.
#[derive(Debug, Clone)]
pub struct WorkloadsFile {
    pub path: PathBuf,
    pub node: String,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    /// Pods listed with `istio.io/dataplane-mode: none`: running, outside
    /// the mesh (not in `pods`).
    pub opted_out: Vec<Arc<Pod>>,
    pub warnings: Vec<String>,
}

impl WorkloadsFile {
    pub fn read(path: &Path) -> Result<Self, YamlError> {
        Self::parse(path, &read_text(path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, YamlError> {
        let doc: Document = yaml::parse_sized(path, text, files::MAX_WORKLOADS_BYTES)?;
        Ok(Self::from_document(path, doc))
    }

    fn from_document(path: &Path, doc: Document) -> Self {
        let mut warnings = Vec::new();
        let mut warn = |field: String, message: String| {
            warnings.push(format!("{}: {field}: {message}; left out", path.display()));
        };
        let mut pods: Vec<Arc<Pod>> = Vec::with_capacity(doc.pods.len());
        let mut opted_out = Vec::new();
        let mut seen: HashMap<PodKey, usize> = HashMap::new();
        for (i, pod) in doc.pods.into_iter().enumerate() {
            if pod.name.is_empty() || pod.namespace.is_empty() {
                warn(
                    format!("pods[{i}]"),
                    "name and namespace must not be empty".into(),
                );
                continue;
            }
            if pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none") {
                opted_out.push(Arc::new(pod));
                continue;
            }
            if let Some(first) = seen.insert(pod.key(), i) {
                warn(
                    format!("pods[{i}]"),
                    format!("pod {} is listed twice (first at pods[{first}])", pod.key()),
                );
                continue;
            }
            pods.push(Arc::new(pod));
        }
        let mut services = Vec::with_capacity(doc.services.len());
        let mut seen_services = HashMap::new();
        'services: for (i, svc) in doc.services.into_iter().enumerate() {
            for (k, port) in svc.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == Some(0) {
                    warn(
                        format!("services[{i}].ports[{k}]"),
                        "port 0 is not a port".into(),
                    );
                    continue 'services;
                }
            }
            let endpoints = svc
                .endpoints
                .iter()
                .map(|ep| match ep.split_once('/') {
                    Some((ns, name)) => PodKey {
                        namespace: ns.into(),
                        name: name.into(),
                    },
                    None => PodKey {
                        namespace: svc.namespace.clone(),
                        name: ep.clone(),
                    },
                })
                .collect();
            let service = Service {
                name: svc.name,
                namespace: svc.namespace,
                vips: svc.vips,
                ports: svc.ports,
                endpoints,
            };
            if let Some(first) = seen_services.insert(service.key(), i) {
                warn(
                    format!("services[{i}]"),
                    format!(
                        "service {} is listed twice (first at services[{first}])",
                        service.key()
                    ),
                );
                continue;
            }
            services.push(Arc::new(service));
        }
        Self {
            path: path.to_owned(),
            node: doc.node,
            pods,
            services,
            opted_out,
            warnings,
        }
    }

    pub fn local_pods(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.iter().filter(move |p| p.node == self.node)
    }
}

fn read_text(path: &Path) -> Result<String, YamlError> {
    Ok(files::read_text(path, files::MAX_WORKLOADS_BYTES)?)
}

/// What was last sent to the store from the file, to send only changes.
#[derive(Default)]
pub struct FileState {
    pods: HashMap<PodKey, Arc<Pod>>,
    services: HashMap<ServiceKey, Arc<Service>>,
    /// Local pods the file no longer lists, kept while their netns exists.
    kept: BTreeSet<PodKey>,
    /// Pods listed as out of the mesh.
    out_of_mesh: HashMap<PodKey, Arc<Pod>>,
    /// Where the local pods applied are saved for the next agent (none in
    /// tests and fuzzing).
    saved_to: Option<PathBuf>,
}

impl FileState {
    /// The updates that turn the last applied file into `file`.
    pub fn diff(&mut self, file: &WorkloadsFile) -> Vec<WorkloadUpdate> {
        let mut updates = Vec::new();
        let pods: HashMap<PodKey, Arc<Pod>> =
            file.pods.iter().map(|p| (p.key(), p.clone())).collect();
        let services: HashMap<ServiceKey, Arc<Service>> =
            file.services.iter().map(|s| (s.key(), s.clone())).collect();
        for key in self.services.keys().filter(|k| !services.contains_key(*k)) {
            updates.push(WorkloadUpdate::RemoveService(key.clone()));
        }
        let out_of_mesh: HashMap<PodKey, Arc<Pod>> = file
            .opted_out
            .iter()
            .map(|p| (p.key(), p.clone()))
            .collect();
        for key in self.pods.keys().filter(|k| !pods.contains_key(*k)) {
            updates.push(match out_of_mesh.get(key) {
                Some(p) => WorkloadUpdate::OutOfMesh(p.clone()),
                None => WorkloadUpdate::RemovePod(key.clone()),
            });
        }
        for key in self
            .out_of_mesh
            .keys()
            .filter(|k| !out_of_mesh.contains_key(*k) && !pods.contains_key(*k))
        {
            updates.push(WorkloadUpdate::RemovePod(key.clone()));
        }
        for (key, p) in &out_of_mesh {
            if !self.pods.contains_key(key) && self.out_of_mesh.get(key) != Some(p) {
                updates.push(WorkloadUpdate::OutOfMesh(p.clone()));
            }
        }
        self.out_of_mesh = out_of_mesh;
        for (key, pod) in &pods {
            if self.pods.get(key) != Some(pod) {
                updates.push(WorkloadUpdate::Pod(pod.clone()));
            }
        }
        for (key, svc) in &services {
            if self.services.get(key) != Some(svc) {
                updates.push(WorkloadUpdate::Service(svc.clone()));
            }
        }
        self.pods = pods;
        self.services = services;
        updates
    }

    /// What `file` would remove or change of the last applied state: pods
    /// and services it no longer lists (kept pods are known to be missing
    /// already), and those it lists differently. A cut can do either: lose
    /// whole objects, or the last lines of one (its labels, which select
    /// policies). Additions need no confirmation.
    pub fn to_confirm(&self, file: &WorkloadsFile) -> Vec<String> {
        let pods: HashMap<PodKey, &Arc<Pod>> = file.pods.iter().map(|p| (p.key(), p)).collect();
        let services: HashMap<ServiceKey, &Arc<Service>> =
            file.services.iter().map(|s| (s.key(), s)).collect();
        let pods = self.pods.iter().filter_map(|(k, old)| match pods.get(k) {
            None if !self.kept.contains(k) => Some(format!("pod {k} removed")),
            Some(new) if *new != old => Some(format!("pod {k} changed")),
            _ => None,
        });
        let services = self
            .services
            .iter()
            .filter_map(|(k, old)| match services.get(k) {
                None => Some(format!("service {k} removed")),
                Some(new) if *new != old => Some(format!("service {k} changed")),
                _ => None,
            });
        pods.chain(services).collect()
    }

    /// Local pods the last applied file had that `file` neither lists nor
    /// takes out of the mesh (`istio.io/dataplane-mode: none`), and whose
    /// network namespace still exists, i.e. pods still running: added to
    /// `file` as they were, so a file cut by a writer that died, or one
    /// that lost lines, never unenrols a running pod (it would leave the
    /// pod's traffic outside the mesh). Returns their keys. Such a pod
    /// leaves once its netns is gone ([`Self::release_gone`]).
    fn keep_running(
        &self,
        file: &mut WorkloadsFile,
        netns_exists: &dyn Fn(&Path) -> bool,
    ) -> BTreeSet<PodKey> {
        let listed: HashSet<PodKey> = file
            .pods
            .iter()
            .map(|p| p.key())
            .chain(file.opted_out.iter().map(|p| p.key()))
            .collect();
        let mut kept = BTreeSet::new();
        let mut keep = Vec::new();
        for (key, pod) in &self.pods {
            if pod.node != file.node || listed.contains(key) {
                continue;
            }
            let Some(netns) = pod.netns.as_deref().filter(|n| netns_exists(n)) else {
                continue;
            };
            if !self.kept.contains(key) {
                warn!(
                    pod = %key,
                    netns = %netns.display(),
                    file = %file.path.display(),
                    "local pod missing from the workloads file while its network namespace still exists: kept in the mesh; list it with the label {DATAPLANE_MODE_LABEL}: none to take it out (it leaves by itself once its netns is gone)"
                );
            }
            keep.push(pod.clone());
            kept.insert(key.clone());
        }
        file.pods.extend(keep);
        kept
    }

    /// Kept pods whose network namespace is gone (the pod was deleted):
    /// their removal from the store.
    fn release_gone(&mut self, netns_exists: &dyn Fn(&Path) -> bool) -> Vec<WorkloadUpdate> {
        let gone: Vec<PodKey> = self
            .kept
            .iter()
            .filter(|k| {
                self.pods
                    .get(*k)
                    .and_then(|p| p.netns.as_deref())
                    .is_none_or(|n| !netns_exists(n))
            })
            .cloned()
            .collect();
        gone.into_iter()
            .map(|key| {
                info!(pod = %key, "network namespace of a pod missing from the workloads file is gone; removing the pod");
                self.kept.remove(&key);
                self.pods.remove(&key);
                WorkloadUpdate::RemovePod(key)
            })
            .collect()
    }
}

/// Whether a pod's network namespace still exists: its path is a
/// namespace (CNI bind-mounts it; a file left behind by a failed unmount
/// is not one).
fn netns_exists(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Applies `file` to `store` (its changes only) and logs the outcome.
pub fn apply(
    state: &mut FileState,
    store: &WorkloadStore,
    file: &WorkloadsFile,
) -> Result<usize, String> {
    if file.node != store.node() {
        return Err(format!(
            "{}: node changed from {} to {}; restart the agent to change its node",
            file.path.display(),
            store.node(),
            file.node
        ));
    }
    for w in &file.warnings {
        warn!("workloads {w}");
    }
    let updates = state.diff(file);
    let n = updates.len();
    store.apply(updates);
    info!(file = %file.path.display(), pods = file.pods.len(), services = file.services.len(), changes = n, "workloads applied");
    if n > 0 {
        state.save(&file.node);
    }
    Ok(n)
}

/// The file in `stateDir` that holds the local pods last applied.
pub const SAVED_PODS_FILE: &str = "local-pods.json";

impl FileState {
    /// Saves the local pods applied (kept ones included), in the workloads
    /// file's own format, for the agent that starts after this one. Best
    /// effort: without it a restart reads the workloads file alone.
    fn save(&self, node: &str) {
        let Some(path) = &self.saved_to else { return };
        let mut pods: Vec<&Pod> = self
            .pods
            .values()
            .filter(|p| p.node == node)
            .map(|p| &**p)
            .collect();
        pods.sort_by_key(|p| p.key());
        let doc = serde_json::json!({ "node": node, "pods": pods });
        if let Err(e) = files::write_atomically(path, doc.to_string().as_bytes()) {
            warn!(file = %path.display(), "saving the local pods for the next agent: {e}");
        }
    }
}

/// The local pods a previous agent on this node last applied (none if it
/// saved none, or for another node, or the file is unreadable: a warning).
fn load_saved(path: &Path, node: &str) -> Vec<Arc<Pod>> {
    let text = match files::read_text(path, files::MAX_WORKLOADS_BYTES) {
        Ok(t) => t,
        Err(files::FileError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Vec::new();
        }
        Err(e) => {
            warn!(
                "the local pods a previous agent saved are unreadable; starting from the workloads file alone: {e}"
            );
            return Vec::new();
        }
    };
    match WorkloadsFile::parse(path, &text) {
        Ok(f) if f.node == node => f.local_pods().cloned().collect(),
        Ok(f) => {
            warn!(file = %path.display(), "saved for node {}, not {node}; ignored", f.node);
            Vec::new()
        }
        Err(e) => {
            warn!(
                "the local pods a previous agent saved do not parse; starting from the workloads file alone: {e}"
            );
            Vec::new()
        }
    }
}

/// The workloads file source's metrics.
#[derive(Clone)]
pub struct FileSourceMetrics {
    reloads: ReloadMetrics,
    pods_kept: Gauge,
}

impl FileSourceMetrics {
    pub fn new(registry: &mut Registry, reloads: ReloadMetrics) -> Self {
        let pods_kept = Gauge::default();
        registry.register(
            "workload_pods_kept",
            "Local pods the workloads file no longer lists, kept in the mesh because their network namespace still exists",
            pods_kept.clone(),
        );
        Self { reloads, pods_kept }
    }
}

/// Keeps the store in line with the workloads file while it is kept.
pub struct FileWorkloadSource {
    _watch: fswatch::Watch,
    release: tokio::task::JoinHandle<()>,
}

impl Drop for FileWorkloadSource {
    fn drop(&mut self) {
        self.release.abort();
    }
}

impl FileWorkloadSource {
    /// Applies `initial` (read at start-up: an error there is fatal, there
    /// is no last good state yet) and watches the file's directory; pods
    /// kept because their netns existed are released once it is gone
    /// (checked every [`fswatch::POLL`]).
    ///
    /// The local pods the previous agent saved in `state_dir` are the last
    /// applied state, and the file is then read as any reload: a restart
    /// with a cut file keeps the running pods it leaves out too.
    pub fn start(
        initial: &WorkloadsFile,
        store: Arc<WorkloadStore>,
        metrics: FileSourceMetrics,
        state_dir: &Path,
    ) -> Result<Self, String> {
        let saved_to = state_dir.join(SAVED_PODS_FILE);
        let mut state = FileState {
            saved_to: Some(saved_to.clone()),
            ..FileState::default()
        };
        let saved = load_saved(&saved_to, &initial.node);
        if !saved.is_empty() {
            info!(pods = saved.len(), file = %saved_to.display(), "local pods the previous agent enrolled");
            let last = WorkloadsFile {
                path: saved_to,
                node: initial.node.clone(),
                pods: saved,
                services: Vec::new(),
                opted_out: Vec::new(),
                warnings: Vec::new(),
            };
            apply(&mut state, &store, &last)?;
            if reload(&initial.path, &mut state, &store, &netns_exists) == "rejected" {
                return Err(format!(
                    "the workloads file {} was rejected (above)",
                    initial.path.display()
                ));
            }
        } else {
            apply(&mut state, &store, initial)?;
        }
        metrics.pods_kept.set(state.kept.len() as i64);
        let state = Arc::new(Mutex::new(state));
        let path = initial.path.clone();
        let name = path.file_name().map(|n| n.to_owned());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let watch = {
            let (state, store, metrics) = (state.clone(), store.clone(), metrics.clone());
            fswatch::watch(
                &dir,
                move |n| Some(n) == name.as_deref(),
                move || {
                    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                    let outcome = reload(&path, &mut state, &store, &netns_exists);
                    metrics.reloads.record("workloads", outcome);
                    metrics.pods_kept.set(state.kept.len() as i64);
                },
            )
        };
        let release = tokio::spawn(async move {
            let mut tick = tokio::time::interval(fswatch::POLL);
            loop {
                tick.tick().await;
                // Busy: a reload is running (it may wait to confirm a
                // removal); the next tick checks.
                let Ok(mut state) = state.try_lock() else {
                    continue;
                };
                if state.kept.is_empty() {
                    continue;
                }
                let updates = state.release_gone(&netns_exists);
                metrics.pods_kept.set(state.kept.len() as i64);
                if !updates.is_empty() {
                    // Under the lock: a reload cannot add the pod back in
                    // between.
                    store.apply(updates);
                    state.save(store.node());
                }
            }
        });
        Ok(Self {
            _watch: watch,
            release,
        })
    }
}

/// Reads the settled file and applies it. One that removes or changes
/// pods or services is read again after [`CONFIRM_CHANGE`] and applied
/// only if it did not change in between; otherwise the newer text is taken from the
/// start. Running local pods it no longer lists are kept
/// ([`FileState::keep_running`]).
fn reload(
    path: &Path,
    state: &mut FileState,
    store: &WorkloadStore,
    netns_exists: &dyn Fn(&Path) -> bool,
) -> &'static str {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let parsed =
            read_text(path).and_then(|text| Ok((WorkloadsFile::parse(path, &text)?, text)));
        let (mut file, text) = match parsed {
            Ok(p) => p,
            Err(e) => {
                error!("workloads file rejected, keeping the last good one: {e}");
                return "rejected";
            }
        };
        let to_confirm = state.to_confirm(&file);
        if !to_confirm.is_empty() && attempts < 10 {
            std::thread::sleep(CONFIRM_CHANGE);
            if read_text(path).ok().as_deref() != Some(text.as_str()) {
                info!(file = %path.display(), "workloads file changed while confirming a removal or change; reading it again");
                continue;
            }
            info!(
                file = %path.display(),
                count = to_confirm.len(),
                first = ?&to_confirm[..to_confirm.len().min(10)],
                "removals and changes confirmed by a second read"
            );
        }
        let kept = state.keep_running(&mut file, netns_exists);
        return match apply(state, store, &file) {
            Ok(n) => {
                state.kept = kept;
                if n == 0 { "unchanged" } else { "applied" }
            }
            Err(e) => {
                error!("workloads file rejected, keeping the last good one: {e}");
                "rejected"
            }
        };
    }
}

/// The fuzz target's body (its seeds also run as a test): a workloads
/// file's bytes through parsing, the diff against the last one, the store
/// and a resolution of every address it names.
pub fn fuzz_workloads_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = WorkloadsFile::parse(Path::new("fuzz.yaml"), text) else {
        return;
    };
    let store = WorkloadStore::new(&file.node, super::StateMetrics::default());
    let mut state = FileState::default();
    let _ = apply(&mut state, &store, &file);
    for pod in &file.pods {
        for ip in &pod.ips {
            let _ = store.resolve(std::net::SocketAddr::new(*ip, 80));
            let _ = store.service_of(&pod.key(), 80);
        }
    }
    for svc in &file.services {
        for vip in &svc.vips {
            for port in &svc.ports {
                let _ = store.resolve(std::net::SocketAddr::new(*vip, port.port));
            }
        }
    }
    // Everything removed again leaves an empty state.
    let empty = WorkloadsFile {
        pods: Vec::new(),
        services: Vec::new(),
        opted_out: Vec::new(),
        warnings: Vec::new(),
        ..file
    };
    let _ = apply(&mut state, &store, &empty);
    assert!(store.pods().is_empty() && store.services().is_empty());
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::state::{Resolved, StateMetrics};

    fn parse(text: &str) -> Result<WorkloadsFile, YamlError> {
        WorkloadsFile::parse(Path::new("workloads.yaml"), text)
    }

    const GOOD: &str = r#"
node: node-0
pods:
  - name: cart-1
    namespace: shop
    serviceAccount: cart
    labels: {app: cart}
    ips: [10.244.0.10, "fd00:244::10"]
    node: node-0
    netns: /run/netns/cart-1
  - name: orders-1
    namespace: shop
    ips: [10.244.1.10]
    node: node-1
services:
  - name: cart
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [cart-1, shop/orders-1]
"#;

    #[test]
    fn resolves_vips_pods_and_external() {
        let file = parse(GOOD).unwrap();
        assert!(file.warnings.is_empty(), "{:?}", file.warnings);
        let store = WorkloadStore::new(&file.node, StateMetrics::default());
        apply(&mut FileState::default(), &store, &file).unwrap();
        assert_eq!(store.local_pods().len(), 1);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        match store.resolve(vip) {
            Resolved::Service { service, endpoints } => {
                assert_eq!(service.to_string(), "cart.shop");
                let mut addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                addrs.sort();
                assert_eq!(
                    addrs,
                    vec![
                        "10.244.0.10:8080".parse::<SocketAddr>().unwrap(),
                        "10.244.1.10:8080".parse().unwrap()
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store.resolve("10.244.1.10:9000".parse().unwrap()),
            Resolved::Pod { .. }
        ));
        assert!(matches!(
            store.resolve("192.0.2.1:443".parse().unwrap()),
            Resolved::External { .. }
        ));
        let pods = store.pods();
        let cart = pods.iter().find(|p| p.name == "cart-1").unwrap();
        assert_eq!(cart.app(), "cart");
        let orders = pods.iter().find(|p| p.name == "orders-1").unwrap();
        assert_eq!(orders.app(), "orders-1");
    }

    #[test]
    fn reloads_send_only_what_changed() {
        let store = WorkloadStore::new("node-0", StateMetrics::default());
        let mut state = FileState::default();
        assert_eq!(apply(&mut state, &store, &parse(GOOD).unwrap()), Ok(3));
        assert_eq!(apply(&mut state, &store, &parse(GOOD).unwrap()), Ok(0));
        let fewer = GOOD.replace("endpoints: [cart-1, shop/orders-1]", "endpoints: [cart-1]");
        assert_eq!(apply(&mut state, &store, &parse(&fewer).unwrap()), Ok(1));
        let other_node = GOOD.replace("node: node-0\npods", "node: node-9\npods");
        let err = apply(&mut state, &store, &parse(&other_node).unwrap()).unwrap_err();
        assert!(err.contains("node changed from node-0 to node-9"), "{err}");
    }

    #[test]
    fn a_running_local_pod_leaves_only_when_taken_out_or_when_its_netns_is_gone() {
        let dir = std::env::temp_dir().join(format!("nm-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workloads.yaml");
        let store = WorkloadStore::new("node-0", StateMetrics::default());
        let mut state = FileState::default();
        apply(&mut state, &store, &parse(GOOD).unwrap()).unwrap();
        let running = std::sync::atomic::AtomicBool::new(true);
        let exists = |p: &Path| {
            p == Path::new("/run/netns/cart-1")
                && running.load(std::sync::atomic::Ordering::Relaxed)
        };
        let names = |store: &WorkloadStore| {
            let mut n: Vec<String> = store.pods().iter().map(|p| p.name.clone()).collect();
            n.sort();
            n
        };
        // Cut after the node line (a writer that died): valid YAML, no pods.
        std::fs::write(&path, "node: node-0\n").unwrap();
        assert_eq!(reload(&path, &mut state, &store, &exists), "applied");
        // The running local pod stays, in the store and so enrolled; the
        // remote one and the service are gone (removal confirmed).
        assert_eq!(names(&store), ["cart-1"]);
        assert!(store.services().is_empty());
        assert_eq!(
            state.kept.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["shop/cart-1"]
        );
        // Another reload of the same file keeps it, without a confirmation.
        let started = tokio::time::Instant::now();
        assert_eq!(reload(&path, &mut state, &store, &exists), "unchanged");
        assert!(
            started.elapsed() < CONFIRM_CHANGE,
            "{:?}",
            started.elapsed()
        );
        assert!(state.release_gone(&exists).is_empty());
        // Its netns gone: the pod was deleted, and leaves.
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        let updates = state.release_gone(&exists);
        assert!(matches!(&updates[..], [WorkloadUpdate::RemovePod(k)] if k.name == "cart-1"));
        store.apply(updates);
        assert!(store.pods().is_empty());
        assert!(state.kept.is_empty());

        // Listed again, then taken out explicitly with Istio's label: it
        // leaves although its netns exists.
        running.store(true, std::sync::atomic::Ordering::Relaxed);
        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(reload(&path, &mut state, &store, &exists), "applied");
        assert_eq!(names(&store), ["cart-1", "orders-1"]);
        let out = GOOD.replace(
            "labels: {app: cart}",
            "labels: {app: cart, istio.io/dataplane-mode: none}",
        );
        std::fs::write(&path, &out).unwrap();
        assert_eq!(reload(&path, &mut state, &store, &exists), "applied");
        assert_eq!(names(&store), ["orders-1"]);
        assert!(state.kept.is_empty());
        let file = parse(&out).unwrap();
        assert_eq!(file.opted_out.len(), 1);
        assert!(file.warnings.is_empty(), "{:?}", file.warnings);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_restart_reads_the_file_against_the_pods_the_previous_agent_saved() {
        let dir = std::env::temp_dir().join(format!("nm-saved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workloads.yaml");
        let state_dir = dir.join("state");
        // A netns that exists for any user: this process's own.
        let full = GOOD.replace("/run/netns/cart-1", "/proc/self/ns/net");
        assert!(netns_exists(Path::new("/proc/self/ns/net")));
        assert!(!netns_exists(&dir));
        let start = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let store = Arc::new(WorkloadStore::new("node-0", StateMetrics::default()));
            let metrics =
                FileSourceMetrics::new(&mut Registry::default(), ReloadMetrics::default());
            let initial = WorkloadsFile::parse(&path, text).unwrap();
            let source =
                FileWorkloadSource::start(&initial, store.clone(), metrics, &state_dir).unwrap();
            let mut names: Vec<String> = store.pods().iter().map(|p| p.name.clone()).collect();
            names.sort();
            drop(source);
            names
        };
        assert_eq!(start(&full), ["cart-1", "orders-1"]);
        let saved = std::fs::read_to_string(state_dir.join(SAVED_PODS_FILE)).unwrap();
        assert!(
            saved.contains("cart-1") && !saved.contains("orders-1"),
            "{saved}"
        );
        // The next agent starts with a cut file: the running pod stays.
        assert_eq!(start("node: node-0\n"), ["cart-1"]);
        // Taken out explicitly: it goes, and is no longer saved.
        let out = full.replace(
            "labels: {app: cart}",
            "labels: {app: cart, istio.io/dataplane-mode: none}",
        );
        assert_eq!(start(&out), ["orders-1"]);
        assert_eq!(start("node: node-0\n"), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cluster_of_fifty_thousand_pods_parses() {
        // The old parser budget stopped near 13,900 pods.
        let mut y = String::from("node: node-0\npods:\n");
        for i in 0..50_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0af4_0000 + i);
            y += &format!(
                "  - name: pod-{i}\n    namespace: shop\n    serviceAccount: sa-{}\n    labels: {{app: app-{}, version: v1}}\n    ips: [\"{ip}\"]\n    node: node-{}\n",
                i % 50,
                i % 50,
                1 + i % 100
            );
        }
        assert!(y.len() as u64 <= files::MAX_WORKLOADS_BYTES);
        let file = parse(&y).unwrap();
        assert_eq!(file.pods.len(), 50_000);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err = parse("node: a\npods:\n  - name: x\n    namespace: y\n    ips: [1.2.3.4]\n    node: b\n    servceAccount: z\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("workloads.yaml: "), "{err}");
        assert!(err.contains("line 7 column 5"), "{err}");
        assert!(err.contains("servceAccount"), "{err}");

        let err = parse("node: a\nnode: b\n").unwrap_err().to_string();
        assert!(err.contains("duplicate mapping key: node"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn bad_objects_are_left_out_with_a_warning_the_rest_stays() {
        let f = parse("node: a\npods:\n  - {name: '', namespace: y, ips: [1.2.3.4], node: a}\n  - {name: ok, namespace: y, ips: [1.2.3.5], node: b}\n  - {name: ok, namespace: y, ips: [1.2.3.6], node: b}\n  - {name: noip, namespace: y, node: b}\nservices:\n  - {name: s, namespace: y, vips: [10.0.0.1], ports: [{port: 0}]}\n")
            .unwrap();
        let names: Vec<&str> = f.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ok", "noip"]);
        assert!(f.services.is_empty());
        let w = f.warnings.join("\n");
        assert!(
            w.contains("workloads.yaml: pods[0]: name and namespace"),
            "{w}"
        );
        assert!(w.contains("pods[2]: pod y/ok is listed twice"), "{w}");
        assert!(w.contains("services[0].ports[0]: port 0"), "{w}");
    }
}
