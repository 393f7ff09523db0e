//! Talks to an agent's HBONE port (15008) the way a misbehaving or hostile
//! peer would, and reports how the agent answered.
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nodemesh_agent::identity::{FileCa, Identity, WorkloadCert, ca::new_root};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

/// The probe does not check the server: it is testing the server's checks.
#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        nodemesh_agent::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_config(cert: Option<&WorkloadCert>) -> Result<rustls::ClientConfig> {
    tls_config_with(cert, nodemesh_agent::tls::provider())
}

/// A client like ztunnel with `COMPLIANCE_POLICY=pqc`: X25519MLKEM768 as
/// its only key exchange, AES-256 listed first.
fn pqc_only_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519MLKEM768],
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..default_provider()
    })
}

fn tls_config_with(
    cert: Option<&WorkloadCert>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match cert {
        Some(c) => b.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Reads until the peer closes (or `limit`), returning how it ended and
/// whether an HTTP/2 GOAWAY frame type byte was seen.
async fn until_closed(mut r: impl AsyncRead + Unpin, limit: Duration) -> Value {
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let ended = loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), r.read(&mut buf)).await
        {
            Ok(Ok(0)) => break "closed",
            Ok(Ok(n)) => got += n,
            Ok(Err(_)) => break "reset",
            Err(_) => break "open",
        }
    };
    json!({"ended": ended, "bytes_from_server": got, "seconds": started.elapsed().as_secs_f64()})
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// HPACK for `:method CONNECT`, `:authority <a>` (literals, indexed names).
fn connect_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x02, 7];
    b.extend_from_slice(b"CONNECT");
    b.push(0x01);
    b.push(authority.len() as u8);
    b.extend_from_slice(authority.as_bytes());
    b
}

/// What `connect` claims as the client's address.
pub const FORGED_FORWARDED: &str = "for=\"6.6.6.6:4444\"";

/// Runs one probe; `mode` is one of plaintext, http1, no-cert, other-ca,
/// rapid-reset, continuation-flood, big-header, connect (one CONNECT to
/// `authority` with a valid certificate; reports the status),
/// connect-pqc-only (the same as a client offering only X25519MLKEM768;
/// reports the key exchange and suite agreed too).
pub async fn run(
    to: SocketAddr,
    mode: &str,
    ca: Option<(&Path, &Path)>,
    authority: &str,
) -> Result<Value> {
    let tcp = TcpStream::connect(to)
        .await
        .context("connecting to 15008")?;
    tcp.set_nodelay(true)?;
    let limit = Duration::from_secs(10);
    match mode {
        "plaintext" | "http1" => {
            let mut tcp = tcp;
            let bytes: &[u8] = if mode == "plaintext" {
                b"hello, this is not TLS\n"
            } else {
                b"CONNECT 10.244.1.10:8080 HTTP/1.1\r\nHost: x\r\n\r\n"
            };
            let _ = tcp.write_all(bytes).await;
            Ok(until_closed(tcp, limit).await)
        }
        "no-cert" | "other-ca" => {
            let cert = if mode == "other-ca" {
                let (cert_pem, key_pem) = new_root("cluster.local")?;
                let ca = FileCa::from_pem(
                    &cert_pem,
                    &key_pem,
                    Path::new("other.pem"),
                    Path::new("other.key"),
                    Duration::from_secs(3600),
                )?;
                Some(ca.sign(&Identity::new("cluster.local", "shop", "client"))?)
            } else {
                None
            };
            let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(cert.as_ref())?));
            let name = ServerName::IpAddress(to.ip().into());
            match connector.connect(name, tcp).await {
                // TLS 1.3: the server checks the client certificate after
                // the client's handshake is done; its refusal comes next.
                Ok(mut tls) => {
                    let _ = tls.write_all(PREFACE).await;
                    let _ = tls.flush().await;
                    let mut v = until_closed(tls, limit).await;
                    v["handshake"] = json!("completed on the client side");
                    Ok(v)
                }
                Err(e) => Ok(json!({"ended": "refused", "error": e.to_string()})),
            }
        }
        abuse => {
            let (cert, key) =
                ca.context("abuse modes need --ca-cert and --ca-key (a valid peer)")?;
            let ca = FileCa::load(cert, key, Duration::from_secs(3600))?;
            let cert = ca.sign(&Identity::new("cluster.local", "shop", "client"))?;
            let provider = match abuse {
                "connect-pqc-only" => pqc_only_provider(),
                _ => nodemesh_agent::tls::provider(),
            };
            let connector =
                tokio_rustls::TlsConnector::from(Arc::new(tls_config_with(Some(&cert), provider)?));
            let tls = connector
                .connect(ServerName::IpAddress(to.ip().into()), tcp)
                .await
                .context("TLS with a valid certificate")?;
            if abuse == "connect" || abuse == "connect-pqc-only" {
                let session = tls.get_ref().1;
                let group = session
                    .negotiated_key_exchange_group()
                    .map(|g| format!("{:?}", g.name()));
                let suite = session
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()));
                let mut v = connect_status(tls, authority).await;
                v["key_exchange"] = json!(group);
                v["suite"] = json!(suite);
                return Ok(v);
            }
            let (r, mut w) = tokio::io::split(tls);
            let reader = tokio::spawn(until_closed(r, Duration::from_secs(20)));
            let sent = abuse_frames(&mut w, abuse, authority).await;
            let mut v = reader.await?;
            v["frames_sent"] = json!(sent);
            Ok(v)
        }
    }
}

