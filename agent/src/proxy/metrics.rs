//! The data path's metrics: Istio's TCP families (`istio_tcp_*`, with the
//! labels ztunnel emits, in its order) and the proxy's own (`nodemesh_`).
use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::error::ResponseFlags;
use crate::{
    identity::Identity,
    metrics::{MetricsRegistry, OrUnknown},
    state::{Pod, ServiceKey},
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// `mutual_tls` for HBONE (from both reporters, as ztunnel); `none` for
/// plaintext (same-node connections at their destination: identities
/// attested by the kernel, not by TLS; captured plaintext); `unknown` where
/// ztunnel says so (the source of a same-node connection).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
    Unknown,
}

impl SecurityPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
            Self::Unknown => "unknown",
        }
    }
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// One side of a connection as Istio labels it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub workload: OrUnknown,
    pub canonical_service: OrUnknown,
    pub canonical_revision: OrUnknown,
    pub namespace: OrUnknown,
    pub principal: OrUnknown,
    pub app: OrUnknown,
    pub version: OrUnknown,
}

impl Peer {
    /// The workloads file has no owner references, so the pod's name is
    /// its workload name; canonical service and revision follow Istio's
    /// label precedence.
    pub fn pod(pod: &Pod, identity: &Identity) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k)).cloned();
        Self {
            workload: pod.workload().into(),
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| pod.workload().to_owned())
            .into(),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into())
            .into(),
            namespace: pod.namespace.as_str().into(),
            principal: identity.to_string().into(),
            app: label(&["app"]).map(OrUnknown::from).unwrap_or_default(),
            version: label(&["version"]).map(OrUnknown::from).unwrap_or_default(),
        }
    }

    /// Only the identity is known (a TLS peer that is not in the workload state).
    pub fn identity(identity: &Identity) -> Self {
        Self {
            principal: identity.to_string().into(),
            namespace: identity.namespace.as_str().into(),
            ..Self::default()
        }
    }
}

/// A service as Istio names it.
#[derive(Clone, Debug, Default)]
pub struct ServiceName {
    /// `name.namespace.svc.cluster.local`
    pub host: OrUnknown,
    pub name: OrUnknown,
    pub namespace: OrUnknown,
}

impl ServiceName {
    pub fn of(service: &ServiceKey) -> Self {
        Self {
            host: service.host().into(),
            name: service.name.as_str().into(),
            namespace: service.namespace.as_str().into(),
        }
    }
}

/// Istio's TCP label set, in ztunnel's order, locality last (always
/// emitted; `unknown` until workloads carry their node's region and zone).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    reporter: Reporter,
    source_workload: OrUnknown,
    source_canonical_service: OrUnknown,
    source_canonical_revision: OrUnknown,
    source_workload_namespace: OrUnknown,
    source_principal: OrUnknown,
    source_app: OrUnknown,
    source_version: OrUnknown,
    source_cluster: OrUnknown,
    destination_service: OrUnknown,
    destination_service_namespace: OrUnknown,
    destination_service_name: OrUnknown,
    destination_workload: OrUnknown,
    destination_canonical_service: OrUnknown,
    destination_canonical_revision: OrUnknown,
    destination_workload_namespace: OrUnknown,
    destination_principal: OrUnknown,
    destination_app: OrUnknown,
    destination_version: OrUnknown,
    destination_cluster: OrUnknown,
    request_protocol: OrUnknown,
    response_flags: ResponseFlags,
    connection_security_policy: SecurityPolicy,
    source_region: OrUnknown,
    source_zone: OrUnknown,
    destination_region: OrUnknown,
    destination_zone: OrUnknown,
}

/// What one report of a connection says.
pub struct Report<'a> {
    pub reporter: Reporter,
    pub source: &'a Peer,
    pub destination: &'a Peer,
    pub service: &'a ServiceName,
    pub security: SecurityPolicy,
}

