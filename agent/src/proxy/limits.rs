//! Admission: bounds on what clients can make the agent hold, so no client,
//! pod or peer can take the descriptors every other connection needs.
//!
//! Each proxied connection is admitted under three counts — all
//! connections, its local workload and direction, and (inbound) its source
//! address — or refused at once (reset, `CONNECTION_LIMIT`), counted by
//! limit, and logged at most a few times a second. Unless set, the total
//! is derived from the open-file limit with a reserve for the admin
//! servers and HBONE pool, a workload may hold half of it and a source
//! address a quarter.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::time::Instant;

use super::ProxyError;

/// Descriptors a proxied connection may hold at worst: two sockets, and a
/// pipe pair per direction while bytes are spliced.
pub const FDS_PER_CONNECTION: usize = 6;
/// Descriptors kept out of the total for everything else: the servers,
/// the HBONE pool, listeners, files.
pub const RESERVED_FDS: usize = 2048;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    direction: &'static str,
    limit: &'static str,
}

/// Connections held against one cap, in all and per source.
#[derive(Default)]
struct Budget {
    total: usize,
    sources: HashMap<IpAddr, usize>,
}

impl Budget {
    fn take(&mut self, source: Option<IpAddr>) {
        self.total += 1;
        if let Some(s) = source {
            *self.sources.entry(s).or_default() += 1;
        }
    }

    fn give_back(&mut self, source: Option<IpAddr>) {
        self.total -= 1;
        if let Some(s) = source
            && let Some(n) = self.sources.get_mut(&s)
        {
            *n -= 1;
            if *n == 0 {
                self.sources.remove(&s);
            }
        }
    }

