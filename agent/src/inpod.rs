//! Sockets inside pods' network namespaces.
//!
//! The agent stays in its own netns; a socket is created inside a pod's
//! netns by switching the calling thread there for the `socket()` call only.
//! A socket keeps its netns for life, so listening, accepting and connecting
//! then work from any thread.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use crate::{
    datapath::{INBOUND_SOURCE_V4, NetnsHandle, PodNetwork, PodNetworks},
    state::Pod,
};

/// The agent's own netns, opened once at start-up from the main thread.
static AGENT_NETNS: OnceLock<File> = OnceLock::new();

pub fn remember_agent_netns() -> io::Result<()> {
    let f = File::open("/proc/thread-self/ns/net")?;
    let _ = AGENT_NETNS.set(f);
    Ok(())
}

/// A pod's network namespace, held open by fd (the pod may go away; the fd
/// keeps the namespace valid for as long as the agent has sockets in it).
#[derive(Debug)]
pub struct PodNetns {
    file: File,
    path: PathBuf,
}

impl PodNetns {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("netns {}: {e}", path.display())))?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Runs `f` with this thread in the pod's netns. `f` must not block or
    /// yield: it is for creating sockets.
    fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let agent = AGENT_NETNS
            .get()
            .ok_or_else(|| io::Error::other("agent netns not recorded"))?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::other(format!("entering netns {}: {e}", self.path.display()))
        })?;
        let result = f();
        if let Err(e) = setns(agent, CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's netns would send other pods'
            // traffic from the wrong place: stop rather than continue.
            tracing::error!("cannot return to the agent's netns: {e}; aborting");
            std::process::abort();
        }
        result
    }
}

impl PodNetwork for PodNetns {
    fn cookie(&self) -> io::Result<u64> {
        // A socket made in the netns has the netns's cookie.
        let s = self.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))?;
        nodemesh_common::user::netns_cookie(s.as_fd())
            .map_err(|e| io::Error::new(e.kind(), format!("SO_NETNS_COOKIE (Linux 5.14+): {e}")))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn namespace_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.run(|| listening_socket(addr, true))?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    }

    /// Dual-stack `[::]`, or `0.0.0.0` where the pod has IPv6 off.
    fn listen_any(&self, port: u16) -> io::Result<TcpListener> {
        let socket = self.run(|| {
            listening_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), false).or_else(|_| {
                listening_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)
            })
        })?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    }

    /// The port of a loopback source is chosen at connect time, per 4-tuple.
    fn socket(&self, peer: SocketAddr, mark: u32, from_loopback: bool) -> io::Result<TcpSocket> {
        let socket =
            self.run(|| Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP)))?;
        socket.set_mark(mark)?;
        if from_loopback {
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(io::Error::from)?;
            let source: IpAddr = if peer.is_ipv4() {
                INBOUND_SOURCE_V4.into()
            } else {
                Ipv6Addr::LOCALHOST.into()
            };
            socket.bind(&SocketAddr::new(source, 0).into())?;
        }
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let socket = self.run(|| {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            Ok(s)
        })?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket.into())
    }

    fn udp_socket(&self, peer: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
        let socket =
            self.run(|| Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP)))?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket.into())
    }
}

/// The cookie of the namespace `handle` holds (None if it cannot be read).
pub fn cookie_of(handle: &NetnsHandle) -> Option<u64> {
    let netns = PodNetns {
        file: handle.file.try_clone().ok()?,
        path: handle.path.clone(),
    };
    netns.cookie().ok()
}

/// Whether `netns` is the agent's own network namespace.
pub fn is_agent_netns(netns: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Some(agent), Ok(given)) = (AGENT_NETNS.get(), netns.metadata()) else {
        return false;
    };
    agent
        .metadata()
        .is_ok_and(|a| a.dev() == given.dev() && a.ino() == given.ino())
}

/// Whether `ip` is an address of the namespace `handle` holds: a socket
/// there binds to it only then.
pub fn holds_address(handle: &NetnsHandle, ip: IpAddr) -> bool {
    let Ok(file) = handle.file.try_clone() else {
        return false;
    };
    let netns = PodNetns {
        file,
        path: handle.path.clone(),
    };
    netns
        .run(|| {
            let s = Socket::new(
                Domain::for_address(SocketAddr::new(ip, 0)),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            s.bind(&SocketAddr::new(ip, 0).into())
        })
        .is_ok()
}

/// Opens local pods' namespaces by the netns path their source gave.
#[derive(Default)]
pub struct NetnsPaths;

impl PodNetworks for NetnsPaths {
    fn open(&self, pod: &Pod, netns: Option<&NetnsHandle>) -> io::Result<Arc<dyn PodNetwork>> {
        if let Some(h) = netns {
            return Ok(Arc::new(PodNetns {
                file: h.file.try_clone()?,
                path: h.path.clone(),
            }));
        }
        let path = pod.netns.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "local pod without a netns path")
        })?;
        Ok(Arc::new(PodNetns::open(path)?))
    }
}

/// A bound, listening socket in the calling thread's netns.
fn listening_socket(addr: SocketAddr, v6_only: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Reuse-port lets a new agent bind beside the old during upgrades.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(v6_only)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s)
}
