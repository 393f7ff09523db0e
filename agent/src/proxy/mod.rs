//! The data path: what the proxy paths share ([`ProxyInputs`]), and the
//! steps they have in common — connecting from inside a pod, copying under
//! policy re-checks, accepting until drain.
//!
//! Paths: `outbound` (a local pod's redirected connections), `inbound`
//! (HBONE into a local pod), `capture` (plaintext into a local pod). Each
//! records its outcome through one [`ConnectionResult`] and fails through
//! one [`ProxyError`].
pub mod access_log;
pub mod balance;
pub mod capture;
pub mod connection;
pub mod dns;
pub mod egress;
pub mod error;
mod h2io;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod pool;
mod read_buffer;
pub mod sni;
mod splice;

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use self::{
    access_log::AccessLog, balance::Balancer, limits::Limits, metrics::ProxyMetrics, pool::Pool,
};
pub use self::{
    connection::ConnectionResult,
    error::{ProxyError, ResponseFlags},
};
use crate::{
    datapath::{Datapath, PodNetwork},
    dns::{DnsProxy, DnsRecords, Resolver},
    drain::Drain,
    identity::Identity,
    policy::{IpBlock, PolicyStore},
    state::{Pod, PodKey, WorkloadStore},
    tls::TlsContext,
};

/// How the agent's sockets are made and kept.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// `SO_MARK` on the agent's sockets, so the kernel hooks skip them.
    pub mark: u32,
    /// Establishing a connection: TCP connect, and for HBONE the handshake.
    pub connect_timeout: Duration,
    pub keepalive: Option<socket2::TcpKeepalive>,
    /// TCP_USER_TIMEOUT: unacknowledged data is given up after this long.
    pub user_timeout: Option<Duration>,
}

impl SocketOptions {
    /// Keepalive and user timeout on a connected socket (best effort).
    pub fn apply(&self, stream: &TcpStream) {
        let s = socket2::SockRef::from(stream);
        if let Some(k) = &self.keepalive {
            let _ = s.set_tcp_keepalive(k);
        }
        if let Some(t) = self.user_timeout {
            let _ = s.set_tcp_user_timeout(Some(t));
        }
    }
}

/// Settings of the data path, from the agent's config.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub sockets: SocketOptions,
    /// The sk_msg fast path for data written to apps.
    pub sockmap: bool,
    pub trust_domain: String,
    /// Plaintext sources that skip inbound checks (`inboundExemptSources`).
    pub inbound_exempt_sources: Vec<IpBlock>,
    /// Ports of the agent: a connection to one of them would re-enter it.
    pub agent_ports: Vec<u16>,
    pub hbone: crate::config::HboneSettings,
    /// Enrolled pods' DNS (UDP and TCP port 53) is answered by the agent.
    pub dns_capture: bool,
    /// `outboundTrafficPolicy.mode`.
    pub outbound_mode: crate::config::OutboundMode,
}

impl ProxyConfig {
    pub fn from_config(config: &crate::config::Config) -> Self {
        use nodemesh_common::{HBONE_PORT, INBOUND_CAPTURE_PORT, OUTBOUND_PORT};
        Self {
            sockets: SocketOptions {
                mark: config.socket_mark,
                connect_timeout: config.connect_timeout(),
                keepalive: config.keepalive(),
                user_timeout: config.user_timeout(),
            },
            sockmap: config.sockmap,
            trust_domain: config.trust_domain.clone(),
            inbound_exempt_sources: config.inbound_exempt_sources(),
            agent_ports: vec![
                OUTBOUND_PORT,
                INBOUND_CAPTURE_PORT,
                HBONE_PORT,
                config.admin_address.port(),
                config.stats_address.port(),
                config.readiness_address.port(),
            ],
            hbone: config.hbone,
            dns_capture: config.dns.capture,
            outbound_mode: config.outbound_traffic_policy.mode,
        }
    }
}

/// What every proxy path needs, shared by all pods (ztunnel's `ProxyInputs`).
pub struct ProxyInputs {
    pub config: ProxyConfig,
    pub datapath: Arc<dyn Datapath>,
    pub workloads: Arc<WorkloadStore>,
    pub balancer: Arc<Balancer>,
    pub tls: Arc<TlsContext>,
    pub pool: Arc<Pool>,
    pub policies: Arc<PolicyStore>,
    pub limits: Arc<Limits>,
    pub access_log: AccessLog,
    pub metrics: Arc<ProxyMetrics>,
    pub drain: Drain,
    /// What each enrolled pod resolved (DNS capture).
    pub dns: Arc<DnsRecords>,
    /// Forwards enrolled pods' queries and records their answers in `dns`.
    pub dns_proxy: Arc<DnsProxy>,
    /// The agent's own resolution of registry hosts (`resolution: DNS`).
    pub resolver: Arc<Resolver>,
    /// This node's enrolled pods, republished by enrolment.
    pub local_pods: arc_swap::ArcSwap<HashMap<PodKey, Arc<LocalPod>>>,
}

impl ProxyInputs {
    pub fn identity_of(&self, pod: &Pod) -> Identity {
        Identity::new(
            &self.config.trust_domain,
            &pod.namespace,
            &pod.service_account,
        )
    }
}

