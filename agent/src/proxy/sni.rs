//! The server name of a TLS ClientHello, read without decrypting anything
//! and without consuming it (the bytes stay queued for the upstream).
use std::time::Duration;

use tokio::net::TcpStream;

/// A ClientHello fits one record (at most 16 KiB plus the header).
const MAX_RECORD: usize = 5 + 16 * 1024;
/// Between peeks while a ClientHello arrives in pieces.
const PEEK_PAUSE: Duration = Duration::from_millis(1);

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello with this server name (lower case).
    Sni(String),
    /// A ClientHello without a server name (an IP address, or none sent).
    NoSni,
    /// Not TLS, or not a ClientHello the agent can read.
    NotTls,
    /// More bytes are needed.
    Partial,
}

/// Waits up to `timeout` for the client's first bytes and reads the SNI.
/// A client that sends nothing in that time (a server-first protocol) is
/// `NotTls`.
pub async fn peek(stream: &TcpStream, timeout: Duration) -> Hello {
    let mut buf = vec![0u8; MAX_RECORD];
    let read = async {
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Hello::NotTls,
                Ok(n) => n,
            };
            match parse(&buf[..n]) {
                Hello::Partial if n < MAX_RECORD => tokio::time::sleep(PEEK_PAUSE).await,
                Hello::Partial => return Hello::NotTls,
                done => return done,
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Hello::NotTls)
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    /// A length-prefixed block.
    fn block(&mut self, len: usize) -> Option<Reader<'a>> {
        self.take(len).map(|data| Reader { data })
    }
}

/// Reads the SNI of the first TLS record in `data`.
pub fn parse(data: &[u8]) -> Hello {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const SERVER_NAME: usize = 0;
    if data.is_empty() {
        return Hello::Partial;
    }
    if data[0] != HANDSHAKE {
        return Hello::NotTls;
    }
    if data.len() < 5 {
        return Hello::Partial;
    }
    // A TLS 1.x record version (0x03 0x01..=0x04).
    if data[1] != 3 {
        return Hello::NotTls;
    }
    let record_len = usize::from(u16::from_be_bytes([data[3], data[4]]));
    if record_len > MAX_RECORD - 5 {
        return Hello::NotTls;
    }
    if data.len() < 5 + record_len {
        return Hello::Partial;
    }
    let mut r = Reader {
        data: &data[5..5 + record_len],
    };
    let hello = (|| {
        if r.u8()? != usize::from(CLIENT_HELLO) {
            return None;
        }
        let len = r.u24()?;
        // A ClientHello longer than its record spans records: not read here.
        let mut h = r.block(len)?;
        h.take(2 + 32)?; // version, random
        let sid = h.u8()?;
        h.take(sid)?;
        let suites = h.u16()?;
        h.take(suites)?;
        let compression = h.u8()?;
        h.take(compression)?;
        if h.data.is_empty() {
            return Some(Hello::NoSni);
        }
        let ext_len = h.u16()?;
        let mut exts = h.block(ext_len)?;
        while !exts.data.is_empty() {
            let kind = exts.u16()?;
            let len = exts.u16()?;
            let mut ext = exts.block(len)?;
            if kind != SERVER_NAME {
                continue;
            }
            let list_len = ext.u16()?;
            let mut list = ext.block(list_len)?;
            while !list.data.is_empty() {
                let name_type = list.u8()?;
                let name_len = list.u16()?;
                let name = list.take(name_len)?;
                if name_type == 0 {
                    let name = std::str::from_utf8(name).ok()?;
                    if name.is_empty() || !name.is_ascii() {
                        return None;
                    }
                    return Some(Hello::Sni(name.trim_end_matches('.').to_ascii_lowercase()));
                }
            }
            return Some(Hello::NoSni);
        }
        Some(Hello::NoSni)
    })();
    hello.unwrap_or(Hello::NotTls)
}

/// The fuzz target's body (its seeds also run as a test).
pub fn fuzz_client_hello(data: &[u8]) {
    let _ = parse(data);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A real ClientHello, from rustls, for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let hello = client_hello("API.Notify.example.com");
        assert_eq!(parse(&hello), Hello::Sni("api.notify.example.com".into()));
        // In pieces: more is needed until the record is whole.
        for cut in [1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), Hello::Partial, "cut at {cut}");
        }
        // An IP address is sent without SNI.
        assert_eq!(parse(&client_hello("10.240.0.201")), Hello::NoSni);
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Hello::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.6\r\n"), Hello::NotTls);
        assert_eq!(parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Hello::NotTls);
        let mut bad = client_hello("a.example.com");
        bad[6] = 0xff; // the handshake length past the record
        assert_eq!(parse(&bad), Hello::NotTls);
    }

    #[tokio::test]
    async fn peeking_leaves_the_bytes_for_the_upstream() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hello = client_hello("pim.example.com");
        let sent = hello.clone();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            // In two pieces, as a slow network may deliver it.
            c.write_all(&sent[..10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(&sent[10..]).await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        assert_eq!(
            peek(&s, Duration::from_secs(5)).await,
            Hello::Sni("pim.example.com".into())
        );
        let mut got = vec![0; hello.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hello);
        let _c = client.await.unwrap();
        // A server-first protocol: nothing comes, so not TLS, in time.
        let silent = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (s2, _) = l.accept().await.unwrap();
        let t = tokio::time::Instant::now();
        assert_eq!(peek(&s2, Duration::from_millis(100)).await, Hello::NotTls);
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(silent);
    }
}
