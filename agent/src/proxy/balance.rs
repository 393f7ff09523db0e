//! Picking an endpoint for each connection, with state kept per endpoint
//! (connections in flight, connect outcomes, ejection) and per destination
//! (connections open against `maxConnections`, a retry budget).
//!
//! A destination is a mesh service or a registry host. Round robin over
//! the endpoints not ejected; when every endpoint is ejected they are all
//! used again (as Envoy's panic threshold does), since refusing everything
//! helps no one. Ejection follows the destination's `outlierDetection`
//! (none by default: nothing is ever ejected).
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::time::Instant;
use tracing::info;

use crate::{
    registry::OutlierPolicy,
    state::{Endpoint, ServiceKey},
};

/// What connections are balanced for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Destination {
    /// A mesh service.
    Service(ServiceKey),
    /// A ServiceEntry host.
    Host(String),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(s) => write!(f, "{s}"),
            Self::Host(h) => f.write_str(h),
        }
    }
}

/// An endpoint the balancer can pick.
pub trait Balanced: Clone {
    fn addr(&self) -> SocketAddr;
}

impl Balanced for Endpoint {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Balanced for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

/// Retries may add this share of first attempts...
const RETRY_RATIO: f64 = 0.2;
/// ...plus this many per second, so a quiet destination can still retry
/// (linkerd2-proxy's defaults).
const MIN_RETRIES_PER_SECOND: f64 = 10.0;
/// Unused retry allowance expires after this long.
const RETRY_BUDGET_TTL: Duration = Duration::from_secs(10);

/// What the balancer knows of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub active: AtomicUsize,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    state: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    consecutive_failures: u32,
    /// Envoy's ejection multiplier: the n-th ejection lasts n base times;
    /// lowered by one per `interval` spent out of ejection.
    times_ejected: u32,
    until: Option<Instant>,
    /// When the multiplier was last raised or lowered.
    since: Option<Instant>,
}

impl Ejection {
    fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| t > now)
    }

    fn decay(&mut self, policy: &OutlierPolicy, now: Instant) {
        if self.ejected(now) || self.times_ejected == 0 {
            return;
        }
        let since = self.since.unwrap_or(now).max(self.until.unwrap_or(now));
        let intervals = (now.saturating_duration_since(since).as_nanos()
            / policy.interval.as_nanos().max(1)) as u32;
        if intervals > 0 {
            self.times_ejected = self.times_ejected.saturating_sub(intervals);
            self.since = Some(now);
        }
    }
}

impl EndpointStats {
    fn ejected(&self, now: Instant) -> bool {
        lock(&self.state).ejected(now)
    }
}

/// A token bucket of retries (linkerd2-proxy's retry budget).
#[derive(Debug)]
struct RetryBudget {
    tokens: f64,
    refilled: Instant,
}

impl RetryBudget {
    fn new() -> Self {
        Self {
            tokens: MIN_RETRIES_PER_SECOND,
            refilled: Instant::now(),
        }
    }

    fn max() -> f64 {
        MIN_RETRIES_PER_SECOND * RETRY_BUDGET_TTL.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * MIN_RETRIES_PER_SECOND).min(Self::max());
        self.refilled = now;
    }

    fn deposit(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + RETRY_RATIO).min(Self::max());
    }

    fn withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct DestinationState {
    next: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>,
    outlier: Mutex<Option<OutlierPolicy>>,
    /// Connections open (for `maxConnections`).
    open: AtomicUsize,
    budget: Mutex<RetryBudget>,
}

impl Default for DestinationState {
    fn default() -> Self {
        Self {
            next: AtomicUsize::new(0),
            endpoints: Mutex::default(),
            outlier: Mutex::default(),
            open: AtomicUsize::new(0),
            budget: Mutex::new(RetryBudget::new()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    destination: String,
    /// `retried`, `budget_exhausted`, `no_other_endpoint`.
    outcome: &'static str,
}

/// The balancer's own families (labels bounded by the destinations the
/// registry and the workload state name).
#[derive(Default, Clone)]
pub struct BalancerMetrics {
    ejections: Family<DestinationLabels, Counter>,
    ejected: Family<DestinationLabels, Gauge>,
    retries: Family<RetryLabels, Counter>,
    overflows: Family<DestinationLabels, Counter>,
}

impl BalancerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by destination (service or host)",
            m.ejections.clone(),
        );
        registry.register(
            "outlier_ejections_active",
            "Endpoints ejected now, by destination",
            m.ejected.clone(),
        );
        registry.register(
            "connect_retries",
            "Connect attempts after a failed one, by destination and outcome (retried on another endpoint, budget_exhausted, no_other_endpoint)",
            m.retries.clone(),
        );
        registry.register(
            "upstream_overflows",
            "Connections refused at once because the destination's maxConnections were open",
            m.overflows.clone(),
        );
        m
    }