impl TrafficLabels {
    pub fn new(r: &Report<'_>) -> Self {
        let (s, d) = (r.source.clone(), r.destination.clone());
        Self {
            reporter: r.reporter,
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_app: s.app,
            source_version: s.version,
            source_cluster: OrUnknown::unknown(),
            destination_service: r.service.host.clone(),
            destination_service_namespace: r.service.namespace.clone(),
            destination_service_name: r.service.name.clone(),
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: d.principal,
            destination_app: d.app,
            destination_version: d.version,
            destination_cluster: OrUnknown::unknown(),
            request_protocol: "tcp".into(),
            response_flags: ResponseFlags::None,
            connection_security_policy: r.security,
            source_region: OrUnknown::unknown(),
            source_zone: OrUnknown::unknown(),
            destination_region: OrUnknown::unknown(),
            destination_zone: OrUnknown::unknown(),
        }
    }
}

/// Bytes of one direction of one connection, added while they flow: one
/// counter per report (same-node connections have two).
#[derive(Clone, Default)]
pub struct ByteCount(Vec<Counter>);

impl ByteCount {
    pub fn add(&self, n: usize) {
        for c in &self.0 {
            c.inc_by(n as u64);
        }
    }
}

/// One connection's series from the moment they are opened; closed by its
/// `ConnectionResult`.
pub struct ConnectionTraffic {
    metrics: Arc<ProxyMetrics>,
    reports: Vec<TrafficLabels>,
    pub client_to_server: ByteCount,
    pub server_to_client: ByteCount,
}

impl ConnectionTraffic {
    /// Counts the close with its flags (`failed` as well when it failed).
    pub fn close(self, flags: ResponseFlags, failed: bool) {
        for mut labels in self.reports {
            labels.response_flags = flags;
            self.metrics.closed.get_or_create(&labels).inc();
            if failed {
                self.metrics.failed.get_or_create(&labels).inc();
            }
        }
    }
}

/// Connections open through the agent, by direction; decremented on drop.
pub struct ActiveConnection(Gauge);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsFailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Default)]
pub struct ProxyMetrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    /// Server -> client (ztunnel's direction, for both reporters).
    sent_bytes: Family<TrafficLabels, Counter>,
    /// Client -> server.
    received_bytes: Family<TrafficLabels, Counter>,
    active_connections: Family<DirectionLabels, Gauge>,
    tls_failures: Family<TlsFailureLabels, Counter>,
    orig_dst_lookups: Family<ResultLabels, Counter>,
    registry_denials: Family<ReasonLabels, Counter>,
    sni_peeks: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

impl ProxyMetrics {
    pub fn new(registry: &MetricsRegistry) -> Arc<Self> {
        let m = Self::default();
        registry.istio(|r| m.register_istio(r));
        registry.own(|r| m.register_own(r));
        Arc::new(m)
    }

    fn register_istio(&self, istio: &mut Registry) {
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            self.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            self.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed",
            self.failed.clone(),
        );
        istio.register_with_unit(
            "tcp_sent",
            "The size of total bytes sent during response in case of a TCP connection",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
        istio.register_with_unit(
            "tcp_received",
            "The size of total bytes received during request in case of a TCP connection",
            Unit::Bytes,
            self.received_bytes.clone(),
        );
    }

