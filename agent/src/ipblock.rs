//! Address blocks (`10.0.0.0/8`, `fd00::/16`, one address) as policies and
//! the egress registry write them; IPv4-mapped IPv6 is IPv4.
use std::net::IpAddr;

/// An address block: `10.0.0.0/8`, `fd00::/16` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    addr: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn parse(v: &str) -> Result<Self, String> {
        let (ip, prefix) = match v.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (v, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{v:?} is not an IP address or CIDR block"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{v:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    /// The one address of a full-length block.
    pub fn single(&self) -> Option<IpAddr> {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        (self.prefix == max).then_some(self.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        if self.prefix == 0 {
            return true;
        }
        let shift = if self.addr.is_ipv4() {
            32 - u32::from(self.prefix)
        } else {
            128 - u32::from(self.prefix)
        };
        let shift = if self.addr.is_ipv4() {
            shift + 96
        } else {
            shift
        };
        (bits(ip) >> shift) == (bits(self.addr) >> shift)
    }
}