    fn labels(d: &Destination) -> DestinationLabels {
        DestinationLabels {
            destination: d.to_string(),
        }
    }
}

#[derive(Default)]
pub struct Balancer {
    destinations: Mutex<HashMap<Destination, Arc<DestinationState>>>,
    metrics: BalancerMetrics,
}

/// The endpoint picked for one connection; report how connecting went.
/// Counted in flight until dropped.
pub struct Pick<E> {
    pub endpoint: E,
    addr: SocketAddr,
    stats: Arc<EndpointStats>,
    destination: Arc<DestinationState>,
    key: Destination,
    metrics: BalancerMetrics,
}

impl<E> Drop for Pick<E> {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One of a destination's `maxConnections`, held while a connection is open.
pub struct ConnectionSlot(Arc<DestinationState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<E> Pick<E> {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connected(&self) {
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        lock(&self.stats.state).consecutive_failures = 0;
    }

    /// A connect failure: counted, and the endpoint ejected if the
    /// destination's outlier detection says so. True when it was ejected.
    pub fn connect_failed(&self) -> bool {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let Some(policy) = lock(&self.destination.outlier).clone() else {
            return false;
        };
        let now = Instant::now();
        let eligible = {
            let endpoints = lock(&self.destination.endpoints);
            let ejected = endpoints.values().filter(|e| e.ejected(now)).count();
            // Envoy ejects while the share ejected is below the maximum,
            // and always at least one.
            let max = endpoints.len() * policy.max_ejection_percent as usize / 100;
            ejected < max.max(1).min(endpoints.len())
        };
        let mut state = lock(&self.stats.state);
        state.decay(&policy, now);
        state.consecutive_failures += 1;
        if state.consecutive_failures < policy.consecutive_errors || state.ejected(now) || !eligible
        {
            return false;
        }
        state.times_ejected += 1;
        state.since = Some(now);
        let time = policy.base_ejection_time * state.times_ejected;
        state.until = Some(now + time);
        state.consecutive_failures = 0;
        drop(state);
        info!(destination = %self.key, endpoint = %self.addr, ejection_ms = time.as_millis(), "endpoint ejected");
        let labels = BalancerMetrics::labels(&self.key);
        self.metrics.ejections.get_or_create(&labels).inc();
        let gauge = self.metrics.ejected.get_or_create(&labels).clone();
        gauge.inc();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(time).await;
                gauge.dec();
            });
        }
        true
    }
}

/// Why a retry was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRetry {
    BudgetExhausted,
    NoOtherEndpoint,
}

impl NoRetry {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BudgetExhausted => "retry budget exhausted",
            Self::NoOtherEndpoint => "no other endpoint",
        }
    }
}

impl Balancer {
    pub fn new(metrics: BalancerMetrics) -> Arc<Self> {
        Arc::new(Self {
            destinations: Mutex::default(),
            metrics,
        })
    }

