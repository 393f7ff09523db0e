//! The policy set in force, swapped whole on reload; a generation number
//! tells open connections to re-check themselves.
use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Decision, MtlsRequirement, PeerAuthSet, PolicySet, Request, load_dir};

/// One loaded set: both kinds change together.
#[derive(Debug, Default)]
struct InForce {
    authorization: PolicySet,
    peer_authentication: PeerAuthSet,
}

pub struct PolicyStore {
    current: ArcSwap<InForce>,
    generation: watch::Sender<u64>,
    root_namespace: String,
}

impl PolicyStore {
    /// An empty set (everything allowed) until the first load.
    pub fn new(root_namespace: &str) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            current: ArcSwap::from_pointee(InForce::default()),
            generation,
            root_namespace: root_namespace.to_owned(),
        }
    }

    pub fn decide(&self, r: &Request<'_>) -> Decision {
        self.current.load().authorization.decide(r)
    }

    /// PeerAuthentication's mode for a port of a workload.
    pub fn mtls_requirement(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        port: u16,
    ) -> MtlsRequirement {
        self.current
            .load()
            .peer_authentication
            .requirement(namespace, labels, port)
    }

    /// `namespace/name` of every authorization policy in force.
    pub fn names(&self) -> Vec<String> {
        self.current.load().authorization.names()
    }

    /// `namespace/name` of every PeerAuthentication in force.
    pub fn peer_authentication_names(&self) -> Vec<String> {
        self.current.load().peer_authentication.names()
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
                let peer = loaded.peer_authentication.len();
                self.current.store(Arc::new(InForce {
                    authorization: loaded.authorization,
                    peer_authentication: loaded.peer_authentication,
                }));
                self.generation.send_modify(|g| *g += 1);
                info!(
                    generation = self.generation(),
                    policies = n,
                    peer_authentication = peer,
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
