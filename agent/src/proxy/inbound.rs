//! The HBONE server in each enrolled pod: `<pod IP>:15008`, TLS with the
//! pod's certificate, HTTP/2 CONNECT to the pod's own ports.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    denied_by, finish, h2io,
    outbound::{LocalPod, Shared, note_decision, reset_on_close},
};
use crate::{
    access_log::Entry,
    identity::Identity,
    metrics::{
        ConnectionTraffic, Peer, Report, Reporter, ResponseFlags, SecurityPolicy, ServiceName,
    },
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
pub async fn serve(shared: Arc<Shared>, pod: Arc<LocalPod>, tcp: TcpStream, peer: SocketAddr) {
    serve_connection(&shared, &pod, tcp, peer).await;
}

/// v4-mapped addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn serve_connection(
    shared: &Arc<Shared>,
    pod: &Arc<LocalPod>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let _ = tcp.set_nodelay(true);
    let issued = match shared.certs.get(&pod.identity) {
        Ok(i) => i,
        Err(e) => {
            warn!(pod = %pod.pod.key(), "no certificate to serve HBONE with: {e}");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(issued.server.clone());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            warn!(pod = %pod.pod.key(), %peer, reason, "HBONE TLS handshake refused: {e}");
            tls_failure(
                shared,
                pod,
                peer,
                reason,
                format!("TLS handshake refused ({reason}): {e}"),
            );
            return;
        }
        Err(_) => {
            warn!(pod = %pod.pod.key(), %peer, "HBONE TLS handshake timed out");
            tls_failure(
                shared,
                pod,
                peer,
                "timeout",
                "TLS handshake timed out (timeout)".into(),
            );
            return;
        }
    };
    // Identity comes only from the client certificate (already verified).
    let src_identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| svid_identity(c, &pod.identity.trust_domain).ok());
    let Some(src_identity) = src_identity else {
        return;
    };
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2_server().handshake(tls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, "HBONE HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    // On drain: GOAWAY, so peers open no new streams here and the connection
    // closes once its streams are done (pooled peers hold idle ones open).
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = shared.drain.stopped(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((request, respond)) => {
                let shared = shared.clone();
                let pod = pod.clone();
                let src_identity = src_identity.clone();
                tokio::spawn(async move {
                    serve_stream(&shared, &pod, local, peer, src_identity, request, respond).await;
                });
            }
            Err(e) => {
                debug!(%peer, "HBONE connection ended: {e}");
                break;
            }
        }
    }
}

/// A handshake that failed: the peer is not authenticated, so only the
/// destination is labelled.
fn tls_failure(
    shared: &Shared,
    pod: &LocalPod,
    peer: SocketAddr,
    reason: &'static str,
    error: String,
) {
    shared.metrics.tls_failure("inbound", reason);
    let traffic = shared.metrics.open(&[Report {
        reporter: Reporter::Destination,
        source: &Peer::default(),
        destination: &Peer::pod(&pod.pod, &pod.identity),
        service: &ServiceName::default(),
        security: SecurityPolicy::Unknown,
    }]);
    let mut e = Entry::new("destination", peer);
    e.dst_workload = Some(pod.pod.key().to_string());
    e.dst_identity = Some(pod.identity.to_string());
    e.result = "tls";
    e.response_flags = ResponseFlags::TlsFailure;
    e.error = Some(error);
    finish(shared, e, Some(traffic));
}

/// Opens a stream's destination report. The source's workload labels come
/// from the workloads file, and only when the pod at the connection's
/// address runs as the identity its certificate proved.
fn open_traffic(
    shared: &Shared,
    pod: &LocalPod,
    peer: SocketAddr,
    src_identity: &Identity,
    target_port: u16,
) -> ConnectionTraffic {
    let source = shared
        .workloads
        .borrow()
        .pod_by_ip(canonical(peer.ip()))
        .filter(|p| shared.identity_of(p) == *src_identity)
        .map(|p| Peer::pod(p, src_identity))
        .unwrap_or_else(|| Peer::identity(src_identity));
    super::open_destination_report(shared, pod, &source, target_port, SecurityPolicy::MutualTls)
}

fn respond(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(response, true);
}

