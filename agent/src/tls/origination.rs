//! TLS the agent originates to a third party for an app that speaks plain
//! text (DestinationRule `tls.mode: SIMPLE | MUTUAL`): the server's chain
//! must lead to the rule's `caCertificates` (else the system's roots) and
//! name the host (or one of `subjectAltNames`).
use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _};

/// Builds the client configuration of one rule. Errors name the file.
pub fn client_config(
    ca_certificates: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    subject_alt_names: &[String],
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca_certificates {
        Some(path) => {
            let certs = super::read_bundle(path).map_err(|e| e.to_string())?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: not a usable root: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(
                    "no caCertificates given and no system roots found (install ca-certificates, or set caCertificates)"
                        .into(),
                );
            }
        }
    }
    let provider = super::provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("TLS roots: {e}"))?;
    let verifier = Arc::new(NamesVerifier {
        inner: webpki,
        names: subject_alt_names
            .iter()
            .filter_map(|n| ServerName::try_from(n.clone()).ok())
            .collect(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client_cert {
        Some((cert, key)) => {
            let chain = super::read_bundle(cert).map_err(|e| e.to_string())?;
            let key_bytes = crate::files::read(key, crate::files::MAX_CONFIG_BYTES)
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_slice(&key_bytes)
                .map_err(|e| format!("{}: no private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate and key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// WebPKI verification; with `subjectAltNames` set, the certificate must
/// name one of them instead of the SNI's host (Istio's meaning).
#[derive(Debug)]
struct NamesVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for NamesVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.names.is_empty() {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        let mut last = None;
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("names is not empty"))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
