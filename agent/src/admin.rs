//! The agent's HTTP servers, all read-only and GET-only; nothing changes
//! state, no response carries keys or tokens. Three servers, as ztunnel's:
//! - admin (`adminAddress`, loopback only): every endpoint, `/config_dump`
//!   among them;
//! - stats (`statsAddress`): `/metrics`, `/stats/prometheus`, for Prometheus;
//! - readiness (`readinessAddress`): `/healthz/ready`, `/healthz/live`.
//!
//! Each is bounded: at most `limits.maxAdminConnections` connections (a
//! quarter of them per source address), headers within
//! `adminHeaderTimeoutSeconds`, a connection closed after
//! `adminConnectionTimeoutSeconds`. A connection past a cap is closed at
//! once and counted, so idle clients cannot take the agent's descriptors.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    config::{Config, Limits},
    metrics::MetricsRegistry,
    proxy::{ProxyInputs, canonical},
    readiness::Readiness,
};

const OPENMETRICS: &str = "application/openmetrics-text;charset=utf-8;version=1.0.0";
const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds the `/config_dump` document on each request.
pub type ConfigDump = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Which server a request came to, and so what it may ask for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Server {
    Admin,
    Stats,
    Readiness,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Stats => "stats",
            Self::Readiness => "readiness",
        }
    }

    fn serves(self, path: &str) -> bool {
        match self {
            Self::Admin => true,
            Self::Stats => matches!(path, "/metrics" | "/stats/prometheus"),
            Self::Readiness => matches!(path, "/healthz/ready" | "/healthz/live"),
        }
    }

    fn index(self) -> &'static str {
        match self {
            Self::Admin => "endpoints: /metrics /healthz/ready /healthz/live /config_dump\n",
            Self::Stats => {
                "endpoints: /metrics /stats/prometheus (admin endpoints are on adminAddress)\n"
            }
            Self::Readiness => "endpoints: /healthz/ready /healthz/live\n",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    server: &'static str,
    reason: &'static str,
}

pub struct Admin {
    metrics: Arc<MetricsRegistry>,
    readiness: Readiness,
    config_dump: OnceLock<ConfigDump>,
    addresses: HashMap<Server, SocketAddr>,
    refused: Family<RefusedLabels, Counter>,
}

impl Admin {
    /// Where `server` listens.
    pub fn address(&self, server: Server) -> SocketAddr {
        self.addresses[&server]
    }

    /// Set once the state it shows exists; until then `/config_dump` is 503.
    pub fn set_config_dump(&self, dump: ConfigDump) {
        let _ = self.config_dump.set(dump);
    }

    fn respond(&self, server: Server, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "read-only: GET only\n".into(),
            );
        }
        let path = request.uri().path();
        if !server.serves(path) {
            return reply(StatusCode::NOT_FOUND, TEXT, server.index().into());
        }
        match path {
            "/metrics" | "/stats/prometheus" => self.metrics(request),
            "/healthz/live" => reply(StatusCode::OK, TEXT, "live\n".into()),
            "/healthz/ready" => {
                let waiting = self.readiness.waiting_for();
                if waiting.is_empty() {
                    reply(StatusCode::OK, TEXT, "ready\n".into())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        format!("not ready: waiting for {}\n", waiting.join(", ")),
                    )
                }
            }
            "/config_dump" => match self.config_dump.get() {
                Some(dump) => match serde_json::to_string_pretty(&dump()) {
                    Ok(json) => reply(StatusCode::OK, "application/json", json),
                    Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
                },
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "starting: no state yet\n".into(),
                ),
            },
            _ => reply(StatusCode::NOT_FOUND, TEXT, server.index().into()),
        }
    }

    /// OpenMetrics for clients that ask for it (Prometheus does), the
    /// classic text format otherwise (what `promtool check metrics` reads).
    fn metrics(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let openmetrics = request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        match self.metrics.encode() {
            Ok(body) if openmetrics => reply(StatusCode::OK, OPENMETRICS, body),
            Ok(body) => reply(StatusCode::OK, PROMETHEUS_TEXT, prometheus_text(&body)),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("encoding metrics: {e}\n"),
            ),
        }
    }
}