    fn destination(&self, key: &Destination) -> Arc<DestinationState> {
        lock(&self.destinations)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Takes one of `max` connection slots of `key`; `None` when they are
    /// all in use (the connection fails fast, counted).
    pub fn admit(&self, key: &Destination, max: Option<u32>) -> Option<ConnectionSlot> {
        let d = self.destination(key);
        let open = d.open.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot(d);
        if max.is_some_and(|m| open >= m as usize) {
            self.metrics
                .overflows
                .get_or_create(&BalancerMetrics::labels(key))
                .inc();
            return None;
        }
        Some(slot)
    }

    /// One of `endpoints` (the destination's current ones) for a new
    /// connection, none of `tried`; `outlier` is the destination's policy
    /// now (it takes effect from this pick on).
    pub fn pick<E: Balanced>(
        &self,
        key: &Destination,
        endpoints: &[E],
        tried: &[SocketAddr],
        outlier: Option<&OutlierPolicy>,
    ) -> Option<Pick<E>> {
        if endpoints.is_empty() {
            return None;
        }
        let d = self.destination(key);
        {
            let mut current = lock(&d.outlier);
            if current.as_ref() != outlier {
                *current = outlier.cloned();
            }
        }
        if tried.is_empty() {
            lock(&d.budget).deposit(Instant::now());
        }
        let now = Instant::now();
        let stats: Vec<Arc<EndpointStats>> = {
            let mut known = lock(&d.endpoints);
            // Endpoints that left the destination take their state with them.
            if known.len() > endpoints.len() {
                known.retain(|addr, _| endpoints.iter().any(|e| e.addr() == *addr));
            }
            endpoints
                .iter()
                .map(|e| known.entry(e.addr()).or_default().clone())
                .collect()
        };
        let untried: Vec<usize> = (0..endpoints.len())
            .filter(|&i| !tried.contains(&endpoints[i].addr()))
            .collect();
        if untried.is_empty() {
            return None;
        }
        let healthy: Vec<usize> = untried
            .iter()
            .copied()
            .filter(|&i| !stats[i].ejected(now))
            .collect();
        let n = d.next.fetch_add(1, Ordering::Relaxed);
        let i = if healthy.is_empty() {
            untried[n % untried.len()]
        } else {
            healthy[n % healthy.len()]
        };
        stats[i].active.fetch_add(1, Ordering::AcqRel);
        Some(Pick {
            addr: endpoints[i].addr(),
            endpoint: endpoints[i].clone(),
            stats: stats[i].clone(),
            destination: d,
            key: key.clone(),
            metrics: self.metrics.clone(),
        })
    }

    /// Another endpoint after a failed connect, if the destination's retry
    /// budget allows one (so retries never multiply an outage).
    pub fn retry<E: Balanced>(
        &self,
        key: &Destination,
        endpoints: &[E],
        tried: &[SocketAddr],
        outlier: Option<&OutlierPolicy>,
    ) -> Result<Pick<E>, NoRetry> {
        let count = |outcome| {
            self.metrics
                .retries
                .get_or_create(&RetryLabels {
                    destination: key.to_string(),
                    outcome,
                })
                .inc();
        };
        if !endpoints.iter().any(|e| !tried.contains(&e.addr())) {
            count("no_other_endpoint");
            return Err(NoRetry::NoOtherEndpoint);
        }
        let d = self.destination(key);
        if !lock(&d.budget).withdraw(Instant::now()) {
            count("budget_exhausted");
            return Err(NoRetry::BudgetExhausted);
        }
        count("retried");
        self.pick(key, endpoints, tried, outlier)
            .ok_or(NoRetry::NoOtherEndpoint)
    }

    /// Forgets destinations `keep` says are gone.
    pub fn retain(&self, keep: impl Fn(&Destination) -> bool) {
        lock(&self.destinations).retain(|k, _| keep(k));
    }

    /// Per destination and endpoint: in flight, connected, failed, ejected
    /// (for `/config_dump`).
    pub fn dump(&self) -> serde_json::Value {
        let now = Instant::now();
        let destinations = lock(&self.destinations);
        let mut out = serde_json::Map::new();
        for (key, d) in destinations.iter() {
            let endpoints: Vec<serde_json::Value> = lock(&d.endpoints)
                .iter()
                .map(|(addr, s)| {
                    let state = lock(&s.state);
                    serde_json::json!({
                        "address": addr.to_string(),
                        "active": s.active.load(Ordering::Relaxed),
                        "connected": s.connected.load(Ordering::Relaxed),
                        "failed": s.failed.load(Ordering::Relaxed),
                        "ejectedForMs": state.until.filter(|t| *t > now).map(|t| (t - now).as_millis()),
                        "timesEjected": state.times_ejected,
                    })
                })
                .collect();
            out.insert(key.to_string(), endpoints.into());
        }
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Pod;

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                pod: Arc::new(Pod {
                    name: format!("p{i}"),
                    namespace: "shop".into(),
                    service_account: "default".into(),
                    labels: Default::default(),
                    ips: vec![[10, 0, 0, i].into()],
                    node: "n".into(),
                    netns: None,
                    uid: None,
                    workload: None,
                }),
                addr: SocketAddr::from(([10, 0, 0, i], 80)),
            })
            .collect()
    }

    fn key() -> Destination {
        Destination::Service(ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        })
    }

    fn balancer() -> Arc<Balancer> {
        Balancer::new(BalancerMetrics::default())
    }

    #[test]
    fn round_robin_and_in_flight_counts() {
        let b = balancer();
        let eps = endpoints(3);
        let picks: Vec<Pick<Endpoint>> = (0..6)
            .map(|_| b.pick(&key(), &eps, &[], None).unwrap())
            .collect();
        let mut seen: Vec<SocketAddr> = picks.iter().map(|p| p.endpoint.addr).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(b.dump()["web.shop"][0]["active"], 2);
        drop(picks);
        assert_eq!(b.dump()["web.shop"][0]["active"], 0);
        assert!(b.pick::<Endpoint>(&key(), &[], &[], None).is_none());
    }

    fn policy(consecutive: u32, max_percent: u32) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_errors: consecutive,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: max_percent,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_a_growing_time_then_it_returns() {
        let b = balancer();
        let p = policy(2, 50);
        let eps = endpoints(2);
        let bad = eps[0].addr;
        let pick = |b: &Balancer| b.pick(&key(), &eps, &[], Some(&p)).unwrap();
        let fail_bad = |b: &Balancer| loop {
            let p = pick(b);
            if p.endpoint.addr == bad {
                p.connect_failed();
                return;
            }
            p.connected();
        };
        fail_bad(&b);
        fail_bad(&b);
        // Ejected: only the other endpoint is picked.
        for _ in 0..10 {
            assert_ne!(pick(&b).endpoint.addr, bad);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        fail_bad(&b);
        fail_bad(&b);
        // The second ejection lasts twice as long.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..10 {
            assert_ne!(pick(&b).endpoint.addr, bad);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!((0..4).any(|_| pick(&b).endpoint.addr == bad));
        // max_ejection_percent: the other endpoint is never ejected too.
        fail_bad(&b);
        fail_bad(&b);
        let other = eps[1].addr;
        for _ in 0..10 {
            let p = pick(&b);
            if p.endpoint.addr == other {
                p.connect_failed();
            }
        }
        assert!((0..4).any(|_| pick(&b).endpoint.addr == other));
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejection_multiplier_decays_per_interval_out_of_ejection() {
        let b = balancer();
        let p = policy(1, 100);
        let eps = [SocketAddr::from(([10, 0, 0, 1], 80))];
        let fail = || {
            b.pick(&Destination::Host("h".into()), &eps, &[], Some(&p))
                .unwrap()
                .connect_failed()
        };
        assert!(fail());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(fail());
        assert_eq!(b.dump()["h"][0]["timesEjected"], 2);
        // 20 s of ejection, then 30 s (three intervals) without one.
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(fail());
        // 2 - 3 floors at 0, then this ejection: the first again (10 s).
        assert_eq!(b.dump()["h"][0]["timesEjected"], 1);
        assert!(b.dump()["h"][0]["ejectedForMs"].as_u64().unwrap() <= 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_go_to_other_endpoints_within_the_budget() {
        let b = balancer();
        let eps: Vec<SocketAddr> = (1..=3)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        let key = Destination::Host("pim.example.com".into());
        let first = b.pick(&key, &eps, &[], None).unwrap();
        let mut tried = vec![first.addr()];
        let second = b.retry(&key, &eps, &tried, None).unwrap();
        assert!(!tried.contains(&second.addr()));
        tried.push(second.addr());
        let third = b.retry(&key, &eps, &tried, None).unwrap();
        tried.push(third.addr());
        assert_eq!(
            b.retry(&key, &eps, &tried, None).err(),
            Some(NoRetry::NoOtherEndpoint)
        );
        // The budget: 10 to start with, then 20% of new connections plus
        // 10 a second. An outage with every attempt failing cannot retry
        // each of 1,000 connections.
        let mut retried = 0;
        for _ in 0..1000 {
            let p = b.pick(&key, &eps, &[], None).unwrap();
            if b.retry(&key, &eps, &[p.addr()], None).is_ok() {
                retried += 1;
            }
        }
        assert!(retried < 1000 / 5 + 20, "{retried} retries");
        tokio::time::advance(Duration::from_secs(1)).await;
        let p = b.pick(&key, &eps, &[], None).unwrap();
        assert!(b.retry(&key, &eps, &[p.addr()], None).is_ok(), "refilled");
    }

    #[test]
    fn max_connections_fail_fast_past_the_limit() {
        let b = balancer();
        let key = Destination::Host("pim.example.com".into());
        let a = b.admit(&key, Some(2)).unwrap();
        let _b2 = b.admit(&key, Some(2)).unwrap();
        assert!(b.admit(&key, Some(2)).is_none());
        drop(a);
        assert!(b.admit(&key, Some(2)).is_some());
        assert!(b.admit(&key, None).is_some());
    }
}
