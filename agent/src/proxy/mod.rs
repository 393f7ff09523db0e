//! The data path.
pub mod capture;
mod h2io;
pub mod inbound;
pub mod outbound;
pub mod pool;
mod splice;

use std::{net::SocketAddr, sync::Arc};

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use outbound::{LocalPod, Shared};

use crate::{
    access_log::Entry,
    metrics::{
        ByteCount, ConnectionTraffic, Peer, Report, Reporter, ResponseFlags, SecurityPolicy,
        ServiceName,
    },
};

/// Why a proxied connection failed, and where.
#[derive(Debug, Error)]
pub enum ProxyError {
    #[error(
        "connection to the outbound port was not redirected by the kernel (no original-destination record); refused"
    )]
    NotRedirected,
    #[error(
        "redirect record names workload id {recorded} but the connection arrived in pod {pod}; refused"
    )]
    WrongPod { recorded: u32, pod: String },
    #[error(
        "captured plaintext connection to {addr}: not one of the pod's addresses, or an agent port; refused"
    )]
    NotCapturable { addr: std::net::SocketAddr },
    #[error(
        "{}plaintext refused: PeerAuthentication {} requires mutual TLS (STRICT) on port {port}; the client must be in the mesh",
        if *after_reload { "closed: after a policy reload, " } else { "" },
        policy.as_deref().unwrap_or("(none)")
    )]
    PlaintextRefused {
        policy: Option<String>,
        port: u16,
        after_reload: bool,
    },
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error(
        "connect to {addr} timed out after {secs} s; is the destination up and routable from the pod?"
    )]
    ConnectTimeout {
        addr: std::net::SocketAddr,
        secs: u64,
    },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("creating the upstream socket in {pod}'s netns: {source}")]
    Socket { pod: String, source: std::io::Error },
    #[error("transfer: {0}")]
    Transfer(std::io::Error),
    #[error("denied by {}", denied_by(policy))]
    Denied { policy: Option<String> },
    #[error("closed: after a policy reload, denied by {}", denied_by(policy))]
    DeniedAfterReload { policy: Option<String> },
    #[error("HBONE to {addr}: TLS failed ({code}): {reason}")]
    Tls {
        addr: std::net::SocketAddr,
        /// Bounded, for the metric label (`tls::failure_reason`).
        code: &'static str,
        reason: String,
    },
    #[error(
        "HBONE to {addr}: no answer in time; is the destination node's agent running and port 15008 reachable?"
    )]
    HboneTimeout { addr: std::net::SocketAddr },
    #[error("HBONE to {addr}: {source}")]
    Hbone {
        addr: std::net::SocketAddr,
        source: h2::Error,
    },
    #[error("HBONE to {addr}: destination answered {status}{}", status_hint(*status))]
    HboneStatus {
        addr: std::net::SocketAddr,
        status: u16,
    },
}

pub fn denied_by(policy: &Option<String>) -> String {
    match policy {
        Some(p) => format!("policy {p}"),
        None => "policy: ALLOW policies select the destination and none matched".into(),
    }
}

fn status_hint(status: u16) -> &'static str {
    match status {
        400 => " (bad request: the destination agent did not accept the CONNECT)",
        401 => " (denied by the destination's policy)",
        503 => " (the destination agent could not reach the pod)",
        _ => "",
    }
}

impl ProxyError {
    /// The stage name used in the access log.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::NotRedirected | Self::WrongPod { .. } | Self::NotCapturable { .. } => "redirect",
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::ConnectTimeout { .. } | Self::Connect { .. } | Self::Socket { .. } => "connect",
            Self::Transfer(_) => "transfer",
            Self::Denied { .. }
            | Self::DeniedAfterReload { .. }
            | Self::PlaintextRefused { .. } => "denied",
            Self::Tls { .. } => "tls",
            Self::HboneStatus { status: 401, .. } => "denied",
            Self::HboneTimeout { .. } | Self::Hbone { .. } | Self::HboneStatus { .. } => "hbone",
        }
    }
}

impl ProxyError {
    /// The Istio response flag a failure is reported with.
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            Self::Denied { .. }
            | Self::DeniedAfterReload { .. }
            | Self::PlaintextRefused { .. }
            | Self::HboneStatus { status: 401, .. } => ResponseFlags::Deny,
            Self::NoEndpoints { .. }
            | Self::ConnectTimeout { .. }
            | Self::Connect { .. }
            | Self::HboneTimeout { .. }
            | Self::HboneStatus { status: 503, .. } => ResponseFlags::Connect,
            Self::Tls { .. } => ResponseFlags::TlsFailure,
            Self::NotRedirected
            | Self::WrongPod { .. }
            | Self::NotCapturable { .. }
            | Self::Socket { .. }
            | Self::Transfer(_)
            | Self::Hbone { .. }
            | Self::HboneStatus { .. } => ResponseFlags::None,
        }
    }
}

