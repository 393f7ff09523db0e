//! Readiness as a set of named tasks still pending; ready once none is
//! (and then for good, as ztunnel's: a later hiccup is not a restart reason).
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
};

#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeSet<&'static str>>>);

/// A pending task; ready when `done` is called (dropping it does not count,
/// so a task that bails out keeps the agent not ready).
#[must_use = "a pending task is only done when `done` is called"]
pub struct Pending {
    readiness: Readiness,
    name: &'static str,
}

impl Readiness {
    pub fn pending(&self, name: &'static str) -> Pending {
        self.lock().insert(name);
        Pending {
            readiness: self.clone(),
            name,
        }
    }

    /// The tasks still pending, in name order; empty when ready.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pending {
    pub fn done(self) {
        self.readiness.lock().remove(self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_task_is_done() {
        let r = Readiness::default();
        let a = r.pending("programs attached");
        let b = r.pending("policy set loaded");
        assert_eq!(r.waiting_for(), ["policy set loaded", "programs attached"]);
        a.done();
        assert_eq!(r.waiting_for(), ["policy set loaded"]);
        drop(b);
        assert_eq!(r.waiting_for(), ["policy set loaded"]);
    }
}
