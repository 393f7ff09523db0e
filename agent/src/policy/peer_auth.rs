//! PeerAuthentication: whether a workload port takes plaintext.
//!
//! Istio's precedence: a policy whose selector matches the workload (its
//! port-level mode first), then the workload namespace's policy without a
//! selector, then the root namespace's (mesh-wide). `UNSET` defers to the
//! next level; with none set the mode is PERMISSIVE. Where Istio picks the
//! oldest of several policies at one level, files carry no creation time,
//! so the first by `namespace/name` wins. DISABLE admits plaintext like
//! PERMISSIVE (as in ztunnel, which only enforces STRICT).
use std::collections::BTreeMap;

use super::compile::{MtlsMode, PeerAuthentication};

/// The effective mode for one connection and the policy that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsRequirement {
    /// Never `Unset`.
    pub mode: MtlsMode,
    /// `namespace/name`; `None`: no policy set a mode (the default).
    pub policy: Option<String>,
}

impl MtlsRequirement {
    pub fn admits_plaintext(&self) -> bool {
        self.mode != MtlsMode::Strict
    }
}

#[derive(Debug, Default)]
pub struct PeerAuthSet {
    /// Sorted by name, so "first" is deterministic.
    policies: Vec<PeerAuthentication>,
    root_namespace: String,
}

impl PeerAuthSet {
    pub fn new(mut policies: Vec<PeerAuthentication>, root_namespace: &str) -> Self {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            policies,
            root_namespace: root_namespace.to_owned(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.policies.iter().map(|p| p.name.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn requirement(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> MtlsRequirement {
        let workload = self.policies.iter().find(|p| {
            p.namespace == namespace
                && p.selector
                    .as_ref()
                    .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        let namespace_wide = self
            .policies
            .iter()
            .find(|p| p.namespace == namespace && p.selector.is_none());
        let mesh_wide = self
            .policies
            .iter()
            .find(|p| p.namespace == self.root_namespace && p.selector.is_none());
        // Port-level modes only count on a policy with a selector (Istio).
        let levels = [
            workload.and_then(|p| Some((p, *p.port_modes.get(&port)?))),
            workload.map(|p| (p, p.mode)),
            namespace_wide.map(|p| (p, p.mode)),
            mesh_wide.map(|p| (p, p.mode)),
        ];
        levels
            .into_iter()
            .flatten()
            .find(|(_, mode)| *mode != MtlsMode::Unset)
            .map(|(p, mode)| MtlsRequirement {
                mode,
                policy: Some(p.name.clone()),
            })
            .unwrap_or(MtlsRequirement {
                mode: MtlsMode::Permissive,
                policy: None,
            })
    }
}
