//! Authorization policy: Istio's AuthorizationPolicy and PeerAuthentication
//! documents read from a directory, checked strictly, compiled into an index
//! — with the egress registry's ServiceEntry and DestinationRule documents,
//! which live in the same directory and change with the same set.
//!
//! A set is all or nothing: one invalid file rejects the whole set and the
//! last good set stays in force (a half-applied set could allow what the
//! author meant to deny).
mod compile;
mod diagnostics;
mod engine;
#[cfg(feature = "kubernetes")]
pub mod kube;
mod model;
mod networking;
mod peer_auth;
mod store;

use std::path::{Path, PathBuf};

pub use compile::{
    Action, AuthorizationPolicy, IpBlock, MtlsMode, PeerAuthentication, PolicyError, PolicyWarning,
};
pub use engine::{Decision, PolicySet, Request};
pub use peer_auth::{MtlsRequirement, PeerAuthSet};
pub use store::{PolicyMetrics, PolicyStore};

use crate::yaml;

/// Istio's default root namespace: its policies apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug)]
pub struct Loaded {
    pub authorization: PolicySet,
    pub peer_authentication: PeerAuthSet,
    /// ServiceEntries and DestinationRules.
    pub registry: crate::registry::ServiceRegistry,
    pub warnings: Vec<PolicyWarning>,
    pub files: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading policy directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Yaml(#[from] yaml::YamlError),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<PolicyError>),
}

/// The policy files in `dir`: `*.yaml` / `*.yml`, hidden entries skipped
/// (a ConfigMap mount's `..data` and `..<timestamp>` directories).
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let err = |source| LoadError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if (name.ends_with(".yaml") || name.ends_with(".yml")) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The text of every policy file in `dir`, as read now.
pub type Texts = Vec<(PathBuf, String)>;

pub fn read_texts(dir: &Path) -> Result<Texts, LoadError> {
    policy_files(dir)?
        .into_iter()
        .map(|f| {
            let text = crate::files::read_text(&f, crate::files::MAX_CONFIG_BYTES)
                .map_err(yaml::YamlError::from)?;
            Ok((f, text))
        })
        .collect()
}

/// Reads, checks and compiles every policy file in `dir`.
pub fn load_dir(dir: &Path, root_namespace: &str) -> Result<Loaded, LoadError> {
    compile_texts(&read_texts(dir)?, root_namespace)
}

/// Checks and compiles policy files' texts as one set.
pub fn compile_texts(texts: &Texts, root_namespace: &str) -> Result<Loaded, LoadError> {
    let files: Vec<PathBuf> = texts.iter().map(|(f, _)| f.clone()).collect();
    let mut compiled = compile::Compiled::default();
    let mut errors = Vec::new();
    for (file, text) in texts {
        let docs: Vec<model::Document> = yaml::parse_documents(file, text)?;
        if let Err(mut e) = compile::compile(file, &docs, &mut compiled) {
            errors.append(&mut e);
        }
    }
    if !errors.is_empty() {
        return Err(LoadError::Invalid(errors));
    }
    Ok(Loaded {
        authorization: PolicySet::new(compiled.authorization, root_namespace),
        peer_authentication: PeerAuthSet::new(compiled.peer_authentication, root_namespace),
        registry: crate::registry::ServiceRegistry::new(
            compiled.service_entries,
            compiled.destination_rules,
        ),
        warnings: compiled.warnings,
        files,
    })
}

/// The fuzz target's body (its seeds also run as a test): a policy file's
/// bytes through parsing, checking, indexing and one decision.
pub fn fuzz_policy_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let Ok(docs) = serde_saphyr::from_multiple::<model::Document>(text) else {
        return;
    };
    let mut compiled = compile::Compiled::default();
    if compile::compile(path, &docs, &mut compiled).is_err() {
        return;
    }
    let set = PolicySet::new(compiled.authorization, DEFAULT_ROOT_NAMESPACE);
    let labels = [("app".to_string(), "orders".to_string())].into();
    let id = crate::identity::Identity::new("cluster.local", "shop", "cart");
    let _ = set.decide(&Request {
        src_identity: Some(&id),
        src_ip: [10, 244, 0, 10].into(),
        dst_namespace: "shop",
        dst_labels: &labels,
        dst_ip: [10, 244, 1, 10].into(),
        dst_port: 8080,
    });
}

#[cfg(test)]
mod networking_tests;
#[cfg(test)]
mod tests;
