//! Where workload knowledge comes from. The file source watches one YAML
//! file; a Kubernetes source (kube-rs) will implement the same trait.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
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

/// Changes closer together than this are read once.
const DEBOUNCE: Duration = Duration::from_millis(150);

impl FileWorkloadSource {
    /// Reads the file (an error here is fatal: there is no last good state
    /// yet) and starts watching its directory, so editors' rename-and-replace
    /// and Kubernetes' `..data` symlink swaps are both seen.
    pub fn start(path: &Path) -> Result<Self, StartError> {
        let initial = Workloads::load(path)?;
        let (tx, rx) = watch::channel(Arc::new(initial));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let file_name = path.file_name().map(|n| n.to_owned());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Only writes, creations, renames and removals: reading the
                // file (the agent itself does) must not trigger a reload.
                let relevant = match &event {
                    Ok(e) if e.kind.is_access() || e.kind.is_other() => false,
                    Ok(e) => e.paths.iter().any(|p| {
                        p.file_name() == file_name.as_deref()
                            || p.file_name().is_some_and(|n| n == "..data")
                    }),
                    Err(_) => true,
                };
                if relevant {
                    let _ = events_tx.send(());
                }
            })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        tokio::spawn(reload_loop(path.to_owned(), events_rx, tx));
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

async fn reload_loop(
    path: PathBuf,
    mut events: mpsc::UnboundedReceiver<()>,
    tx: watch::Sender<Arc<Workloads>>,
) {
    while events.recv().await.is_some() {
        // Debounce: wait for quiet, then read the whole file once.
        loop {
            match tokio::time::timeout(DEBOUNCE, events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let loaded = tokio::task::spawn_blocking({
            let path = path.clone();
            move || Workloads::load(&path)
        })
        .await;
        match loaded {
            Ok(Ok(w)) => {
                info!(
                    file = %path.display(),
                    pods = w.pods().len(),
                    "workloads reloaded"
                );
                tx.send_replace(Arc::new(w));
            }
            Ok(Err(e)) => error!("workloads file rejected, keeping the last good one: {e}"),
            Err(e) => error!("workloads reload task failed: {e}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Invalid(#[from] YamlError),
    #[error("cannot watch the workloads file: {0}")]
    Watch(#[from] notify::Error),
}
