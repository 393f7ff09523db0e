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
use std::{net::SocketAddr, sync::Arc};

use nodemesh_common::{HBONE_PORT, INBOUND_CAPTURE_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    ConnectionResult, LocalPod, ProxyError, ProxyInputs, canonical,
    connection::Bytes,
    inbound::open_destination_report,
    metrics::{Peer, Reporter, SecurityPolicy},
    reset_on_close,
};
use crate::{
    metrics::OrUnknown,
    policy::{Decision, MtlsMode, MtlsRequirement, Request},
};

/// Serves one captured connection.
pub async fn serve(
    inputs: Arc<ProxyInputs>,
    pod: Arc<LocalPod>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let peer = canonical(peer);
    let mut result =
        ConnectionResult::new(&inputs, Reporter::Destination, "inbound_plaintext", peer);
    result.entry().dst_workload = Some(pod.pod.key().to_string());
    result.entry().dst_identity = Some(pod.identity.to_string());
    let admitted = inputs
        .limits
        .admit("inbound_plaintext", Some(pod.workload_id), Some(peer.ip()));
    let _admitted = match admitted {
        Ok(a) => a,
        Err(e) => {
            super::shed(&inputs, &mut result, &e, &pod);
            reset_on_close(&client);
            return;
        }
    };
    let target = client.local_addr().map(canonical);
    let bytes = open_traffic(
        &inputs,
        &mut result,
        &pod,
        peer,
        target.as_ref().map_or(0, |t| t.port()),
    );
    let outcome = match target {
        Ok(target) => proxy(&inputs, &pod, &client, peer, target, &mut result, &bytes).await,
        Err(e) => Err(ProxyError::Transfer(e)),
    };
    if let Err(e) = outcome {
        debug!(pod = %pod.pod.key(), %peer, dst = %result.entry().orig_dst, "{e}");
        result.fail(&e);
        reset_on_close(&client);
    }
}

/// The destination report of a plaintext connection: no principal (nothing
/// proved one); the source's workload labels when its address is a pod's.
fn open_traffic(
    inputs: &ProxyInputs,
    result: &mut ConnectionResult,
    pod: &LocalPod,
    peer: SocketAddr,
    target_port: u16,
) -> Bytes {
    let source = inputs
        .workloads
        .pod_by_ip(peer.ip())
        .map(|p| Peer {
            principal: OrUnknown::unknown(),
            ..Peer::pod(&p, &inputs.identity_of(&p))
        })
        .unwrap_or_default();
    open_destination_report(
        inputs,
        result,
        pod,
        &source,
        target_port,
        SecurityPolicy::None,
    )
}

/// Why a captured connection may not reach the pod, if it may not: STRICT
/// first, then authorization (no identity: only IP and port rules can
/// admit it).
fn check(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    request: &Request<'_>,
) -> Result<Decision, ProxyError> {
    let requirement =
        inputs
            .policies
            .mtls_requirement(&pod.pod.namespace, &pod.pod.labels, request.dst_port);
    if let MtlsRequirement {
        policy,
        mode: MtlsMode::Strict,
    } = requirement
    {
        return Err(ProxyError::PlaintextRefused {
            policy,
            port: request.dst_port,
            after_reload: false,
        });
    }
    match inputs.policies.decide(request) {
        Decision::Deny { policy } => Err(ProxyError::Denied { policy }),
        allow => Ok(allow),
    }
}

async fn proxy(
    inputs: &ProxyInputs,
    pod: &LocalPod,
    client: &TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    result: &mut ConnectionResult,
    bytes: &Bytes,
) -> Result<(), ProxyError> {
    result.entry().orig_dst = target.to_string();
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
    let exempt = inputs
        .config
        .inbound_exempt_sources
        .iter()
        .any(|b| b.contains(peer.ip()));
    if exempt {
        result.decided(&Decision::Allow {
            policy: Some("inboundExemptSources".into()),
        });
    } else {
        let decision = check(inputs, pod, &request)?;
        result.decided(&decision);
    }
    result.entry().upstream = Some(target.to_string());
    let upstream = super::connect_in(inputs, pod, target).await?;
    let _ = client.set_nodelay(true);
    // A reload may make this connection refused (STRICT) or denied.
    let recheck = || check(inputs, pod, &request).map(|_| ());
    let (from_client, to_client) = super::splice_rechecked(
        inputs,
        client,
        &upstream,
        bytes,
        (!exempt).then_some(&recheck as super::Recheck<'_>),
    )
    .await?;
    // Bytes from the client to the pod are "received", as in ztunnel.
    result.transferred(from_client, to_client);
    Ok(())
}
