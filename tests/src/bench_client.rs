//! Load generators for `cargo xtask bench`, run inside a pod: plain TCP,
//! or TLS done by the client itself (`--tls-ca`, verifying the server for
//! `--sni` or the name in `--to`).
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::json;
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::TcpStream,
};

type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// Where a load generator connects, and whether in TLS.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Target {
    /// `to` is `ip:port`, `[ip6]:port` or `name:port`; a name is resolved
    /// once, here, by the system's resolver (glibc: in a pod, through its
    /// resolv.conf, so a meshed pod's lookup goes through the agent's DNS
    /// capture). With `tls_ca`, connections are TLS (the agent's provider),
    /// the server verified against that CA for `sni`, else the name in
    /// `to`, else its IP address.
    pub async fn new(to: &str, tls_ca: Option<&Path>, sni: Option<&str>) -> Result<Self> {
        let (addr, name) = match to.parse::<SocketAddr>() {
            Ok(a) => (a, None),
            Err(_) => {
                let (host, port) = to
                    .rsplit_once(':')
                    .ok_or_else(|| anyhow!("bad address {to}: not ip:port or name:port"))?;
                let port: u16 = port.parse().with_context(|| format!("bad port in {to}"))?;
                let addr = tokio::net::lookup_host((host, port))
                    .await
                    .with_context(|| format!("resolving {host}"))?
                    .next()
                    .ok_or_else(|| anyhow!("{host} has no address"))?;
                (addr, Some(host.to_owned()))
            }
        };
        let tls = match tls_ca {
            None => None,
            Some(ca) => {
                let server_name = match sni.map(str::to_owned).or(name) {
                    Some(n) => ServerName::try_from(n.clone())
                        .with_context(|| format!("bad server name {n}"))?,
                    None => ServerName::IpAddress(addr.ip().into()),
                };
                Some((tls_connector(ca)?, server_name))
            }
        };
        Ok(Self { addr, tls })
    }

    /// A new connection's halves (the TLS handshake done).
    async fn connect(&self, nodelay: bool) -> std::io::Result<(ReadHalf, WriteHalf)> {
        let s = TcpStream::connect(self.addr).await?;
        if nodelay {
            s.set_nodelay(true)?;
        }
        Ok(match &self.tls {
            None => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), s).await?;
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        })
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "addr": self.addr.to_string(),
            "tls": self.tls.as_ref().map(|(_, n)| n.to_str().into_owned()),
        })
    }
}

/// A TLS client trusting only the CA in `ca` (PEM), as an app calling a
/// third party with its CA bundle. rustls' defaults otherwise: session
/// resumption on, as for the agent's own origination.
fn tls_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots
            .add(cert.with_context(|| format!("{}", ca.display()))?)
            .with_context(|| format!("{}", ca.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(nodemesh_agent::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

fn with_target(mut v: serde_json::Value, to: &Target) -> serde_json::Value {
    v["target"] = to.describe();
    v
}

/// Bulk throughput: `streams` connections each writing for `secs`.
pub async fn stream(to: &Target, secs: f64, streams: usize) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let to = to.clone();
        tasks.spawn(async move {
            let (mut r, mut w) = to.connect(false).await?;
            w.write_all(b"DISCARD\n").await?;
            let buf = vec![0x5au8; 128 * 1024];
            let mut sent = 0u64;
            while Instant::now() < deadline {
                w.write_all(&buf).await?;
                sent += buf.len() as u64;
            }
            w.shutdown().await?;
            let mut answer = String::new();
            r.read_to_string(&mut answer).await?;
            let received: u64 = answer.trim().parse().unwrap_or(0);
            Ok::<_, anyhow::Error>((sent, received))
        });
    }
    let (mut sent, mut received) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        let (s, r) = r??;
        sent += s;
        received += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let v = json!({
        "bytes": received,
        "intact": sent == received,
        "seconds": elapsed,
        "gbit_per_s": received as f64 * 8.0 / elapsed / 1e9,
    });
    Ok(with_target(v, to))
}

/// 64-byte request/response on one connection for `secs`: latency.
pub async fn rr(to: &Target, secs: f64) -> Result<serde_json::Value> {
    let (r, mut w) = to.connect(true).await?;
    let mut r = BufReader::new(r);
    w.write_all(b"ECHO\n").await?;
    let req = [0x42u8; 64];
    let mut resp = [0u8; 64];
    let mut lat = Vec::with_capacity(100_000);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        let t = Instant::now();
        w.write_all(&req).await?;
        r.read_exact(&mut resp).await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    w.shutdown().await?;
    let _ = r.fill_buf().await;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    let v = json!({
        "requests": lat.len(),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
    });
    Ok(with_target(v, to))
}

/// New connections per second: connect, 1-byte echo, close; `parallel`
/// loops for `secs`.
pub async fn crr(to: &Target, secs: f64, parallel: usize) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let to = to.clone();
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let one = async {
                    let (mut r, mut w) = to.connect(true).await?;
                    w.write_all(b"ECHO\nx").await?;
                    w.shutdown().await?;
                    let mut b = Vec::new();
                    r.read_to_end(&mut b).await?;
                    Ok::<_, std::io::Error>(b == b"x")
                };
                match one.await {
                    Ok(true) => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (o, f) = r?;
        ok += o;
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let v = json!({"connections": ok, "failed": failed, "per_second": ok as f64 / elapsed});
    Ok(with_target(v, to))
}
