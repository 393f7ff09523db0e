//! The outbound listener in each enrolled pod: accepts what the kernel
//! redirected, finds the original destination and the source workload in
//! the maps, and forwards the bytes from inside the source pod's netns.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use nodemesh_common::{
    AF_INET, FlowKey, SockKey,
    user::{ip_to_words, words_to_ip},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, warn};

use super::ProxyError;
use crate::{
    access_log::{AccessLog, Entry},
    drain::Drain,
    ebpf::Kernel,
    inpod::PodNetns,
    state::{Pod, Resolved, Workloads},
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
}

/// An enrolled pod as the data path sees it.
pub struct LocalPod {
    pub pod: Pod,
    pub workload_id: u32,
    pub netns_cookie: u64,
    pub netns: PodNetns,
}

pub async fn accept_loop(shared: Arc<Shared>, pod: Arc<LocalPod>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.drain.stopped() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let guard = shared.drain.connection();
                let shared = shared.clone();
                let pod = pod.clone();
                tokio::spawn(async move {
                    handle(&shared, &pod, stream, peer).await;
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

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn handle(shared: &Shared, pod: &LocalPod, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let mut entry = Entry {
        start_ms: unix_ms(),
        duration_ms: 0,
        src_workload: pod.pod.key().to_string(),
        src_addr: peer.to_string(),
        orig_dst: String::new(),
        service: None,
        dst_workload: None,
        upstream: None,
        bytes_sent: 0,
        bytes_received: 0,
        result: "ok",
        error: None,
    };
    let outcome = proxy(shared, pod, &client, peer, &mut entry).await;
    entry.duration_ms = started.elapsed().as_millis();
    if let Err(e) = outcome {
        match &e {
            ProxyError::NotRedirected | ProxyError::WrongPod { .. } => {
                warn!(pod = %pod.pod.key(), %peer, "{e}")
            }
            _ => debug!(pod = %pod.pod.key(), dst = %entry.orig_dst, "{e}"),
        }
        entry.result = e.stage();
        entry.error = Some(e.to_string());
        // Tell the app it failed: a reset, not a clean close.
        reset_on_close(&client);
    }
    shared.access_log.log(entry);
}

async fn proxy(
    shared: &Shared,
    pod: &LocalPod,
    client: &TcpStream,
    peer: SocketAddr,
    entry: &mut Entry,
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
    let orig = shared
        .kernel
        .orig_dst(&key)
        .ok_or(ProxyError::NotRedirected)?;
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
        if let Err(e) = shared.kernel.add_to_sockhash(sk, client) {
            debug!("sockhash insert: {e}");
        }
    }
    let _ = client.set_nodelay(true);

    let upstream_addr = {
        let workloads = shared.workloads.borrow();
        match workloads.resolve(orig_dst) {
            Resolved::Service { service, pod, addr } => {
                entry.service = Some(service.to_owned());
                entry.dst_workload = Some(pod.key().to_string());
                addr
            }
            Resolved::NoEndpoints { service } => {
                return Err(ProxyError::NoEndpoints {
                    service: service.to_owned(),
                });
            }
            Resolved::Pod { pod, addr } => {
                entry.dst_workload = Some(pod.key().to_string());
                addr
            }
            Resolved::External { addr } => addr,
        }
    };
    entry.upstream = Some(upstream_addr.to_string());

    let socket = pod
        .netns
        .socket(upstream_addr, shared.socket_mark)
        .map_err(|source| ProxyError::Socket {
            pod: pod.pod.key().to_string(),
            source,
        })?;
    let upstream =
        match tokio::time::timeout(shared.connect_timeout, socket.connect(upstream_addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(ProxyError::Connect {
                    addr: upstream_addr,
                    source,
                });
            }
            Err(_) => {
                return Err(ProxyError::ConnectTimeout {
                    addr: upstream_addr,
                    secs: shared.connect_timeout.as_secs(),
                });
            }
        };
    // In-kernel splice: measured to halve the agent's CPU per GiB against a
    // userspace copy (docs/architecture.md). Half-close is carried both ways.
    let result = super::splice::bidirectional(client, &upstream).await;
    match result {
        Ok((sent, received)) => {
            entry.bytes_sent = sent;
            entry.bytes_received = received;
            Ok(())
        }
        Err(e) => {
            // Pass a reset on to the upstream side too.
            reset_on_close(&upstream);
            Err(ProxyError::Transfer(e))
        }
    }
}

/// Linger 0: closing sends a reset, so the peer sees a failure, not an EOF.
/// (A zero linger never blocks the closing thread.)
fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
