//! The workloads file: a hand-written (or generated) list of pods and
//! services, for the virtual cluster and for use outside Kubernetes. It is
//! one producer of workload updates: each reload is compared with the last
//! one applied and only what changed is sent to the store.
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

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

/// How long a reload that removes pods waits to read the file again: it
/// applies only if both reads agree, so a file cut by a writer that was not
/// done yet never unenrols a running pod.
pub const CONFIRM_REMOVAL: std::time::Duration = std::time::Duration::from_millis(500);

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
        let mut seen: HashMap<PodKey, usize> = HashMap::new();
        for (i, pod) in doc.pods.into_iter().enumerate() {
            if pod.name.is_empty() || pod.namespace.is_empty() {
                warn(
                    format!("pods[{i}]"),
                    "name and namespace must not be empty".into(),
                );
                continue;
            }
            if pod.node == doc.node && pod.netns.is_none() {
                warn(
                    format!("pods[{i}].netns"),
                    format!(
                        "pod {} runs on this node ({}) so its network namespace path is required",
                        pod.key(),
                        doc.node
                    ),
                );
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
        for key in self.pods.keys().filter(|k| !pods.contains_key(*k)) {
            updates.push(WorkloadUpdate::RemovePod(key.clone()));
        }
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

    /// Pods and services the last applied file had that `file` does not.
    pub fn removed(&self, file: &WorkloadsFile) -> Vec<String> {
        let pods = self
            .pods
            .keys()
            .filter(|k| !file.pods.iter().any(|p| p.key() == **k))
            .map(|k| format!("pod {k}"));
        let services = self
            .services
            .keys()
            .filter(|k| !file.services.iter().any(|s| s.key() == **k))
            .map(|k| format!("service {k}"));
        pods.chain(services).collect()
    }
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
    Ok(n)
}

/// Keeps the store in line with the workloads file while it is kept.
pub struct FileWorkloadSource {
    _watch: fswatch::Watch,
}

impl FileWorkloadSource {
    /// Applies `initial` (read at start-up: an error there is fatal, there
    /// is no last good state yet) and watches the file's directory.
    pub fn start(
        initial: &WorkloadsFile,
        store: std::sync::Arc<WorkloadStore>,
        reloads: ReloadMetrics,
    ) -> Result<Self, String> {
        let mut state = FileState::default();
        apply(&mut state, &store, initial)?;
        let path = initial.path.clone();
        let name = path.file_name().map(|n| n.to_owned());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let watch = fswatch::watch(
            &dir,
            move |n| Some(n) == name.as_deref(),
            move || {
                let outcome = reload(&path, &mut state, &store);
                reloads.record("workloads", outcome);
            },
        );
        Ok(Self { _watch: watch })
    }
}

/// Reads the settled file and applies it. One that removes pods or services is read
/// again after [`CONFIRM_REMOVAL`] and applied only if it did not change
/// in between; otherwise the newer text is taken from the start.
fn reload(path: &Path, state: &mut FileState, store: &WorkloadStore) -> &'static str {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let parsed =
            read_text(path).and_then(|text| Ok((WorkloadsFile::parse(path, &text)?, text)));
        let (file, text) = match parsed {
            Ok(p) => p,
            Err(e) => {
                error!("workloads file rejected, keeping the last good one: {e}");
                return "rejected";
            }
        };
        let removed = state.removed(&file);
        if !removed.is_empty() && attempts < 10 {
            std::thread::sleep(CONFIRM_REMOVAL);
            if read_text(path).ok().as_deref() != Some(text.as_str()) {
                info!(file = %path.display(), "workloads file changed while confirming a removal; reading it again");
                continue;
            }
            info!(file = %path.display(), removed = ?removed, "removal confirmed by a second read");
        }
        return match apply(state, store, &file) {
            Ok(0) => "unchanged",
            Ok(_) => "applied",
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
        let f = parse("node: a\npods:\n  - {name: x, namespace: y, ips: [1.2.3.4], node: a}\n  - {name: ok, namespace: y, ips: [1.2.3.5], node: b}\n  - {name: ok, namespace: y, ips: [1.2.3.6], node: b}\n  - {name: noip, namespace: y, node: b}\nservices:\n  - {name: s, namespace: y, vips: [10.0.0.1], ports: [{port: 0}]}\n")
            .unwrap();
        let names: Vec<&str> = f.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ok", "noip"]);
        assert!(f.services.is_empty());
        let w = f.warnings.join("\n");
        assert!(w.contains("workloads.yaml: pods[0].netns"), "{w}");
        assert!(w.contains("pods[2]: pod y/ok is listed twice"), "{w}");
        assert!(w.contains("services[0].ports[0]: port 0"), "{w}");
    }
}
