//! The HBONE server in each enrolled pod: `<pod IP>:15008`, TLS with the
//! pod's certificate, HTTP/2 CONNECT to the pod's own ports.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    ConnectionResult, LocalPod, ProxyError, ProxyInputs, canonical, h2io,
    limits::Admitted,
    metrics::{Peer, Report, Reporter, SecurityPolicy, ServiceName},
    reset_on_close,
};
use crate::{
    identity::Identity,
    policy::{Decision, Request},
    tls::{failure_reason, svid_identity},
};

pub use nodemesh_common::HBONE_PORT;

/// How long a peer may take for the TLS handshake and the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 settings: bounded headers and streams; windows of 4 MiB per
/// stream and 16 MiB per connection, which measured best for cross-node bulk
/// throughput on the virtual cluster (1/4 MiB: -13%, 16/64 MiB: -3%, single
/// stream; docs/architecture.md). Real links with more delay want no less.
pub fn h2_server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(200)
        .max_send_buffer_size(1024 * 1024);
    b
}

/// Serves one HBONE connection (TLS, then HTTP/2 streams).
pub async fn serve(inputs: Arc<ProxyInputs>, pod: Arc<LocalPod>, tcp: TcpStream, peer: SocketAddr) {
    let peer = canonical(peer);
    let admitted = if is_agent_source(peer.ip()) {
        // The agent's own connections to apps come from there: one that
        // reached this port is an HBONE inside HBONE.
        Err(ProxyError::ReentersAgent {
            what: format!("an HBONE connection from {peer}"),
        })
    } else {
        inputs.limits.admit_handshake(peer.ip())
    };
    let outcome = match admitted {
        Ok(handshake) => serve_connection(&inputs, &pod, tcp, peer, handshake).await,
        Err(e) => {
            reset_on_close(&tcp);
            Err(e)
        }
    };
    if let Err(e) = outcome {
        // The connection failed before any stream: the peer is not (yet)
        // authenticated, so only the destination is labelled, and the logs
        // are sampled (anyone can open connections; the metrics count all).
        let mut result = ConnectionResult::new(&inputs, Reporter::Destination, "inbound", peer);
        result.entry().dst_workload = Some(pod.pod.key().to_string());
        result.entry().dst_identity = Some(pod.identity.to_string());
        result.open(&[Report {
            reporter: Reporter::Destination,
            source: &Peer::default(),
            destination: &Peer::pod(&pod.pod, &pod.identity),
            service: &ServiceName::default(),
            security: SecurityPolicy::Unknown,
        }]);
        result.fail(&e);
        match inputs.limits.sampler.sample() {
            Some(suppressed)
                if e.tls_code().is_some() || matches!(e, ProxyError::Overloaded { .. }) =>
            {
                warn!(pod = %pod.pod.key(), %peer, suppressed, "{e}")
            }
            Some(suppressed) => debug!(pod = %pod.pod.key(), %peer, suppressed, "{e}"),
            None => result.quiet(),
        }
    }
}

/// The source the agent's own connections to apps have (127.0.0.6, ::1).
fn is_agent_source(ip: IpAddr) -> bool {
    ip == IpAddr::V4(crate::datapath::INBOUND_SOURCE_V4)
        || ip == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
}

