//! The outbound listener in each enrolled pod: accepts what the kernel
//! redirected, finds the original destination and the source workload in
//! the maps, and forwards the bytes from inside the source pod's netns:
//! over HBONE to pods on other nodes, as plain TCP to pods on this node
//! (this agent decides their policy) and to destinations outside the mesh.
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
    balance::Pick,
    connection::Bytes,
    h2io,
    inbound::HBONE_PORT,
    metrics::{Peer, Report, Reporter, SecurityPolicy, ServiceName},
    reset_on_close,
};
use crate::{
    policy::{Decision, Request},
    state::{Pod, Resolved, ServiceKey},
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

/// Where a connection goes once resolved.
struct Target {
    /// The address the agent connects to (an endpoint, for a service).
    addr: SocketAddr,
    /// The destination pod, when it is in the mesh.
    pod: Option<Arc<Pod>>,
    service: Option<ServiceKey>,
    /// The balancer's pick, for a service.
    pick: Option<Pick>,
}

fn resolve(inputs: &ProxyInputs, orig_dst: SocketAddr) -> Result<Target, ProxyError> {
    Ok(match inputs.workloads.resolve(orig_dst) {
        Resolved::Service { service, endpoints } => {
            let pick = inputs.balancer.pick(&service, &endpoints).ok_or_else(|| {
                ProxyError::NoEndpoints {
                    service: service.to_string(),
                }
            })?;
            Target {
                addr: pick.endpoint.addr,
                pod: Some(pick.endpoint.pod.clone()),
                service: Some(service),
                pick: Some(pick),
            }
        }
        Resolved::Pod { pod, addr } => Target {
            addr,
            pod: Some(pod),
            service: None,
            pick: None,
        },
        Resolved::External { addr } => Target {
            addr,
            pod: None,
            service: None,
            pick: None,
        },
    })
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

    let target = resolve(inputs, orig_dst)?;
    // A mesh pod's agent ports are the agent's own: reaching one would
    // re-enter it (an HBONE inside HBONE).
    if target.pod.is_some() && inputs.config.agent_ports.contains(&target.addr.port()) {
        return Err(ProxyError::ReentersAgent {
            what: format!("a connection to {}, an agent port", target.addr),
        });
    }
    if let Some(service) = &target.service {
        result.entry().service = Some(service.to_string());
    }
    let same_node = target
        .pod
        .as_ref()
        .is_some_and(|p| inputs.workloads.is_local(p));
    let mut denied = None;
    if let Some(p) = &target.pod {
        result.entry().dst_workload = Some(p.key().to_string());
        result.entry().dst_identity = Some(inputs.identity_of(p).to_string());
        // A pod on this node: this agent is also its destination agent.
        if same_node {
            let decision = decide_local(inputs, pod, p, target.addr, peer);
            result.decided(&decision);
            if let Decision::Deny { policy } = decision {
                denied = Some(policy);
            }
        }
    }
    let bytes = open_traffic(inputs, result, pod, &target, same_node);
    if let Some(policy) = denied {
        return Err(ProxyError::Denied { policy });
    }
    result.entry().upstream = Some(target.addr.to_string());
    match &target.pod {
        // Pods on other nodes are reached through HBONE.
        Some(dst) if !same_node => hbone(inputs, pod, client, &target, dst, result, &bytes).await,
        // Pods on this node and destinations outside the mesh directly.
        _ => {
            direct(
                inputs, pod, client, &target, peer, same_node, result, &bytes,
            )
            .await
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
    same_node: bool,
) -> Bytes {
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

/// The balancer hears how connecting to its pick went.
fn report_connect<T>(pick: Option<&Pick>, r: &Result<T, ProxyError>) {
    if let Some(pick) = pick {
        match r {
            Ok(_) => pick.connected(),
            Err(_) => pick.connect_failed(),
        }
    }
}

/// Plain TCP from inside a pod: same-node pods and destinations outside
/// the mesh.
#[allow(clippy::too_many_arguments)]
async fn direct(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    client: &TcpStream,
    target: &Target,
    peer: SocketAddr,
    same_node: bool,
    result: &mut ConnectionResult,
    bytes: &Bytes,
) -> Result<(), ProxyError> {
    // To an enrolled pod on this node: from inside that pod, over its
    // loopback, so its inbound capture does not take the connection for a
    // plaintext client (identity and policy were settled above).
    let dst_local = target
        .pod
        .as_ref()
        .filter(|_| same_node)
        .and_then(|d| inputs.local_pods.load().get(&d.key()).cloned());
    let upstream =
        super::connect_in(inputs, dst_local.as_deref().unwrap_or(pod), target.addr).await;
    report_connect(target.pick.as_ref(), &upstream);
    let upstream = upstream?;
    // In-kernel splice: measured to halve the agent's CPU per GiB against a
    // userspace copy (docs/architecture.md). Half-close is carried both ways.
    // A policy reload may deny a same-node connection while it is open.
    let recheck = |dst: &Pod| match decide_local(inputs, pod, dst, target.addr, peer) {
        Decision::Deny { policy } => Err(ProxyError::Denied { policy }),
        Decision::Allow { .. } => Ok(()),
    };
    let recheck_dst = target
        .pod
        .as_deref()
        .filter(|_| same_node)
        .map(|dst| move || recheck(dst));
    let (sent, received) = super::splice_rechecked(
        inputs,
        client,
        &upstream,
        bytes,
        recheck_dst.as_ref().map(|f| f as super::Recheck<'_>),
    )
    .await?;
    result.transferred(sent, received);
    Ok(())
}

/// HTTP/2 CONNECT over mutual TLS to the destination pod's agent
/// (`<pod IP>:15008`), on a pooled connection.
async fn hbone(
    inputs: &ProxyInputs,
    pod: &Arc<LocalPod>,
    client: &mut TcpStream,
    target: &Target,
    dst: &Pod,
    result: &mut ConnectionResult,
    bytes: &Bytes,
) -> Result<(), ProxyError> {
    result.entry().security = "mutual_tls";
    let peer = client.peer_addr().map_err(ProxyError::Transfer)?;
    let expected = inputs.identity_of(dst);
    let hbone_addr = SocketAddr::new(target.addr.ip(), HBONE_PORT);
    let sender = inputs.pool.sender(pod, hbone_addr, &expected).await;
    if sender.is_err() {
        report_connect(target.pick.as_ref(), &sender);
    }
    let (mut sender, _stream) = sender?;
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
    let response = response.await.map_err(hbone_error);
    let status = response.as_ref().map(|r| r.status().as_u16());
    // The destination could not reach its pod: a connect failure of this
    // endpoint, as a refused direct connect would be.
    let connected: Result<(), ProxyError> = match status {
        Ok(503) => Err(ProxyError::HboneStatus {
            addr: hbone_addr,
            status: 503,
        }),
        _ => Ok(()),
    };
    report_connect(target.pick.as_ref(), &connected);
    let response = response?;
    if response.status() != http::StatusCode::OK {
        send.send_reset(h2::Reason::CANCEL);
        return Err(ProxyError::HboneStatus {
            addr: hbone_addr,
            status: response.status().as_u16(),
        });
    }
    match h2io::copy(
        client,
        &mut send,
        response.into_body(),
        &bytes.client_to_server,
        &bytes.server_to_client,
    )
    .await
    {
        Ok((sent, received)) => {
            result.transferred(sent, received);
            Ok(())
        }
        Err(e) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(ProxyError::Transfer(e))
        }
    }
}
