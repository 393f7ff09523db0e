//! nodemesh kernel programs.
//!
//! - `nm_connect4` / `nm_connect6` (cgroup/connect4, connect6): an enrolled
//!   pod's TCP `connect()` goes to the agent's in-pod listener on loopback;
//!   the original destination is recorded under the socket cookie.
//! - `nm_sock_ops` (sockops): at ACTIVE_ESTABLISHED the record moves to a
//!   key the agent can build from its accepted socket (netns cookie +
//!   4-tuple), before the agent's `accept()` can return; on TCP_CLOSE it is
//!   removed, so maps shrink back to idle size.
//! - `nm_sk_msg` (sk_msg): optional fast path; data the agent writes to an
//!   app socket goes straight to its receive queue.
//! - `nm_sk_lookup` (sk_lookup, attached to each enrolled pod's netns): a
//!   plaintext TCP connection arriving at the pod from outside is handed to
//!   the agent's capture listener in that pod, so PeerAuthentication and
//!   authorization apply to it; with no listener (agent down) it is refused.
//! - DNS of enrolled pods: `nm_connect4|6` (connected UDP, as glibc uses)
//!   and `nm_sendmsg4|6` (unconnected) send UDP to port 53 to the agent's
//!   DNS listener on loopback, recording the resolver under the socket
//!   cookie; `nm_recvmsg4|6` give the replies the resolver's address back
//!   (resolvers drop answers from another source); `nm_sock_release`
//!   removes the record with its socket.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use nodemesh_common::{
    AF_INET, AF_INET6, CAPTURE_CAPACITY, DNS_ORIG_CAPACITY, DNS_PORT, DNS_SERVER_PORT,
    ENROLLED_CAPACITY, ENROLLED_FLAG_SOCKMAP, EnrolledPod, FlowKey, HBONE_PORT, Ip6Words,
    ORIG_DST_CAPACITY, OUTBOUND_PORT, OrigDst, PENDING_CAPACITY, ProgramConfig, SOCKHASH_CAPACITY,
    SockKey, counter, is_v4_mapped, v4_mapped,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const LOOPBACK_V4_BE: u32 = u32::to_be(0x7f00_0001);
const LOOPBACK_V6: Ip6Words = [0, 0, 0, u32::to_be(1)];
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[map(name = "NM_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(ENROLLED_CAPACITY, 0);

/// Socket cookie -> original destination, between connect() and ESTABLISHED.
/// LRU: a connect() that fails before TCP_CONNECT_CB (so before the close
/// callback is asked for) leaves its entry; the oldest such go first.
#[map(name = "NM_PENDING")]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(PENDING_CAPACITY, 0);

#[map(name = "NM_ORIG_DST")]
static ORIG_DST: HashMap<FlowKey, OrigDst> = HashMap::pinned(ORIG_DST_CAPACITY, 0);

#[map(name = "NM_CONFIG")]
static CONFIG: Array<ProgramConfig> = Array::pinned(1, 0);

#[map(name = "NM_SOCKHASH")]
static SOCKHASH: SockHash<SockKey> = SockHash::pinned(SOCKHASH_CAPACITY, 0);

/// Pod IP (v4-mapped for IPv4) -> the agent's capture listener in that pod.
#[map(name = "NM_CAPTURE")]
static CAPTURE: SockHash<Ip6Words> = SockHash::pinned(CAPTURE_CAPACITY, 0);

/// Socket cookie -> the resolver an enrolled pod's UDP socket sent DNS to,
/// for giving the agent's replies that source. LRU, and removed when the
/// socket is released: UDP sockets have no close callback in sockops.
#[map(name = "NM_DNS_ORIG")]
static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(DNS_ORIG_CAPACITY, 0);

#[map(name = "NM_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn config() -> ProgramConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => ProgramConfig::default(),
    }
}

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn nm_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if is_udp(sa.type_, sa.protocol) {
        return dns_redirect4(&ctx);
    }
    if sa.type_ != SOCK_STREAM || (sa.protocol != IPPROTO_TCP && sa.protocol != 0) {
        return ALLOW;
    }
    let dst_ip = sa.user_ip4;
    // 127.0.0.0/8 stays inside the pod: it never needs the mesh.
    if u32::from_be(dst_ip) >> 24 == 127 {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    match record_pending(&ctx, v4_mapped(dst_ip), port, AF_INET) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => REJECT,
        Verdict::Redirect => {
            sa.user_ip4 = LOOPBACK_V4_BE;
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn nm_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if is_udp(sa.type_, sa.protocol) {
        return dns_redirect6(&ctx);
    }
    if sa.type_ != SOCK_STREAM || (sa.protocol != IPPROTO_TCP && sa.protocol != 0) {
        return ALLOW;
    }
    // SAFETY: field of the valid context.
    let dst = unsafe { read_ip6(&raw const sa.user_ip6) };
    let mapped = is_v4_mapped(&dst);
    if mapped && u32::from_be(dst[3]) >> 24 == 127 {
        return ALLOW;
    }
    if !mapped && dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == u32::to_be(1) {
        return ALLOW;
    }
    let family = if mapped { AF_INET } else { AF_INET6 };
    let port = u16::from_be(sa.user_port as u16);
    match record_pending(&ctx, dst, port, family) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => REJECT,
        Verdict::Redirect => {
            // A dual-stack socket asking for an IPv4 peer keeps talking IPv4.
            if mapped {
                sa.user_ip6 = v4_mapped(LOOPBACK_V4_BE);
            } else {
                sa.user_ip6 = [0, 0, 0, u32::to_be(1)];
            }
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            ALLOW
        }
    }
}

