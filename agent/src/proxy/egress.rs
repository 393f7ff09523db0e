//! Connections from meshed pods to destinations outside the mesh: named by
//! the registry (ServiceEntry), allowed or refused by
//! `outboundTrafficPolicy`, connected under the destination's
//! DestinationRule (timeouts, `maxConnections`, keepalive, outlier
//! detection, retries on another endpoint, TLS origination).
//!
//! How a destination is named, most certain first:
//! 1. its address is a ServiceEntry's (`addresses`, STATIC endpoints);
//! 2. a TLS connection's SNI is a ServiceEntry host **and** this pod
//!    resolved that name to this address (an SNI alone proves nothing: a
//!    client may send an allowed name to any address);
//! 3. this pod resolved a ServiceEntry host to this address (its own DNS
//!    answers, recorded by the agent's DNS capture).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    ConnectionResult, LocalPod, ProxyError, ProxyInputs, SocketOptions,
    access_log::Attempt,
    balance::{Destination, Pick},
    connection::Bytes,
    metrics::{Peer, Report, Reporter, SecurityPolicy, ServiceName},
    sni::{self, Hello},
};
use crate::{
    config::OutboundMode,
    registry::{
        ConnectPolicy, EndpointAddress, Matched, OutlierPolicy, Resolution, ServiceRegistry,
    },
};

/// A pod label that tightens the agent's `outboundTrafficPolicy` for the
/// pod (it can only make it stricter).
pub const OUTBOUND_POLICY_LABEL: &str = "networking.nodemesh.dev/outbound-traffic-policy";
/// Attempts to connect, each to another endpoint, before giving up.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// How long the agent waits for a TLS client's first bytes.
const SNI_TIMEOUT: Duration = Duration::from_secs(5);
/// The port TLS is assumed on even when no ServiceEntry says so.
const HTTPS_PORT: u16 = 443;

/// The mode that applies to `pod`: the agent's, or stricter by label.
pub fn mode_for(inputs: &ProxyInputs, pod: &LocalPod) -> OutboundMode {
    match pod
        .pod
        .labels
        .get(OUTBOUND_POLICY_LABEL)
        .map(String::as_str)
    {
        Some("REGISTRY_ONLY") => OutboundMode::RegistryOnly,
        _ => inputs.config.outbound_mode,
    }
}

/// Serves a connection to `orig_dst`, an address outside the mesh.
pub async fn serve(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    client: &mut TcpStream,
    orig_dst: SocketAddr,
    result: &mut ConnectionResult,
) -> Result<(), ProxyError> {
    let registry = inputs.policies.registry();
    let mode = mode_for(inputs, pod);
    if mode == OutboundMode::AllowAny && registry.is_empty() {
        // Nothing to name or refuse: no SNI is read.
        let bytes = open(result, pod, None);
        return passthrough(inputs, pod, client, orig_dst, result, &bytes).await;
    }
    let named = classify(inputs, &registry, pod, client, orig_dst, result)
        .await
        .and_then(|m| {
            m.ok_or_else(|| ProxyError::NotInRegistry {
                dst: orig_dst,
                names: inputs
                    .dns
                    .names_of(pod.workload_id, orig_dst.ip())
                    .join(", "),
            })
        });
    let matched = match (named, mode) {
        (Ok(m), _) => m,
        (Err(refusal), OutboundMode::RegistryOnly) => {
            open(result, pod, None);
            inputs.metrics.registry_denied(refusal.reason());
            // Every refusal is in the access log; the agent's log samples
            // them, so a pod retrying in a loop cannot flood it.
            if let Some(suppressed) = inputs.limits.sampler.sample() {
                warn!(pod = %pod.pod.key(), dst = %orig_dst, suppressed, "{refusal}");
            }
            return Err(refusal);
        }
        // ALLOW_ANY: what the registry does not name passes, as it would
        // without the mesh.
        (Err(_), OutboundMode::AllowAny) => {
            let bytes = open(result, pod, None);
            return passthrough(inputs, pod, client, orig_dst, result, &bytes).await;
        }
    };
    result.entry().host = Some(matched.host.clone());
    result.entry().service = Some(matched.host.clone());
    let bytes = open(result, pod, Some(&matched));
    let policy = registry.connect_policy(&matched.host, orig_dst.port());
    let destination = Destination::Host(matched.host.clone());
    let slot = inputs
        .balancer
        .admit(&destination, policy.max_connections)
        .ok_or_else(|| ProxyError::UpstreamOverflow {
            destination: matched.host.clone(),
            max: policy.max_connections.unwrap_or(0),
            rule: policy.rule.clone().unwrap_or_default(),
        })?;
    result.hold(slot);
    let endpoints = endpoints(inputs, &matched, orig_dst).await?;
    let upstream = connect(inputs, pod, &destination, &endpoints, &policy, result).await?;
    match &policy.tls {
        Some(tls) => {
            result.entry().security = "tls_originated";
            let sni = tls.sni.clone().unwrap_or_else(|| matched.host.clone());
            let (sent, received) = originated(
                inputs,
                client,
                upstream,
                tls.config.clone(),
                &sni,
                &policy,
                &bytes,
            )
            .await?;
            result.transferred(sent, received);
        }
        None => {
            let (sent, received) =
                super::splice_rechecked(inputs, client, &upstream, &bytes, None).await?;
            result.transferred(sent, received);
        }
    }
    Ok(())
}

