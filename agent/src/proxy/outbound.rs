//! The outbound listener in each enrolled pod: accepts what the kernel
//! redirected, finds the original destination and the source workload in
//! the maps, and forwards the bytes from inside the source pod's netns.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use nodemesh_common::{
    AF_INET, FlowKey, SockKey,
    user::{ip_to_words, words_to_ip},
};
use tokio::{net::TcpStream, sync::watch};
use tracing::{debug, warn};

use super::{ProxyError, finish, h2io, inbound::HBONE_PORT, pool::Pool};
use crate::{
    access_log::{AccessLog, Entry},
    drain::Drain,
    ebpf::Kernel,
    identity::{CertStore, Identity},
    inpod::PodNetns,
    metrics::{
        ByteCount, ConnectionTraffic, Metrics, Peer, Report, Reporter, SecurityPolicy, ServiceName,
    },
    policy::{Decision, PolicyStore, Request},
    state::{Pod, PodKey, Resolved, Workloads},
};

/// What every connection needs, shared by all pods.
pub struct Shared {
    pub kernel: Arc<Kernel>,
    pub workloads: watch::Receiver<Arc<Workloads>>,
    pub access_log: AccessLog,
    pub drain: Drain,
    pub socket_mark: u32,
    pub sockmap: bool,
    pub connect_timeout: std::time::Duration,
    pub trust_domain: String,
    pub certs: Arc<CertStore>,
    pub pool: Arc<Pool>,
    pub policies: Arc<PolicyStore>,
    /// Plaintext sources that skip inbound checks (`inboundExemptSources`).
    pub inbound_exempt_sources: Vec<crate::policy::IpBlock>,
    /// This node's enrolled pods, republished by enrolment.
    pub local_pods: arc_swap::ArcSwap<std::collections::HashMap<PodKey, Arc<LocalPod>>>,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn identity_of(&self, pod: &Pod) -> Identity {
        Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account)
    }
}

/// An enrolled pod as the data path sees it.
pub struct LocalPod {
    pub pod: Pod,
    pub identity: Identity,
    pub workload_id: u32,
    pub netns_cookie: u64,
    pub netns: PodNetns,
}

/// Serves one redirected connection.
pub async fn serve(shared: Arc<Shared>, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    handle(&shared, &pod, client, peer).await;
}

async fn handle(shared: &Shared, pod: &LocalPod, mut client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _active = shared.metrics.active("outbound");
    let mut entry = Entry::new("source", peer);
    entry.src_workload = Some(pod.pod.key().to_string());
    entry.src_identity = Some(pod.identity.to_string());
    let mut traffic = None;
    let outcome = proxy(shared, pod, &mut client, peer, &mut entry, &mut traffic).await;
    entry.duration_ms = started.elapsed().as_millis();
    if let Err(e) = outcome {
        if let ProxyError::Tls { code, .. } = &e {
            shared.metrics.tls_failure("outbound", code);
        }
        match &e {
            ProxyError::NotRedirected | ProxyError::WrongPod { .. } => {
                warn!(pod = %pod.pod.key(), %peer, "{e}")
            }
            _ => debug!(pod = %pod.pod.key(), dst = %entry.orig_dst, "{e}"),
        }
        entry.result = e.stage();
        entry.response_flags = e.response_flags();
        entry.error = Some(e.to_string());
        // Tell the app it failed: a reset, not a clean close.
        reset_on_close(&client);
    }
    finish(shared, entry, traffic);
}

