//! TLS for HBONE: TLS 1.3 only, AES-GCM suites, ALPN h2, mutual
//! authentication with X.509-SVIDs, no SNI, no resumption.
mod verify;

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig,
    client::Resumption,
    crypto::{CryptoProvider, ring},
};

pub use verify::{
    ClientIdentityVerifier, ServerIdentityVerifier, SvidError, TrustBundle, svid_identity,
};

use crate::identity::{Identity, WorkloadCert};

pub const ALPN_H2: &[u8] = b"h2";

/// ring with the AES-GCM TLS 1.3 suites only (as ztunnel).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(p)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server side of a destination pod: presents its certificate, demands
/// a client certificate from the mesh in the same trust domain.
pub fn server_config(
    cert: &WorkloadCert,
    bundle: Arc<TrustBundle>,
) -> Result<ServerConfig, TlsConfigError> {
    let verifier = Arc::new(ClientIdentityVerifier::new(
        bundle,
        cert.identity.trust_domain.clone(),
    ));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
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
    let verifier = Arc::new(ServerIdentityVerifier::new(bundle, expected));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(config)
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
        E::InvalidCertificate(C::Expired | C::NotValidYet) => "certificate_expired",
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