enum Verdict {
    Pass,
    Redirect,
    Reject,
}

/// The enrolment of the socket's netns and its cookie, unless the netns is
/// not enrolled or the socket is the agent's own.
#[inline(always)]
fn enrolled_app(ctx: &SockAddrContext, cfg: &ProgramConfig) -> Option<(u64, EnrolledPod)> {
    // SAFETY: helpers valid for cgroup sock_addr programs (Linux 5.7+).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy of a value; a concurrent unenrol only makes the
    // copy stale, which the agent rejects.
    let pod = (unsafe { ENROLLED.get(netns_cookie) }).copied()?;
    // The agent's own sockets in the pod netns carry its mark.
    // SAFETY: `sk` is always set for connect and sendmsg hooks.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if cfg.agent_mark != 0 && mark == cfg.agent_mark {
        bump(counter::SKIPPED_AGENT);
        return None;
    }
    Some((netns_cookie, pod))
}

#[inline(always)]
fn record_pending(ctx: &SockAddrContext, addr: Ip6Words, port: u16, family: u16) -> Verdict {
    let Some((netns_cookie, pod)) = enrolled_app(ctx, &config()) else {
        return Verdict::Pass;
    };
    // SAFETY: helper valid for this program type.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        family,
        workload_id: pod.workload_id,
        netns_cookie,
    };
    if PENDING.insert(socket_cookie, orig, BPF_ANY as u64).is_err() {
        // Never a silent bypass: without a record the connection must fail.
        bump(counter::PENDING_FULL);
        return Verdict::Reject;
    }
    bump(counter::REDIRECTED);
    debug!(ctx, "redirect workload {} port {}", pod.workload_id, port);
    Verdict::Redirect
}

#[inline(always)]
fn is_udp(type_: u32, protocol: u32) -> bool {
    type_ == SOCK_DGRAM && (protocol == IPPROTO_UDP || protocol == 0)
}

/// UDP from an enrolled pod to port 53: records the resolver under the
/// socket cookie (the last one sent to wins: replies all come from the
/// agent, and a resolver library that sends to several servers on one
/// socket accepts an answer from any of them).
#[inline(always)]
fn record_dns(ctx: &SockAddrContext, addr: Ip6Words, family: u16) -> Verdict {
    let cfg = config();
    if cfg.dns_capture == 0 {
        return Verdict::Pass;
    }
    let Some((netns_cookie, pod)) = enrolled_app(ctx, &cfg) else {
        return Verdict::Pass;
    };
    // SAFETY: helper valid for this program type.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port: DNS_SERVER_PORT,
        family,
        workload_id: pod.workload_id,
        netns_cookie,
    };
    if DNS_ORIG
        .insert(socket_cookie, orig, BPF_ANY as u64)
        .is_err()
    {
        // Without a record the reply could not be given the resolver's
        // source and would be dropped anyway: refuse the send now.
        bump(counter::DNS_ORIG_FULL);
        return Verdict::Reject;
    }
    bump(counter::DNS_REDIRECTED);
    Verdict::Redirect
}

