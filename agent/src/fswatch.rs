//! Watching a directory for changes to files in it, debounced. Directories
//! (not files) are watched so that rename-replace and Kubernetes' atomic
//! `..data` symlink swaps are seen.
use std::{path::Path, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Changes closer together than this are handled once.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Calls `on_change` (on a blocking thread) after changes in `dir` for which
/// `relevant(file name)` holds. Keep the returned watcher alive.
pub fn watch(
    dir: &Path,
    relevant: impl Fn(&std::ffi::OsStr) -> bool + Send + 'static,
    on_change: impl Fn() + Send + Sync + 'static,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let hit = match &event {
            // Reading a file (the agent itself does) is no change.
            Ok(e) if e.kind.is_access() || e.kind.is_other() => false,
            Ok(e) => e
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| relevant(n) || n == "..data")),
            Err(_) => true,
        };
        if hit {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    let on_change = std::sync::Arc::new(on_change);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    });
    Ok(watcher)
}
