//! The closest honest substitute for a node's kernel programs and pod
//! namespaces that runs without root: every "pod" is an address on the
//! loopback device of the test's own network namespace (127.x.y.z), its
//! agent listeners are bound to that address, and the connect hook's work
//! (record the original destination, send the connection to the outbound
//! listener) is done by [`LoopbackDatapath::connect_redirected`].
//!
//! For the in-process tests of the proxy paths only. What it cannot show —
//! the programs themselves, sk_lookup capture, sockets in other network
//! namespaces, SO_MARK — the root tests on the virtual cluster check.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::BorrowedFd,
    sync::{Arc, Mutex, PoisonError},
};

use nodemesh_common::{
    AF_INET, AF_INET6, EnrolledPod, FlowKey, OUTBOUND_PORT, OrigDst, SockKey, user::ip_to_words,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use super::{Datapath, NetnsHandle, PodNetwork, PodNetworks};
use crate::state::Pod;

/// The netns cookie a loopback pod is given: derived from its address.
pub fn cookie_of(ip: Ipv4Addr) -> u64 {
    (1 << 40) | u64::from(u32::from(ip))
}

#[derive(Default)]
pub struct LoopbackDatapath {
    flows: Mutex<HashMap<FlowKey, OrigDst>>,
    enrolled: Mutex<HashMap<u64, EnrolledPod>>,
    captured: Mutex<HashSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LoopbackDatapath {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// What an application at `app` (a loopback pod address) gets from
    /// `connect(orig_dst)` on an enrolled node: the connect hook records
    /// the original destination under the connection's 4-tuple and the
    /// connection goes to the pod's outbound listener. A pod that is not
    /// enrolled connects to `orig_dst` itself, as the hook leaves it alone.
    pub async fn connect_redirected(
        &self,
        app: Ipv4Addr,
        orig_dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let cookie = cookie_of(app);
        let Some(pod) = lock(&self.enrolled).get(&cookie).copied() else {
            return TcpStream::connect(orig_dst).await;
        };
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((app, 0)))?;
        let local = socket.local_addr()?;
        let listener = SocketAddr::from((app, OUTBOUND_PORT));
        let key = FlowKey {
            netns_cookie: cookie,
            src_addr: ip_to_words(local.ip()),
            dst_addr: ip_to_words(listener.ip()),
            src_port: local.port(),
            dst_port: listener.port(),
            _pad: 0,
        };
        let record = OrigDst {
            addr: ip_to_words(orig_dst.ip()),
            port: orig_dst.port(),
            family: if orig_dst.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            },
            workload_id: pod.workload_id,
            netns_cookie: cookie,
        };
        lock(&self.flows).insert(key, record);
        let connected = socket.connect(listener).await;
        if connected.is_err() {
            lock(&self.flows).remove(&key);
        }
        connected
    }

    pub fn is_enrolled(&self, app: Ipv4Addr) -> bool {
        lock(&self.enrolled).contains_key(&cookie_of(app))
    }

    pub fn is_captured(&self, app: Ipv4Addr) -> bool {
        lock(&self.captured).contains(&cookie_of(app))
    }
}

impl Datapath for LoopbackDatapath {
    fn orig_dst(&self, key: &FlowKey) -> Option<OrigDst> {
        lock(&self.flows).get(key).copied()
    }

    fn add_to_sockhash(&self, _key: SockKey, _socket: &TcpStream) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no sk_msg fast path in the loopback substitute",
        ))
    }

    fn enrol(&self, netns_cookie: u64, pod: EnrolledPod) -> io::Result<()> {
        lock(&self.enrolled).insert(netns_cookie, pod);
        Ok(())
    }

    fn unenrol(&self, netns_cookie: u64) {
        lock(&self.enrolled).remove(&netns_cookie);
        lock(&self.captured).remove(&netns_cookie);
        lock(&self.flows).retain(|k, _| k.netns_cookie != netns_cookie);
    }

    fn enrolled_cookies(&self) -> Vec<u64> {
        let mut c: Vec<u64> = lock(&self.enrolled).keys().copied().collect();
        c.extend(lock(&self.captured).iter().copied());
        c.sort_unstable();
        c.dedup();
        c
    }

    fn enrolment_intact(&self, netns_cookie: u64) -> bool {
        lock(&self.enrolled).contains_key(&netns_cookie)
            && lock(&self.captured).contains(&netns_cookie)
    }

    fn add_capture_listener(&self, _ip: IpAddr, _listener: &TcpListener) -> io::Result<()> {
        Ok(())
    }

    fn attach_capture(&self, _network: &dyn PodNetwork, netns_cookie: u64) -> io::Result<()> {
        lock(&self.captured).insert(netns_cookie);
        Ok(())
    }
}

/// A pod's "network": its IPv4 loopback address.
#[derive(Debug)]
pub struct LoopbackNetwork {
    ip: Ipv4Addr,
}

impl LoopbackNetwork {
    /// The pod at `ip`, which must be a loopback address.
    pub fn new(ip: Ipv4Addr) -> Self {
        Self { ip }
    }
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what}: not in the loopback substitute"),
    )
}

fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

impl PodNetwork for LoopbackNetwork {
    fn cookie(&self) -> io::Result<u64> {
        Ok(cookie_of(self.ip))
    }

    fn describe(&self) -> String {
        format!("loopback {}", self.ip)
    }

    fn namespace_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// The pod's own address stands in for `0.0.0.0` and `127.0.0.1`.
    fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        if addr.is_ipv6() {
            return Err(unsupported("IPv6"));
        }
        listener(SocketAddr::from((self.ip, addr.port())))
    }

    fn listen_any(&self, port: u16) -> io::Result<TcpListener> {
        listener(SocketAddr::from((self.ip, port)))
    }

    fn socket(&self, peer: SocketAddr, _mark: u32, from_loopback: bool) -> io::Result<TcpSocket> {
        if peer.is_ipv6() {
            return Err(unsupported("IPv6"));
        }
        let socket = TcpSocket::new_v4()?;
        let source = if from_loopback {
            super::INBOUND_SOURCE_V4
        } else {
            self.ip
        };
        socket.bind(SocketAddr::from((source, 0)))?;
        socket.set_nodelay(true)?;
        Ok(socket)
    }

    /// The pod's own address stands in for `127.0.0.1`.
    fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        if addr.is_ipv6() {
            return Err(unsupported("IPv6"));
        }
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((self.ip, addr.port())).into())?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s.into())
    }

    /// From the pod's address (no mark: one namespace, no hooks).
    fn udp_socket(&self, peer: SocketAddr, _mark: u32) -> io::Result<UdpSocket> {
        if peer.is_ipv6() {
            return Err(unsupported("IPv6"));
        }
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.bind(&SocketAddr::from((self.ip, 0)).into())?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s.into())
    }
}

/// Opens every local pod as its first IPv4 address, which must be a
/// loopback one.
#[derive(Default)]
pub struct LoopbackNetworks;

impl PodNetworks for LoopbackNetworks {
    fn open(&self, pod: &Pod, _netns: Option<&NetnsHandle>) -> io::Result<Arc<dyn PodNetwork>> {
        let ip = pod
            .ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) if v4.is_loopback() => Some(*v4),
                _ => None,
            })
            .ok_or_else(|| unsupported(&format!("pod {} without a 127/8 address", pod.key())))?;
        Ok(Arc::new(LoopbackNetwork { ip }))
    }
}
