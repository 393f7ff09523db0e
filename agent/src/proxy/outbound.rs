//! The outbound listener in each enrolled pod: accepts what the kernel
//! redirected, finds the original destination and the source workload in
//! the maps, and forwards the bytes from inside the source pod's netns:
//! over HBONE to pods on other nodes, as plain TCP to pods on this node
//! (this agent decides their policy); destinations outside the mesh go
//! through the egress registry (`egress`).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use nodemesh_common::{
    AF_INET, FlowKey, SockKey,
    user::{ip_to_words, words_to_ip},
};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    ConnectionResult, LocalPod, ProxyError, ProxyInputs,
    access_log::Attempt,
    balance::{Destination, Pick},
    connection::Bytes,
    h2io,
    inbound::HBONE_PORT,
    metrics::{Peer, Report, Reporter, SecurityPolicy, ServiceName},
    pool::StreamGuard,
    reset_on_close,
};
use crate::{
    policy::{Decision, Request},
    state::{Endpoint, Pod, Resolved, ServiceKey},
};

/// Serves one redirected connection.
pub async fn serve(
    inputs: Arc<ProxyInputs>,
    pod: Arc<LocalPod>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let mut result = ConnectionResult::new(&inputs, Reporter::Source, "outbound", peer);
    result.entry().src_workload = Some(pod.pod.key().to_string());
    result.entry().src_identity = Some(pod.identity.to_string());
    let _admitted = match inputs.limits.admit("outbound", Some(pod.workload_id), None) {
        Ok(a) => a,
        Err(e) => {
            super::shed(&inputs, &mut result, &e, &pod);
            reset_on_close(&client);
            return;
        }
    };
    if let Err(e) = proxy(&inputs, &pod, &mut client, peer, &mut result).await {
        match &e {
            ProxyError::NotRedirected | ProxyError::WrongPod { .. } => {
                warn!(pod = %pod.pod.key(), %peer, "{e}")
            }
            _ => debug!(pod = %pod.pod.key(), dst = %result.entry().orig_dst, "{e}"),
        }
        result.fail(&e);
        // Tell the app it failed: a reset, not a clean close.
        reset_on_close(&client);
    }
}

/// Where the application was connecting to, from the connect hook's record.
fn original_destination(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    let key = FlowKey {
        netns_cookie: pod.netns_cookie,
        src_addr: ip_to_words(peer.ip()),
        dst_addr: ip_to_words(local.ip()),
        src_port: peer.port(),
        dst_port: local.port(),
        _pad: 0,
    };
    let orig = inputs.datapath.orig_dst(&key);
    inputs.metrics.orig_dst_lookup(orig.is_some());
    let orig = orig.ok_or(ProxyError::NotRedirected)?;
    if orig.workload_id != pod.workload_id {
        return Err(ProxyError::WrongPod {
            recorded: orig.workload_id,
            pod: pod.pod.key().to_string(),
        });
    }
    let ip = match words_to_ip(orig.addr) {
        IpAddr::V6(v6) if orig.family == AF_INET => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        other => other,
    };
    Ok(SocketAddr::new(ip, orig.port))
}

/// Where a connection goes: one endpoint, or one attempt's pick.
struct Target {
    /// The address the agent connects to (an endpoint, for a service).
    addr: SocketAddr,
    /// The destination pod, when it is in the mesh.
    pod: Option<Arc<Pod>>,
    service: Option<ServiceKey>,
}

/// What the app connected to, as the mesh knows it.
enum Candidates {
    /// A service's endpoints, balanced, retried.
    Service {
        service: ServiceKey,
        endpoints: Vec<Endpoint>,
    },
    /// One pod, by its address.
    Pod { pod: Arc<Pod>, addr: SocketAddr },
}

/// A connected upstream: plain TCP, or an HBONE stream.
enum Upstream {
    Direct(TcpStream),
    Hbone {
        send: h2::SendStream<bytes::Bytes>,
        recv: h2::RecvStream,
        addr: SocketAddr,
        _guard: StreamGuard,
    },
}

