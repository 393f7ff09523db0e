//! The certificates of the node's local workloads: issued on first use,
//! renewed at half-life (open connections keep their session), and the
//! trust bundle that every handshake checks peers against.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use tracing::{info, warn};

use super::{CaError, CertificateAuthority, Identity, WorkloadCert};
use crate::tls::{self, TlsConfigError, TrustBundle};

/// A workload's certificate and the server configuration presenting it.
pub struct Issued {
    pub cert: WorkloadCert,
    pub server: Arc<rustls::ServerConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("trust bundle {path}: {message}")]
    Bundle { path: String, message: String },
}

pub struct CertStore {
    ca: Arc<dyn CertificateAuthority>,
    bundle: Arc<TrustBundle>,
    lifetime: Duration,
    certs: Mutex<HashMap<Identity, Arc<Issued>>>,
}

/// Reads every certificate in a PEM file (a bundle may hold several roots).
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let err = |message: String| StoreError::Bundle {
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificates in the file".into()));
    }
    Ok(certs)
}

impl CertStore {
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        bundle: Arc<TrustBundle>,
        lifetime: Duration,
    ) -> Self {
        Self {
            ca,
            bundle,
            lifetime,
            certs: Mutex::new(HashMap::new()),
        }
    }

    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    fn issue(&self, id: &Identity) -> Result<Arc<Issued>, StoreError> {
        let cert = self.ca.issue(id, self.lifetime)?;
        let server = Arc::new(tls::server_config(&cert, self.bundle.clone())?);
        Ok(Arc::new(Issued { cert, server }))
    }

    /// The workload's current certificate, issued now if it has none.
    pub fn get(&self, id: &Identity) -> Result<Arc<Issued>, StoreError> {
        if let Some(i) = self.lock().get(id) {
            return Ok(i.clone());
        }
        let issued = self.issue(id)?;
        info!(identity = %id, expires_in_s = self.lifetime.as_secs(), "certificate issued");
        Ok(self.lock().entry(id.clone()).or_insert(issued).clone())
    }

    /// A client configuration for `src` connecting to a server that must be
    /// `expected`.
    pub fn client_config(
        &self,
        src: &Identity,
        expected: Identity,
    ) -> Result<Arc<rustls::ClientConfig>, StoreError> {
        let issued = self.get(src)?;
        Ok(Arc::new(tls::client_config(
            &issued.cert,
            self.bundle.clone(),
            expected,
        )?))
    }

    /// Renews every certificate past half its life. Connections already
    /// open keep their session; new handshakes use the new certificate.
    pub fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<Identity> = self
            .lock()
            .iter()
            .filter(|(_, i)| i.cert.renew_at() <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            match self.issue(&id) {
                Ok(issued) => {
                    self.lock().insert(id.clone(), issued);
                    info!(identity = %id, "certificate renewed");
                }
                // The old certificate stays until it expires; retried next tick.
                Err(e) => warn!(identity = %id, "certificate renewal failed: {e}"),
            }
        }
    }

    /// Seconds until each certificate expires (for metrics and checks).
    pub fn expiries(&self) -> Vec<(Identity, Duration)> {
        let now = SystemTime::now();
        self.lock()
            .iter()
            .map(|(id, i)| {
                (
                    id.clone(),
                    i.cert.not_after.duration_since(now).unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn forget(&self, id: &Identity) {
        self.lock().remove(id);
    }

    /// Rereads the trust bundle file; a bad file leaves the old roots.
    pub fn reload_bundle(&self, path: &Path) -> Result<usize, StoreError> {
        let roots = read_bundle(path)?;
        self.bundle
            .replace(&roots)
            .map_err(|e| StoreError::Bundle {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(roots.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<Issued>>> {
        self.certs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