/// The classic text format (0.0.4) of an OpenMetrics exposition: a counter
/// family is named by its `_total` samples there, and `# UNIT` / `# EOF`
/// do not exist.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds the three servers and serves there until the process ends.
pub async fn start(
    config: &Config,
    metrics: Arc<MetricsRegistry>,
    readiness: Readiness,
) -> anyhow::Result<Arc<Admin>> {
    use anyhow::Context as _;
    let mut listeners = Vec::new();
    let mut addresses = HashMap::new();
    for (server, address, field) in [
        (Server::Admin, config.admin_address, "adminAddress"),
        (Server::Stats, config.stats_address, "statsAddress"),
        (
            Server::Readiness,
            config.readiness_address,
            "readinessAddress",
        ),
    ] {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("{} server on {address} ({field})", server.name()))?;
        let bound = listener.local_addr()?;
        tracing::info!(address = %bound, "{} server listening", server.name());
        addresses.insert(server, bound);
        listeners.push((server, listener));
    }
    let refused = Family::<RefusedLabels, Counter>::default();
    metrics.own(|r| {
        r.register(
            "admin_connections_refused",
            "Connections to the admin, stats and readiness servers closed at once, by server and reason (limit, per_source, local)",
            refused.clone(),
        )
    });
    let admin = Arc::new(Admin {
        metrics,
        readiness,
        config_dump: OnceLock::new(),
        addresses,
        refused,
    });
    for (server, listener) in listeners {
        tokio::spawn(serve(admin.clone(), server, listener, config.limits));
    }
    Ok(admin)
}

/// The effective config, the local workloads, the policies in force and the
/// certificates' subjects and expiry: state, never key material.
pub fn config_dump(config: Config, inputs: Arc<ProxyInputs>) -> ConfigDump {
    Box::new(move || {
        let workloads = &inputs.workloads;
        let mut local: Vec<serde_json::Value> = workloads
            .local_pods()
            .iter()
            .map(|p| {
                serde_json::json!({
                    "pod": p.key().to_string(),
                    "identity": inputs.identity_of(p).to_string(),
                    "ips": p.ips,
                    "labels": p.labels,
                })
            })
            .collect();
        local.sort_by(|a, b| a["pod"].as_str().cmp(&b["pod"].as_str()));
        // Every pod the agent knows, as ztunnel's dump lists its workloads:
        // which addresses it would send over HBONE.
        let mut all: Vec<serde_json::Value> = workloads
            .pods()
            .iter()
            .map(|p| {
                serde_json::json!({
                    "pod": p.key().to_string(),
                    "node": p.node,
                    "ips": p.ips,
                })
            })
            .collect();
        all.sort_by(|a, b| a["pod"].as_str().cmp(&b["pod"].as_str()));
        let mut certificates: Vec<serde_json::Value> = inputs
            .tls
            .certs()
            .expiries()
            .into_iter()
            .map(|(identity, left)| {
                serde_json::json!({
                    "identity": identity.to_string(),
                    "expiresInSeconds": left.as_secs(),
                })
            })
            .collect();
        certificates.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        serde_json::json!({
            "config": config,
            "node": workloads.node(),
            "localWorkloads": local,
            "workloadState": {
                "generation": workloads.generation(),
                "pods": workloads.pods().len(),
                "services": workloads.services().len(),
            },
            "workloads": all,
            "enrolledNetns": inputs.datapath.enrolled_cookies().len(),
            "connectionLimits": inputs.limits.effective(),
            "policies": {
                "generation": inputs.policies.generation(),
                "authorization": inputs.policies.names(),
                "peer_authentication": inputs.policies.peer_authentication_names(),
            },
            "certificates": certificates,
            "endpoints": inputs.balancer.dump(),
            "registry": inputs.policies.registry().dump(),
            "outboundTrafficPolicy": inputs.config.outbound_mode,
            "dns": dns_dump(&inputs),
        })
    })
}

/// What each enrolled pod resolved, by pod (`namespace/name`; a workload
/// id no enrolled pod has any more as `workload-<id>`), and the upstreams.
fn dns_dump(inputs: &ProxyInputs) -> serde_json::Value {
    let local = inputs.local_pods.load();
    let pod_of = |id: &str| {
        local
            .values()
            .find(|p| p.workload_id.to_string() == id)
            .map(|p| p.pod.key().to_string())
            .unwrap_or_else(|| format!("workload-{id}"))
    };
    let records: serde_json::Map<String, serde_json::Value> = match inputs.dns.dump() {
        serde_json::Value::Object(by_id) => {
            by_id.into_iter().map(|(id, r)| (pod_of(&id), r)).collect()
        }
        _ => Default::default(),
    };
    serde_json::json!({
        "capture": inputs.config.dns_capture,
        "upstreams": inputs.dns_proxy.upstreams(),
        "records": records,
    })
}

/// Connections open to one server, in all and per source address; the
/// node's own (the kubelet's probes, a local `curl`) counted apart.
#[derive(Default)]
struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    local: usize,
}