async fn serve_stream(
    shared: &Shared,
    pod: &LocalPod,
    local: SocketAddr,
    peer: SocketAddr,
    src_identity: Identity,
    http_request: http::Request<h2::RecvStream>,
    responder: SendResponse<Bytes>,
) {
    let (request_head, body) = http_request.into_parts();
    let started = Instant::now();
    let _active = shared.metrics.active("inbound");
    let mut entry = Entry::new("destination", peer);
    entry.src_identity = Some(src_identity.to_string());
    entry.dst_workload = Some(pod.pod.key().to_string());
    entry.dst_identity = Some(pod.identity.to_string());
    entry.security = "mutual_tls";
    if let Some(src) = request_head
        .headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for)
    {
        entry.src_addr = src;
    }
    let target = match connect_target(&request_head.method, &request_head.uri, local.ip()) {
        Ok(t) => t,
        Err(why) => {
            entry.result = "bad_request";
            entry.error = Some(why);
            respond(responder, StatusCode::BAD_REQUEST);
            shared.access_log.log(entry);
            return;
        }
    };
    let traffic = open_traffic(shared, pod, peer, &src_identity, target.port());
    entry.orig_dst = target.to_string();
    entry.upstream = Some(target.to_string());
    // Policy: identity from the certificate, address from the TCP peer.
    let request = Request {
        src_identity: Some(&src_identity),
        src_ip: peer.ip(),
        dst_namespace: &pod.pod.namespace,
        dst_labels: &pod.pod.labels,
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    let decision = shared.policies.decide(&request);
    note_decision(&mut entry, &decision);
    if let Decision::Deny { policy } = &decision {
        entry.result = "denied";
        entry.response_flags = ResponseFlags::Deny;
        entry.error = Some(format!("denied by {}", denied_by(policy)));
        respond(responder, StatusCode::UNAUTHORIZED);
        finish(shared, entry, Some(traffic));
        return;
    }
    let mut upstream = match super::connect_in(shared, pod, target).await {
        Ok(s) => s,
        Err(e) => {
            entry.result = e.stage();
            entry.response_flags = e.response_flags();
            entry.error = Some(format!("in pod {}: {e}", pod.pod.key()));
            respond(responder, StatusCode::SERVICE_UNAVAILABLE);
            finish(shared, entry, Some(traffic));
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut responder = responder;
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    let mut send = match responder.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            entry.result = "transfer";
            entry.error = Some(format!("HBONE stream closed before the response: {e}"));
            finish(shared, entry, Some(traffic));
            return;
        }
    };
    // While bytes flow, a new policy set may deny this connection: it is
    // then closed; allowed ones are untouched.
    let mut generation = shared.policies.subscribe();
    // A set that arrived since the first decision (during the connect) is
    // checked at once.
    generation.mark_changed();
    let copied = {
        let copy = h2io::copy(
            &mut upstream,
            &mut send,
            body,
            &traffic.server_to_client,
            &traffic.client_to_server,
        );
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => break Some(r),
                changed = generation.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let now = shared.policies.decide(&request);
                    if let Decision::Deny { policy } = now {
                        entry.policy = policy.clone();
                        entry.result = "denied";
                        entry.response_flags = ResponseFlags::Deny;
                        entry.error = Some(format!(
                            "closed: after a policy reload, denied by {}",
                            denied_by(&policy)
                        ));
                        break None;
                    }
                }
            }
        }
    };
    match copied {
        Some(Ok((to_peer, from_peer))) => {
            entry.bytes_sent = to_peer;
            entry.bytes_received = from_peer;
        }
        Some(Err(e)) => {
            send.send_reset(h2::Reason::CANCEL);
            reset_on_close(&upstream);
            entry.result = "transfer";
            entry.error = Some(e.to_string());
        }
        None => {
            send.send_reset(h2::Reason::CANCEL);
            reset_on_close(&upstream);
        }
    }
    entry.duration_ms = started.elapsed().as_millis();
    finish(shared, entry, Some(traffic));
}

/// The target of an HBONE request, or why it gets a 400: not CONNECT, an
/// authority that is not `ip:port`, or an IP that is not the pod the
/// connection arrived on (a peer may not use this pod to reach others).
pub fn connect_target(
    method: &Method,
    uri: &http::Uri,
    local_ip: IpAddr,
) -> Result<SocketAddr, String> {
    if method != Method::CONNECT {
        return Err(format!("{method} is not CONNECT"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("CONNECT {uri} has no authority"))?;
    let target: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| format!("authority {authority} is not ip:port"))?;
    if canonical(target.ip()) != canonical(local_ip) {
        return Err(format!("authority {target} is not this pod ({local_ip})"));
    }
    if target.port() == 0 {
        return Err("port 0".into());
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
    if let (Ok(m), Ok(u)) = (Method::from_bytes(method), http::Uri::try_from(uri))
        && let Ok(t) = connect_target(&m, &u, local)
    {
        assert_eq!(canonical(t.ip()), canonical(local));
        assert_eq!(m, Method::CONNECT);
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
