//! Moving bytes between a TCP socket and an HTTP/2 CONNECT stream, with
//! h2 flow control respected both ways and half-close carried as
//! END_STREAM / shutdown(SHUT_WR).
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::metrics::ByteCount;

/// Read size from the TCP side; the buffer is reused once h2 has sent the
/// previous chunk (BytesMut reclaims its allocation).
const CHUNK: usize = 64 * 1024;

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

/// Copies both ways until both directions ended. On error the caller resets
/// both sides. Each chunk is added to `count_out` (TCP to stream) or
/// `count_in` (stream to TCP) as it moves, so metrics show progress.
pub async fn copy(
    tcp: &mut TcpStream,
    send: &mut SendStream<Bytes>,
    recv: RecvStream,
    count_out: &ByteCount,
    count_in: &ByteCount,
) -> io::Result<(u64, u64)> {
    let (mut read, mut write) = tcp.split();
    tokio::try_join!(
        tcp_to_stream(&mut read, send, count_out),
        stream_to_tcp(recv, &mut write, count_in)
    )
}

async fn tcp_to_stream(
    read: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    count: &ByteCount,
) -> io::Result<u64> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut total = 0u64;
    loop {
        buf.reserve(CHUNK);
        let n = read.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            return Ok(total);
        }
        let mut data = buf.split().freeze();
        total += n as u64;
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionReset, "stream closed"))?
                .map_err(h2_to_io)?;
            if granted == 0 {
                continue;
            }
            let part = data.split_to(granted.min(data.len()));
            let len = part.len();
            send.send_data(part, false).map_err(h2_to_io)?;
            count.add(len);
        }
    }
}

async fn stream_to_tcp(
    mut recv: RecvStream,
    write: &mut tokio::net::tcp::WriteHalf<'_>,
    count: &ByteCount,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_to_io)?;
        write.write_all(&chunk).await?;
        total += chunk.len() as u64;
        count.add(chunk.len());
        // Open the window only once the bytes are written on.
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    // END_STREAM: the peer half-closed.
    write.shutdown().await?;
    Ok(total)
}