/// One CONNECT; the status of the answer when it is one of HPACK's static
/// `:status` entries (200, 204, 206, 304, 400, 404, 500), else `other`.
/// The request carries a forged `forwarded` header ([`FORGED_FORWARDED`]):
/// the agent must log it as a claim, never use it as the source.
async fn connect_status(mut tls: impl AsyncRead + AsyncWrite + Unpin, authority: &str) -> Value {
    let mut out = [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat();
    let mut block = connect_block(authority);
    // A literal header field without indexing, with a new name.
    for (i, part) in ["forwarded", FORGED_FORWARDED].iter().enumerate() {
        if i == 0 {
            block.push(0x00);
        }
        block.push(part.len() as u8);
        block.extend_from_slice(part.as_bytes());
    }
    out.extend(frame(HEADERS, END_HEADERS, 1, &block));
    if tls.write_all(&out).await.is_err() {
        return json!({"status": "write failed"});
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Frames: 9-byte header, then the payload.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            let (kind, stream) = (
                buf[at + 3],
                u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]),
            );
            if buf.len() < at + 9 + len {
                break;
            }
            if stream == 1 && kind == RST_STREAM {
                return json!({"status": "reset"});
            }
            if stream == 1 && kind == HEADERS && len > 0 {
                let status = match buf[at + 9] {
                    0x88 => "200",
                    0x89 => "204",
                    0x8a => "206",
                    0x8b => "304",
                    0x8c => "400",
                    0x8d => "404",
                    0x8e => "500",
                    _ => "other",
                };
                return json!({"status": status});
            }
            at += 9 + len;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return json!({"status": "closed"}),
            Err(_) => return json!({"status": "timeout"}),
        }
    }
}

/// Writes the abusive frames until the server stops reading (or a bound).
async fn abuse_frames(w: &mut (impl AsyncWrite + Unpin), mode: &str, authority: &str) -> u64 {
    let mut sent = 0u64;
    let mut write = async |bytes: Vec<u8>| w.write_all(&bytes).await.is_ok();
    if !write([PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()).await {
        return 0;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    match mode {
        "rapid-reset" => {
            let block = connect_block(authority);
            let mut stream = 1u32;
            while stream < 40_000 && Instant::now() < deadline {
                let mut batch = frame(HEADERS, END_HEADERS, stream, &block);
                batch.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
                if !write(batch).await {
                    break;
                }
                sent += 2;
                stream += 2;
            }
        }
        "continuation-flood" if write(frame(HEADERS, 0, 1, &connect_block(authority))).await => {
            let junk = vec![0x40u8; 16 * 1024];
            while Instant::now() < deadline {
                if !write(frame(CONTINUATION, 0, 1, &junk)).await {
                    break;
                }
                sent += 1;
            }
        }
        "big-header" => {
            // One 1 MiB header value, in 16 KiB pieces.
            let mut block = connect_block(authority);
            block.extend_from_slice(&[0x00, 0x01, b'x', 0x7f]);
            let mut n = (1usize << 20) - 127;
            while n >= 128 {
                block.push(0x80 | (n & 0x7f) as u8);
                n >>= 7;
            }
            block.push(n as u8);
            block.extend(std::iter::repeat_n(b'a', 1 << 20));
            let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
            for (i, c) in chunks.iter().enumerate() {
                let last = i + 1 == chunks.len();
                let f = if i == 0 {
                    frame(HEADERS, if last { END_HEADERS } else { 0 }, 1, c)
                } else {
                    frame(CONTINUATION, if last { END_HEADERS } else { 0 }, 1, c)
                };
                if !write(f).await {
                    break;
                }
                sent += 1;
            }
        }
        _ => {}
    }
    let _ = w.flush().await;
    sent
}
