//! The userspace half of the shared types: `aya::Pod` for every map type and
//! the netns-cookie socket option. This is the one module outside the eBPF
//! crate that needs `unsafe`.
#![allow(unsafe_code)]

extern crate std;

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd, BorrowedFd},
};

use crate::{EnrolledPod, FlowKey, Ip6Words, OrigDst, ProgramConfig, SockKey};

// SAFETY: all are `#[repr(C)]`, `Copy`, made only of integers, and have
// explicit padding fields, so every bit pattern is valid and none is uninit.
unsafe impl aya::Pod for EnrolledPod {}
unsafe impl aya::Pod for OrigDst {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for ProgramConfig {}

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the netns a socket lives in.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Reads the network-namespace cookie of the socket `fd`.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = core::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the borrow's lifetime; `cookie`
    // and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// An address as the programs store it (IPv4 v4-mapped).
pub fn ip_to_words(ip: IpAddr) -> Ip6Words {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The inverse of [`ip_to_words`]: v4-mapped words become an IPv4 address.
pub fn words_to_ip(words: Ip6Words) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_match_the_kernel_layout() {
        for ip in ["10.244.1.10", "127.0.0.1", "fd00:244:1::a", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(words_to_ip(ip_to_words(ip)), ip);
        }
        // IPv4 is stored v4-mapped, in network order, as the programs do.
        let w = ip_to_words("10.0.0.1".parse().unwrap());
        assert!(crate::is_v4_mapped(&w));
        assert_eq!(w, crate::v4_mapped(u32::from_ne_bytes([10, 0, 0, 1])));
    }

    #[test]
    fn map_types_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<FlowKey>(), 8 + 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2 + 4 + 8);
        assert_eq!(size_of::<SockKey>(), 16 + 16 + 4 + 4);
        assert_eq!(size_of::<EnrolledPod>(), 8);
    }
}