async fn proxy(
    shared: &Shared,
    pod: &LocalPod,
    client: &mut TcpStream,
    peer: SocketAddr,
    entry: &mut Entry,
    traffic: &mut Option<ConnectionTraffic>,
) -> Result<(), ProxyError> {
    let local = client.local_addr().map_err(ProxyError::Transfer)?;
    let key = FlowKey {
        netns_cookie: pod.netns_cookie,
        src_addr: ip_to_words(peer.ip()),
        dst_addr: ip_to_words(local.ip()),
        src_port: peer.port(),
        dst_port: local.port(),
        _pad: 0,
    };
    let orig = shared.kernel.orig_dst(&key);
    shared.metrics.orig_dst_lookup(orig.is_some());
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
    let orig_dst = SocketAddr::new(ip, orig.port);
    entry.orig_dst = orig_dst.to_string();

    if shared.sockmap {
        // Before the agent writes anything, so all its writes take the
        // fast path in order.
        let sk = SockKey {
            local_addr: ip_to_words(local.ip()),
            remote_addr: ip_to_words(peer.ip()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(peer.port()),
        };
        if let Err(e) = shared.kernel.add_to_sockhash(sk, &*client) {
            debug!("sockhash insert: {e}");
        }
    }
    let _ = client.set_nodelay(true);

    let (upstream_addr, dst_pod, local_dst, denied) = {
        let workloads = shared.workloads.borrow();
        let (addr, dst_pod) = match workloads.resolve(orig_dst) {
            Resolved::Service { service, pod, addr } => {
                entry.service = Some(service.to_owned());
                (addr, Some(pod.clone()))
            }
            Resolved::NoEndpoints { service } => {
                return Err(ProxyError::NoEndpoints {
                    service: service.to_owned(),
                });
            }
            Resolved::Pod { pod, addr } => (addr, Some(pod.clone())),
            Resolved::External { addr } => (addr, None),
        };
        let mut denied = None;
        if let Some(p) = &dst_pod {
            entry.dst_workload = Some(p.key().to_string());
            entry.dst_identity = Some(shared.identity_of(p).to_string());
            // A pod on this node: this agent is also its destination agent.
            if p.node == workloads.node {
                let decision = decide_local(shared, pod, p, addr);
                note_decision(entry, &decision);
                if let Decision::Deny { policy } = decision {
                    denied = Some(policy);
                }
            }
        }
        // Pods on other nodes are reached through HBONE; pods on this node
        // and destinations outside the mesh directly.
        let (remote, local): (Option<Pod>, Option<Pod>) = match dst_pod {
            Some(p) if p.node != workloads.node => (Some(p), None),
            other => (None, other),
        };
        (addr, remote, local, denied)
    };
    let opened = open_traffic(
        shared,
        pod,
        dst_pod.as_ref().or(local_dst.as_ref()),
        local_dst.is_some(),
        entry.service.as_deref(),
    );
    let bytes = ByteCounters {
        client_to_server: opened.client_to_server.clone(),
        server_to_client: opened.server_to_client.clone(),
    };
    *traffic = Some(opened);
    if let Some(policy) = denied {
        return Err(ProxyError::Denied { policy });
    }
    entry.upstream = Some(upstream_addr.to_string());
    match dst_pod {
        Some(dst) => hbone(shared, pod, client, upstream_addr, &dst, entry, &bytes).await,
        None => {
            direct(
                shared,
                pod,
                client,
                upstream_addr,
                local_dst.as_ref(),
                entry,
                &bytes,
            )
            .await
        }
    }
}

/// A connection's byte counters, one per direction (ztunnel's: received =
/// client to server, sent = server to client, for both reporters).
pub struct ByteCounters {
    pub client_to_server: ByteCount,
    pub server_to_client: ByteCount,
}

/// Opens the connection's Istio series: the source report, and for a pod on
/// this node the destination report too (this agent is both; as ztunnel
/// does for same-node traffic).
fn open_traffic(
    shared: &Shared,
    src: &LocalPod,
    dst: Option<&Pod>,
    same_node: bool,
    service: Option<&str>,
) -> ConnectionTraffic {
    let source = Peer::pod(&src.pod, &src.identity);
    let destination = dst
        .map(|p| Peer::pod(p, &shared.identity_of(p)))
        .unwrap_or_default();
    let service = service.map(ServiceName::parse).unwrap_or_default();
    let report = |reporter, security| Report {
        reporter,
        source: &source,
        destination: &destination,
        service: &service,
        security,
    };
    let mut reports = vec![report(Reporter::Source, SecurityPolicy::Unknown)];
    if same_node {
        reports.push(report(Reporter::Destination, SecurityPolicy::None));
    }
    shared.metrics.open(&reports)
}

/// The decision for a connection to a pod on this node (this agent is its
/// destination agent too).
fn decide_local(shared: &Shared, src: &LocalPod, dst: &Pod, addr: SocketAddr) -> Decision {
    shared.policies.decide(&Request {
        src_identity: Some(&src.identity),
        src_ip: peer_ip_of(src, addr),
        dst_namespace: &dst.namespace,
        dst_labels: &dst.labels,
        dst_ip: addr.ip(),
        dst_port: addr.port(),
    })
}

/// The source pod's own address in the destination's family.
fn peer_ip_of(pod: &LocalPod, dst: SocketAddr) -> IpAddr {
    pod.pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .copied()
        .unwrap_or(pod.pod.ips[0])
}

/// Records which policy decided, for the access log.
pub fn note_decision(entry: &mut Entry, decision: &Decision) {
    entry.policy = match decision {
        Decision::Allow { policy } | Decision::Deny { policy } => policy.clone(),
    };
}

/// Plain TCP from inside the source pod: same-node pods and destinations
/// outside the mesh.
async fn direct(
    shared: &Shared,
    pod: &LocalPod,
    client: &mut TcpStream,
    upstream_addr: SocketAddr,
    local_dst: Option<&Pod>,
    entry: &mut Entry,
    bytes: &ByteCounters,
) -> Result<(), ProxyError> {
    // To an enrolled pod on this node: from inside that pod, over its
    // loopback, so its inbound capture does not take the connection for a
    // plaintext client (identity and policy were settled above).
    let dst_local = local_dst.and_then(|d| shared.local_pods.load().get(&d.key()).cloned());
    let upstream =
        super::connect_in(shared, dst_local.as_deref().unwrap_or(pod), upstream_addr).await?;
    // In-kernel splice: measured to halve the agent's CPU per GiB against a
    // userspace copy (docs/architecture.md). Half-close is carried both ways.
    // A policy reload may deny a same-node connection while it is open.
    let recheck = |dst: &Pod| match decide_local(shared, pod, dst, upstream_addr) {
        Decision::Deny { policy } => Err(ProxyError::DeniedAfterReload { policy }),
        Decision::Allow { .. } => Ok(()),
    };
    let recheck_dst = local_dst.map(|dst| move || recheck(dst));
    let copied = super::splice_rechecked(
        shared,
        client,
        &upstream,
        (&bytes.client_to_server, &bytes.server_to_client),
        recheck_dst
            .as_ref()
            .map(|f| f as &(dyn Fn() -> Result<(), ProxyError> + Sync)),
    )
    .await;
    match copied {
        Ok((sent, received)) => {
            entry.bytes_sent = sent;
            entry.bytes_received = received;
            Ok(())
        }
        Err(e) => {
            if let ProxyError::DeniedAfterReload { policy } = &e {
                entry.policy = policy.clone();
            }
            Err(e)
        }
    }
}

/// HTTP/2 CONNECT over mutual TLS to the destination pod's agent
/// (`<pod IP>:15008`), on a pooled connection.
async fn hbone(
    shared: &Shared,
    pod: &LocalPod,
    client: &mut TcpStream,
    target: SocketAddr,
    dst: &Pod,
    entry: &mut Entry,
    bytes: &ByteCounters,
) -> Result<(), ProxyError> {
    entry.security = "mutual_tls";
    let peer = client.peer_addr().map_err(ProxyError::Transfer)?;
    let expected = shared.identity_of(dst);
    let hbone_addr = SocketAddr::new(target.ip(), HBONE_PORT);
    let (mut sender, _stream) = shared.pool.sender(pod, hbone_addr, &expected).await?;
    // The app's address as the pod has it (it connected from loopback).
    let src_ip = pod
        .pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == target.is_ipv4())
        .copied()
        .unwrap_or(peer.ip());
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
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
    let (response, mut send) =
        sender
            .send_request(request, false)
            .map_err(|source| ProxyError::Hbone {
                addr: hbone_addr,
                source,
            })?;
    let response = response.await.map_err(|source| ProxyError::Hbone {
        addr: hbone_addr,
        source,
    })?;
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
            entry.bytes_sent = sent;
            entry.bytes_received = received;
            Ok(())
        }
        Err(e) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(ProxyError::Transfer(e))
        }
    }
}

/// Linger 0: closing sends a reset, so the peer sees a failure, not an EOF.
/// (A zero linger never blocks the closing thread.)
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