/// connect4 / sendmsg4 of a UDP socket.
#[inline(always)]
fn dns_redirect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst_ip = sa.user_ip4;
    if u16::from_be(sa.user_port as u16) != DNS_SERVER_PORT || u32::from_be(dst_ip) >> 24 == 127 {
        return ALLOW;
    }
    match record_dns(ctx, v4_mapped(dst_ip), AF_INET) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => REJECT,
        Verdict::Redirect => {
            sa.user_ip4 = LOOPBACK_V4_BE;
            sa.user_port = u32::from(DNS_PORT.to_be());
            ALLOW
        }
    }
}

/// connect6 / sendmsg6 of a UDP socket; v4-mapped destinations as connect6.
#[inline(always)]
fn dns_redirect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != DNS_SERVER_PORT {
        return ALLOW;
    }
    // SAFETY: field of the valid context.
    let dst = unsafe { read_ip6(&raw const sa.user_ip6) };
    if is_loopback(&dst) {
        return ALLOW;
    }
    let mapped = is_v4_mapped(&dst);
    let family = if mapped { AF_INET } else { AF_INET6 };
    match record_dns(ctx, dst, family) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => REJECT,
        Verdict::Redirect => {
            // A dual-stack socket asking for an IPv4 resolver keeps talking
            // IPv4 (to the agent's 127.0.0.1 socket).
            let to = if mapped {
                v4_mapped(LOOPBACK_V4_BE)
            } else {
                LOOPBACK_V6
            };
            // SAFETY: field of the valid context.
            unsafe { write_ip6(&raw mut sa.user_ip6, to) };
            sa.user_port = u32::from(DNS_PORT.to_be());
            ALLOW
        }
    }
}

/// Unconnected UDP sends (connected ones went through connect4 already).
#[cgroup_sock_addr(sendmsg4)]
pub fn nm_sendmsg4(ctx: SockAddrContext) -> i32 {
    dns_redirect4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn nm_sendmsg6(ctx: SockAddrContext) -> i32 {
    dns_redirect6(&ctx)
}

/// The resolver a socket's DNS was sent to, if the agent answered it.
#[inline(always)]
fn dns_orig(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy of a value.
    unsafe { DNS_ORIG.get(cookie) }.copied()
}

/// A datagram from 127.0.0.1:15053 to a socket that sent DNS: from its
/// resolver, as far as the app can tell. Must return 1 (recvmsg hooks
/// cannot drop).
#[cgroup_sock_addr(recvmsg4)]
pub fn nm_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4 != LOOPBACK_V4_BE || sa.user_port != u32::from(DNS_PORT.to_be()) {
        return ALLOW;
    }
    if let Some(orig) = dns_orig(&ctx)
        && orig.family == AF_INET
    {
        sa.user_ip4 = orig.addr[3];
        sa.user_port = u32::from(orig.port.to_be());
        bump(counter::DNS_REVERSED);
    }
    ALLOW
}

/// The same on AF_INET6 sockets: from [::1]:15053, or from the v4-mapped
/// 127.0.0.1:15053 on a dual-stack socket that sent to an IPv4 resolver.
#[cgroup_sock_addr(recvmsg6)]
pub fn nm_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_port != u32::from(DNS_PORT.to_be()) {
        return ALLOW;
    }
    // SAFETY: field of the valid context.
    let src = unsafe { read_ip6(&raw const sa.user_ip6) };
    let family = if src == v4_mapped(LOOPBACK_V4_BE) {
        AF_INET
    } else if src == LOOPBACK_V6 {
        AF_INET6
    } else {
        return ALLOW;
    };
    if let Some(orig) = dns_orig(&ctx)
        && orig.family == family
    {
        // SAFETY: field of the valid context.
        unsafe { write_ip6(&raw mut sa.user_ip6, orig.addr) };
        sa.user_port = u32::from(orig.port.to_be());
        bump(counter::DNS_REVERSED);
    }
    ALLOW
}

