//! Picking an endpoint of a service for each connection, with state kept
//! per endpoint: connections in flight, connect outcomes, and ejection.
//!
//! The workload state says which endpoints a service has; the balancer
//! says which one to use now. Round robin over the endpoints not ejected;
//! when every endpoint is ejected they are all used again (as Envoy's panic
//! threshold does), since refusing everything helps no one. Ejection is
//! driven by an [`OutlierDetection`] policy when one is set for the service
//! (none by default: nothing is ever ejected).
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tracing::info;

use crate::state::{Endpoint, ServiceKey};

/// Envoy's outlier detection on connect failures: after `consecutive`
/// failures in a row an endpoint is ejected for `base_ejection` times the
/// number of times it has been ejected, never more than
/// `max_ejection_percent` of a service's endpoints at once.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

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
    times_ejected: u32,
    until: Option<Instant>,
}

impl EndpointStats {
    fn ejected(&self, now: Instant) -> bool {
        lock(&self.state).until.is_some_and(|t| t > now)
    }
}

#[derive(Default)]
struct ServiceState {
    next: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>,
    outlier: Option<OutlierDetection>,
}

#[derive(Default)]
pub struct Balancer {
    services: Mutex<HashMap<ServiceKey, Arc<ServiceState>>>,
}

/// The endpoint picked for one connection; report how connecting went.
/// Counted in flight until dropped.
pub struct Pick {
    pub endpoint: Endpoint,
    stats: Arc<EndpointStats>,
    service: Arc<ServiceState>,
    key: ServiceKey,
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pick {
    pub fn connected(&self) {
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        lock(&self.stats.state).consecutive_failures = 0;
    }

    /// A connect failure: counted, and the endpoint ejected if the
    /// service's outlier detection says so.
    pub fn connect_failed(&self) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let Some(policy) = &self.service.outlier else {
            return;
        };
        let now = Instant::now();
        let eligible = {
            let endpoints = lock(&self.service.endpoints);
            let ejected = endpoints.values().filter(|e| e.ejected(now)).count();
            let max = endpoints.len() * policy.max_ejection_percent as usize / 100;
            ejected < max.max(1).min(endpoints.len())
        };
        let mut state = lock(&self.stats.state);
        state.consecutive_failures += 1;
        if state.consecutive_failures >= policy.consecutive_failures
            && state.until.is_none_or(|t| t <= now)
            && eligible
        {
            state.times_ejected += 1;
            let time = policy.base_ejection * state.times_ejected;
            state.until = Some(now + time);
            state.consecutive_failures = 0;
            info!(service = %self.key, endpoint = %self.endpoint.addr, ejection_ms = time.as_millis(), "endpoint ejected");
        }
    }
}

impl Balancer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets (or clears) the outlier detection of a service.
    pub fn set_outlier_detection(&self, service: &ServiceKey, policy: Option<OutlierDetection>) {
        let mut services = lock(&self.services);
        let old = services.remove(service);
        let state = ServiceState {
            outlier: policy,
            next: AtomicUsize::new(old.as_ref().map_or(0, |o| o.next.load(Ordering::Relaxed))),
            endpoints: Mutex::new(old.map(|o| lock(&o.endpoints).clone()).unwrap_or_default()),
        };
        services.insert(service.clone(), Arc::new(state));
    }

    fn service(&self, key: &ServiceKey) -> Arc<ServiceState> {
        lock(&self.services).entry(key.clone()).or_default().clone()
    }

    /// One of `endpoints` (the service's current ones) for a new connection.
    pub fn pick(&self, key: &ServiceKey, endpoints: &[Endpoint]) -> Option<Pick> {
        if endpoints.is_empty() {
            return None;
        }
        let service = self.service(key);
        let now = Instant::now();
        let stats: Vec<Arc<EndpointStats>> = {
            let mut known = lock(&service.endpoints);
            // Endpoints that left the service take their state with them.
            if known.len() > endpoints.len() {
                known.retain(|addr, _| endpoints.iter().any(|e| e.addr == *addr));
            }
            endpoints
                .iter()
                .map(|e| known.entry(e.addr).or_default().clone())
                .collect()
        };
        let healthy: Vec<usize> = (0..endpoints.len())
            .filter(|&i| !stats[i].ejected(now))
            .collect();
        let n = service.next.fetch_add(1, Ordering::Relaxed);
        let i = if healthy.is_empty() {
            n % endpoints.len()
        } else {
            healthy[n % healthy.len()]
        };
        stats[i].active.fetch_add(1, Ordering::AcqRel);
        Some(Pick {
            endpoint: endpoints[i].clone(),
            stats: stats[i].clone(),
            service,
            key: key.clone(),
        })
    }

    /// Forgets services `keep` says are gone.
    pub fn retain(&self, keep: impl Fn(&ServiceKey) -> bool) {
        lock(&self.services).retain(|k, _| keep(k));
    }

    /// Per service and endpoint: in flight, connected, failed, ejected (for
    /// `/config_dump`).
    pub fn dump(&self) -> serde_json::Value {
        let now = Instant::now();
        let services = lock(&self.services);
        let mut out = serde_json::Map::new();
        for (key, svc) in services.iter() {
            let endpoints: Vec<serde_json::Value> = lock(&svc.endpoints)
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

    fn key() -> ServiceKey {
        ServiceKey {
            namespace: "shop".into(),
            name: "web".into(),
        }
    }

    #[test]
    fn round_robin_and_in_flight_counts() {
        let b = Balancer::new();
        let eps = endpoints(3);
        let picks: Vec<Pick> = (0..6).map(|_| b.pick(&key(), &eps).unwrap()).collect();
        let mut seen: Vec<SocketAddr> = picks.iter().map(|p| p.endpoint.addr).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(b.dump()["web.shop"][0]["active"], 2);
        drop(picks);
        assert_eq!(b.dump()["web.shop"][0]["active"], 0);
        assert!(b.pick(&key(), &[]).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_a_growing_time_then_it_returns() {
        let b = Balancer::new();
        b.set_outlier_detection(
            &key(),
            Some(OutlierDetection {
                consecutive_failures: 2,
                base_ejection: Duration::from_secs(10),
                max_ejection_percent: 50,
            }),
        );
        let eps = endpoints(2);
        let bad = eps[0].addr;
        let fail_bad = |b: &Balancer| loop {
            let p = b.pick(&key(), &eps).unwrap();
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
            assert_ne!(b.pick(&key(), &eps).unwrap().endpoint.addr, bad);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        fail_bad(&b);
        fail_bad(&b);
        // The second ejection lasts twice as long.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..10 {
            assert_ne!(b.pick(&key(), &eps).unwrap().endpoint.addr, bad);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let back = (0..4).any(|_| b.pick(&key(), &eps).unwrap().endpoint.addr == bad);
        assert!(back);
        // max_ejection_percent: the other endpoint is never ejected too.
        fail_bad(&b);
        fail_bad(&b);
        let other = eps[1].addr;
        for _ in 0..10 {
            let p = b.pick(&key(), &eps).unwrap();
            if p.endpoint.addr == other {
                p.connect_failed();
            }
        }
        assert!((0..4).any(|_| b.pick(&key(), &eps).unwrap().endpoint.addr == other));
    }
}
