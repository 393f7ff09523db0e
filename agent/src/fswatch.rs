//! Watching configuration files in a directory, so that a change is acted
//! on once, after the files stopped changing, and the watch never ends
//! without a word.
//!
//! The directory is watched (not the files), so rename-replace and
//! Kubernetes' atomic `..data` symlink swaps are seen. inotify events make
//! reloads quick; a poll every [`POLL`] makes them certain: it catches what
//! an event queue dropped and re-establishes the watch when the directory
//! itself was deleted, recreated or swapped by a rename.
use std::{
    ffi::{OsStr, OsString},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How long the files must stay unchanged before they are read.
pub const SETTLE: Duration = Duration::from_millis(200);
/// How often the directory is checked without an event.
pub const POLL: Duration = Duration::from_secs(1);

/// What identifies the directory itself (a new inode after a swap).
type DirId = Option<(u64, u64)>;

/// Name, type and identity of each relevant entry: any write, rename,
/// truncation or symlink swap changes it.
type Fingerprint = Vec<(OsString, u64, u64, u64, i64, i64, Option<PathBuf>)>;

fn dir_id(dir: &Path) -> DirId {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

fn fingerprint(dir: &Path, relevant: &dyn Fn(&OsStr) -> bool) -> Fingerprint {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut print: Fingerprint = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            relevant(&n) || n == "..data"
        })
        .map(|e| {
            let path = e.path();
            let link = std::fs::read_link(&path).ok();
            // Following symlinks: a ConfigMap's files point into `..data`.
            let m = std::fs::metadata(&path).ok();
            let f = |g: fn(&std::fs::Metadata) -> i64| m.as_ref().map_or(-1, g);
            (
                e.file_name(),
                f(|m| m.mode() as i64) as u64,
                f(|m| m.ino() as i64) as u64,
                f(|m| m.size() as i64) as u64,
                f(|m| m.mtime()),
                f(|m| m.mtime_nsec()),
                link,
            )
        })
        .collect();
    print.sort();
    print
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    source: &'static str,
    outcome: &'static str,
}

/// Outcomes of configuration reloads, by source: `applied`, `unchanged`,
/// `rejected` (the last good state stays).
#[derive(Clone, Default)]
pub struct ReloadMetrics(Family<ReloadLabels, Counter>);

impl ReloadMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "config_reloads",
            "Reloads of watched configuration by source and outcome (applied, unchanged, rejected)",
            m.0.clone(),
        );
        m
    }

    pub fn record(&self, source: &'static str, outcome: &'static str) {
        self.0
            .get_or_create(&ReloadLabels { source, outcome })
            .inc();
    }

    pub fn count(&self, source: &'static str, outcome: &'static str) -> u64 {
        self.0
            .get_or_create(&ReloadLabels { source, outcome })
            .get()
    }
}

/// Stops watching when dropped.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls `on_change` (on a blocking thread, one call at a time) after the
/// entries of `dir` for which `relevant(file name)` holds changed and then
/// stayed unchanged for [`SETTLE`]. `dir` need not exist yet.
pub fn watch(
    dir: &Path,
    relevant: impl Fn(&OsStr) -> bool + Send + Sync + 'static,
    on_change: impl FnMut() + Send + 'static,
) -> Watch {
    let dir = dir.to_owned();
    let relevant: Arc<dyn Fn(&OsStr) -> bool + Send + Sync> = Arc::new(relevant);
    let on_change = Arc::new(std::sync::Mutex::new(on_change));
    let task = tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let mut watcher = start_watcher(&dir, tx.clone());
        let mut id = dir_id(&dir);
        let mut seen = fingerprint(&dir, &*relevant);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rx.recv() => {}
                _ = poll.tick() => {
                    let now = dir_id(&dir);
                    if now != id {
                        info!(dir = %dir.display(), "watched directory replaced; watching it anew");
                        id = now;
                        watcher = start_watcher(&dir, tx.clone());
                    } else if fingerprint(&dir, &*relevant) == seen {
                        continue;
                    }
                }
            }
            // Settle: read only once nothing changed for SETTLE.
            let mut last = fingerprint(&dir, &*relevant);
            loop {
                tokio::time::sleep(SETTLE).await;
                while rx.try_recv().is_ok() {}
                let now = fingerprint(&dir, &*relevant);
                if now == last {
                    break;
                }
                last = now;
            }
            if last == seen && dir_id(&dir) == id && watcher.is_some() {
                // An event without a change (e.g. a touch of another file).
                continue;
            }
            seen = last;
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (*f)()
            })
            .await;
        }
    });
    Watch { task }
}

fn start_watcher(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file (the agent itself does) is no change.
        if !matches!(&event, Ok(e) if e.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| warn!(dir = %dir.display(), "cannot watch (polling instead): {e}"))
    .ok()?;
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            warn!(dir = %dir.display(), "cannot watch (polling until it can): {e}");
            None
        }
    }
}