async fn proxy(
    inputs: &ProxyInputs,
    pod: &Arc<LocalPod>,
    client: &mut TcpStream,
    peer: SocketAddr,
    result: &mut ConnectionResult,
) -> Result<(), ProxyError> {
    let local = client.local_addr().map_err(ProxyError::Transfer)?;
    let orig_dst = original_destination(inputs, pod, peer, local)?;
    result.entry().orig_dst = orig_dst.to_string();
    if orig_dst.port() == nodemesh_common::DNS_SERVER_PORT && inputs.config.dns_capture {
        // DNS over TCP: answered by the agent's DNS proxy, as UDP is.
        super::dns::serve_tcp(inputs, pod, client).await;
        return Ok(());
    }

    if inputs.config.sockmap {
        // Before the agent writes anything, so all its writes take the
        // fast path in order.
        let sk = SockKey {
            local_addr: ip_to_words(local.ip()),
            remote_addr: ip_to_words(peer.ip()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(peer.port()),
        };
        if let Err(e) = inputs.datapath.add_to_sockhash(sk, &*client) {
            debug!("sockhash insert: {e}");
        }
    }
    let _ = client.set_nodelay(true);

    let candidates = match inputs.workloads.resolve(orig_dst) {
        Resolved::External { addr } => {
            return super::egress::serve(inputs, pod, client, addr, result).await;
        }
        Resolved::Service { service, endpoints } => Candidates::Service { service, endpoints },
        Resolved::Pod { pod, addr } => Candidates::Pod { pod, addr },
    };
    let (target, upstream) =
        connect(inputs, pod, client, peer, orig_dst, candidates, result).await?;
    let bytes = open_traffic(inputs, result, pod, &target);
    match upstream {
        Upstream::Hbone {
            mut send,
            recv,
            addr,
            _guard,
        } => {
            let copied = h2io::copy(
                client,
                &mut send,
                recv,
                &bytes.client_to_server,
                &bytes.server_to_client,
            )
            .await;
            match copied {
                Ok((sent, received)) => {
                    result.transferred(sent, received);
                    Ok(())
                }
                Err(e) => {
                    send.send_reset(h2::Reason::CANCEL);
                    debug!(hbone = %addr, "HBONE stream failed: {e}");
                    Err(ProxyError::Transfer(e))
                }
            }
        }
        Upstream::Direct(upstream) => {
            let same_node = target
                .pod
                .as_ref()
                .is_some_and(|p| inputs.workloads.is_local(p));
            // A policy reload may deny a same-node connection while it is
            // open.
            let recheck = |dst: &Pod| match decide_local(inputs, pod, dst, target.addr, peer) {
                Decision::Deny { policy } => Err(ProxyError::Denied { policy }),
                Decision::Allow { .. } => Ok(()),
            };
            let recheck_dst = target
                .pod
                .as_deref()
                .filter(|_| same_node)
                .map(|dst| move || recheck(dst));
            // In-kernel splice: measured to halve the agent's CPU per GiB
            // against a userspace copy (docs/architecture.md).
            let (sent, received) = super::splice_rechecked(
                inputs,
                client,
                &upstream,
                &bytes,
                recheck_dst.as_ref().map(|f| f as super::Recheck<'_>),
            )
            .await?;
            result.transferred(sent, received);
            Ok(())
        }
    }
}

/// Connects to the destination: a service's endpoint (retried on another
/// one after a connect failure, within the DestinationRule's limits and
/// the retry budget) or a pod. Every attempt is in the access log. A
/// failure opens the connection's series first, so it is counted.
#[allow(clippy::too_many_arguments)]
async fn connect(
    inputs: &ProxyInputs,
    pod: &Arc<LocalPod>,
    client: &TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    candidates: Candidates,
    result: &mut ConnectionResult,
) -> Result<(Target, Upstream), ProxyError> {
    let (service, endpoints) = match candidates {
        Candidates::Pod { pod: dst, addr } => {
            let target = Target {
                addr,
                pod: Some(dst),
                service: None,
            };
            let attempt = attempt(
                inputs,
                pod,
                client,
                peer,
                &target,
                &inputs.config.sockets,
                result,
            )
            .await;
            if attempt.is_err() {
                open_traffic(inputs, result, pod, &target);
            }
            return attempt.map(|u| (target, u));
        }
        Candidates::Service { service, endpoints } => (service, endpoints),
    };
    result.entry().service = Some(service.to_string());
    let policy = inputs
        .policies
        .registry()
        .connect_policy(&service.host(), orig_dst.port());
    let options = super::egress::socket_options(inputs, &policy);
    let destination = Destination::Service(service.clone());
    let outlier = policy.outlier.as_ref();
    let first = inputs
        .balancer
        .pick(&destination, &endpoints, &[], outlier)
        .ok_or_else(|| ProxyError::NoEndpoints {
            service: service.to_string(),
        })?;
    let target_of = |pick: &Pick<Endpoint>| Target {
        addr: pick.endpoint.addr,
        pod: Some(pick.endpoint.pod.clone()),
        service: Some(service.clone()),
    };
    let Some(slot) = inputs.balancer.admit(&destination, policy.max_connections) else {
        open_traffic(inputs, result, pod, &target_of(&first));
        return Err(ProxyError::UpstreamOverflow {
            destination: service.to_string(),
            max: policy.max_connections.unwrap_or(0),
            rule: policy.rule.clone().unwrap_or_default(),
        });
    };
    result.hold(slot);
    let mut tried = Vec::new();
    let mut pick = first;
    loop {
        let target = target_of(&pick);
        tried.push(target.addr);
        let started = tokio::time::Instant::now();
        let error = match attempt(inputs, pod, client, peer, &target, &options, result).await {
            Ok(upstream) => {
                pick.connected();
                if tried.len() > 1 {
                    result
                        .entry()
                        .attempts
                        .push(Attempt::ok(target.addr, started.elapsed()));
                }
                return Ok((target, upstream));
            }
            Err(e) => e,
        };
        if !error.is_connect_failure() {
            open_traffic(inputs, result, pod, &target);
            return Err(error);
        }
        let next = super::egress::after_connect_failure(
            inputs,
            &destination,
            &endpoints,
            &tried,
            outlier,
            &pick,
            started.elapsed(),
            error,
            result,
        );
        match next {
            Ok(p) => pick = p,
            Err(e) => {
                open_traffic(inputs, result, pod, &target);
                return Err(e);
            }
        }
    }
}

/// One connect attempt to `target`: the per-endpoint checks (agent ports,
/// this node's policy for a pod on this node), then TCP or HBONE.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    inputs: &ProxyInputs,
    pod: &Arc<LocalPod>,
    client: &TcpStream,
    peer: SocketAddr,
    target: &Target,
    options: &super::SocketOptions,
    result: &mut ConnectionResult,
) -> Result<Upstream, ProxyError> {
    // A mesh pod's agent ports are the agent's own: reaching one would
    // re-enter it (an HBONE inside HBONE).
    if target.pod.is_some() && inputs.config.agent_ports.contains(&target.addr.port()) {
        return Err(ProxyError::ReentersAgent {
            what: format!("a connection to {}, an agent port", target.addr),
        });
    }
    let same_node = target
        .pod
        .as_ref()
        .is_some_and(|p| inputs.workloads.is_local(p));
    result.entry().upstream = Some(target.addr.to_string());
    if let Some(p) = &target.pod {
        result.entry().dst_workload = Some(p.key().to_string());
        result.entry().dst_identity = Some(inputs.identity_of(p).to_string());
        // A pod on this node: this agent is also its destination agent.
        if same_node {
            let decision = decide_local(inputs, pod, p, target.addr, peer);
            result.decided(&decision);
            if let Decision::Deny { policy } = decision {
                return Err(ProxyError::Denied { policy });
            }
        }
    }
    match &target.pod {
        // Pods on other nodes are reached through HBONE.
        Some(dst) if !same_node => hbone(inputs, pod, client, target, dst, result).await,
        // Pods on this node, from inside that pod (over its loopback, so
        // its inbound capture does not take the connection for a plaintext
        // client; identity and policy were settled above).
        _ => {
            let dst_local = target
                .pod
                .as_ref()
                .filter(|_| same_node)
                .and_then(|d| inputs.local_pods.load().get(&d.key()).cloned());
            let from = dst_local.as_deref().unwrap_or(pod);
            super::connect_from(from, target.addr, options)
                .await
                .map(Upstream::Direct)
        }
    }
}

/// Opens the connection's Istio series: the source report, and for a pod on
/// this node the destination report too (this agent is both; as ztunnel
/// does for same-node traffic).
fn open_traffic(
    inputs: &ProxyInputs,
    result: &mut ConnectionResult,
    src: &LocalPod,
    target: &Target,
) -> Bytes {
    let same_node = target
        .pod
        .as_ref()
        .is_some_and(|p| inputs.workloads.is_local(p));
    let source = Peer::pod(&src.pod, &src.identity);
    let destination = target
        .pod
        .as_ref()
        .map(|p| Peer::pod(p, &inputs.identity_of(p)))
        .unwrap_or_default();
    let service = target
        .service
        .as_ref()
        .map(ServiceName::of)
        .unwrap_or_default();
    let report = |reporter, security| Report {
        reporter,
        source: &source,
        destination: &destination,
        service: &service,
        security,
    };
    // HBONE is mutual TLS from both ends (ztunnel reports it so).
    let source_security = if target.pod.is_some() && !same_node {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::Unknown
    };
    let mut reports = vec![report(Reporter::Source, source_security)];
    if same_node {
        reports.push(report(Reporter::Destination, SecurityPolicy::None));
    }
    result.open(&reports)
}

/// The decision for a connection to a pod on this node (this agent is its
/// destination agent too).
fn decide_local(
    inputs: &ProxyInputs,
    src: &LocalPod,
    dst: &Pod,
    addr: SocketAddr,
    peer: SocketAddr,
) -> Decision {
    inputs.policies.decide(&Request {
        src_identity: Some(&src.identity),
        src_ip: src.ip_like(addr.ip()).unwrap_or(peer.ip()),
        dst_namespace: &dst.namespace,
        dst_labels: &dst.labels,
        dst_ip: addr.ip(),
        dst_port: addr.port(),
    })
}

/// HTTP/2 CONNECT over mutual TLS to the destination pod's agent
/// (`<pod IP>:15008`), on a pooled connection, up to the destination's
/// answer; a 503 (it could not reach its pod) is a connect failure of
/// this endpoint, as a refused direct connect would be.
async fn hbone(
    inputs: &ProxyInputs,
    pod: &Arc<LocalPod>,
    client: &TcpStream,
    target: &Target,
    dst: &Pod,
    result: &mut ConnectionResult,
) -> Result<Upstream, ProxyError> {
    result.entry().security = "mutual_tls";
    let peer = client.peer_addr().map_err(ProxyError::Transfer)?;
    let expected = inputs.identity_of(dst);
    let hbone_addr = SocketAddr::new(target.addr.ip(), HBONE_PORT);
    let (mut sender, guard) = inputs.pool.sender(pod, hbone_addr, &expected).await?;
    // The app's address as the pod has it (it connected from loopback).
    let src_ip = pod.ip_like(target.addr.ip()).unwrap_or(peer.ip());
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.addr.to_string())
        .header(
            "forwarded",
            format!("for=\"{}\"", SocketAddr::new(src_ip, peer.port())),
        )
        .header(
            "baggage",
            format!(
                "k8s.namespace.name={},k8s.pod.name={},service.name={}",
                pod.pod.namespace,
                pod.pod.name,
                pod.pod.app()
            ),
        )
        .body(())
        .map_err(|e| ProxyError::Transfer(std::io::Error::other(e)))?;
    let hbone_error = |source| ProxyError::Hbone {
        addr: hbone_addr,
        source,
    };
    let (response, mut send) = sender.send_request(request, false).map_err(hbone_error)?;
    let response = response.await.map_err(hbone_error)?;
    if response.status() != http::StatusCode::OK {
        send.send_reset(h2::Reason::CANCEL);
        return Err(ProxyError::HboneStatus {
            addr: hbone_addr,
            status: response.status().as_u16(),
        });
    }
    Ok(Upstream::Hbone {
        send,
        recv: response.into_body(),
        addr: hbone_addr,
        _guard: guard,
    })
}
