//! The policy set in force, swapped whole on reload; a generation number
//! tells open connections to re-check themselves.
use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{
    Decision, LoadError, MtlsRequirement, PeerAuthSet, PolicySet, Request, Texts, compile_texts,
    read_texts,
};

/// How long a reload that changes or removes a file in force waits to read
/// the files again: it applies only if both reads agree, so a file cut by a
/// writer that was not done yet never drops rules.
pub const CONFIRM_CHANGE: Duration = Duration::from_millis(500);

/// One loaded set: both kinds change together.
#[derive(Debug, Default)]
struct InForce {
    authorization: PolicySet,
    registry: Arc<crate::registry::ServiceRegistry>,
    peer_authentication: PeerAuthSet,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Default)]
pub struct PolicyMetrics {
    reloads: Family<OutcomeLabels, Counter>,
    generation: Gauge,
}

impl PolicyMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "policy_reloads",
            "Policy directory loads by outcome (applied, unchanged, rejected)",
            m.reloads.clone(),
        );
        registry.register(
            "policy_generation",
            "Generation of the policy set in force (0: none loaded)",
            m.generation.clone(),
        );
        m
    }

    fn record(&self, outcome: &'static str, generation: u64) {
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
        self.generation.set(generation as i64);
    }
}

pub struct PolicyStore {
    current: ArcSwap<InForce>,
    generation: watch::Sender<u64>,
    root_namespace: String,
    /// The files of the set in force, as read.
    texts: Mutex<Texts>,
    metrics: PolicyMetrics,
}

impl PolicyStore {
    /// An empty set (everything allowed) until the first load.
    pub fn new(root_namespace: &str, metrics: PolicyMetrics) -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            current: ArcSwap::from_pointee(InForce::default()),
            generation,
            root_namespace: root_namespace.to_owned(),
            texts: Mutex::new(Vec::new()),
            metrics,
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

    /// The egress registry in force (ServiceEntries, DestinationRules).
    pub fn registry(&self) -> Arc<crate::registry::ServiceRegistry> {
        self.current.load().registry.clone()
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
    /// failure the old one stays and the errors are logged. A set that
    /// changes or drops a file in force is read a second time after
    /// [`CONFIRM_CHANGE`] and applied only if the files did not change in
    /// between (else the newer files are taken from the start).
    pub fn reload(&self, dir: &Path) -> bool {
        let outcome = self.reload_confirmed(dir);
        self.metrics.record(outcome, self.generation());
        outcome != "rejected"
    }

    fn reload_confirmed(&self, dir: &Path) -> &'static str {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let texts = match read_texts(dir) {
                Ok(t) => t,
                Err(e) => return self.rejected(&e),
            };
            let in_force = self.texts_in_force();
            if texts == in_force && self.generation() > 0 {
                return "unchanged";
            }
            let drops = in_force.iter().any(|old| !texts.contains(old));
            if drops && attempts < 10 {
                std::thread::sleep(CONFIRM_CHANGE);
                if read_texts(dir).ok().as_ref() != Some(&texts) {
                    info!(dir = %dir.display(), "policy files changed while confirming a change; reading them again");
                    continue;
                }
            }
            return match compile_texts(&texts, &self.root_namespace) {
                Ok(loaded) => self.take(texts, loaded),
                Err(e) => self.rejected(&e),
            };
        }
    }

    /// Replaces the set in force with `texts`, whole, if they are valid
    /// (Kubernetes objects: each arrives complete, so no second read).
    /// On errors the set in force stays and they are returned (the caller
    /// reports them where the objects' authors look).
    pub fn replace(&self, texts: Texts) -> Result<(), LoadError> {
        if texts == self.texts_in_force() && self.generation() > 0 {
            self.metrics.record("unchanged", self.generation());
            return Ok(());
        }
        match compile_texts(&texts, &self.root_namespace) {
            Ok(loaded) => {
                self.take(texts, loaded);
                self.metrics.record("applied", self.generation());
                Ok(())
            }
            Err(e) => {
                self.rejected(&e);
                self.metrics.record("rejected", self.generation());
                Err(e)
            }
        }
    }

    fn texts_in_force(&self) -> Texts {
        self.texts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn take(&self, texts: Texts, loaded: super::Loaded) -> &'static str {
        for w in &loaded.warnings {
            warn!("policy {w}");
        }
        let n = loaded.authorization.len();
        let peer = loaded.peer_authentication.len();
        let entries = loaded.registry.entries().len();
        self.current.store(Arc::new(InForce {
            authorization: loaded.authorization,
            registry: Arc::new(loaded.registry),
            peer_authentication: loaded.peer_authentication,
        }));
        *self.texts.lock().unwrap_or_else(PoisonError::into_inner) = texts;
        self.generation.send_modify(|g| *g += 1);
        info!(
            generation = self.generation(),
            policies = n,
            peer_authentication = peer,
            service_entries = entries,
            files = loaded.files.len(),
            "policies loaded"
        );
        "applied"
    }

    fn rejected(&self, e: &LoadError) -> &'static str {
        error!(
            generation = self.generation(),
            "policy set rejected, the set in force stays:\n{e}"
        );
        "rejected"
    }
}
