//! The certificates of the node's local workloads: issued once per identity
//! however many callers ask at the same time (single flight), renewed at
//! half-life (open connections keep their session), forgotten when no local
//! pod runs as the identity any more.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::gauge::ConstGauge,
    registry::{Registry, Unit},
};
use tracing::{info, warn};

use super::{CaError, CertificateAuthority, Identity, WorkloadCert};

/// One identity's certificate and the lock its issuance holds.
#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<WorkloadCert>>>,
    issuing: tokio::sync::Mutex<()>,
}

impl Slot {
    fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, cert: Arc<WorkloadCert>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(cert);
    }
}

pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
}

impl CertManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>) -> Arc<Self> {
        Arc::new(Self {
            ca,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self, id: &Identity) -> Arc<Slot> {
        self.lock().entry(id.clone()).or_default().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The workload's current certificate, issued now if it has none;
    /// callers that ask together wait for the one issuance.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CaError> {
        let slot = self.slot(id);
        if let Some(c) = slot.current() {
            return Ok(c);
        }
        let _issuing = slot.issuing.lock().await;
        if let Some(c) = slot.current() {
            return Ok(c);
        }
        let cert = Arc::new(self.ca.issue(id).await?);
        info!(identity = %id, expires_in_s = expires_in(&cert).as_secs(), "certificate issued");
        slot.set(cert.clone());
        Ok(cert)
    }

    /// Renews every certificate past half its life. Connections already
    /// open keep their session; new handshakes use the new certificate.
    pub async fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<(Identity, Arc<Slot>)> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.current().is_some_and(|c| c.renew_at() <= now))
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        for (id, slot) in due {
            let _issuing = slot.issuing.lock().await;
            match self.ca.issue(&id).await {
                Ok(cert) => {
                    slot.set(Arc::new(cert));
                    info!(identity = %id, "certificate renewed");
                }
                // The old certificate stays until it expires; retried next tick.
                Err(e) => warn!(identity = %id, "certificate renewal failed: {e}"),
            }
        }
    }

    /// Time until each certificate expires (for metrics and checks).
    pub fn expiries(&self) -> Vec<(Identity, Duration)> {
        self.lock()
            .iter()
            .filter_map(|(id, s)| Some((id.clone(), expires_in(s.current()?.as_ref()))))
            .collect()
    }

    pub fn forget(&self, id: &Identity) {
        self.lock().remove(id);
    }

    /// Registers `nodemesh_certificate_expiry_seconds`, read at scrape time.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(ExpiryCollector(Arc::downgrade(self))));
    }
}

fn expires_in(cert: &WorkloadCert) -> Duration {
    cert.not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

struct ExpiryCollector(std::sync::Weak<CertManager>);

impl std::fmt::Debug for ExpiryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryCollector")
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(certs) = self.0.upgrade() else {
            return Ok(());
        };
        let expiries = certs.expiries();
        if expiries.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "certificate_expiry",
            "Time until each local workload certificate expires.",
            Some(&Unit::Seconds),
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (identity, left) in expiries {
            let identity = identity.to_string();
            ConstGauge::new(left.as_secs_f64())
                .encode(family.encode_family(&[("identity", identity.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::identity::{FileCa, IssueFuture, ca::new_root};

    /// A CA that takes a while and counts its issuances.
    struct SlowCa {
        ca: FileCa,
        issued: AtomicUsize,
    }

    impl CertificateAuthority for SlowCa {
        fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a> {
            Box::pin(async move {
                self.issued.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.ca.sign(identity)
            })
        }
    }

    #[tokio::test]
    async fn callers_that_ask_together_share_one_issuance_and_renewal_replaces_it() {
        let (cert, key) = new_root("cluster.local").unwrap();
        let ca = FileCa::from_pem(
            &cert,
            &key,
            "ca.pem".as_ref(),
            "ca.key".as_ref(),
            Duration::from_secs(2),
        )
        .unwrap();
        let slow = Arc::new(SlowCa {
            ca,
            issued: AtomicUsize::new(0),
        });
        let m = CertManager::new(slow.clone());
        let id = Identity::new("cluster.local", "shop", "cart");
        let all = futures_join(&m, &id, 20).await;
        assert_eq!(slow.issued.load(Ordering::SeqCst), 1);
        assert!(all.iter().all(|c| Arc::ptr_eq(c, &all[0])));
        // The CA chose a 2 s lifetime: renewal is due after 1 s.
        m.renew_due().await;
        assert_eq!(slow.issued.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        m.renew_due().await;
        assert_eq!(slow.issued.load(Ordering::SeqCst), 2);
        assert!(!Arc::ptr_eq(&m.get(&id).await.unwrap(), &all[0]));
        assert_eq!(m.expiries().len(), 1);
        m.forget(&id);
        assert!(m.expiries().is_empty());
    }

    async fn futures_join(m: &Arc<CertManager>, id: &Identity, n: usize) -> Vec<Arc<WorkloadCert>> {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (m, id) = (m.clone(), id.clone());
            tasks.spawn(async move { m.get(&id).await.unwrap() });
        }
        tasks.join_all().await
    }
}
