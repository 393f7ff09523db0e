//! Plaintext inbound: connections to an enrolled pod that did not come
//! through the mesh (a client outside it), steered by the kernel's sk_lookup
//! program to the agent's capture listener in the pod (port 15006). The
//! accepted socket keeps the original destination as its local address.
//!
//! PeerAuthentication decides first: STRICT refuses the connection (a
//! reset), PERMISSIVE and DISABLE admit it with no identity, and then
//! authorization decides as for any connection. The agent connects to the
//! app from inside the pod, over loopback, which the kernel does not
//! capture again.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use nodemesh_common::{HBONE_PORT, INBOUND_CAPTURE_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    ProxyError, finish,
    outbound::{LocalPod, Shared, note_decision, reset_on_close},
};
use crate::{
    access_log::Entry,
    metrics::{ConnectionTraffic, OrUnknown, Peer, SecurityPolicy},
    policy::{Decision, MtlsRequirement, Request},
};

/// Serves one captured connection.
pub async fn serve(shared: Arc<Shared>, pod: Arc<LocalPod>, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _active = shared.metrics.active("inbound_plaintext");
    let peer = canonical(peer);
    let mut entry = Entry::new("destination", peer);
    entry.dst_workload = Some(pod.pod.key().to_string());
    entry.dst_identity = Some(pod.identity.to_string());
    let target = client.local_addr().map(canonical);
    let traffic = open_traffic(&shared, &pod, peer, target.as_ref().map_or(0, |t| t.port()));
    let outcome = match target {
        Ok(target) => proxy(&shared, &pod, &client, peer, target, &mut entry, &traffic).await,
        Err(e) => Err(ProxyError::Transfer(e)),
    };
    entry.duration_ms = started.elapsed().as_millis();
    if let Err(e) = outcome {
        debug!(pod = %pod.pod.key(), %peer, dst = %entry.orig_dst, "{e}");
        entry.result = e.stage();
        entry.response_flags = e.response_flags();
        entry.error = Some(e.to_string());
        reset_on_close(&client);
    }
    finish(&shared, entry, Some(traffic));
}

/// The destination report of a plaintext connection: no principal (nothing
/// proved one); the source's workload labels when its address is a pod's.
fn open_traffic(
    shared: &Shared,
    pod: &LocalPod,
    peer: SocketAddr,
    target_port: u16,
) -> ConnectionTraffic {
    let source = shared
        .workloads
        .borrow()
        .pod_by_ip(peer.ip())
        .map(|p| Peer {
            principal: OrUnknown::unknown(),
            ..Peer::pod(p, &shared.identity_of(p))
        })
        .unwrap_or_default();
    super::open_destination_report(shared, pod, &source, target_port, SecurityPolicy::None)
}

/// v4-mapped addresses as IPv4 (the capture listener is dual-stack).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Why a captured connection may not reach the pod, if it may not: STRICT
/// first, then authorization (no identity: only IP and port rules can
/// admit it).
fn check(shared: &Shared, pod: &LocalPod, request: &Request<'_>) -> Result<Decision, ProxyError> {
    let requirement =
        shared
            .policies
            .mtls_requirement(&pod.pod.namespace, &pod.pod.labels, request.dst_port);
    if let MtlsRequirement {
        policy,
        mode: crate::policy::MtlsMode::Strict,
    } = requirement
    {
        return Err(ProxyError::PlaintextRefused {
            policy,
            port: request.dst_port,
            after_reload: false,
        });
    }
    match shared.policies.decide(request) {
        Decision::Deny { policy } => Err(ProxyError::Denied { policy }),
        allow => Ok(allow),
    }
}

async fn proxy(
    shared: &Shared,
    pod: &LocalPod,
    client: &TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    entry: &mut Entry,
    traffic: &ConnectionTraffic,
) -> Result<(), ProxyError> {
    entry.orig_dst = target.to_string();
    // The agent's own ports: reaching 15006 directly would loop.
    if [OUTBOUND_PORT, INBOUND_CAPTURE_PORT, HBONE_PORT].contains(&target.port())
        || !pod.pod.ips.contains(&target.ip())
    {
        return Err(ProxyError::NotCapturable { addr: target });
    }
    let request = Request {
        src_identity: None,
        src_ip: peer.ip(),
        dst_namespace: &pod.pod.namespace,
        dst_labels: &pod.pod.labels,
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    // Exempt sources (kubelet probes) pass unchecked, as in Istio's ambient.
    let exempt = shared
        .inbound_exempt_sources
        .iter()
        .any(|b| b.contains(peer.ip()));
    let checked = if exempt {
        Ok(Decision::Allow {
            policy: Some("inboundExemptSources".into()),
        })
    } else {
        check(shared, pod, &request)
    };
    match &checked {
        Ok(decision) => note_decision(entry, decision),
        Err(ProxyError::PlaintextRefused { policy, .. } | ProxyError::Denied { policy }) => {
            entry.policy = policy.clone();
        }
        Err(_) => {}
    }
    checked?;
    entry.upstream = Some(target.to_string());
    let upstream = super::connect_in(shared, pod, target).await?;
    let _ = client.set_nodelay(true);
    // A reload may make this connection refused (STRICT) or denied.
    let recheck = || {
        check(shared, pod, &request)
            .map(|_| ())
            .map_err(|e| match e {
                ProxyError::Denied { policy } => ProxyError::DeniedAfterReload { policy },
                ProxyError::PlaintextRefused { policy, port, .. } => ProxyError::PlaintextRefused {
                    policy,
                    port,
                    after_reload: true,
                },
                other => other,
            })
    };
    let copied = super::splice_rechecked(
        shared,
        client,
        &upstream,
        (&traffic.client_to_server, &traffic.server_to_client),
        (!exempt).then_some(&recheck as &(dyn Fn() -> Result<(), ProxyError> + Sync)),
    )
    .await;
    match copied {
        // Bytes from the client to the pod are "received", as in ztunnel.
        Ok((from_client, to_client)) => {
            entry.bytes_received = from_client;
            entry.bytes_sent = to_client;
            Ok(())
        }
        Err(e) => {
            if let ProxyError::PlaintextRefused { policy, .. }
            | ProxyError::DeniedAfterReload { policy } = &e
            {
                entry.policy = policy.clone();
            }
            Err(e)
        }
    }
}
