//! TLS for HBONE: TLS 1.3 only, AES-GCM suites, ALPN h2, mutual
//! authentication with X.509-SVIDs, no SNI, no resumption.
pub mod origination;
mod verify;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use rustls::{
    ClientConfig, ServerConfig,
    client::Resumption,
    crypto::{CryptoProvider, aws_lc_rs, ring},
};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use tracing::warn;

pub use verify::{
    ClientIdentityVerifier, ServerIdentityVerifier, SvidError, TrustBundle, svid_identity,
};

use crate::identity::{CaError, CertManager, Identity, WorkloadCert};

pub const ALPN_H2: &[u8] = b"h2";

/// The HBONE provider: TLS 1.3 AES-GCM suites only (as ztunnel).
///
/// - Suites: ring's (the record cipher and the key schedule's hash and
///   HKDF), AES-128 first. Measured in memory (`cargo xtask bench`, both
///   sides, suites taking turns): ring's AES-128-GCM 0.46-0.58 s/GiB
///   against aws-lc-rs's 0.74-1.14 on a CPU with VAES but no AVX-512 (ring
///   has a VAES-AVX2 path, aws-lc only AVX-512 and AES-NI ones); AES-256
///   never cheaper than AES-128 (fewer rounds, same GHASH). The server's
///   order decides (`ignore_client_order`), so a ztunnel peer, which lists
///   AES-256 first, gets AES-128 too.
/// - Key exchange, signatures, randomness: aws-lc-rs. Post-quantum
///   X25519MLKEM768 first (ring has none), so two nodemesh agents agree on
///   it, and so does a ztunnel with `COMPLIANCE_POLICY=pqc`, which offers
///   nothing else; the ClientHello carries an X25519 share beside it for
///   free, so a classical peer costs no extra round trip. Then the groups
///   ring offered (X25519, P-256, P-384).
pub fn provider() -> Arc<CryptoProvider> {
    use aws_lc_rs::kx_group;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        ..aws_lc_rs::default_provider()
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("trust bundle {path}: {message}")]
    Bundle { path: String, message: String },
}

/// Reads every certificate in a PEM file (a bundle may hold several roots).
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let err = |message: String| TlsConfigError::Bundle {
        path: path.display().to_string(),
        message,
    };
    let bytes =
        crate::files::read(path, crate::files::MAX_CONFIG_BYTES).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificates in the file".into()));
    }
    Ok(certs)
}

/// Each identity's certificate and the server configuration presenting it.
type ServerConfigs = HashMap<Identity, (Arc<WorkloadCert>, Arc<ServerConfig>)>;

/// The TLS side of the mesh: the trust bundle every handshake checks peers
/// against, and the rustls configurations of the local workloads' current
/// certificates (a server configuration is built once per certificate).
pub struct TlsContext {
    certs: Arc<CertManager>,
    bundle: Arc<TrustBundle>,
    /// The root this agent's certificates chain to, when it is known (a
    /// file CA): a bundle without it is warned about.
    issuer_root: Option<CertificateDer<'static>>,
    servers: Mutex<ServerConfigs>,
}

impl TlsContext {
    pub fn new(
        certs: Arc<CertManager>,
        bundle: Arc<TrustBundle>,
        issuer_root: Option<CertificateDer<'static>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            certs,
            bundle,
            issuer_root,
            servers: Mutex::new(HashMap::new()),
        })
    }

    pub fn certs(&self) -> &Arc<CertManager> {
        &self.certs
    }

    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    /// The server side of a destination pod.
    pub async fn server_config(&self, id: &Identity) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let cert = self.certs.get(id).await?;
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((c, config)) = servers.get(id)
            && Arc::ptr_eq(c, &cert)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(server_config(&cert, self.bundle.clone())?);
        servers.insert(id.clone(), (cert, config.clone()));
        Ok(config)
    }

    /// The client side of `src` towards a server that must be `expected`.
    pub async fn client_config(
        &self,
        src: &Identity,
        expected: Identity,
    ) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let cert = self.certs.get(src).await?;
        Ok(Arc::new(client_config(
            &cert,
            self.bundle.clone(),
            expected,
        )?))
    }

    /// Forgets an identity no local pod runs as any more.
    pub fn forget(&self, id: &Identity) {
        self.certs.forget(id);
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Warns when `roots` lack the root this agent's certificates chain to:
    /// every peer with the same bundle would then refuse them.
    pub fn check_roots(&self, path: &Path, roots: &[CertificateDer<'_>]) {
        if let Some(own) = &self.issuer_root
            && !roots.iter().any(|r| r.as_ref() == own.as_ref())
        {
            warn!(
                file = %path.display(),
                "the trust bundle does not hold the CA certificate this agent issues from: peers will refuse this node's certificates (during a rotation, list the old and new roots together)"
            );
        }
    }

    /// Rereads the trust bundle file; a bad file leaves the old roots.
    pub fn reload_bundle(&self, path: &Path) -> Result<usize, TlsConfigError> {
        let roots = read_bundle(path)?;
        self.bundle
            .replace(&roots)
            .map_err(|e| TlsConfigError::Bundle {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        self.check_roots(path, &roots);
        Ok(roots.len())
    }
}

/// The server side of a destination pod: presents its certificate, demands
/// a client certificate from the mesh in the same trust domain.
pub fn server_config(
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, TlsConfigError> {
    server_config_with(provider(), cert, bundle)
}

/// `server_config` with another provider (tests and the bench: other
/// suites or key exchanges).
pub fn server_config_with(
    provider: Arc<CryptoProvider>,
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, TlsConfigError> {
    let verifier = Arc::new(ClientIdentityVerifier::new(
        bundle,
        cert.identity.trust_domain.clone(),
    ));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // The suite is ours to choose (see `provider`); the key exchange stays
    // the client's first choice (rustls takes the client's order for it).
    config.ignore_client_order = true;
    // Stateless: no tickets, no session cache to fill.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client side of a source pod towards one destination identity.
pub fn client_config(
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
    expected: Identity,
) -> Result<ClientConfig, TlsConfigError> {
    client_config_with(provider(), cert, bundle, expected)
}

/// `client_config` with another provider (tests and the bench).
pub fn client_config_with(
    provider: Arc<CryptoProvider>,
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
    expected: Identity,
) -> Result<ClientConfig, TlsConfigError> {
    let verifier = Arc::new(ServerIdentityVerifier::new(bundle, expected));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The key exchange and suite a handshake agreed on, for the log.
pub fn negotiated(session: &rustls::CommonState) -> (&'static str, &'static str) {
    let group = session
        .negotiated_key_exchange_group()
        .and_then(|g| g.name().as_str())
        .unwrap_or("unknown");
    let suite = session
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown");
    (group, suite)
}

#[cfg(test)]
mod tests;

/// A bounded name for why a handshake failed (a metric label; the full
/// error goes to the access log).
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "peer_closed",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(C::UnknownIssuer) => "unknown_issuer",
        E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "certificate_expired",
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "wrong_name"
        }
        E::InvalidCertificate(C::BadSignature) => "bad_signature",
        E::InvalidCertificate(C::Other(other)) => match other.0.downcast_ref::<SvidError>() {
            Some(SvidError::WrongIdentity { .. }) => "wrong_identity",
            Some(_) => "not_an_svid",
            None => "bad_certificate",
        },
        E::InvalidCertificate(_) => "bad_certificate",
        E::AlertReceived(_) => "alert_received",
        E::NoApplicationProtocol => "no_alpn",
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_)
        | E::PeerIncompatible(_) => "protocol_error",
        _ => "other",
    }
}
