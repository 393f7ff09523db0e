//! Enrolment by the chained CNI plugin (`nodemesh-cni`, istio-cni's model).
//!
//! The container runtime runs the plugin after the cluster's own CNI plugin,
//! while it creates a pod's sandbox and before any container starts. The
//! plugin hands the agent the new netns (as a file descriptor) and the pod's
//! addresses, and waits: the agent answers once the pod's listeners, capture
//! program and enrolment entry exist, so a pod never runs outside the mesh
//! (with the agent down the ADD fails and the runtime retries).
//!
//! [`server`] answers the plugin on a unix socket and passes each request to
//! enrolment as a [`CniRequest`]; [`CniRecords`] are what enrolment keeps of
//! each pod's netns, saved in `stateDir` so a restarted agent re-enrols the
//! pods it enrolled before (re-opened by path, accepted only if the netns
//! cookie is the one recorded). [`install`] puts the plugin on the node.
pub mod install;
pub mod recover;
pub mod server;

use std::{
    collections::HashMap,
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nodemesh_cni::protocol::Response;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::{
    datapath::NetnsHandle,
    files,
    state::{Pod, PodKey},
};

/// One request of the plugin, for enrolment to carry out; `reply` gets the
/// answer the plugin waits for.
#[derive(Debug)]
pub enum CniRequest {
    /// Enrol the pod in `netns` (a new sandbox: a replaced one for the same
    /// pod supersedes the old). Waits up to `wait` for the pod to appear in
    /// the workload source.
    Add {
        record: Box<CniRecord>,
        netns: File,
        wait: Duration,
        reply: oneshot::Sender<Response>,
    },
    /// The sandbox `container_id` of the pod is gone (best effort; the
    /// workload source's removal is the authority).
    Del {
        pod: PodKey,
        container_id: String,
        reply: oneshot::Sender<Response>,
    },
    /// Is the sandbox still enrolled?
    Check {
        pod: PodKey,
        container_id: String,
        reply: oneshot::Sender<Response>,
    },
}

/// What enrolment keeps of a pod the plugin enrolled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CniRecord {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub container_id: String,
    /// The path the runtime named the netns by.
    pub netns: PathBuf,
    /// The addresses the cluster's CNI plugin gave the pod.
    pub ips: Vec<IpAddr>,
    /// The netns cookie once enrolled (0 before): a restarted agent accepts
    /// the path only if it still leads to this namespace.
    #[serde(default)]
    pub cookie: u64,
    /// The pod as last enrolled, so it stays in the mesh while the workload
    /// source briefly lacks it (a restart before the API watch synced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
}

impl CniRecord {
    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// A record with its netns held open.
#[derive(Debug)]
pub struct CniNetns {
    pub record: CniRecord,
    pub handle: NetnsHandle,
}

impl CniNetns {
    /// Whether the runtime's path still names the namespace held open: the
    /// runtime unmounts it when the sandbox goes (the namespace itself lives
    /// on while the agent holds it, so the path is what tells).
    ///
    /// A path whose directory the agent cannot see at all tells nothing
    /// (the runtime's netns dir not mounted into the agent's pod): the pod
    /// is kept, with an error, rather than taken out of the mesh.
    pub fn still_mounted(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(held) = self.handle.file.metadata() else {
            return false;
        };
        match std::fs::metadata(&self.handle.path) {
            Ok(now) => held.dev() == now.dev() && held.ino() == now.ino(),
            Err(_) => {
                let dir = self.handle.path.parent().unwrap_or(Path::new("/"));
                if dir.is_dir() {
                    return false;
                }
                tracing::error!(netns = %self.handle.path.display(), "the runtime's netns directory is not visible to the agent (mount it, with HostToContainer propagation); cannot tell whether the pod left, so it stays enrolled");
                true
            }
        }
    }
}

/// The records of the pods the plugin enrolled, saved in `stateDir` as
/// they change.
pub struct CniRecords {
    pub pods: HashMap<PodKey, CniNetns>,
    saved_to: Option<PathBuf>,
}

/// The file in `stateDir` that holds the records.
pub const SAVED_RECORDS_FILE: &str = "cni-pods.json";

impl CniRecords {
    /// No records, none saved (tests, and agents without CNI enrolment).
    pub fn unsaved() -> Self {
        Self {
            pods: HashMap::new(),
            saved_to: None,
        }
    }

    /// The records a previous agent saved in `state_dir`, each re-opened by
    /// its path and kept only if `cookie_of` finds the namespace recorded
    /// there (a path reused for another sandbox is dropped).
    pub fn restore(state_dir: &Path, cookie_of: &dyn Fn(&NetnsHandle) -> Option<u64>) -> Self {
        let path = state_dir.join(SAVED_RECORDS_FILE);
        let mut pods = HashMap::new();
        let records: Vec<CniRecord> = match files::read_text(&path, files::MAX_WORKLOADS_BYTES) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                warn!(file = %path.display(), "saved CNI records do not parse; pods re-enrol by their next CNI ADD: {e}");
                Vec::new()
            }),
            Err(files::FileError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Vec::new()
            }
            Err(e) => {
                warn!("saved CNI records unreadable; pods re-enrol by their next CNI ADD: {e}");
                Vec::new()
            }
        };
        for record in records {
            let key = record.key();
            let handle = match File::open(&record.netns) {
                Ok(file) => NetnsHandle {
                    file,
                    path: record.netns.clone(),
                },
                Err(e) => {
                    info!(pod = %key, netns = %record.netns.display(), "netns of a pod enrolled before is gone: {e}");
                    continue;
                }
            };
            match cookie_of(&handle) {
                Some(c) if c == record.cookie => {
                    info!(pod = %key, netns = %record.netns.display(), "pod enrolled by CNI before the restart: enrolling it again");
                    pods.insert(key, CniNetns { record, handle });
                }
                Some(c) if record.cookie != 0 => {
                    info!(pod = %key, netns = %record.netns.display(), recorded = record.cookie, now = c, "the netns path now names another namespace; the record is dropped");
                }
                _ => {
                    info!(pod = %key, netns = %record.netns.display(), "a record of a pod never enrolled, or whose netns cookie cannot be read: dropped (the pod re-enrols by its next CNI ADD or the /proc scan)");
                }
            }
        }
        let records = Self {
            pods,
            saved_to: Some(path),
        };
        records.save();
        records
    }

    /// Writes the records for the next agent (atomically). Best effort:
    /// without them, a restart waits for the pods' next CNI ADD.
    pub fn save(&self) {
        let Some(path) = &self.saved_to else { return };
        let mut records: Vec<&CniRecord> = self.pods.values().map(|p| &p.record).collect();
        records.sort_by_key(|r| r.key());
        let written = serde_json::to_vec(&records)
            .map_err(std::io::Error::other)
            .and_then(|bytes| files::write_atomically(path, &bytes));
        if let Err(e) = written {
            warn!(file = %path.display(), "saving the CNI records for the next agent: {e}");
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    command: &'static str,
    outcome: &'static str,
}

/// The CNI server's metrics.
#[derive(Clone, Default)]
pub struct CniMetrics {
    requests: Family<RequestLabels, Counter>,
}

impl CniMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "cni_requests",
            "Requests of the CNI plugin by command (add, del, check, status) and outcome (enrolled, not_meshed, removed, ready, error)",
            m.requests.clone(),
        );
        m
    }

    fn record(&self, command: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { command, outcome })
            .inc();
    }
}

/// The pod a record stands for while the workload source lacks it.
pub fn last_known(record: &CniRecord) -> Option<Arc<Pod>> {
    record.pod.clone().map(Arc::new)
}
