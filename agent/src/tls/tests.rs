//! Real rustls handshakes in memory: every certificate the mesh must refuse.
use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::{FileCa, WorkloadCert, ca::leaf_params, ca::new_root};

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(86400);

struct TestCa {
    cert_pem: String,
    key_pem: String,
    ca: FileCa,
}

impl TestCa {
    fn new(td: &str) -> Self {
        let (cert_pem, key_pem) = new_root(td).unwrap();
        let ca = FileCa::from_pem(
            &cert_pem,
            &key_pem,
            Path::new("ca.pem"),
            Path::new("ca.key"),
            DAY,
        )
        .unwrap();
        Self {
            cert_pem,
            key_pem,
            ca,
        }
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        Arc::new(TrustBundle::new(&[self.ca.root().clone()]).unwrap())
    }

    fn issue(&self, id: &Identity) -> WorkloadCert {
        self.ca.sign(id).unwrap()
    }

    /// A leaf from arbitrary parameters, signed by this CA.
    fn sign(&self, id: &Identity, params: CertificateParams) -> WorkloadCert {
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem).unwrap())
                .unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        cert_with(id, cert.der().clone(), key)
    }
}

fn cert_with(id: &Identity, der: CertificateDer<'static>, key: KeyPair) -> WorkloadCert {
    WorkloadCert {
        identity: id.clone(),
        chain: vec![der],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        issued_at: SystemTime::now(),
        not_after: SystemTime::now() + DAY,
    }
}

fn id(sa: &str) -> Identity {
    Identity::new(TD, "shop", sa)
}

fn params(id: &Identity) -> CertificateParams {
    let now = SystemTime::now();
    leaf_params(id, now - Duration::from_secs(60), now + DAY).unwrap()
}

/// Runs one handshake (and one byte each way); returns what each side saw.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> (Result<Identity, String>, Result<(), String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let server = async move {
        let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .ok_or("no client cert")?[0]
            .clone();
        let id = svid_identity(&peer, TD).map_err(|e| e.to_string())?;
        tls.write_all(b"s").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok(id)
    };
    let client = async move {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(b"c").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::join!(server, client)
}

fn server_for(ca: &TestCa, sa: &str) -> rustls::ServerConfig {
    server_config(&ca.issue(&id(sa)), ca.bundle()).unwrap()
}

fn client_with(ca: &TestCa, cert: &WorkloadCert, expect: &str) -> rustls::ClientConfig {
    client_config(cert, ca.bundle(), id(expect)).unwrap()
}

#[tokio::test]
async fn mutual_tls_with_svids_carries_the_client_identity() {
    let ca = TestCa::new(TD);
    let (server, client) = handshake(
        server_for(&ca, "orders"),
        client_with(&ca, &ca.issue(&id("cart")), "orders"),
    )
    .await;
    assert_eq!(server.unwrap(), id("cart"));
    client.unwrap();
}