/// Removes a UDP socket's DNS record when the socket goes.
#[cgroup_sock(sock_release)]
pub fn nm_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    if unsafe { (*ctx.sock).type_ } == SOCK_DGRAM {
        // SAFETY: helper valid for cgroup sock programs (Linux 5.8+).
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = DNS_ORIG.remove(cookie);
    }
    ALLOW
}

#[sock_ops]
pub fn nm_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sockops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.get_ptr(cookie).is_some() {
        // Ask for TCP_CLOSE so both records are removed whatever happens.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// The socket's (local, remote) addresses. Both families' fields are read
/// unconditionally and the values selected afterwards: reading them in
/// separate branches lets LLVM merge the loads into one ctx access with a
/// variable offset, which the verifier rejects.
#[inline(always)]
fn local_remote(ctx: &SockOpsContext) -> (Ip6Words, Ip6Words) {
    let ops = ctx.ops;
    // SAFETY: `ops` is the valid context for the program's run.
    let (family, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            read_ip6(&raw const (*ops).local_ip6),
            read_ip6(&raw const (*ops).remote_ip6),
        )
    };
    select_family(family, l4, r4, l6, r6)
}

#[inline(always)]
fn select_family(
    family: u32,
    l4: u32,
    r4: u32,
    l6: Ip6Words,
    r6: Ip6Words,
) -> (Ip6Words, Ip6Words) {
    if family == u32::from(AF_INET) {
        (v4_mapped(l4), v4_mapped(r4))
    } else {
        (l6, r6)
    }
}

/// A context's IPv6 address, one 4-byte volatile load per word (the only
/// access size the verifier allows on these fields).
#[inline(always)]
unsafe fn read_ip6(p: *const [u32; 4]) -> Ip6Words {
    let w = p.cast::<u32>();
    // SAFETY: the caller passes a field of a valid context.
    unsafe {
        [
            read_volatile(w),
            read_volatile(w.add(1)),
            read_volatile(w.add(2)),
            read_volatile(w.add(3)),
        ]
    }
}

/// Stores an IPv6 address into a context field, one 4-byte volatile store
/// per word: a plain array copy becomes a copy through a pointer derived
/// from the context, which the verifier rejects.
#[inline(always)]
unsafe fn write_ip6(p: *mut [u32; 4], a: Ip6Words) {
    let w = p.cast::<u32>();
    // SAFETY: the caller passes a field of a valid context.
    unsafe {
        write_volatile(w, a[0]);
        write_volatile(w.add(1), a[1]);
        write_volatile(w.add(2), a[2]);
        write_volatile(w.add(3), a[3]);
    }
}

#[inline(always)]
fn flow_key(ctx: &SockOpsContext, netns_cookie: u64) -> FlowKey {
    let (local, remote) = local_remote(ctx);
    FlowKey {
        netns_cookie,
        src_addr: local,
        dst_addr: remote,
        src_port: ctx.local_port() as u16,
        dst_port: u32::from_be(ctx.remote_port()) as u16,
        _pad: 0,
    }
}

