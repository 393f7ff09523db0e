//! Issuing workload certificates.
//!
//! Trust model: an agent that holds the CA key can mint a certificate for
//! *any* identity in the trust domain, so every node running the agent is as
//! trusted as the CA. The `CertificateAuthority` trait is the seam where an
//! external CA (istiod, SPIRE, cert-manager) replaces the file CA, so that
//! agents hold only their node's workloads' keys.
use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

/// A workload's certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// When it was issued. `not_before` in the certificate is earlier, to
    /// allow for clock skew; renewal counts from here.
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// When to renew: half-way through the validity period.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("issuing a certificate for {identity}: {source}")]
    Issue {
        identity: Identity,
        source: rcgen::Error,
    },
}

pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, CaError>> + Send + 'a>>;

/// Issues workload certificates; the CA chooses their lifetime (the
/// certificate's `not_after` says it). Implementations: [`FileCa`] now; an
/// external CA (istiod, SPIRE) is a client that answers asynchronously.
pub trait CertificateAuthority: Send + Sync {
    fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a>;
}

/// A CA whose root certificate and key are files (a Secret in Kubernetes).
pub struct FileCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    lifetime: Duration,
}

/// Leaves are back-dated this much, for clocks that are slightly behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

impl FileCa {
    /// Issues certificates valid for `lifetime`.
    pub fn load(cert_path: &Path, key_path: &Path, lifetime: Duration) -> Result<Self, CaError> {
        let read = |p: &Path| {
            crate::files::read_text(p, crate::files::MAX_CONFIG_BYTES).map_err(|e| {
                CaError::Invalid {
                    path: p.to_owned(),
                    message: e.to_string(),
                }
            })
        };
        Self::from_pem(
            &read(cert_path)?,
            &read(key_path)?,
            cert_path,
            key_path,
            lifetime,
        )
    }

    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Invalid {
            path: key_path.to_owned(),
            message: format!("not a PEM private key the CA can sign with: {e}"),
        })?;
        let root_der: CertificateDer<'static> = rustls_pki_types::pem::PemObject::from_pem_slice(
            cert_pem.as_bytes(),
        )
        .map_err(|e: rustls_pki_types::pem::Error| CaError::Invalid {
            path: cert_path.to_owned(),
            message: format!("not a PEM certificate: {e}"),
        })?;
        // A key that is not the certificate's would sign leaves every peer
        // rejects (bad_signature): refuse it here, not on every handshake.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&root_der).map_err(|e| CaError::Invalid {
                path: cert_path.to_owned(),
                message: format!("not a certificate: {e}"),
            })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Invalid {
                path: key_path.to_owned(),
                message: format!(
                    "this key is not the key of the CA certificate {}; give the key the certificate was made with",
                    cert_path.display()
                ),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path.to_owned(),
            message: format!("not a CA certificate: {e}"),
        })?;
        Ok(Self {
            issuer,
            root: root_der,
            lifetime,
        })
    }

    /// The CA's own certificate (part of the trust bundle).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }
}

impl CertificateAuthority for FileCa {
    fn issue<'a>(&'a self, identity: &'a Identity) -> IssueFuture<'a> {
        // Signing takes well under a millisecond: no need to leave the task.
        Box::pin(std::future::ready(self.sign(identity)))
    }
}

impl FileCa {
    /// A certificate for `identity`, signed now.
    pub fn sign(&self, identity: &Identity) -> Result<WorkloadCert, CaError> {
        let lifetime = self.lifetime;
        let err = |source| CaError::Issue {
            identity: identity.clone(),
            source,
        };
        let now = SystemTime::now();
        let not_before = now - CLOCK_SKEW;
        let not_after = now + lifetime;
        let params = leaf_params(identity, not_before, not_after).map_err(err)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            issued_at: now,
            not_after,
        })
    }
}

/// X.509-SVID leaf: exactly one URI SAN, CA=false, digitalSignature,
/// EKU serverAuth + clientAuth, no subject.
pub fn leaf_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// A new self-signed root for a trust domain (for tests, the lab and first
/// installs): returns (certificate PEM, key PEM).
pub fn new_root(trust_domain: &str) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("nodemesh root {trust_domain}"));
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 86400)).into();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}
