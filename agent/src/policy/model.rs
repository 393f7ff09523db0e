//! Policy documents as users write them: Kubernetes-style
//! (`apiVersion`/`kind`/`metadata`/`spec`), several per file, Istio's
//! AuthorizationPolicy, PeerAuthentication, ServiceEntry and
//! DestinationRule fields. Strings and numbers that need checks parsing
//! cannot do carry their location (`Spanned`).
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub type S = Spanned<String>;
pub type N = Spanned<i64>;
/// A part accepted as written and not honoured (a warning names it).
pub type Any = serde_json::Value;

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

/// The fields of every kind's spec; which belong to which kind is checked
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
    // ServiceEntry
    pub hosts: Option<Vec<S>>,
    pub addresses: Option<Vec<S>>,
    pub ports: Option<Vec<ServicePort>>,
    pub location: Option<S>,
    pub resolution: Option<S>,
    pub endpoints: Option<Vec<WorkloadEntry>>,
    pub subject_alt_names: Option<Vec<S>>,
    // ServiceEntry and DestinationRule
    pub export_to: Option<Vec<S>>,
    pub workload_selector: Option<Any>,
    // DestinationRule
    pub host: Option<S>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Option<Any>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub number: N,
    #[serde(default)]
    pub protocol: Option<S>,
    #[serde(default)]
    pub name: Option<S>,
    #[serde(default)]
    pub target_port: Option<N>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: Option<S>,
    #[serde(default)]
    pub ports: Option<BTreeMap<String, N>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub locality: Option<S>,
    #[serde(default)]
    pub network: Option<S>,
    #[serde(default)]
    pub weight: Option<N>,
    #[serde(default)]
    pub service_account: Option<S>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<Any>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    pub port_level_settings: Option<Vec<PortTrafficPolicy>>,
    pub tunnel: Option<Any>,
    pub proxy_protocol: Option<Any>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<Any>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    pub number: N,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<Any>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<N>,
    pub connect_timeout: Option<S>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<S>,
    pub idle_timeout: Option<S>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpKeepalive {
    pub probes: Option<N>,
    pub time: Option<S>,
    pub interval: Option<S>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive_gateway_errors: Option<N>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<N>,
    pub interval: Option<S>,
    pub base_ejection_time: Option<S>,
    pub max_ejection_percent: Option<N>,
    pub min_health_percent: Option<N>,
    pub split_external_local_origin_errors: Option<bool>,
    pub consecutive_local_origin_failures: Option<N>,
    /// Deprecated in Istio, still accepted there.
    pub consecutive_errors: Option<N>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: S,
    pub client_certificate: Option<S>,
    pub private_key: Option<S>,
    pub ca_certificates: Option<S>,
    pub credential_name: Option<S>,
    pub subject_alt_names: Option<Vec<S>>,
    pub sni: Option<S>,
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: Option<S>,
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
