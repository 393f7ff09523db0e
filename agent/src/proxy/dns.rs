//! A local pod's DNS through the agent (the proxy itself is
//! [`crate::dns::DnsProxy`]): the pod's UDP listener, served until drain,
//! and DNS over TCP, which arrives on the outbound listener.
use std::sync::Arc;

use tokio::net::{TcpStream, UdpSocket};

use super::{LocalPod, ProxyInputs};
use crate::dns::DnsClient;

/// Serves one of the pod's DNS listeners (127.0.0.1 / ::1) until draining
/// starts; the socket then closes, so a new agent's listener beside it
/// (SO_REUSEPORT) receives every query.
pub async fn serve_udp(inputs: Arc<ProxyInputs>, pod: Arc<LocalPod>, socket: UdpSocket) {
    let key = pod.pod.key().to_string();
    let dns = inputs.dns_proxy.clone();
    tokio::select! {
        () = dns.serve_udp(&key, pod.workload_id, pod.network.clone(), socket) => {}
        () = inputs.drain.stopped() => {}
    }
}

/// Answers the DNS queries of one redirected TCP connection to port 53.
pub async fn serve_tcp(inputs: &ProxyInputs, pod: &LocalPod, client: &mut TcpStream) {
    let key = pod.pod.key().to_string();
    let client_pod = DnsClient {
        pod: &key,
        workload_id: pod.workload_id,
        network: &*pod.network,
    };
    inputs.dns_proxy.serve_tcp(client_pod, client).await;
}
