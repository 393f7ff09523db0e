//! Load generators for `cargo xtask bench`, run inside a pod.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

/// Bulk throughput: `streams` connections each writing for `secs`.
pub async fn stream(to: SocketAddr, secs: f64, streams: usize) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        tasks.spawn(async move {
            let s = TcpStream::connect(to).await?;
            let (mut r, mut w) = s.into_split();
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
    Ok(json!({
        "bytes": received,
        "intact": sent == received,
        "seconds": elapsed,
        "gbit_per_s": received as f64 * 8.0 / elapsed / 1e9,
    }))
}

/// 64-byte request/response on one connection for `secs`: latency.
pub async fn rr(to: SocketAddr, secs: f64) -> Result<serde_json::Value> {
    let s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
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
    Ok(json!({
        "requests": lat.len(),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
    }))
}

/// New connections per second: connect, 1-byte echo, close; `parallel`
/// loops for `secs`.
pub async fn crr(to: SocketAddr, secs: f64, parallel: usize) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let one = async {
                    let mut s = TcpStream::connect(to).await?;
                    s.set_nodelay(true)?;
                    s.write_all(b"ECHO\nx").await?;
                    s.shutdown().await?;
                    let mut b = Vec::new();
                    s.read_to_end(&mut b).await?;
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
    Ok(json!({"connections": ok, "failed": failed, "per_second": ok as f64 / elapsed}))
}