    fn register_own(&self, own: &mut Registry) {
        own.register(
            "active_connections",
            "Connections being proxied, by direction (outbound: from a local pod; inbound: HBONE streams to one; inbound_plaintext: captured)",
            self.active_connections.clone(),
        );
        own.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by direction and reason (HBONE, and TLS originated to third parties: outbound)",
            self.tls_failures.clone(),
        );
        own.register(
            "orig_dst_lookups",
            "Original-destination lookups in NM_ORIG_DST by result (found, missing)",
            self.orig_dst_lookups.clone(),
        );
        own.register(
            "registry_denials",
            "Connections refused under outboundTrafficPolicy REGISTRY_ONLY, by reason (not_in_registry, sni_not_in_registry, sni_not_resolved)",
            self.registry_denials.clone(),
        );
        own.register(
            "sni_peeks",
            "TLS ClientHellos read for their SNI on connections leaving the mesh",
            self.sni_peeks.clone(),
        );
    }

    /// Opens a connection's series: counts it opened for each report and
    /// hands out its byte counters.
    pub fn open(self: &Arc<Self>, reports: &[Report<'_>]) -> ConnectionTraffic {
        let labels: Vec<TrafficLabels> = reports.iter().map(TrafficLabels::new).collect();
        for l in &labels {
            self.opened.get_or_create(l).inc();
        }
        let bytes = |family: &Family<TrafficLabels, Counter>| {
            ByteCount(
                labels
                    .iter()
                    .map(|l| family.get_or_create_owned(l))
                    .collect(),
            )
        };
        ConnectionTraffic {
            metrics: self.clone(),
            client_to_server: bytes(&self.received_bytes),
            server_to_client: bytes(&self.sent_bytes),
            reports: labels,
        }
    }

    pub fn active(&self, direction: &'static str) -> ActiveConnection {
        let g = self
            .active_connections
            .get_or_create_owned(&DirectionLabels { direction });
        g.inc();
        ActiveConnection(g)
    }

    pub fn tls_failure(&self, direction: &'static str, reason: &'static str) {
        self.tls_failures
            .get_or_create(&TlsFailureLabels { direction, reason })
            .inc();
    }

    pub fn registry_denied(&self, reason: &'static str) {
        self.registry_denials
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn sni_peeked(&self) {
        self.sni_peeks.inc();
    }

    pub fn orig_dst_lookup(&self, found: bool) {
        let result = if found { "found" } else { "missing" };
        self.orig_dst_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ips: vec![[10, 0, 0, 1].into()],
            node: "n".into(),
            netns: None,
            uid: None,
            workload: None,
        }
    }

    #[test]
    fn istio_names_labels_and_unknown_defaults() {
        let registry = MetricsRegistry::new();
        let m = ProxyMetrics::new(&registry);
        let client = pod("client-1", &[("app", "client"), ("version", "v2")]);
        let server = pod("server-1", &[]);
        let src = Peer::pod(&client, &Identity::new("cluster.local", "shop", "client"));
        let dst = Peer::pod(&server, &Identity::new("cluster.local", "shop", "server"));
        let service = ServiceName::of(&ServiceKey {
            namespace: "shop".into(),
            name: "server".into(),
        });
        let conn = m.open(&[Report {
            reporter: Reporter::Source,
            source: &src,
            destination: &dst,
            service: &service,
            security: SecurityPolicy::Unknown,
        }]);
        conn.client_to_server.add(100);
        conn.server_to_client.add(7);
        conn.close(ResponseFlags::Deny, true);
        let text = registry.encode().unwrap();
        let labels = "reporter=\"source\",source_workload=\"client-1\",source_canonical_service=\"client\",source_canonical_revision=\"v2\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_app=\"client\",source_version=\"v2\",source_cluster=\"unknown\",destination_service=\"server.shop.svc.cluster.local\",destination_service_namespace=\"shop\",destination_service_name=\"server\",destination_workload=\"server-1\",destination_canonical_service=\"server-1\",destination_canonical_revision=\"latest\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\",destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"unknown\",request_protocol=\"tcp\"";
        let locality = "source_region=\"unknown\",source_zone=\"unknown\",destination_region=\"unknown\",destination_zone=\"unknown\"";
        for line in [
            format!(
                "istio_tcp_connections_opened_total{{{labels},response_flags=\"-\",connection_security_policy=\"unknown\",{locality}}} 1"
            ),
            format!(
                "istio_tcp_received_bytes_total{{{labels},response_flags=\"-\",connection_security_policy=\"unknown\",{locality}}} 100"
            ),
            format!(
                "istio_tcp_sent_bytes_total{{{labels},response_flags=\"-\",connection_security_policy=\"unknown\",{locality}}} 7"
            ),
            format!(
                "istio_tcp_connections_closed_total{{{labels},response_flags=\"DENY\",connection_security_policy=\"unknown\",{locality}}} 1"
            ),
            format!(
                "istio_tcp_connections_failed_total{{{labels},response_flags=\"DENY\",connection_security_policy=\"unknown\",{locality}}} 1"
            ),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn own_metrics_have_bounded_labels() {
        let registry = MetricsRegistry::new();
        let m = ProxyMetrics::new(&registry);
        m.tls_failure("inbound", "unknown_issuer");
        m.orig_dst_lookup(false);
        let active = m.active("outbound");
        let text = registry.encode().unwrap();
        drop(active);
        for line in [
            "nodemesh_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown_issuer\"} 1",
            "nodemesh_orig_dst_lookups_total{result=\"missing\"} 1",
            "nodemesh_active_connections{direction=\"outbound\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            registry
                .encode()
                .unwrap()
                .contains("nodemesh_active_connections{direction=\"outbound\"} 0")
        );
    }
}