/// Names the destination from the registry; `Ok(None)` when nothing names
/// it, `Err` for a TLS client whose SNI is refused (the reason given).
async fn classify(
    inputs: &ProxyInputs,
    registry: &ServiceRegistry,
    pod: &LocalPod,
    client: &TcpStream,
    orig_dst: SocketAddr,
    result: &mut ConnectionResult,
) -> Result<Option<Matched>, ProxyError> {
    if let Some(m) = registry.by_address(orig_dst) {
        return Ok(Some(m));
    }
    let port = orig_dst.port();
    let ip = orig_dst.ip();
    let resolved = inputs.dns.names_of(pod.workload_id, ip);
    if registry.is_tls_port(port) || port == HTTPS_PORT {
        let hello = sni::peek(client, SNI_TIMEOUT).await;
        inputs.metrics.sni_peeked();
        if let Hello::Sni(name) = hello {
            result.entry().sni = Some(name.clone());
            let Some(m) = registry.by_name(&name, port) else {
                return Err(ProxyError::SniNotInRegistry {
                    sni: name,
                    dst: orig_dst,
                });
            };
            if !resolved.contains(&name) {
                return Err(ProxyError::SniNotResolved {
                    sni: name,
                    dst: orig_dst,
                    resolved: resolved.join(", "),
                });
            }
            return Ok(Some(m));
        }
    }
    Ok(resolved.iter().find_map(|n| registry.by_name(n, port)))
}

/// Opens the connection's Istio series; the destination service is the
/// registry host (as Istio names a ServiceEntry's: host, name = host,
/// namespace = the entry's).
fn open(result: &mut ConnectionResult, src: &LocalPod, matched: Option<&Matched>) -> Bytes {
    let source = Peer::pod(&src.pod, &src.identity);
    let destination = Peer::default();
    let service = matched
        .map(|m| ServiceName {
            host: m.host.as_str().into(),
            name: m.host.as_str().into(),
            namespace: m.entry.namespace.as_str().into(),
        })
        .unwrap_or_default();
    result.open(&[Report {
        reporter: Reporter::Source,
        source: &source,
        destination: &destination,
        service: &service,
        security: SecurityPolicy::Unknown,
    }])
}