/// The server must refuse each of these client certificates.
#[tokio::test]
async fn bad_client_certificates_are_refused_with_a_reason() {
    let ca = TestCa::new(TD);
    let other = TestCa::new(TD);
    let now = SystemTime::now();
    let mut expired = params(&id("cart"));
    expired.not_before = (now - 2 * DAY).into();
    expired.not_after = (now - DAY).into();
    let mut future = params(&id("cart"));
    future.not_before = (now + DAY).into();
    future.not_after = (now + 2 * DAY).into();
    let mut two_sans = params(&id("cart"));
    two_sans
        .subject_alt_names
        .push(SanType::URI(id("admin").to_string().try_into().unwrap()));
    let mut ca_leaf = params(&id("cart"));
    ca_leaf.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let self_signed = {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params(&id("cart")).self_signed(&key).unwrap();
        cert_with(&id("cart"), cert.der().clone(), key)
    };
    let foreign = Identity::new("evil.example", "shop", "cart");
    let cases: Vec<(&str, WorkloadCert, &str)> = vec![
        ("self-signed", self_signed, "UnknownIssuer"),
        // Same subject as ours: found by name, refused by signature.
        (
            "another CA",
            other.issue(&id("cart")),
            "BadSignature|UnknownIssuer",
        ),
        ("expired", ca.sign(&id("cart"), expired), "Expired"),
        ("not yet valid", ca.sign(&id("cart"), future), "NotValidYet"),
        (
            "foreign trust domain",
            ca.issue(&foreign),
            "not in trust domain cluster.local",
        ),
        ("two URI SANs", ca.sign(&id("cart"), two_sans), "2 URI SANs"),
        ("CA:TRUE leaf", ca.sign(&id("cart"), ca_leaf), "is a CA"),
    ];
    for (what, cert, reason) in cases {
        let client = client_config(&cert, ca.bundle(), id("orders")).unwrap();
        let (server, _) = handshake(server_for(&ca, "orders"), client).await;
        let err = server.expect_err(what);
        assert!(reason.split('|').any(|r| err.contains(r)), "{what}: {err}");
    }

    // No client certificate at all.
    let no_cert = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerIdentityVerifier::new(
            ca.bundle(),
            id("orders"),
        )))
        .with_no_client_auth();
    let (server, _) = handshake(server_for(&ca, "orders"), no_cert).await;
    let err = server.expect_err("no client certificate");
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let ca = TestCa::new(TD);
    let (_, client) = handshake(
        server_for(&ca, "promotions"),
        client_with(&ca, &ca.issue(&id("cart")), "orders"),
    )
    .await;
    let err = client.expect_err("wrong server identity");
    assert!(
        err.contains("server identity is spiffe://cluster.local/ns/shop/sa/promotions"),
        "{err}"
    );
}

#[tokio::test]
async fn trust_bundle_rotation_accepts_old_and_new_roots_together() {
    let old = TestCa::new(TD);
    let new = TestCa::new(TD);
    let bundle = Arc::new(TrustBundle::new(&[old.ca.root().clone()]).unwrap());
    let server = server_config(&old.issue(&id("orders")), bundle.clone()).unwrap();
    // A client already on the new root is refused until the bundle has both.
    let client_cert = new.issue(&id("cart"));
    let client = client_config(&client_cert, bundle.clone(), id("orders")).unwrap();
    let (s, _) = handshake(server.clone(), client.clone()).await;
    assert!(s.is_err());
    bundle
        .replace(&[old.ca.root().clone(), new.ca.root().clone()])
        .unwrap();
    let (s, c) = handshake(server, client).await;
    assert_eq!(s.unwrap(), id("cart"));
    c.unwrap();
    assert_eq!(bundle.len(), 2);
}

#[test]
fn issued_leaves_follow_the_svid_rules() {
    let ca = TestCa::new(TD);
    let cert = ca.issue(&id("cart"));
    assert_eq!(svid_identity(&cert.chain[0], TD).unwrap(), id("cart"));
    let (_, x) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
    assert!(!x.is_ca());
    assert!(x.key_usage().unwrap().unwrap().value.digital_signature());
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(x.subject().iter_attributes().next().is_none(), "no subject");
    // Half-life from issuance, not from the skew-adjusted notBefore.
    let half = cert.renew_at();
    assert!(half > SystemTime::now() + DAY / 2 - Duration::from_secs(5));
    assert!(half <= SystemTime::now() + DAY / 2);
}

#[test]
fn a_ca_key_that_is_not_the_certificates_is_refused() {
    let (cert, _) = new_root(TD).unwrap();
    let (_, other_key) = new_root(TD).unwrap();
    let err = FileCa::from_pem(
        &cert,
        &other_key,
        Path::new("ca.pem"),
        Path::new("ca.key"),
        DAY,
    )
    .err()
    .expect("a mismatched key must be refused")
    .to_string();
    assert!(
        err.starts_with("ca.key: this key is not the key of the CA certificate ca.pem"),
        "{err}"
    );
}

/// What a handshake agreed on, done in memory with rustls' own
/// connections: key exchange, suite, and whether it took a retry.
fn negotiate(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> Result<
    (
        rustls::NamedGroup,
        rustls::CipherSuite,
        rustls::HandshakeKind,
    ),
    rustls::Error,
> {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
    let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    let mut wire = Vec::new();
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            let group = c.negotiated_key_exchange_group().map(|g| g.name());
            let suite = c.negotiated_cipher_suite().map(|s| s.suite());
            let kind = c.handshake_kind();
            return Ok((group.unwrap(), suite.unwrap(), kind.unwrap()));
        }
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut r = &wire[..];
        let mut server_result = Ok(());
        while !r.is_empty() && server_result.is_ok() {
            s.read_tls(&mut r).unwrap();
            server_result = s.process_new_packets().map(|_| ());
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        // The server's reason first: the client only sees its alert.
        let mut r = &wire[..];
        let mut client_result = Ok(());
        while !r.is_empty() && client_result.is_ok() {
            c.read_tls(&mut r).unwrap();
            client_result = c.process_new_packets().map(|_| ());
        }
        server_result?;
        client_result?;
    }
    panic!("the handshake did not finish");
}