    fn from(&self, source: IpAddr) -> usize {
        self.sources.get(&source).copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct Counts {
    /// Proxied connections, HBONE streams and authenticated HBONE
    /// connections.
    main: Budget,
    workloads: HashMap<(u32, &'static str), usize>,
    /// HBONE connections not authenticated yet (TLS handshake running):
    /// apart, so peers nobody authenticated cannot take the main budget.
    handshakes: Budget,
}

pub struct Limits {
    max_total: usize,
    per_workload: usize,
    per_source: usize,
    max_handshakes: usize,
    counts: Mutex<Counts>,
    shed: Family<ShedLabels, Counter>,
    in_use: Gauge,
    /// For the log of refusals: at most [`LogSampler::PER_SECOND`] lines a second.
    pub sampler: LogSampler,
}

/// An admitted connection; its counts go down when it is dropped.
pub struct Admitted {
    limits: Arc<Limits>,
    handshake: bool,
    workload: Option<(u32, &'static str)>,
    source: Option<IpAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        if self.handshake {
            c.handshakes.give_back(self.source);
            return;
        }
        c.main.give_back(self.source);
        if let Some(w) = self.workload
            && let Some(n) = c.workloads.get_mut(&w)
        {
            *n -= 1;
            if *n == 0 {
                c.workloads.remove(&w);
            }
        }
        self.limits.in_use.set(c.main.total as i64);
    }
}

/// What a source address is counted as: itself, or for IPv6 its /64 (one
/// host usually has a whole /64 to send from).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl Limits {
    /// `max_total` 0: derived from the process's open-file limit.
    pub fn new(config: &crate::config::Limits, registry: &mut Registry) -> Arc<Self> {
        let max_total = match config.max_connections {
            0 => {
                let nofile =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                        .map_or(1024, |(soft, _)| soft as usize);
                (nofile.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION).max(64)
            }
            n => n,
        };
        let limits = Self {
            max_handshakes: (max_total / 8).max(64),
            max_total,
            per_workload: match config.max_connections_per_workload {
                0 => (max_total / 2).max(1),
                n => n,
            },
            per_source: match config.max_connections_per_source {
                0 => (max_total / 4).max(1),
                n => n,
            },
            counts: Mutex::new(Counts::default()),
            shed: Family::default(),
            in_use: Gauge::default(),
            sampler: LogSampler::default(),
        };
        registry.register(
            "connections_shed",
            "Connections refused at once because a limit was reached, by direction (hbone_handshake: not authenticated yet) and limit (total, per_workload, per_source)",
            limits.shed.clone(),
        );
        registry.register(
            "connections_admitted",
            "Proxied connections and HBONE streams held now, against nodemesh_connections_limit",
            limits.in_use.clone(),
        );
        let max = Gauge::<i64>::default();
        max.set(max_total as i64);
        registry.register(
            "connections_limit",
            "The most proxied connections and HBONE streams held at once (limits.maxConnections, or derived from the open-file limit)",
            max,
        );
        Arc::new(limits)
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// The limits in force (those left 0 in the config resolved), and the
    /// connections held now.
    pub fn effective(&self) -> serde_json::Value {
        let c = self.lock();
        serde_json::json!({
            "maxConnections": self.max_total,
            "maxConnectionsPerWorkload": self.per_workload,
            "maxConnectionsPerSource": self.per_source,
            "maxHandshakes": self.max_handshakes,
            "admitted": c.main.total,
            "handshakes": c.handshakes.total,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse(&self, direction: &'static str, limit: &'static str, max: usize) -> ProxyError {
        self.shed
            .get_or_create(&ShedLabels { direction, limit })
            .inc();
        ProxyError::Overloaded { limit, max }
    }

    /// Admits one connection of `direction` for local workload `workload`
    /// (none: counted in the total only) from `source` (inbound only).
    pub fn admit(
        self: &Arc<Self>,
        direction: &'static str,
        workload: Option<u32>,
        source: Option<IpAddr>,
    ) -> Result<Admitted, ProxyError> {
        let source = source.map(source_key);
        let mut c = self.lock();
        if c.main.total >= self.max_total {
            return Err(self.refuse(direction, "total", self.max_total));
        }
        let workload = workload.map(|w| (w, direction));
        if let Some(w) = workload
            && c.workloads.get(&w).copied().unwrap_or(0) >= self.per_workload
        {
            return Err(self.refuse(direction, "per_workload", self.per_workload));
        }
        if let Some(s) = source
            && c.main.from(s) >= self.per_source
        {
            return Err(self.refuse(direction, "per_source", self.per_source));
        }
        c.main.take(source);
        if let Some(w) = workload {
            *c.workloads.entry(w).or_default() += 1;
        }
        self.in_use.set(c.main.total as i64);
        Ok(Admitted {
            limits: self.clone(),
            handshake: false,
            workload,
            source,
        })
    }

    /// Admits an HBONE connection from `source` for its TLS handshake, in
    /// a budget of its own (an eighth of the total, at least 64; a quarter
    /// of that per source). Once the peer is authenticated, the connection
    /// is [`Self::admit`]ted and this is dropped.
    pub fn admit_handshake(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, ProxyError> {
        const DIRECTION: &str = "hbone_handshake";
        let source = source_key(source);
        let per_source = (self.max_handshakes / 4).max(1);
        let mut c = self.lock();
        if c.handshakes.total >= self.max_handshakes {
            return Err(self.refuse(DIRECTION, "total", self.max_handshakes));
        }
        if c.handshakes.from(source) >= per_source {
            return Err(self.refuse(DIRECTION, "per_source", per_source));
        }
        c.handshakes.take(Some(source));
        Ok(Admitted {
            limits: self.clone(),
            handshake: true,
            workload: None,
            source: Some(source),
        })
    }
}

/// Lets through at most [`Self::PER_SECOND`] log lines of one kind a second
/// and counts the rest, so a flood of refusals cannot flood the logs.
#[derive(Default)]
pub struct LogSampler(Mutex<Window>);

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogSampler {
    pub const PER_SECOND: u32 = 10;

    /// `Some(n)`: log this one, noting the `n` left out before it; `None`:
    /// leave it out.
    pub fn sample(&self) -> Option<u64> {
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if w.started.is_none_or(|s| now - s >= Duration::from_secs(1)) {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < Self::PER_SECOND {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn limits(total: usize, per_workload: usize, per_source: usize) -> Arc<Limits> {
        let cfg = config::Limits {
            max_connections: total,
            max_connections_per_workload: per_workload,
            max_connections_per_source: per_source,
            ..Default::default()
        };
        Limits::new(&cfg, &mut Registry::default())
    }

    #[test]
    fn each_limit_refuses_past_its_count_and_frees_on_drop() {
        let l = limits(4, 2, 2);
        let src: IpAddr = [10, 0, 0, 1].into();
        let a = l.admit("inbound", Some(1), Some(src)).unwrap();
        let _b = l.admit("inbound", Some(1), Some(src)).unwrap();
        let e = l.admit("inbound", Some(1), Some(src)).err().unwrap();
        assert!(
            matches!(
                e,
                ProxyError::Overloaded {
                    limit: "per_workload",
                    max: 2
                }
            ),
            "{e}"
        );
        // Another direction of the same workload is counted apart.
        let _c = l.admit("outbound", Some(1), None).unwrap();
        let e = l
            .admit("inbound", Some(2), Some(src))
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProxyError::Overloaded {
                    limit: "per_source",
                    ..
                }
            ),
            "{e}"
        );
        let _d = l.admit("inbound", Some(2), None).unwrap();
        let e = l.admit("outbound", Some(3), None).map(|_| ()).unwrap_err();
        assert!(
            matches!(
                e,
                ProxyError::Overloaded {
                    limit: "total",
                    max: 4
                }
            ),
            "{e}"
        );
        assert_eq!(e.response_flags().as_str(), "CONNECTION_LIMIT");
        drop(a);
        assert!(l.admit("outbound", Some(3), None).is_ok());
    }

    #[test]
    fn handshakes_have_a_budget_of_their_own_and_ipv6_sources_count_by_64() {
        let l = limits(8, 0, 0);
        assert_eq!(l.max_handshakes, 64);
        let host = |n: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, n]);
        // One host cycling through its /64 is one source: 16 of the 64.
        let held: Vec<_> = (0..16)
            .map(|n| l.admit_handshake(host(n)).unwrap())
            .collect();
        let e = l.admit_handshake(host(99)).map(|_| ()).unwrap_err();
        assert!(
            matches!(
                e,
                ProxyError::Overloaded {
                    limit: "per_source",
                    max: 16
                }
            ),
            "{e}"
        );
        // Unauthenticated peers take nothing from the main budget.
        let main: Vec<_> = (0..8)
            .map(|_| l.admit("inbound", None, None).unwrap())
            .collect();
        assert!(l.admit("inbound", None, None).is_err());
        drop(main);
        drop(held);
        assert_eq!(l.lock().handshakes.total, 0);
        let mapped = IpAddr::from(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(source_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn unset_per_workload_and_per_source_limits_are_shares_of_the_total() {
        let l = limits(100, 0, 0);
        assert_eq!((l.max_total(), l.per_workload, l.per_source), (100, 50, 25));
        let held: Vec<_> = (0..50)
            .map(|_| l.admit("outbound", Some(1), None).unwrap())
            .collect();
        assert!(l.admit("outbound", Some(1), None).is_err());
        assert!(l.admit("outbound", Some(2), None).is_ok());
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_lets_ten_a_second_through_and_counts_the_rest() {
        let s = LogSampler::default();
        let passed = (0..25).filter(|_| s.sample().is_some()).count();
        assert_eq!(passed, 10);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.sample(), Some(15));
        assert_eq!(s.sample(), Some(0));
    }
}