/// The addresses to connect to for a registry match.
async fn endpoints(
    inputs: &ProxyInputs,
    matched: &Matched,
    orig_dst: SocketAddr,
) -> Result<Vec<SocketAddr>, ProxyError> {
    let entry = &matched.entry;
    let port = &matched.port;
    let target = port.target_port.unwrap_or(port.number);
    let mut out = Vec::new();
    match entry.resolution {
        Resolution::None => out.push(SocketAddr::new(orig_dst.ip(), target)),
        Resolution::Static => {
            for ep in &entry.endpoints {
                if let EndpointAddress::Ip(ip) = ep.address {
                    out.push(SocketAddr::new(ip, ep.port_for(port)));
                }
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let names: Vec<(String, u16)> = if entry.endpoints.is_empty() {
                vec![(matched.host.clone(), target)]
            } else {
                entry
                    .endpoints
                    .iter()
                    .map(|ep| match &ep.address {
                        EndpointAddress::Name(n) => (n.clone(), ep.port_for(port)),
                        EndpointAddress::Ip(ip) => (ip.to_string(), ep.port_for(port)),
                    })
                    .collect()
            };
            for (name, p) in names {
                let ips: Vec<IpAddr> = match name.parse::<IpAddr>() {
                    Ok(ip) => vec![ip],
                    Err(_) => inputs.resolver.resolve(&name).await.map_err(|reason| {
                        ProxyError::Resolve {
                            host: name.clone(),
                            reason,
                        }
                    })?,
                };
                let take = match entry.resolution {
                    // One address of each answer at a time (Envoy's
                    // LOGICAL_DNS).
                    Resolution::DnsRoundRobin => 1,
                    _ => ips.len(),
                };
                out.extend(ips.into_iter().take(take).map(|ip| SocketAddr::new(ip, p)));
            }
        }
    }
    if out.is_empty() {
        return Err(ProxyError::NoEndpoints {
            service: matched.host.clone(),
        });
    }
    Ok(out)
}

/// The agent's socket options with a DestinationRule's over them.
pub fn socket_options(inputs: &ProxyInputs, policy: &ConnectPolicy) -> SocketOptions {
    let mut options = inputs.config.sockets.clone();
    if let Some(t) = policy.connect_timeout {
        options.connect_timeout = t;
    }
    if let Some(k) = policy.keepalive {
        let mut ka = socket2::TcpKeepalive::new();
        if let Some(t) = k.time {
            ka = ka.with_time(t);
        }
        if let Some(i) = k.interval {
            ka = ka.with_interval(i);
        }
        if let Some(p) = k.probes {
            ka = ka.with_retries(p);
        }
        options.keepalive = Some(ka);
    }
    options
}

/// Connects to one of `endpoints`, from inside the pod, retrying on
/// another endpoint after a failure (at most [`MAX_CONNECT_ATTEMPTS`],
/// within the destination's retry budget). Every attempt is in the access
/// log; the balancer hears each outcome.
pub async fn connect<E: super::balance::Balanced>(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    destination: &Destination,
    endpoints: &[E],
    policy: &ConnectPolicy,
    result: &mut ConnectionResult,
) -> Result<TcpStream, ProxyError> {
    let options = socket_options(inputs, policy);
    let outlier = policy.outlier.as_ref();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut pick: Pick<E> = inputs
        .balancer
        .pick(destination, endpoints, &tried, outlier)
        .ok_or_else(|| ProxyError::NoEndpoints {
            service: destination.to_string(),
        })?;
    loop {
        let addr = pick.addr();
        tried.push(addr);
        result.entry().upstream = Some(addr.to_string());
        let started = tokio::time::Instant::now();
        let attempt = super::connect_from(pod, addr, &options).await;
        let error = match attempt {
            Ok(stream) => {
                pick.connected();
                result
                    .entry()
                    .attempts
                    .push(Attempt::ok(addr, started.elapsed()));
                return Ok(stream);
            }
            Err(e) => e,
        };
        pick = after_connect_failure(
            inputs,
            destination,
            endpoints,
            &tried,
            outlier,
            &pick,
            started.elapsed(),
            error,
            result,
        )?;
    }
}

/// After a failed connect to `failed` (the endpoints tried so far in
/// `tried`): the balancer hears it (outlier detection), the attempt goes
/// into the access log, and another endpoint is picked if the attempts
/// left and the destination's retry budget allow; else the connection's
/// error. The one retry decision of the mesh and egress paths.
#[allow(clippy::too_many_arguments)]
pub fn after_connect_failure<E: super::balance::Balanced>(
    inputs: &ProxyInputs,
    destination: &Destination,
    endpoints: &[E],
    tried: &[SocketAddr],
    outlier: Option<&OutlierPolicy>,
    failed: &Pick<E>,
    took: Duration,
    error: ProxyError,
    result: &mut ConnectionResult,
) -> Result<Pick<E>, ProxyError> {
    let ejected = failed.connect_failed();
    debug!(%destination, endpoint = %failed.addr(), ejected, "connect attempt failed: {error}");
    result
        .entry()
        .attempts
        .push(Attempt::failed(failed.addr(), took, &error, ejected));
    if tried.len() >= MAX_CONNECT_ATTEMPTS {
        return Err(unreachable(destination, result, error));
    }
    inputs
        .balancer
        .retry(destination, endpoints, tried, outlier)
        .map_err(|why| {
            result.entry().retry_stopped = Some(why.as_str());
            unreachable(destination, result, error)
        })
}

/// The error of a connection whose every attempt failed: the one attempt's
/// own, or all of them in one line.
fn unreachable(
    destination: &Destination,
    result: &mut ConnectionResult,
    last: ProxyError,
) -> ProxyError {
    let attempts = &result.entry().attempts;
    if attempts.len() <= 1 {
        return last;
    }
    ProxyError::Unreachable {
        destination: destination.to_string(),
        attempts: attempts
            .iter()
            .map(|a| format!("{}: {}", a.endpoint, a.error.as_deref().unwrap_or("ok")))
            .collect::<Vec<_>>()
            .join("; "),
        last: Box::new(last),
    }
}

/// ALLOW_ANY to an unknown destination: straight through, as without the
/// mesh (still counted and logged).
async fn passthrough(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    client: &TcpStream,
    orig_dst: SocketAddr,
    result: &mut ConnectionResult,
    bytes: &Bytes,
) -> Result<(), ProxyError> {
    result.entry().upstream = Some(orig_dst.to_string());
    let upstream = super::connect_in(inputs, pod, orig_dst).await?;
    let (sent, received) = super::splice_rechecked(inputs, client, &upstream, bytes, None).await?;
    result.transferred(sent, received);
    Ok(())
}

/// TLS to the third party for an app that speaks plain text: the handshake
/// (within the connect timeout) verifies the server's certificate for
/// `sni`; then bytes are copied, counted as they flow.
async fn originated(
    inputs: &ProxyInputs,
    client: &mut TcpStream,
    upstream: TcpStream,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
    policy: &ConnectPolicy,
    bytes: &Bytes,
) -> Result<(u64, u64), ProxyError> {
    let addr = upstream.peer_addr().map_err(ProxyError::Transfer)?;
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| ProxyError::OriginationTls {
        host: sni.to_owned(),
        addr,
        code: "bad_name",
        reason: e.to_string(),
    })?;
    let timeout = policy
        .connect_timeout
        .unwrap_or(inputs.config.sockets.connect_timeout);
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake = tokio::time::timeout(timeout, connector.connect(name, upstream)).await;
    let tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let code = crate::tls::failure_reason(&e);
            return Err(ProxyError::OriginationTls {
                host: sni.to_owned(),
                addr,
                code,
                reason: e.to_string(),
            });
        }
        Err(_) => {
            return Err(ProxyError::OriginationTls {
                host: sni.to_owned(),
                addr,
                code: "timeout",
                reason: format!("no handshake in {} ms", timeout.as_millis()),
            });
        }
    };
    let (_, session) = tls.get_ref();
    let (group, suite) = crate::tls::negotiated(session);
    debug!(host = sni, %addr, group, suite, "TLS originated");
    copy_counted(client, tls, bytes)
        .await
        .map_err(ProxyError::Transfer)
}

/// Both directions between a plain socket and a TLS stream, with
/// half-closes carried, until both end.
async fn copy_counted<S>(
    client: &mut TcpStream,
    upstream: S,
    bytes: &Bytes,
) -> std::io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let (mut client_read, mut client_write) = client.split();
    let to_upstream = async {
        let n = copy_one(&mut client_read, &mut up_write, &bytes.client_to_server).await?;
        up_write.shutdown().await?;
        Ok::<u64, std::io::Error>(n)
    };
    let to_client = async {
        let n = copy_one(&mut up_read, &mut client_write, &bytes.server_to_client).await?;
        client_write.shutdown().await?;
        Ok::<u64, std::io::Error>(n)
    };
    tokio::try_join!(to_upstream, to_client)
}

async fn copy_one<R, W>(
    r: &mut R,
    w: &mut W,
    count: &super::metrics::ByteCount,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        count.add(n);
        total += n as u64;
    }
}
