//! What each enrolled pod resolved: names to addresses, with their TTL.
//!
//! The egress path asks it which names a pod knows an address by (so a
//! connection to an address is named by the pod's own lookup) and whether
//! a pod resolved a name to an address (so an SNI cannot claim a name the
//! pod never looked up for that address). An answer is kept for its TTL
//! plus [`GRACE`]: apps and their runtimes cache answers a little past the
//! TTL (glibc does not, Java and Go resolvers may), and a connection made
//! right at expiry must not be refused.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::hostname::normalize;

/// How long past its TTL an answer still names its addresses.
pub const GRACE: Duration = Duration::from_secs(30);
/// Records kept per pod; past it the soonest to expire go first (a pod
/// resolving without end cannot grow the agent without bound).
pub const MAX_RECORDS_PER_POD: usize = 4096;

#[derive(Debug, Clone)]
struct Record {
    name: String,
    ip: IpAddr,
    expires: Instant,
}

#[derive(Default)]
pub struct DnsRecords {
    /// Workload id -> that pod's records.
    pods: Mutex<HashMap<u32, Vec<Record>>>,
}

impl DnsRecords {
    /// Records that workload `id` resolved `name` to `ips`, for `ttl`.
    pub fn record(&self, id: u32, name: &str, ips: &[IpAddr], ttl: Duration) {
        let name = normalize(name);
        let now = Instant::now();
        let expires = now + ttl + GRACE;
        let mut pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        let records = pods.entry(id).or_default();
        records.retain(|r| r.expires > now);
        for ip in ips {
            let ip = ip.to_canonical();
            match records.iter_mut().find(|r| r.ip == ip && r.name == name) {
                Some(r) => r.expires = r.expires.max(expires),
                None => records.push(Record {
                    name: name.clone(),
                    ip,
                    expires,
                }),
            }
        }
        if records.len() > MAX_RECORDS_PER_POD {
            records.sort_by_key(|r| std::cmp::Reverse(r.expires));
            records.truncate(MAX_RECORDS_PER_POD);
        }
    }

    /// The names workload `id` resolved to `ip`, still valid.
    pub fn names_of(&self, id: u32, ip: IpAddr) -> Vec<String> {
        let ip = ip.to_canonical();
        let now = Instant::now();
        let pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = pods
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|r| r.ip == ip && r.expires > now)
            .map(|r| r.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether workload `id` resolved `name` to `ip` (still valid).
    pub fn resolved(&self, id: u32, name: &str, ip: IpAddr) -> bool {
        let name = normalize(name);
        self.names_of(id, ip).contains(&name)
    }

    /// Forgets a pod that left.
    pub fn forget(&self, id: u32) {
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Records held, all pods together (a gauge).
    pub fn len(&self) -> usize {
        let pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        pods.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per workload id: name, address, seconds left (for `/config_dump`).
    pub fn dump(&self) -> serde_json::Value {
        let now = Instant::now();
        let pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = serde_json::Map::new();
        for (id, records) in pods.iter() {
            let list: Vec<serde_json::Value> = records
                .iter()
                .filter(|r| r.expires > now)
                .map(|r| {
                    serde_json::json!({
                        "name": r.name,
                        "address": r.ip.to_string(),
                        "validForSeconds": (r.expires - now).as_secs(),
                    })
                })
                .collect();
            out.insert(id.to_string(), list.into());
        }
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn answers_name_addresses_for_their_ttl_plus_grace_per_pod() {
        let r = DnsRecords::default();
        let ip: IpAddr = [10, 240, 0, 201].into();
        r.record(1, "PIM.example.com.", &[ip], Duration::from_secs(5));
        assert_eq!(r.names_of(1, ip), vec!["pim.example.com"]);
        assert!(r.resolved(1, "pim.example.com", ip));
        // Another pod did not resolve it.
        assert!(!r.resolved(2, "pim.example.com", ip));
        // Another name for the same address: not this one.
        assert!(!r.resolved(1, "notify.example.com", ip));
        // A v4-mapped address is the same address.
        assert!(r.resolved(1, "pim.example.com", "::ffff:10.240.0.201".parse().unwrap()));
        tokio::time::advance(Duration::from_secs(5) + GRACE - Duration::from_millis(1)).await;
        assert!(r.resolved(1, "pim.example.com", ip));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!r.resolved(1, "pim.example.com", ip));
        assert!(r.names_of(1, ip).is_empty());
    }

    #[test]
    fn bounded_per_pod() {
        let r = DnsRecords::default();
        for i in 0..(MAX_RECORDS_PER_POD + 10) {
            let ip = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
            r.record(7, "many.example.com", &[ip], Duration::from_secs(60));
        }
        assert_eq!(r.len(), MAX_RECORDS_PER_POD);
        r.forget(7);
        assert!(r.is_empty());
    }
}
