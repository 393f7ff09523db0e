//! Certificate checks for HBONE.
//!
//! Chains are verified with webpki against the trust bundle (which may hold
//! several roots during a rotation); then the leaf must be an X.509-SVID:
//! exactly one URI SAN, a SPIFFE ID in our trust domain, not a CA. The
//! server's certificate must name the identity the client expects; DNS names
//! play no part.
use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::identity::Identity;

/// The roots a peer's chain may lead to. Swapped whole on rotation, so a
/// handshake sees one consistent set.
pub struct TrustBundle {
    anchors: ArcSwap<Vec<TrustAnchor<'static>>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.anchors.load().len())
    }
}

impl TrustBundle {
    pub fn new(roots: &[CertificateDer<'_>]) -> Result<Self, Error> {
        Ok(Self {
            anchors: ArcSwap::from_pointee(anchors(roots)?),
        })
    }

    /// Replaces the roots (e.g. old and new together during a rotation).
    pub fn replace(&self, roots: &[CertificateDer<'_>]) -> Result<(), Error> {
        self.anchors.store(Arc::new(anchors(roots)?));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.anchors.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let anchors = self.anchors.load();
        cert.verify_for_usage(
            algorithms().all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(webpki_error)
    }
}

fn anchors(roots: &[CertificateDer<'_>]) -> Result<Vec<TrustAnchor<'static>>, Error> {
    roots
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))
        })
        .collect()
}

/// The signature algorithms of the HBONE provider, built once (a handshake
/// asks three times).
fn algorithms() -> WebPkiSupportedAlgorithms {
    static ALGORITHMS: std::sync::LazyLock<WebPkiSupportedAlgorithms> =
        std::sync::LazyLock::new(|| super::provider().signature_verification_algorithms);
    *ALGORITHMS
}

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    let c = match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::CaUsedAsEndEntity => return svid(SvidError::CaLeaf),
        other => CertificateError::Other(OtherError(Arc::new(ChainError(other)))),
    };
    Error::InvalidCertificate(c)
}

struct ChainError(webpki::Error);

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate chain rejected: {:?}", self.0)
    }
}

impl fmt::Debug for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for ChainError {}

/// Why a certificate is not an acceptable X.509-SVID.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER")]
    Encoding,
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("URI SAN {0:?} is not a workload SPIFFE ID")]
    NotSpiffe(String),
    #[error("identity {found} is not in trust domain {expected}")]
    ForeignTrustDomain { found: String, expected: String },
    #[error("leaf certificate is a CA (basicConstraints CA:TRUE)")]
    CaLeaf,
    #[error("leaf certificate lacks keyUsage digitalSignature")]
    NoDigitalSignature,
    #[error("server identity is {found}, expected {expected}")]
    WrongIdentity { found: String, expected: String },
}

// rustls shows `CertificateError::Other` with Debug: make that the message.
impl fmt::Debug for SvidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn svid(e: SvidError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The identity an X.509-SVID leaf carries, if it is one in `trust_domain`.
pub fn svid_identity(der: &[u8], trust_domain: &str) -> Result<Identity, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Encoding)?;
    if cert
        .basic_constraints()
        .map_err(|_| SvidError::Encoding)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::CaLeaf);
    }
    if let Some(ku) = cert.key_usage().map_err(|_| SvidError::Encoding)?
        && !ku.value.digital_signature()
    {
        return Err(SvidError::NoDigitalSignature);
    }
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::Encoding)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let id: Identity = uri
        .parse()
        .map_err(|_| SvidError::NotSpiffe(uri.to_string()))?;
    if id.trust_domain != trust_domain {
        return Err(SvidError::ForeignTrustDomain {
            found: id.to_string(),
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

/// The handshake-signature methods both verifiers share: plain webpki
/// checks with the provider's algorithms (aws-lc-rs).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

/// Server side: any mesh identity of our trust domain may connect (policy
/// decides what it may do); the identity comes only from this certificate.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    bundle: Arc<TrustBundle>,
    trust_domain: String,
}

impl ClientIdentityVerifier {
    pub fn new(bundle: Arc<TrustBundle>, trust_domain: String) -> Self {
        Self {
            bundle,
            trust_domain,
        }
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.bundle.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        svid_identity(end_entity, &self.trust_domain).map_err(svid)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Client side: the server must prove the identity the workloads file says
/// the destination pod runs as.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    bundle: Arc<TrustBundle>,
    expected: Identity,
}

impl ServerIdentityVerifier {
    pub fn new(bundle: Arc<TrustBundle>, expected: Identity) -> Self {
        Self { bundle, expected }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.bundle.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let found = svid_identity(end_entity, &self.expected.trust_domain).map_err(svid)?;
        if found != self.expected {
            return Err(svid(SvidError::WrongIdentity {
                found: found.to_string(),
                expected: self.expected.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
