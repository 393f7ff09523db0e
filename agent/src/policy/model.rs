//! Policy documents as users write them: Kubernetes-style
//! (`apiVersion`/`kind`/`metadata`/`spec`), several per file, Istio's
//! AuthorizationPolicy and PeerAuthentication fields. Strings that need
//! checks parsing cannot do carry their location (`Spanned`).
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub type S = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    pub api_version: S,
    pub kind: S,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

/// Kubernetes object metadata: only name and namespace matter here; the
/// rest (labels, annotations, uid, ... as `kubectl get -o yaml` writes it)
/// is accepted and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: S,
    #[serde(default)]
    pub namespace: Option<S>,
}

/// The fields of both kinds' specs; which belong to which kind is checked
/// after parsing (and reported with the field's path).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pub selector: Option<Selector>,
    // AuthorizationPolicy
    pub action: Option<S>,
    pub rules: Option<Vec<Rule>>,
    pub provider: Option<serde_saphyr::Spanned<BTreeMap<String, String>>>,
    /// Binds the policy to a Gateway, waypoint or Service instead of
    /// workloads (`group`, `kind`, `name`, `namespace`).
    pub target_ref: Option<BTreeMap<String, S>>,
    pub target_refs: Option<Vec<BTreeMap<String, S>>>,
    // PeerAuthentication
    pub mtls: Option<Mtls>,
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mtls {
    pub mode: S,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct From {
    pub source: Source,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    pub principals: Option<Vec<S>>,
    pub not_principals: Option<Vec<S>>,
    /// `namespace/name`: principals of any trust domain (Istio 1.23+).
    pub service_accounts: Option<Vec<S>>,
    pub not_service_accounts: Option<Vec<S>>,
    pub namespaces: Option<Vec<S>>,
    pub not_namespaces: Option<Vec<S>>,
    pub ip_blocks: Option<Vec<S>>,
    pub not_ip_blocks: Option<Vec<S>>,
    pub remote_ip_blocks: Option<Vec<S>>,
    pub not_remote_ip_blocks: Option<Vec<S>>,
    // L7: ztunnel cannot see them.
    pub request_principals: Option<Vec<S>>,
    pub not_request_principals: Option<Vec<S>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct To {
    pub operation: Operation,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    pub ports: Option<Vec<S>>,
    pub not_ports: Option<Vec<S>>,
    // L7: ztunnel cannot see them.
    pub hosts: Option<Vec<S>>,
    pub not_hosts: Option<Vec<S>>,
    pub methods: Option<Vec<S>>,
    pub not_methods: Option<Vec<S>>,
    pub paths: Option<Vec<S>>,
    pub not_paths: Option<Vec<S>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    pub key: S,
    #[serde(default)]
    pub values: Option<Vec<S>>,
    #[serde(default)]
    pub not_values: Option<Vec<S>>,
}