/// Held by an admitted connection.
struct Slot {
    open: Arc<Mutex<Open>>,
    /// None: a connection from the node itself.
    source: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(source) = self.source else {
            open.local -= 1;
            return;
        };
        open.total -= 1;
        if let Some(n) = open.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.per_source.remove(&source);
            }
        }
    }
}

/// Admits a connection from `source` within the caps, or says which it
/// hit. A connection from the node itself (`local`) has its own share, so
/// clients elsewhere, however many sources they use, cannot keep the
/// kubelet from probing readiness.
fn admit(
    open: &Arc<Mutex<Open>>,
    source: IpAddr,
    local: bool,
    limits: &Limits,
) -> Result<Slot, &'static str> {
    let max = limits.max_admin_connections;
    let share = (max / 4).max(1);
    let mut o = open.lock().unwrap_or_else(PoisonError::into_inner);
    if local {
        if o.local >= share {
            return Err("local");
        }
        o.local += 1;
        return Ok(Slot {
            open: open.clone(),
            source: None,
        });
    }
    if o.total >= max {
        return Err("limit");
    }
    let n = o.per_source.entry(source).or_default();
    if *n >= share {
        return Err("per_source");
    }
    *n += 1;
    o.total += 1;
    Ok(Slot {
        open: open.clone(),
        source: Some(source),
    })
}

/// Why a connection was refused, for the log.
fn refusal(reason: &str) -> &'static str {
    match reason {
        "per_source" => {
            "connections refused: this source holds its share (a quarter of limits.maxAdminConnections)"
        }
        "local" => {
            "connections refused: the node's own connections hold their share (a quarter of limits.maxAdminConnections)"
        }
        _ => {
            "connections refused: the server is at its connection limit (limits.maxAdminConnections)"
        }
    }
}

/// Serves HTTP/1.1 on `listener` until the process ends.
async fn serve(admin: Arc<Admin>, server: Server, listener: TcpListener, limits: Limits) {
    let open = Arc::new(Mutex::new(Open::default()));
    let header_timeout = Duration::from_secs(limits.admin_header_timeout_seconds);
    let connection_timeout = Duration::from_secs(limits.admin_connection_timeout_seconds);
    let mut refused_since_warning = 0u64;
    let mut last_warning = tokio::time::Instant::now();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                debug!("{} accept: {e}", server.name());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // From the node itself: to its own address, or over loopback.
        let peer = canonical(peer);
        let local = peer.ip().is_loopback()
            || stream
                .local_addr()
                .is_ok_and(|a| canonical(a).ip() == peer.ip());
        let slot = match admit(&open, peer.ip(), local, &limits) {
            Ok(slot) => slot,
            Err(reason) => {
                admin
                    .refused
                    .get_or_create(&RefusedLabels {
                        server: server.name(),
                        reason,
                    })
                    .inc();
                // Closed at once; the warning at most once a second.
                refused_since_warning += 1;
                if last_warning.elapsed() >= Duration::from_secs(1) {
                    warn!(
                        server = server.name(),
                        %peer,
                        reason,
                        refused = refused_since_warning,
                        "{}",
                        refusal(reason)
                    );
                    refused_since_warning = 0;
                    last_warning = tokio::time::Instant::now();
                }
                drop(stream);
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let response = admin.respond(server, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(connection_timeout, conn).await {
                Ok(Err(e)) => debug!("{} connection: {e}", server.name()),
                Err(_) => debug!(
                    "{} connection closed after {connection_timeout:?}",
                    server.name()
                ),
                Ok(Ok(())) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_by_their_samples() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total{x=\"y\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"y\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn sources_share_a_server_and_the_node_keeps_its_own_share() {
        let limits = Limits {
            max_admin_connections: 8,
            ..Limits::default()
        };
        let open = Arc::new(Mutex::new(Open::default()));
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let mut held = Vec::new();
        for n in 1..=4 {
            held.push(admit(&open, ip(n), false, &limits).unwrap());
            held.push(admit(&open, ip(n), false, &limits).unwrap());
            if n == 1 {
                let third = admit(&open, ip(1), false, &limits);
                assert_eq!(third.err(), Some("per_source"));
            }
        }
        assert_eq!(admit(&open, ip(5), false, &limits).err(), Some("limit"));
        // Full for everyone else; the node's own probes still get in.
        let local = [
            admit(&open, ip(9), true, &limits).unwrap(),
            admit(&open, ip(9), true, &limits).unwrap(),
        ];
        assert_eq!(admit(&open, ip(9), true, &limits).err(), Some("local"));
        drop(local);
        drop(held.pop());
        assert!(admit(&open, ip(5), false, &limits).is_ok());
        let o = open.lock().unwrap();
        assert_eq!((o.total, o.local), (7, 0));
    }
}
