//! Where workload knowledge comes from. The file source watches one YAML
//! file; a Kubernetes source (kube-rs) will implement the same trait.
use std::{path::Path, sync::Arc};

use tokio::sync::watch;
use tracing::{error, info};

use super::Workloads;
use crate::yaml::YamlError;

/// A source of workload snapshots. The receiver always holds the last good
/// snapshot; a bad update is reported by the source and never published.
pub trait WorkloadSource: Send + 'static {
    fn subscribe(&self) -> watch::Receiver<Arc<Workloads>>;
}

pub struct FileWorkloadSource {
    rx: watch::Receiver<Arc<Workloads>>,
    // Dropping the watcher stops the updates.
    _watcher: notify::RecommendedWatcher,
}

impl FileWorkloadSource {
    /// Reads the file (an error here is fatal: there is no last good state
    /// yet) and starts watching its directory, so editors' rename-and-replace
    /// and Kubernetes' `..data` symlink swaps are both seen.
    pub fn start(path: &Path) -> Result<Self, StartError> {
        let initial = Workloads::load(path)?;
        let (tx, rx) = watch::channel(Arc::new(initial));
        let name = path.file_name().map(|n| n.to_owned());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let path = path.to_owned();
        let watcher = crate::fswatch::watch(
            dir,
            move |n| Some(n) == name.as_deref(),
            move || match Workloads::load(&path) {
                Ok(w) => {
                    info!(file = %path.display(), pods = w.pods().len(), "workloads reloaded");
                    tx.send_replace(Arc::new(w));
                }
                Err(e) => error!("workloads file rejected, keeping the last good one: {e}"),
            },
        )?;
        Ok(Self {
            rx,
            _watcher: watcher,
        })
    }
}

impl WorkloadSource for FileWorkloadSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Workloads>> {
        self.rx.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Invalid(#[from] YamlError),
    #[error("cannot watch the workloads file: {0}")]
    Watch(#[from] notify::Error),
}