/// Fails only before the first stream (TLS, certificate, limits, HTTP/2
/// preface). `handshake` holds the connection's place in the handshake
/// budget until the peer is authenticated.
async fn serve_connection(
    inputs: &Arc<ProxyInputs>,
    pod: &Arc<LocalPod>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: Admitted,
) -> Result<(), ProxyError> {
    let local = canonical(tcp.local_addr().map_err(ProxyError::Transfer)?);
    let _ = tcp.set_nodelay(true);
    let server =
        inputs
            .tls
            .server_config(&pod.identity)
            .await
            .map_err(|e| ProxyError::Certificate {
                identity: pod.identity.to_string(),
                reason: e.to_string(),
            })?;
    let refused =
        |code: &'static str, reason: String| ProxyError::TlsHandshake { peer, code, reason };
    let handshake_timeout = inputs.config.sockets.connect_timeout.max(HANDSHAKE_TIMEOUT);
    let tls = match tokio::time::timeout(
        handshake_timeout,
        TlsAcceptor::from(server).accept(super::read_buffer::ReadBuffered::new(tcp)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(refused(failure_reason(&e), e.to_string())),
        Err(_) => return Err(refused("timeout", "TLS handshake timed out".into())),
    };
    // Identity comes only from the client certificate (already verified).
    let src_identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| refused("no_client_certificate", "no client certificate".into()))
        .and_then(|c| {
            svid_identity(c, &pod.identity.trust_domain)
                .map_err(|e| refused("not_an_svid", e.to_string()))
        })?;
    // Authenticated: from the handshake budget into the main one.
    let _admitted = inputs
        .limits
        .admit("hbone_connection", None, Some(peer.ip()))?;
    drop(handshake);
    let mut conn = match tokio::time::timeout(handshake_timeout, h2_server().handshake(tls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, "HBONE HTTP/2 handshake failed: {e}");
            return Ok(());
        }
        Err(_) => {
            debug!(%peer, "HBONE HTTP/2 preface timed out");
            return Ok(());
        }
    };
    // Liveness: a PING the peer must answer, and an idle timeout; a
    // partitioned or silent peer is closed in bounded time.
    let hbone = inputs.config.hbone;
    let mut ping_pong = conn.ping_pong();
    let keepalive = super::pool::keepalive(
        ping_pong.as_mut(),
        Duration::from_secs(hbone.ping_interval_seconds),
        Duration::from_secs(hbone.ping_timeout_seconds),
    );
    tokio::pin!(keepalive);
    let idle_timeout = Duration::from_secs(hbone.idle_timeout_seconds);
    // Checked every quarter of the timeout: an idle connection closes
    // within 1.5 times it, and a busy one wakes up rarely.
    let mut idle_check = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(250)));
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since = Some(tokio::time::Instant::now());
    // On drain or idle: GOAWAY, so peers open no new streams here and the
    // connection closes once its streams are done (pooled peers hold idle
    // ones open).
    let mut closing = false;
    let drain = inputs.drain.clone();
    let stopped = drain.stopped();
    tokio::pin!(stopped);
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut stopped, if !closing => {
                closing = true;
                conn.graceful_shutdown();
                continue;
            }
            () = &mut keepalive => {
                warn!(pod = %pod.pod.key(), %peer, "HBONE peer stopped answering PINGs; connection closed");
                break;
            }
            _ = idle_check.tick(), if !closing => {
                let active = streams.load(std::sync::atomic::Ordering::Acquire);
                match (active, idle_since) {
                    (0, None) => idle_since = Some(tokio::time::Instant::now()),
                    (0, Some(t)) if t.elapsed() >= idle_timeout => {
                        debug!(%peer, "HBONE connection idle for {idle_timeout:?}; closing");
                        closing = true;
                        conn.graceful_shutdown();
                    }
                    (0, Some(_)) => {}
                    _ => idle_since = None,
                }
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((request, respond)) => {
                let inputs = inputs.clone();
                let pod = pod.clone();
                let src_identity = src_identity.clone();
                let streams = StreamCount::new(streams.clone());
                idle_since = None;
                tokio::spawn(async move {
                    let _streams = streams;
                    serve_stream(&inputs, &pod, local, peer, src_identity, request, respond).await;
                });
            }
            Err(e) => {
                debug!(%peer, "HBONE connection ended: {e}");
                break;
            }
        }
    }
    Ok(())
}

/// Counts a connection's open streams (for its idle timeout).
struct StreamCount(Arc<std::sync::atomic::AtomicUsize>);

