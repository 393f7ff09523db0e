//! Prometheus metrics: Istio's standard TCP metrics (prefix `istio_`, the
//! names and labels ztunnel emits, so Istio's dashboards and Kiali read
//! them unchanged) and the agent's own (prefix `nodemesh_`, bounded labels).
use std::{
    fmt::Write as _,
    sync::{Arc, OnceLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::{Registry, Unit},
};

use crate::{
    ebpf::Kernel,
    identity::{CertStore, Identity},
    proxy::pool::Pool,
    state::Pod,
};

/// A label value that encodes as `unknown` when missing, as Istio documents
/// ("or 'unknown' if … missing").
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct OrUnknown(Option<String>);

impl OrUnknown {
    pub fn unknown() -> Self {
        Self(None)
    }
}

impl<S: Into<String>> From<S> for OrUnknown {
    fn from(s: S) -> Self {
        let s = s.into();
        Self((!s.is_empty()).then_some(s))
    }
}

impl EncodeLabelValue for OrUnknown {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_deref().unwrap_or("unknown"))
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Source => "source",
            Self::Destination => "destination",
        })
    }
}

/// Envoy/ztunnel response flags: why a connection failed, `-` when it did not.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    None,
    /// Denied by an AuthorizationPolicy.
    Deny,
    /// The upstream refused, timed out or could not be reached.
    Connect,
    /// The mTLS handshake failed.
    TlsFailure,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
            Self::TlsFailure => "TLS_FAILURE",
        }
    }
}

impl serde::Serialize for ResponseFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `mutual_tls` for HBONE at the destination; `none` for same-node
/// connections (plaintext on the node, identities attested by the kernel,
/// not by TLS); `unknown` from the source, as ztunnel reports.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
    Unknown,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
            Self::Unknown => "unknown",
        })
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
            workload: pod.name.as_str().into(),
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| pod.name.clone())
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

    /// Only the identity is known (a TLS peer that is not in the workloads file).
    pub fn identity(identity: &Identity) -> Self {
        Self {
            principal: identity.to_string().into(),
            namespace: identity.namespace.as_str().into(),
            ..Self::default()
        }
    }
}

/// Istio's TCP label set, in ztunnel's order (locality labels omitted: the
/// workloads file has none).
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
    /// From the workloads' `name.namespace` form.
    pub fn parse(service: &str) -> Self {
        match service.split_once('.') {
            Some((name, namespace)) => Self {
                host: format!("{name}.{namespace}.svc.cluster.local").into(),
                name: name.into(),
                namespace: namespace.into(),
            },
            None => Self::default(),
        }
    }
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
        }
    }
}

/// The `istio_tcp_*` families.
#[derive(Default)]
pub struct TrafficMetrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    /// Server -> client (ztunnel's direction, for both reporters).
    sent_bytes: Family<TrafficLabels, Counter>,
    /// Client -> server.
    received_bytes: Family<TrafficLabels, Counter>,
}

/// Bytes of one direction of one connection, added while they flow: one
/// counter per reporter (same-node connections have two).
#[derive(Clone, Default)]
pub struct ByteCount(Vec<Counter>);

impl ByteCount {
    pub fn add(&self, n: usize) {
        for c in &self.0 {
            c.inc_by(n as u64);
        }
    }
}

/// One connection's series from the moment it is opened.
pub struct ConnectionTraffic {
    metrics: Arc<Metrics>,
    reports: Vec<TrafficLabels>,
    pub client_to_server: ByteCount,
    pub server_to_client: ByteCount,
}

