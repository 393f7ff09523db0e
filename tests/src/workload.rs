//! The programs that run inside pods: a test server with a one-line
//! protocol, and clients that check what they get.
//!
//! Protocol: the client's first line names the mode.
//! - `PEER`: the server answers with the peer address it sees.
//! - `ECHO`: echoes until EOF, then shuts its write side.
//! - `SINK`: reads to EOF, answers `<bytes> <sha256>` (tests client->server
//!   half-close: the answer can only come after the client's FIN).
//! - `SOURCE <n>`: sends n pattern bytes, shuts its write side, then still
//!   reads to EOF (tests server->client half-close) and logs what it got.
//! - `DISCARD`: reads to EOF, answers the byte count.
//!
//! The same protocol inside TLS with `serve --tls-cert --tls-key` (the
//! egress bench's third party speaking it).
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

const CHUNK: usize = 64 * 1024;

/// The deterministic test stream, chunk by chunk: each chunk starts with
/// its index, so reordered or duplicated chunks change the checksum.
struct Pattern {
    buf: Vec<u8>,
    left: u64,
    index: u64,
}

impl Pattern {
    fn new(n: u64) -> Self {
        let buf = (0..CHUNK)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(7))
            .collect();
        Self {
            buf,
            left: n,
            index: 0,
        }
    }

    fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let take = self.left.min(CHUNK as u64) as usize;
        let n = take.min(8);
        self.buf[..n].copy_from_slice(&self.index.to_le_bytes()[..n]);
        self.left -= take as u64;
        self.index += 1;
        Some(&self.buf[..take])
    }
}

/// The sha256 of the first `n` bytes of the pattern stream.
pub fn pattern_sha(n: u64) -> String {
    let mut h = Sha256::new();
    let mut p = Pattern::new(n);
    while let Some(chunk) = p.next_chunk() {
        h.update(chunk);
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn write_pattern(w: &mut (impl tokio::io::AsyncWrite + Unpin), n: u64) -> Result<()> {
    let mut p = Pattern::new(n);
    while let Some(chunk) = p.next_chunk() {
        w.write_all(chunk).await?;
    }
    Ok(())
}

async fn read_to_end_hashing(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&h.finalize())))
}

/// Serves the protocol on every address of the pod (v4 and v6) at `port`.
pub async fn serve(port: u16) -> Result<()> {
    serve_with(port, None).await
}

/// A TLS server configuration for the protocol: the certificate chain and
/// key from PEM files (e.g. `ThirdPartyCa::issue_server_certs`'), the
/// agent's provider, no client certificates.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(nodemesh_agent::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("TLS server configuration")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// [`serve`], in TLS when given an acceptor (each connection's handshake,
/// then the same protocol inside).
pub async fn serve_with(port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<()> {
    let v4 = TcpListener::bind(("0.0.0.0", port)).await?;
    let v6 = {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        TcpListener::from_std(s.into())?
    };
    println!("{}", json!({"listening": port, "tls": tls.is_some()}));
    let serve_one = |l: TcpListener| {
        let tls = tls.clone();
        async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let served = match tls {
                        Some(acceptor) => handle_tls(s, peer, acceptor).await,
                        None => handle(s, peer).await,
                    };
                    if let Err(e) = served {
                        println!(
                            "{}",
                            json!({"peer": peer.to_string(), "error": format!("{e:#}")})
                        );
                    }
                });
            }
        }
    };
    tokio::join!(serve_one(v4), serve_one(v6));
    Ok(())
}

async fn handle(s: TcpStream, peer: SocketAddr) -> Result<()> {
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    modes(r, w, peer).await
}

async fn handle_tls(
    s: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Result<()> {
    s.set_nodelay(true)?;
    let tls = acceptor.accept(s).await.context("TLS handshake")?;
    let (r, w) = tokio::io::split(tls);
    modes(r, w, peer).await
}

/// The protocol on a connection's two halves.
async fn modes<R, W>(r: R, mut w: W, peer: SocketAddr) -> Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut r = BufReader::with_capacity(CHUNK, r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    match words.next() {
        Some("PEER") => {
            w.write_all(format!("{peer}\n").as_bytes()).await?;
            // Wait for the client's close so its FIN is seen here first.
            let mut sink = Vec::new();
            r.read_to_end(&mut sink).await?;
        }
        Some("ECHO") => {
            tokio::io::copy_buf(&mut r, &mut w).await?;
            w.shutdown().await?;
        }
        Some("SINK") => {
            let (n, sha) = read_to_end_hashing(&mut r).await?;
            w.write_all(format!("{n} {sha}\n").as_bytes()).await?;
            w.shutdown().await?;
        }
        Some("DISCARD") => {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0u64;
            loop {
                let k = r.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            w.write_all(format!("{n}\n").as_bytes()).await?;
            w.shutdown().await?;
        }
        Some("SOURCE") => {
            let n: u64 = words.next().context("SOURCE needs a size")?.parse()?;
            write_pattern(&mut w, n).await?;
            w.shutdown().await?;
            // Half-closed: this side can still receive.
            let mut got = Vec::new();
            r.read_to_end(&mut got).await?;
            println!(
                "{}",
                json!({"peer": peer.to_string(), "mode": "SOURCE", "after_shutdown": String::from_utf8_lossy(&got)})
            );
        }
        other => bail!("unknown mode {other:?}"),
    }
    Ok(())
}

/// How a connection attempt ended, for tests that expect failures.
pub fn classify(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | BrokenPipe | ConnectionAborted => "reset",
        TimedOut | WouldBlock => "timeout",
        UnexpectedEof => "eof",
        _ => "error",
    }
}

async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `PEER` round trip: what address the server saw.
pub async fn peer(to: SocketAddr) -> std::io::Result<String> {
    let mut s = connect(to).await?;
    s.write_all(b"PEER\n").await?;
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))??;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(line.trim().to_owned())
}

