//! The policy set in force, swapped whole on reload; a generation number
//! tells open connections to re-check themselves.
use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Decision, PolicySet, Request, load_dir};

pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    generation: watch::Sender<u64>,
    root_namespace: String,
}

impl PolicyStore {
    /// An empty set (everything allowed) until the first load.
    pub fn new(root_namespace: &str) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            current: ArcSwap::from_pointee(PolicySet::default()),
            generation,
            root_namespace: root_namespace.to_owned(),
        }
    }

    pub fn decide(&self, r: &Request<'_>) -> Decision {
        self.current.load().decide(r)
    }

    /// `namespace/name` of every authorization policy in force.
    pub fn names(&self) -> Vec<String> {
        self.current.load().names()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Changes whenever a new set takes effect.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Loads `dir`; on success the new set replaces the old at once, on
    /// failure the old one stays and the errors are logged.
    pub fn reload(&self, dir: &Path) -> bool {
        match load_dir(dir, &self.root_namespace) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    warn!("policy {w}");
                }
                let n = loaded.authorization.len();
                self.current.store(Arc::new(loaded.authorization));
                self.generation.send_modify(|g| *g += 1);
                info!(
                    generation = self.generation(),
                    policies = n,
                    files = loaded.files.len(),
                    "policies loaded"
                );
                true
            }
            Err(e) => {
                error!(
                    generation = self.generation(),
                    "policy set rejected, the set in force stays:\n{e}"
                );
                false
            }
        }
    }
}