#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    // SAFETY: helpers valid for sockops (netns cookie: Linux 5.15+).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PENDING.get_ptr(cookie) else {
        return;
    };
    // SAFETY: copied out before the entry is removed below.
    let orig = unsafe { *orig };
    let _ = PENDING.remove(cookie);
    let key = flow_key(ctx, orig.netns_cookie);
    if ORIG_DST.insert(key, orig, BPF_NOEXIST as u64).is_err() {
        // The agent finds no record and resets the connection: fail closed.
        bump(counter::ORIG_DST_FULL);
        return;
    }
    bump(counter::ORIG_DST_RECORDED);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if config().sockmap_enabled != 0 {
        // SAFETY: read-only copy.
        let flags = unsafe { ENROLLED.get(orig.netns_cookie) }
            .map(|p| p.flags)
            .unwrap_or(0);
        if flags & ENROLLED_FLAG_SOCKMAP != 0 {
            let (local, remote) = local_remote(ctx);
            let mut sk_key = SockKey {
                local_addr: local,
                remote_addr: remote,
                local_port: ctx.local_port(),
                remote_port: u32::from_be(ctx.remote_port()),
            };
            // SAFETY: the sockops context is valid for the program's run.
            if SOCKHASH
                .update(&mut sk_key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
                .is_ok()
            {
                bump(counter::SOCKMAP_ADDED);
            }
        }
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: helpers valid for sockops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = PENDING.remove(cookie);
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = ORIG_DST.remove(flow_key(ctx, netns_cookie));
}

/// Sends what the agent writes to an app socket straight to that socket's
/// receive queue, skipping the loopback TCP stack.
#[sk_msg]
pub fn nm_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let md = unsafe { &*ctx.msg };
    // Only the agent's side (local port 15001) takes the fast path. The app's
    // first bytes may already sit in the agent socket's TCP queue before the
    // agent adds that socket to the map, and the kernel reads redirected data
    // before queued TCP data: redirecting app->agent could reorder bytes.
    if md.local_port != u32::from(OUTBOUND_PORT) {
        return SK_PASS;
    }
    let m = ctx.msg;
    // SAFETY: reads of the valid context, unconditional (see local_remote).
    let (family, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(&raw const (*m).family),
            read_volatile(&raw const (*m).local_ip4),
            read_volatile(&raw const (*m).remote_ip4),
            read_ip6(&raw const (*m).local_ip6),
            read_ip6(&raw const (*m).remote_ip6),
        )
    };
    let (local, remote) = select_family(family, l4, r4, l6, r6);
    // The peer socket sees the same connection with the ends swapped.
    let mut peer = SockKey {
        local_addr: remote,
        remote_addr: local,
        local_port: u32::from_be(md.remote_port),
        remote_port: md.local_port,
    };
    let verdict = SOCKHASH.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64);
    if verdict == SK_PASS as i64 {
        bump(counter::MSG_REDIRECTED);
    }
    // Without a peer in the map the kernel passes the data normally.
    SK_PASS
}

/// Runs in an enrolled pod's netns for every listener lookup. Steers TCP
/// connections that arrive from outside the pod to the agent's capture
/// listener; the accepted socket keeps the original local address, so the
/// agent reads the destination port from it.
///
/// Not captured: connections from inside the pod — over loopback, from a
/// loopback source (how the agent reaches the app: the kernel drops
/// loopback sources that arrive on other devices), or from the pod's own
/// address to itself (a SYN from outside that forges it cannot complete:
/// the SYN-ACK stays in the pod) — and the HBONE port, whose listener is
/// the agent's already. The ingress ifindex alone does not tell: traffic to the
/// pod's own address is reported on the device that holds the address.
#[sk_lookup]
pub fn nm_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: reads of the valid context, unconditional (see local_remote).
    let (protocol, family, ifindex, port, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).ingress_ifindex),
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).local_ip4),
            read_volatile(&raw const (*l).remote_ip4),
            read_ip6(&raw const (*l).local_ip6),
            read_ip6(&raw const (*l).remote_ip6),
        )
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || port == u32::from(HBONE_PORT) {
        return SK_PASS;
    }
    let (key, remote) = select_family(family, l4, r4, l6, r6);
    if key == remote || is_loopback(&remote) {
        return SK_PASS;
    }
    match CAPTURE.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            bump(counter::INBOUND_CAPTURED);
            SK_PASS
        }
        // The program is only attached while the pod is enrolled: without
        // the agent's listener, refuse rather than let plaintext past policy.
        Err(_) => {
            bump(counter::INBOUND_NO_LISTENER);
            SK_DROP
        }
    }
}

/// 127.0.0.0/8 (v4-mapped) or ::1.
#[inline(always)]
fn is_loopback(a: &Ip6Words) -> bool {
    (is_v4_mapped(a) && u32::from_be(a[3]) >> 24 == 127)
        || (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == u32::to_be(1))
}

// Only for the bpf target: host-side `cargo clippy` links std's.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