/// Connects to `addr` from inside `from`'s netns (the socket carries the
/// agent's mark, so the kernel hooks leave it alone), within the timeout.
///
/// To the pod's own address (the agent reaching the app) the source is
/// `127.0.0.6` / `::1`: from the pod's own address every such connection
/// would have the same two addresses, and the agent's side, which usually
/// closes first, holds its port in TIME_WAIT for 60 s — a cap near 470 new
/// connections/s into a pod (measured). With a loopback source the kernel
/// reuses TIME_WAIT ports after a second (`tcp_tw_reuse`'s default), and
/// apps bound only to localhost stay unreachable (the destination is still
/// the pod's address).
pub async fn connect_in(
    shared: &Shared,
    from: &LocalPod,
    addr: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    connect_from(from, addr, shared.socket_mark, shared.connect_timeout).await
}

/// The socket and connect of [`connect_in`], for callers with their own
/// mark and timeout (the HBONE pool).
pub async fn connect_from(
    from: &LocalPod,
    addr: SocketAddr,
    mark: u32,
    timeout: std::time::Duration,
) -> Result<TcpStream, ProxyError> {
    let to_itself = from.pod.ips.contains(&addr.ip());
    let socket = from
        .netns
        .socket(addr, mark, to_itself)
        .map_err(|source| ProxyError::Socket {
            pod: from.pod.key().to_string(),
            source,
        })?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
        Err(_) => Err(ProxyError::ConnectTimeout {
            addr,
            secs: timeout.as_secs(),
        }),
    }
}

/// Plain TCP both ways with splice (bytes counted as they flow) until both
/// directions end. After each policy reload `recheck` runs; its error
/// closes the connection. Either failure resets the upstream side (the
/// caller resets the client's). Returns bytes client->upstream, back.
pub async fn splice_rechecked(
    shared: &Shared,
    client: &TcpStream,
    upstream: &TcpStream,
    (up, down): (&ByteCount, &ByteCount),
    recheck: Option<&(dyn Fn() -> Result<(), ProxyError> + Sync)>,
) -> Result<(u64, u64), ProxyError> {
    let mut generation = shared.policies.subscribe();
    // A set that arrived since the first decision (during the connect) is
    // checked at once.
    generation.mark_changed();
    let copied = {
        let copy = splice::bidirectional(client, upstream, up, down);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => break r.map_err(ProxyError::Transfer),
                changed = generation.changed(), if recheck.is_some() => {
                    if changed.is_err() {
                        continue;
                    }
                    if let Some(Err(e)) = recheck.map(|f| f()) {
                        break Err(e);
                    }
                }
            }
        }
    };
    if copied.is_err() {
        outbound::reset_on_close(upstream);
    }
    copied
}

/// Opens the destination report of a connection to a pod on this node:
/// its service from the target port, and the source as already known.
pub fn open_destination_report(
    shared: &Shared,
    pod: &LocalPod,
    source: &Peer,
    target_port: u16,
    security: SecurityPolicy,
) -> ConnectionTraffic {
    let service = shared
        .workloads
        .borrow()
        .service_of(&pod.pod, target_port)
        .map(ServiceName::parse)
        .unwrap_or_default();
    shared.metrics.open(&[Report {
        reporter: Reporter::Destination,
        source,
        destination: &Peer::pod(&pod.pod, &pod.identity),
        service: &service,
        security,
    }])
}

/// Ends a connection's reports: its close in the metrics (with the flags in
/// the entry, and as failed unless it ended `ok`) and its access-log line.
pub fn finish(shared: &Shared, entry: Entry, traffic: Option<ConnectionTraffic>) {
    if let Some(t) = traffic {
        t.close(entry.response_flags, entry.result != "ok");
    }
    shared.access_log.log(entry);
}

/// Accepts on one of a pod's listeners until draining starts; each
/// connection is served by `serve` in its own task and counted for drain.
pub async fn accept_loop<F, Fut>(
    shared: Arc<Shared>,
    pod: Arc<LocalPod>,
    listener: TcpListener,
    serve: F,
) where
    F: Fn(Arc<Shared>, Arc<LocalPod>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.drain.stopped() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let guard = shared.drain.connection();
                let served = serve(shared.clone(), pod.clone(), stream, peer);
                tokio::spawn(async move {
                    served.await;
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %pod.pod.key(), "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