/// A provider like a peer's that offers only these groups and suites.
fn peer_provider(
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as suite;
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: groups,
        // ztunnel's order: AES-256 first.
        cipher_suites: vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..(*provider()).clone()
    })
}

#[test]
fn two_agents_agree_on_post_quantum_key_exchange_and_aes_128() {
    let ca = TestCa::new(TD);
    let (group, suite, kind) = negotiate(
        server_for(&ca, "orders"),
        client_with(&ca, &ca.issue(&id("cart")), "orders"),
    )
    .unwrap();
    assert_eq!(group, rustls::NamedGroup::X25519MLKEM768);
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(kind, rustls::HandshakeKind::Full);
}

/// A ztunnel with `COMPLIANCE_POLICY=pqc` offers X25519MLKEM768 and nothing
/// else; with ring, every handshake with it failed (`NoKxGroupsInCommon`).
#[test]
fn a_post_quantum_only_peer_is_met_in_both_directions() {
    use rustls::crypto::aws_lc_rs::kx_group;
    let ca = TestCa::new(TD);
    let pqc_only = || peer_provider(vec![kx_group::X25519MLKEM768]);
    // The peer as client: our server keeps its suite preference.
    let client = client_config_with(
        pqc_only(),
        &ca.issue(&id("cart")),
        ca.bundle(),
        id("orders"),
    )
    .unwrap();
    let (group, suite, _) = negotiate(server_for(&ca, "orders"), client).unwrap();
    assert_eq!(group, rustls::NamedGroup::X25519MLKEM768);
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    // The peer as server.
    let server = server_config_with(pqc_only(), &ca.issue(&id("orders")), ca.bundle()).unwrap();
    let (group, _, kind) =
        negotiate(server, client_with(&ca, &ca.issue(&id("cart")), "orders")).unwrap();
    assert_eq!(group, rustls::NamedGroup::X25519MLKEM768);
    assert_eq!(kind, rustls::HandshakeKind::Full);
    // And a peer with nothing in common fails with the reason.
    let mlkem1024_only = peer_provider(vec![kx_group::MLKEM1024]);
    let client = client_config_with(
        mlkem1024_only,
        &ca.issue(&id("cart")),
        ca.bundle(),
        id("orders"),
    )
    .unwrap();
    let err = negotiate(server_for(&ca, "orders"), client).unwrap_err();
    assert!(err.to_string().contains("NoKxGroupsInCommon"), "{err}");
}

/// A classical peer (X25519 only, as ztunnel by default) costs no retry:
/// our ClientHello carries an X25519 share beside the hybrid one.
#[test]
fn a_classical_peer_is_met_without_a_retry() {
    use rustls::crypto::aws_lc_rs::kx_group;
    let ca = TestCa::new(TD);
    let mut server = server_config_with(
        peer_provider(vec![kx_group::X25519]),
        &ca.issue(&id("orders")),
        ca.bundle(),
    )
    .unwrap();
    // As ztunnel's server (rustls' default): the client's order decides.
    server.ignore_client_order = false;
    let (group, suite, kind) =
        negotiate(server, client_with(&ca, &ca.issue(&id("cart")), "orders")).unwrap();
    assert_eq!(group, rustls::NamedGroup::X25519);
    // The client's order is ours: AES-128.
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(kind, rustls::HandshakeKind::Full);
    let client = client_config_with(
        peer_provider(vec![kx_group::X25519]),
        &ca.issue(&id("cart")),
        ca.bundle(),
        id("orders"),
    )
    .unwrap();
    let (group, suite, _) = negotiate(server_for(&ca, "orders"), client).unwrap();
    assert_eq!(group, rustls::NamedGroup::X25519);
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
}