impl StreamCount {
    fn new(c: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        c.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn respond(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(response, true);
}

async fn serve_stream(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    local: SocketAddr,
    peer: SocketAddr,
    src_identity: Identity,
    request: http::Request<h2::RecvStream>,
    responder: SendResponse<Bytes>,
) {
    let (head, body) = request.into_parts();
    let mut result = ConnectionResult::new(inputs, Reporter::Destination, "inbound", peer);
    let entry = result.entry();
    entry.src_identity = Some(src_identity.to_string());
    entry.dst_workload = Some(pod.pod.key().to_string());
    entry.dst_identity = Some(pod.identity.to_string());
    entry.security = "mutual_tls";
    entry.forwarded_for = head
        .headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    let target = match connect_target(
        &head.method,
        &head.uri,
        local.ip(),
        &inputs.config.agent_ports,
    ) {
        Ok(t) => t,
        Err(e) => {
            respond(responder, StatusCode::BAD_REQUEST);
            result.fail(&e);
            return;
        }
    };
    let _admitted = match inputs.limits.admit("inbound", Some(pod.workload_id), None) {
        Ok(a) => a,
        Err(e) => {
            respond(responder, StatusCode::SERVICE_UNAVAILABLE);
            super::shed(inputs, &mut result, &e, pod);
            return;
        }
    };
    let entry = result.entry();
    entry.orig_dst = target.to_string();
    entry.upstream = Some(target.to_string());
    let bytes = open_traffic(inputs, &mut result, pod, peer, &src_identity, target.port());
    // Policy: identity from the certificate, address from the TCP peer.
    let request = Request {
        src_identity: Some(&src_identity),
        src_ip: peer.ip(),
        dst_namespace: &pod.pod.namespace,
        dst_labels: &pod.pod.labels,
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    let decision = inputs.policies.decide(&request);
    result.decided(&decision);
    if let Decision::Deny { policy } = decision {
        respond(responder, StatusCode::UNAUTHORIZED);
        result.fail(&ProxyError::Denied { policy });
        return;
    }
    let mut upstream = match super::connect_in(inputs, pod, target).await {
        Ok(s) => s,
        Err(e) => {
            respond(responder, StatusCode::SERVICE_UNAVAILABLE);
            result.fail(&ProxyError::InPod {
                pod: pod.pod.key().to_string(),
                source: Box::new(e),
            });
            return;
        }
    };
    let mut responder = responder;
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    let mut send = match responder.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            result.fail(&ProxyError::Transfer(std::io::Error::other(format!(
                "HBONE stream closed before the response: {e}"
            ))));
            return;
        }
    };
    // While bytes flow, a new policy set may deny this connection: it is
    // then closed; allowed ones are untouched.
    let recheck = || match inputs.policies.decide(&request) {
        Decision::Deny { policy } => Err(ProxyError::Denied { policy }),
        Decision::Allow { .. } => Ok(()),
    };
    let copy = async {
        h2io::copy(
            &mut upstream,
            &mut send,
            body,
            &bytes.server_to_client,
            &bytes.client_to_server,
        )
        .await
        .map_err(ProxyError::Transfer)
    };
    match super::rechecked(inputs, copy, Some(&recheck)).await {
        Ok((to_peer, from_peer)) => result.transferred(from_peer, to_peer),
        Err(e) => {
            send.send_reset(h2::Reason::CANCEL);
            reset_on_close(&upstream);
            result.fail(&e);
        }
    }
}

/// Opens a stream's destination report. The source's workload labels come
/// from the workload state, and only when the pod at the connection's
/// address runs as the identity its certificate proved.
fn open_traffic(
    inputs: &ProxyInputs,
    result: &mut ConnectionResult,
    pod: &LocalPod,
    peer: SocketAddr,
    src_identity: &Identity,
    target_port: u16,
) -> super::connection::Bytes {
    let source = inputs
        .workloads
        .pod_by_ip(peer.ip())
        .filter(|p| inputs.identity_of(p) == *src_identity)
        .map(|p| Peer::pod(&p, src_identity))
        .unwrap_or_else(|| Peer::identity(src_identity));
    open_destination_report(
        inputs,
        result,
        pod,
        &source,
        target_port,
        SecurityPolicy::MutualTls,
    )
}

/// Opens the destination report of a connection to a pod on this node:
/// its service from the target port, and the source as already known.
pub fn open_destination_report(
    inputs: &ProxyInputs,
    result: &mut ConnectionResult,
    pod: &LocalPod,
    source: &Peer,
    target_port: u16,
    security: SecurityPolicy,
) -> super::connection::Bytes {
    let service = inputs
        .workloads
        .service_of(&pod.pod.key(), target_port)
        .map(|s| ServiceName::of(&s))
        .unwrap_or_default();
    result.open(&[Report {
        reporter: Reporter::Destination,
        source,
        destination: &Peer::pod(&pod.pod, &pod.identity),
        service: &service,
        security,
    }])
}

/// The target of an HBONE request, or why it gets a 400: not CONNECT, an
/// authority that is not `ip:port`, an IP that is not the pod the
/// connection arrived on (a peer may not use this pod to reach others), or
/// one of the agent's own ports (it would re-enter the agent, and the inner
/// connection would be decided with the agent's address as its source).
pub fn connect_target(
    method: &Method,
    uri: &http::Uri,
    local_ip: IpAddr,
    agent_ports: &[u16],
) -> Result<SocketAddr, ProxyError> {
    let bad = |why: String| Err(ProxyError::BadRequest(why));
    if method != Method::CONNECT {
        return bad(format!("{method} is not CONNECT"));
    }
    let Some(authority) = uri.authority() else {
        return bad(format!("CONNECT {uri} has no authority"));
    };
    let Ok(target) = authority.as_str().parse::<SocketAddr>() else {
        return bad(format!("authority {authority} is not ip:port"));
    };
    let target = canonical(target);
    if target.ip() != canonical(SocketAddr::new(local_ip, 0)).ip() {
        return bad(format!("authority {target} is not this pod ({local_ip})"));
    }
    if target.port() == 0 {
        return bad("port 0".into());
    }
    if agent_ports.contains(&target.port()) {
        return Err(ProxyError::ReentersAgent {
            what: format!("CONNECT to {target}, an agent port"),
        });
    }
    Ok(target)
}

/// The fuzz target's body (also run on the seed corpus as a test): a method
/// line, then a URI line, then a `forwarded` header value.
pub fn fuzz_connect_request(data: &[u8]) {
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let local: IpAddr = [10, 244, 1, 10].into();
    let agent_ports = [15001, 15006, 15008, 15000, 15020, 15021];
    if let (Ok(m), Ok(u)) = (Method::from_bytes(method), http::Uri::try_from(uri))
        && let Ok(t) = connect_target(&m, &u, local, &agent_ports)
    {
        assert_eq!(canonical(t).ip(), local);
        assert_eq!(m, Method::CONNECT);
        assert!(!agent_ports.contains(&t.port()));
    }
    if let Some(Ok(fwd)) = lines.next().map(std::str::from_utf8) {
        let _ = forwarded_for(fwd);
    }
}

/// `for="10.244.0.10:43210"` -> the address (telemetry only).
pub fn forwarded_for(v: &str) -> Option<String> {
    v.split(';')
        .find_map(|p| p.trim().strip_prefix("for="))
        .map(|s| s.trim_matches('"').to_owned())
}
