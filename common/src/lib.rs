//! Types shared by the eBPF programs and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so
//! that the kernel side and userspace agree byte for byte and no key carries
//! uninitialised padding (which would make hash lookups miss).
#![no_std]

#[cfg(feature = "user")]
pub mod user;

/// Port of the agent's outbound listener inside every enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the agent's listener for captured plaintext inbound connections
/// inside every enrolled pod's netns (Istio's inbound port).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// HBONE (mTLS) inbound port inside every enrolled pod's netns; never captured.
pub const HBONE_PORT: u16 = 15008;
/// Port of the agent's DNS listener (UDP, on 127.0.0.1 and ::1) inside every
/// enrolled pod's netns; the pod's UDP queries to port 53 are sent there.
pub const DNS_PORT: u16 = 15053;
/// The port whose UDP traffic is taken for DNS.
pub const DNS_SERVER_PORT: u16 = 53;

/// Names of the maps, as pinned under the agent's bpffs directory.
pub const MAP_ENROLLED: &str = "NM_ENROLLED";
pub const MAP_PENDING: &str = "NM_PENDING";
pub const MAP_ORIG_DST: &str = "NM_ORIG_DST";
pub const MAP_CONFIG: &str = "NM_CONFIG";
pub const MAP_SOCKHASH: &str = "NM_SOCKHASH";
pub const MAP_COUNTERS: &str = "NM_COUNTERS";
pub const MAP_CAPTURE: &str = "NM_CAPTURE";
pub const MAP_DNS_ORIG: &str = "NM_DNS_ORIG";

/// Capacities. `ORIG_DST_CAPACITY` bounds concurrent redirected connections
/// per node; an insert that does not fit fails the `connect()` (fail closed).
pub const ENROLLED_CAPACITY: u32 = 4096;
pub const PENDING_CAPACITY: u32 = 65536;
pub const ORIG_DST_CAPACITY: u32 = 65536;
pub const SOCKHASH_CAPACITY: u32 = 131072;
/// Capture listeners, one per enrolled pod IP.
pub const CAPTURE_CAPACITY: u32 = 8192;
/// UDP sockets of enrolled pods that sent DNS, by socket cookie (an LRU:
/// the oldest go first; entries also go when their socket is released).
pub const DNS_ORIG_CAPACITY: u32 = 65536;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// An IPv6 address as four network-order words; IPv4 is stored v4-mapped
/// (`::ffff:a.b.c.d`) so one key type serves both families.
pub type Ip6Words = [u32; 4];

/// Value of the enrolment map, keyed by the pod's network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Agent-assigned id of the workload (its index in the agent's table).
    pub workload_id: u32,
    pub flags: u32,
}

/// Redirect this pod's connections through the sockmap fast path.
pub const ENROLLED_FLAG_SOCKMAP: u32 = 1;

/// Where a redirected connection was going, recorded at `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Ip6Words,
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` when the application asked for an IPv4 address (also via a
    /// v4-mapped address on an AF_INET6 socket), else `AF_INET6`.
    pub family: u16,
    pub workload_id: u32,
    pub netns_cookie: u64,
}

/// A connection as both ends see it: (netns, source, destination). Tuples are
/// only unique within one netns, hence the cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub src_addr: Ip6Words,
    pub dst_addr: Ip6Words,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub _pad: u32,
}

/// Key of the sockhash: a socket by its own (local, remote) view.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_addr: Ip6Words,
    pub remote_addr: Ip6Words,
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
}

/// Settings the agent writes into a one-entry array map before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProgramConfig {
    /// `SO_MARK` carried by the agent's own sockets; connect hooks skip them.
    pub agent_mark: u32,
    /// Non-zero: sockops adds redirected app sockets to the sockhash.
    pub sockmap_enabled: u32,
    /// Non-zero: enrolled pods' UDP DNS goes to the agent (`dns.capture`).
    pub dns_capture: u32,
}

/// Indices into the per-CPU counter array the programs bump.
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const SKIPPED_AGENT: u32 = 1;
    pub const PENDING_FULL: u32 = 2;
    pub const ORIG_DST_RECORDED: u32 = 3;
    pub const ORIG_DST_FULL: u32 = 4;
    pub const SOCKMAP_ADDED: u32 = 5;
    pub const MSG_REDIRECTED: u32 = 6;
    /// Plaintext inbound connections steered to the agent's capture listener.
    pub const INBOUND_CAPTURED: u32 = 7;
    /// Plaintext inbound connections refused: the pod is enrolled but no
    /// agent listener is in the map (the agent is down or restarting).
    pub const INBOUND_NO_LISTENER: u32 = 8;
    /// UDP DNS (connect or sendmsg to port 53) sent to the agent's listener.
    pub const DNS_REDIRECTED: u32 = 9;
    /// Replies from the agent's DNS listener given back the resolver's
    /// address as their source.
    pub const DNS_REVERSED: u32 = 10;
    /// DNS refused because its record did not fit in `NM_DNS_ORIG`.
    pub const DNS_ORIG_FULL: u32 = 11;
    pub const COUNT: u32 = 16;
}

/// The v4-mapped form of a network-order IPv4 address.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Ip6Words {
    [0, 0, u32::to_be(0x0000_ffff), ip4_be]
}

/// True for `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn is_v4_mapped(a: &Ip6Words) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::to_be(0x0000_ffff)
}