/// An enrolled pod as the data path sees it.
pub struct LocalPod {
    pub pod: Arc<Pod>,
    pub identity: Identity,
    pub workload_id: u32,
    pub netns_cookie: u64,
    pub network: Arc<dyn PodNetwork>,
}

impl LocalPod {
    /// The pod's own address in the family of `like`.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.pod.ip_like(like)
    }
}

/// v4-mapped addresses as IPv4 (dual-stack listeners report them so).
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Connects to `addr` from inside `from`'s netns (the socket carries the
/// agent's mark, so the kernel hooks leave it alone), within `timeout`.
///
/// To the pod's own address (the agent reaching the app) the source is
/// `127.0.0.6` / `::1`: from the pod's own address every such connection
/// would have the same two addresses, and the agent's side, which usually
/// closes first, holds its port in TIME_WAIT for 60 s — a cap near 470 new
/// connections/s into a pod (measured). With a loopback source the kernel
/// reuses TIME_WAIT ports after a second (`tcp_tw_reuse`'s default), and
/// apps bound only to localhost stay unreachable (the destination is still
/// the pod's address).
pub async fn connect_from(
    from: &LocalPod,
    addr: SocketAddr,
    options: &SocketOptions,
) -> Result<TcpStream, ProxyError> {
    let to_itself = from.pod.ips.contains(&addr.ip());
    let socket = from
        .network
        .socket(addr, options.mark, to_itself)
        .map_err(|source| ProxyError::Socket {
            pod: from.pod.key().to_string(),
            source,
        })?;
    let timeout = options.connect_timeout;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            options.apply(&s);
            Ok(s)
        }
        Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
        Err(_) => Err(ProxyError::ConnectTimeout {
            addr,
            ms: timeout.as_millis(),
        }),
    }
}

/// [`connect_from`] with the data path's socket options.
pub async fn connect_in(
    inputs: &ProxyInputs,
    from: &LocalPod,
    addr: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    connect_from(from, addr, &inputs.config.sockets).await
}

/// A connection's decision, re-made after each policy reload.
pub type Recheck<'a> = &'a (dyn Fn() -> Result<(), ProxyError> + Sync);

/// Runs `copy` until it ends; after every policy reload `recheck` decides
/// again, and its error ends the connection instead (the caller resets
/// both sides). The one re-check loop of every path.
pub async fn rechecked<T>(
    inputs: &ProxyInputs,
    copy: impl Future<Output = Result<T, ProxyError>>,
    recheck: Option<Recheck<'_>>,
) -> Result<T, ProxyError> {
    let mut generation = inputs.policies.subscribe();
    // A set that arrived since the first decision (during the connect) is
    // checked at once.
    generation.mark_changed();
    tokio::pin!(copy);
    loop {
        tokio::select! {
            r = &mut copy => return r,
            changed = generation.changed(), if recheck.is_some() => {
                if changed.is_err() {
                    continue;
                }
                if let Some(Err(e)) = recheck.map(|f| f()) {
                    return Err(e.after_reload());
                }
            }
        }
    }
}

/// Plain TCP both ways with splice (bytes counted as they flow) until both
/// directions end, under policy re-checks. A failure resets the upstream
/// side (the caller resets the client's). Returns bytes client->upstream,
/// and back.
pub async fn splice_rechecked(
    inputs: &ProxyInputs,
    client: &TcpStream,
    upstream: &TcpStream,
    bytes: &connection::Bytes,
    recheck: Option<Recheck<'_>>,
) -> Result<(u64, u64), ProxyError> {
    let copy = async {
        splice::bidirectional(
            client,
            upstream,
            &bytes.client_to_server,
            &bytes.server_to_client,
        )
        .await
        .map_err(ProxyError::Transfer)
    };
    let copied = rechecked(inputs, copy, recheck).await;
    if copied.is_err() {
        reset_on_close(upstream);
    }
    copied
}

/// A connection refused by [`Limits`]: counted in the metrics always, in
/// the logs only as sampled.
pub fn shed(inputs: &ProxyInputs, result: &mut ConnectionResult, e: &ProxyError, pod: &LocalPod) {
    result.fail(e);
    match inputs.limits.sampler.sample() {
        Some(suppressed) => warn!(pod = %pod.pod.key(), suppressed, "{e}"),
        None => result.quiet(),
    }
}

/// Linger 0: closing sends a reset, so the peer sees a failure, not an EOF.
/// (A zero linger never blocks the closing thread.)
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Accepts on one of a pod's listeners until draining starts; each
/// connection is served by `serve` in its own task and counted for drain.
pub async fn accept_loop<F, Fut>(
    inputs: Arc<ProxyInputs>,
    pod: Arc<LocalPod>,
    listener: TcpListener,
    serve: F,
) where
    F: Fn(Arc<ProxyInputs>, Arc<LocalPod>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = inputs.drain.stopped() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                inputs.config.sockets.apply(&stream);
                let guard = inputs.drain.connection();
                let served = serve(inputs.clone(), pod.clone(), stream, peer);
                tokio::spawn(async move {
                    served.await;
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %pod.pod.key(), "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
