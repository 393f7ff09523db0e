//! What the proxy needs from the node, as two small traits: the kernel's
//! redirection state ([`Datapath`]: original destinations, enrolment,
//! plaintext capture) and sockets inside a pod's network namespace
//! ([`PodNetwork`]). On a node the eBPF programs (`ebpf::Kernel`) and
//! setns(2) (`inpod::PodNetns`) implement them; [`loopback`] implements
//! them inside one network namespace, so the proxy paths run in-process
//! in tests without root.
pub mod loopback;

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::BorrowedFd,
    sync::Arc,
};

use nodemesh_common::{EnrolledPod, FlowKey, OrigDst, SockKey};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use crate::state::Pod;

/// The source of the agent's connections to its pod's apps (as Istio's
/// sidecars use): a loopback address, so nothing outside the pod can send
/// from it, and the kernel reuses its TIME_WAIT ports after a second.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// The kernel side of the mesh, as the agent uses it.
pub trait Datapath: Send + Sync {
    /// Where a redirected connection was going (the connect hook's record).
    fn orig_dst(&self, key: &FlowKey) -> Option<OrigDst>;
    /// Puts the agent's side of an app connection into the sk_msg fast path.
    fn add_to_sockhash(&self, key: SockKey, socket: &TcpStream) -> io::Result<()>;
    /// From now on the pod's connections are redirected to its listeners.
    fn enrol(&self, netns_cookie: u64, pod: EnrolledPod) -> io::Result<()>;
    /// Removes the pod's enrolment and its inbound capture.
    fn unenrol(&self, netns_cookie: u64);
    /// Every enrolled netns, including those a previous agent left.
    fn enrolled_cookies(&self) -> Vec<u64>;
    /// Whether the netns's enrolment entry and capture are both still in
    /// the kernel (something outside the agent may remove either).
    fn enrolment_intact(&self, netns_cookie: u64) -> bool;
    /// Makes `listener` the target of plaintext connections to `ip`.
    fn add_capture_listener(&self, ip: IpAddr, listener: &TcpListener) -> io::Result<()>;
    /// Starts capturing plaintext inbound connections in the pod's netns.
    fn attach_capture(&self, network: &dyn PodNetwork, netns_cookie: u64) -> io::Result<()>;
}

/// Sockets inside one pod's network namespace.
pub trait PodNetwork: Send + Sync + fmt::Debug {
    /// The namespace's cookie (the key of the enrolment map).
    fn cookie(&self) -> io::Result<u64>;
    /// Where it is, for logs (a netns path).
    fn describe(&self) -> String;
    /// The namespace itself, for attaching programs to it.
    fn namespace_fd(&self) -> Option<BorrowedFd<'_>>;
    /// A listening socket on `addr` inside the pod (IPv6: v6 only).
    fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener>;
    /// A listener on `port` for both families.
    fn listen_any(&self, port: u16) -> io::Result<TcpListener>;
    /// An unconnected socket inside the pod carrying `mark`; from a
    /// loopback source (`127.0.0.6`, `::1`) when `from_loopback`.
    fn socket(&self, peer: SocketAddr, mark: u32, from_loopback: bool) -> io::Result<TcpSocket>;
    /// A UDP socket bound to `addr` inside the pod (IPv6: v6 only), with
    /// SO_REUSEPORT so a new agent binds beside the old.
    fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket>;
    /// An unbound UDP socket inside the pod, of `peer`'s family, carrying
    /// `mark`.
    fn udp_socket(&self, peer: SocketAddr, mark: u32) -> io::Result<UdpSocket>;
}

/// A pod's network namespace as the CNI plugin handed it over: open (so
/// the agent needs no view of the host's netns directory), with the path
/// the runtime named it by, for logs and for telling when it is gone.
#[derive(Debug)]
pub struct NetnsHandle {
    pub file: std::fs::File,
    pub path: std::path::PathBuf,
}

impl NetnsHandle {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }
}

/// Opens the network of a local pod: the namespace the CNI plugin handed
/// over when there is one, else the pod's netns path.
pub trait PodNetworks: Send + Sync {
    fn open(&self, pod: &Pod, netns: Option<&NetnsHandle>) -> io::Result<Arc<dyn PodNetwork>>;
}