impl ConnectionTraffic {
    /// Counts the close with its flags (`failed` as well when it failed).
    pub fn close(self, flags: ResponseFlags, failed: bool) {
        let t = &self.metrics.traffic;
        for mut labels in self.reports {
            labels.response_flags = flags;
            t.closed.get_or_create(&labels).inc();
            if failed {
                t.failed.get_or_create(&labels).inc();
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
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// What the collector reads at scrape time; set once they exist (the
/// admin server starts before the programs are attached).
struct Sources {
    kernel: Arc<Kernel>,
    certs: Arc<CertStore>,
    pool: Arc<Pool>,
}

#[derive(Default)]
struct Scraped(OnceLock<Sources>);

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

pub struct Metrics {
    registry: Registry,
    traffic: TrafficMetrics,
    enrolled_pods: Gauge,
    active_connections: Family<DirectionLabels, Gauge>,
    tls_failures: Family<TlsFailureLabels, Counter>,
    policy_reloads: Family<OutcomeLabels, Counter>,
    policy_generation: Gauge,
    orig_dst_lookups: Family<ResultLabels, Counter>,
    scraped: Arc<Scraped>,
}

/// The eBPF counters' names, by index in `NM_COUNTERS`.
fn ebpf_event_name(index: usize) -> Option<&'static str> {
    use nodemesh_common::counter as c;
    Some(match index as u32 {
        c::REDIRECTED => "redirected",
        c::SKIPPED_AGENT => "skipped_agent",
        c::PENDING_FULL => "pending_full",
        c::ORIG_DST_RECORDED => "orig_dst_recorded",
        c::ORIG_DST_FULL => "orig_dst_full",
        c::SOCKMAP_ADDED => "sockmap_added",
        c::MSG_REDIRECTED => "msg_redirected",
        c::INBOUND_CAPTURED => "inbound_captured",
        c::INBOUND_NO_LISTENER => "inbound_no_listener",
        _ => return None,
    })
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(s) = self.0.get() else {
            return Ok(());
        };
        let counters = s.kernel.counters();
        let mut family = encoder.encode_descriptor(
            "ebpf_events",
            "Events counted by the kernel programs (NM_COUNTERS), summed over CPUs.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (i, v) in counters.iter().enumerate() {
            if let Some(event) = ebpf_event_name(i) {
                ConstCounter::new(*v).encode(family.encode_family(&[("event", event)])?)?;
            }
        }
        let (connections, streams) = s.pool.usage();
        let gauge = ConstGauge::new(connections as i64);
        gauge.encode(encoder.encode_descriptor(
            "hbone_pool_connections",
            "Pooled HBONE client connections.",
            None,
            gauge.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(streams as i64);
        gauge.encode(encoder.encode_descriptor(
            "hbone_pool_streams",
            "CONNECT streams open on pooled HBONE client connections.",
            None,
            gauge.metric_type(),
        )?)?;
        let opened = ConstCounter::new(s.pool.opened() as u64);
        opened.encode(encoder.encode_descriptor(
            "hbone_pool_connections_opened",
            "HBONE client connections opened.",
            None,
            opened.metric_type(),
        )?)?;
        let expiries = s.certs.expiries();
        if !expiries.is_empty() {
            let mut family = encoder.encode_descriptor(
                "certificate_expiry",
                "Time until each local workload certificate expires.",
                Some(&Unit::Seconds),
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (identity, left) in expiries {
                let identity = identity.to_string();
                ConstGauge::new(left.as_secs_f64())
                    .encode(family.encode_family(&[("identity", identity.as_str())])?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let traffic = TrafficMetrics::default();
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            traffic.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            traffic.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed",
            traffic.failed.clone(),
        );
        istio.register_with_unit(
            "tcp_sent",
            "The size of total bytes sent during response in case of a TCP connection",
            Unit::Bytes,
            traffic.sent_bytes.clone(),
        );
        istio.register_with_unit(
            "tcp_received",
            "The size of total bytes received during request in case of a TCP connection",
            Unit::Bytes,
            traffic.received_bytes.clone(),
        );

        let own = registry.sub_registry_with_prefix("nodemesh");
        // A gauge of 1, not an OpenMetrics info: the classic text format
        // (and promtool) has no info type.
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        own.register("build_info", "The agent's version", build_info);
        let enrolled_pods = Gauge::default();
        own.register(
            "enrolled_pods",
            "Local pods enrolled in the mesh",
            enrolled_pods.clone(),
        );
        let active_connections = Family::<DirectionLabels, Gauge>::default();
        own.register(
            "active_connections",
            "Connections being proxied, by direction (outbound: from a local pod; inbound: HBONE streams to one)",
            active_connections.clone(),
        );
        let tls_failures = Family::<TlsFailureLabels, Counter>::default();
        own.register(
            "tls_handshake_failures",
            "Failed mTLS handshakes by direction and reason",
            tls_failures.clone(),
        );
        let policy_reloads = Family::<OutcomeLabels, Counter>::default();
        own.register(
            "policy_reloads",
            "Policy directory loads by outcome (applied, rejected)",
            policy_reloads.clone(),
        );
        let policy_generation = Gauge::default();
        own.register(
            "policy_generation",
            "Generation of the policy set in force (0: none loaded)",
            policy_generation.clone(),
        );
        let orig_dst_lookups = Family::<ResultLabels, Counter>::default();
        own.register(
            "orig_dst_lookups",
            "Original-destination lookups in NM_ORIG_DST by result (found, missing)",
            orig_dst_lookups.clone(),
        );
        let scraped = Arc::new(Scraped::default());
        own.register_collector(Box::new(scraped.clone()));
        Arc::new(Self {
            registry,
            traffic,
            enrolled_pods,
            active_connections,
            tls_failures,
            policy_reloads,
            policy_generation,
            orig_dst_lookups,
            scraped,
        })
    }

    /// From now on scrapes include the kernel counters, the pool and the
    /// certificates' expiries.
    pub fn scrape_from(&self, kernel: Arc<Kernel>, certs: Arc<CertStore>, pool: Arc<Pool>) {
        let _ = self.scraped.0.set(Sources {
            kernel,
            certs,
            pool,
        });
    }

    /// The OpenMetrics text of every metric (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Opens a connection's series: counts it opened for each report and
    /// hands out its byte counters.
    pub fn open(self: &Arc<Self>, reports: &[Report<'_>]) -> ConnectionTraffic {
        let labels: Vec<TrafficLabels> = reports.iter().map(TrafficLabels::new).collect();
        let t = &self.traffic;
        for l in &labels {
            t.opened.get_or_create(l).inc();
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
            client_to_server: bytes(&t.received_bytes),
            server_to_client: bytes(&t.sent_bytes),
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

    pub fn set_enrolled_pods(&self, n: usize) {
        self.enrolled_pods.set(n as i64);
    }

    /// A policy load: applied (with the generation now in force) or rejected.
    pub fn policy_reload(&self, applied: bool, generation: u64) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.policy_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.policy_generation.set(generation as i64);
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
        }
    }

    #[test]
    fn istio_names_labels_and_unknown_defaults() {
        let m = Metrics::new();
        let client = pod("client-1", &[("app", "client"), ("version", "v2")]);
        let server = pod("server-1", &[]);
        let src = Peer::pod(&client, &Identity::new("cluster.local", "shop", "client"));
        let dst = Peer::pod(&server, &Identity::new("cluster.local", "shop", "server"));
        let conn = m.open(&[Report {
            reporter: Reporter::Source,
            source: &src,
            destination: &dst,
            service: &ServiceName::parse("server.shop"),
            security: SecurityPolicy::Unknown,
        }]);
        conn.client_to_server.add(100);
        conn.server_to_client.add(7);
        conn.close(ResponseFlags::Deny, true);
        let text = m.encode().unwrap();
        let labels = "reporter=\"source\",source_workload=\"client-1\",source_canonical_service=\"client\",source_canonical_revision=\"v2\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_app=\"client\",source_version=\"v2\",source_cluster=\"unknown\",destination_service=\"server.shop.svc.cluster.local\",destination_service_namespace=\"shop\",destination_service_name=\"server\",destination_workload=\"server-1\",destination_canonical_service=\"server-1\",destination_canonical_revision=\"latest\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\",destination_app=\"unknown\",destination_version=\"unknown\",destination_cluster=\"unknown\",request_protocol=\"tcp\"";
        for line in [
            format!(
                "istio_tcp_connections_opened_total{{{labels},response_flags=\"-\",connection_security_policy=\"unknown\"}} 1"
            ),
            format!(
                "istio_tcp_received_bytes_total{{{labels},response_flags=\"-\",connection_security_policy=\"unknown\"}} 100"
            ),
            format!(
                "istio_tcp_sent_bytes_total{{{labels},response_flags=\"-\",connection_security_policy=\"unknown\"}} 7"
            ),
            format!(
                "istio_tcp_connections_closed_total{{{labels},response_flags=\"DENY\",connection_security_policy=\"unknown\"}} 1"
            ),
            format!(
                "istio_tcp_connections_failed_total{{{labels},response_flags=\"DENY\",connection_security_policy=\"unknown\"}} 1"
            ),
            "nodemesh_build_info{version=\"0.1.0\"} 1".to_string(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn own_metrics_have_bounded_labels() {
        let m = Metrics::new();
        m.tls_failure("inbound", "unknown_issuer");
        m.policy_reload(true, 3);
        m.policy_reload(false, 3);
        m.orig_dst_lookup(false);
        let active = m.active("outbound");
        let text = m.encode().unwrap();
        drop(active);
        for line in [
            "nodemesh_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown_issuer\"} 1",
            "nodemesh_policy_reloads_total{outcome=\"applied\"} 1",
            "nodemesh_policy_reloads_total{outcome=\"rejected\"} 1",
            "nodemesh_policy_generation 3",
            "nodemesh_orig_dst_lookups_total{result=\"missing\"} 1",
            "nodemesh_active_connections{direction=\"outbound\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            m.encode()
                .unwrap()
                .contains("nodemesh_active_connections{direction=\"outbound\"} 0")
        );
    }
}