pub async fn probe(to: SocketAddr) -> serde_json::Value {
    match peer(to).await {
        Ok(saw) => json!({"result": "ok", "server_saw": saw}),
        Err(e) => json!({"result": classify(&e), "error": e.to_string()}),
    }
}

/// Streams `bytes` pattern bytes (pausing `pace_ms` between chunks),
/// half-closes, and checks the server's sum.
pub async fn send(to: SocketAddr, bytes: u64, pace_ms: u64) -> Result<serde_json::Value> {
    let started = Instant::now();
    let s = connect(to).await?;
    let (mut r, mut w) = s.into_split();
    w.write_all(b"SINK\n").await?;
    let mut p = Pattern::new(bytes);
    while let Some(chunk) = p.next_chunk() {
        w.write_all(chunk).await?;
        if pace_ms > 0 {
            tokio::time::sleep(Duration::from_millis(pace_ms)).await;
        }
    }
    w.shutdown().await?;
    let mut answer = String::new();
    r.read_to_string(&mut answer).await?;
    let expected = format!("{bytes} {}", pattern_sha(bytes));
    let ok = answer.trim() == expected;
    Ok(
        json!({"ok": ok, "answer": answer.trim(), "expected": expected, "seconds": started.elapsed().as_secs_f64()}),
    )
}

/// Sends `text` `repeat` times through the echo mode and checks the echo.
pub async fn canary(to: SocketAddr, text: &str, repeat: usize) -> Result<serde_json::Value> {
    let s = connect(to).await?;
    let (mut r, mut w) = s.into_split();
    let sent = text.repeat(repeat);
    let writer = async {
        w.write_all(b"ECHO\n").await?;
        w.write_all(sent.as_bytes()).await?;
        w.shutdown().await
    };
    let mut echoed = String::new();
    let (wrote, read) = tokio::join!(writer, r.read_to_string(&mut echoed));
    wrote?;
    read?;
    Ok(json!({"ok": echoed == sent, "bytes": sent.len()}))
}

/// Fetches `bytes` from the server, checks them, then — after the server
/// has half-closed — still sends a note the server must receive.
pub async fn fetch(to: SocketAddr, bytes: u64) -> Result<serde_json::Value> {
    let s = connect(to).await?;
    let (mut r, mut w) = s.into_split();
    w.write_all(format!("SOURCE {bytes}\n").as_bytes()).await?;
    let (n, sha) = read_to_end_hashing(&mut r).await?;
    w.write_all(b"after-eof").await?;
    w.shutdown().await?;
    let ok = n == bytes && sha == pattern_sha(bytes);
    Ok(json!({"ok": ok, "bytes": n, "sha": sha}))
}

/// `n` connections open at once, each a `PEER` round trip.
pub async fn concurrent(to: SocketAddr, n: usize) -> serde_json::Value {
    // Open every connection before any completes, so they are concurrent.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let mut s = connect(to).await?;
            barrier.wait().await;
            s.write_all(b"PEER\n").await?;
            let mut r = BufReader::new(&mut s);
            let mut line = String::new();
            r.read_line(&mut line).await?;
            Ok::<_, std::io::Error>(line.trim().to_owned())
        });
    }
    let mut ok = 0;
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(saw)) if !saw.is_empty() => {
                ok += 1;
                seen.insert(saw);
            }
            Ok(Ok(_)) => *errors.entry("empty".into()).or_default() += 1,
            Ok(Err(e)) => *errors.entry(classify(&e).into()).or_default() += 1,
            Err(e) => *errors.entry(format!("join: {e}")).or_default() += 1,
        }
    }
    json!({"ok": ok, "distinct_peers": seen.len(), "errors": errors})
}

/// `n` short connections, `parallel` at a time, each a `PEER` round trip.
pub async fn many(to: SocketAddr, n: usize, parallel: usize) -> serde_json::Value {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let counter = counter.clone();
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                match peer(to).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(Ok((o, f))) = tasks.join_next().await {
        ok += o;
        failed += f;
    }
    json!({"ok": ok, "failed": failed})
}

/// Opens `n` connections (64 at a time) and holds them idle for `secs`, as
/// a client that wants to exhaust a server would. Prints
/// `{"holding": ...}` once all are opened, then the outcome: how many
/// connected, were refused, and were closed by the server while held.
pub async fn hold(to: SocketAddr, n: usize, secs: f64) -> serde_json::Value {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let sem = sem.clone();
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await;
            let s = tokio::time::timeout(std::time::Duration::from_secs(5), connect(to)).await;
            drop(permit);
            match s {
                Ok(Ok(s)) => Some(s),
                _ => None,
            }
        });
    }
    let mut held = Vec::new();
    let mut refused = 0usize;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Some(s)) => held.push(s),
            _ => refused += 1,
        }
    }
    println!("{}", json!({"holding": held.len(), "refused": refused}));
    let connected = held.len();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut watchers = tokio::task::JoinSet::new();
    for mut s in held {
        let closed = closed.clone();
        watchers.spawn(async move {
            let mut buf = [0u8; 1];
            if let Ok(r) =
                tokio::time::timeout(std::time::Duration::from_secs_f64(secs), s.read(&mut buf))
                    .await
                && !matches!(r, Ok(n) if n > 0)
            {
                closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while watchers.join_next().await.is_some() {}
    let closed = closed.load(std::sync::atomic::Ordering::Relaxed);
    json!({"connected": connected, "refused": refused, "closed_by_peer": closed})
}

/// Parses `ip:port` / `[ip6]:port`.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    s.parse().map_err(|e| anyhow!("bad address {s}: {e}"))
}
