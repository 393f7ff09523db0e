//! A read buffer under rustls. rustls 0.23 reads its transport into a
//! deframer buffer of about one record (~18 KiB; grown 4 KiB at a time from
//! empty), so a busy HBONE socket costs a `recv()` per record or more, each
//! through tokio's readiness machinery. Reading the socket in larger pieces
//! and handing rustls slices of them costs one copy in memory and saves
//! calls (measured: docs/architecture.md, "Bytes").
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket per `recv()`: four full TLS records.
const READ_SIZE: usize = 64 * 1024;

/// `io` with reads buffered; writes go straight through (rustls already
/// hands them over as one vectored write per batch of records).
pub struct ReadBuffered<T> {
    io: T,
    /// Allocated (not zeroed) when a read needs it and freed whenever it is
    /// empty and the socket has nothing more, so an idle connection holds
    /// none.
    buf: BytesMut,
}

impl<T> ReadBuffered<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // A caller asking for as much as the buffer holds gains nothing
            // from a copy.
            if out.remaining() >= READ_SIZE {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            // Empty, so this reuses the allocation if there is one.
            this.buf.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                // Drained: waiting costs no memory.
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: nothing put in `out` says so.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Small reads are served from one large read, in order, to the end;
    /// large reads and writes pass through.
    #[tokio::test]
    async fn bytes_arrive_intact_in_any_read_size() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut r = ReadBuffered::new(b);
        let mut got = Vec::new();
        let mut sizes = [1usize, 4096, 17, READ_SIZE, 3 * READ_SIZE, 100]
            .into_iter()
            .cycle();
        loop {
            let mut chunk = vec![0u8; sizes.next().unwrap()];
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        r.write_all(b"done").await.unwrap();
        r.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
    }

    /// A connection waiting for bytes holds no buffer; it reads on after.
    #[tokio::test]
    async fn a_drained_connection_holds_no_buffer() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = ReadBuffered::new(b);
        a.write_all(&[7u8; 10_000]).await.unwrap();
        let mut small = [0u8; 4096];
        let mut got = 0;
        while got < 10_000 {
            got += r.read(&mut small).await.unwrap();
        }
        assert!(r.buf.capacity() > 0, "the reads went through the buffer");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = ReadBuf::new(&mut small);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert_eq!(r.buf.capacity(), 0);
        a.write_all(b"more").await.unwrap();
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"more");
    }
}
