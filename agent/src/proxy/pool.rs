//! HBONE client connections, pooled per (source identity, destination
//! pod:15008): many CONNECT streams share one mTLS HTTP/2 connection.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{ProxyError, outbound::LocalPod};
use crate::identity::{CertStore, Identity};

/// Streams per connection; past it another connection is opened (as
/// ztunnel: min(100, the server's limit)), so a busy pool never queues.
const MAX_STREAMS: usize = 100;
/// Idle pooled connections are closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// Keepalive: a PING this often, and the connection is dead without a PONG.
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    src: Identity,
    dst: SocketAddr,
}

struct Entry {
    send: SendRequest<Bytes>,
    last_used: Instant,
    active: Arc<AtomicUsize>,
}

/// Counts a stream as active on its pooled connection while held.
pub struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(active: Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::AcqRel);
        Self(active)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Pool {
    certs: Arc<CertStore>,
    socket_mark: u32,
    connect_timeout: Duration,
    conns: Mutex<HashMap<Key, Vec<Entry>>>,
    /// One connection attempt per key at a time: callers arriving together
    /// share the new connection instead of each opening one.
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    opened: AtomicUsize,
}

impl Pool {
    pub fn new(certs: Arc<CertStore>, socket_mark: u32, connect_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(Self {
            certs,
            socket_mark,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            opened: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE / 4);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.release_idle();
            }
        });
        pool
    }

    /// HBONE connections opened so far (for tests and metrics).
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// Pooled connections and the streams open on them (for metrics).
    pub fn usage(&self) -> (usize, usize) {
        self.lock()
            .values()
            .flatten()
            .fold((0, 0), |(conns, streams), e| {
                (conns + 1, streams + e.active.load(Ordering::Acquire))
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Entry>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release_idle(&self) {
        let now = Instant::now();
        self.lock().retain(|key, entries| {
            entries.retain(|e| {
                let keep = e.active.load(Ordering::Acquire) > 0 || now - e.last_used < IDLE;
                if !keep {
                    debug!(dst = %key.dst, "closing idle HBONE connection");
                }
                keep
            });
            !entries.is_empty()
        });
        let conns = self.lock();
        self.connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, gate| conns.contains_key(k) || Arc::strong_count(gate) > 1);
    }

    /// A ready sender on a pooled (or new) connection, and a guard that
    /// counts the stream until dropped.
    pub async fn sender(
        &self,
        src: &LocalPod,
        dst: SocketAddr,
        expected: &Identity,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), ProxyError> {
        let key = Key {
            src: src.identity.clone(),
            dst,
        };
        let gate = self
            .connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let _connecting = gate.lock().await;
        loop {
            // A pooled connection with room for another stream...
            let pooled = self.lock().get(&key).and_then(|entries| {
                entries
                    .iter()
                    .find(|e| e.active.load(Ordering::Acquire) < MAX_STREAMS)
                    .map(|e| (e.send.clone(), e.active.clone()))
            });
            let Some((send, active)) = pooled else { break };
            // Counted before awaiting, so concurrent callers spread out.
            let guard = StreamGuard::new(active.clone());
            match send.ready().await {
                Ok(ready) => {
                    self.touch(&key, &active);
                    return Ok((ready, guard));
                }
                Err(e) => {
                    debug!(%dst, "pooled HBONE connection gone ({e}); dropping it");
                    if let Some(entries) = self.lock().get_mut(&key) {
                        entries.retain(|e| !Arc::ptr_eq(&e.active, &active));
                    }
                }
            }
        }
        // ...or a new one.
        let send = self.connect(src, dst, expected).await?;
        let active = Arc::new(AtomicUsize::new(0));
        let guard = StreamGuard::new(active.clone());
        self.lock().entry(key).or_default().push(Entry {
            send: send.clone(),
            last_used: Instant::now(),
            active,
        });
        let ready = send
            .ready()
            .await
            .map_err(|source| ProxyError::Hbone { addr: dst, source })?;
        Ok((ready, guard))
    }

    fn touch(&self, key: &Key, active: &Arc<AtomicUsize>) {
        if let Some(e) = self
            .lock()
            .get_mut(key)
            .and_then(|entries| entries.iter_mut().find(|e| Arc::ptr_eq(&e.active, active)))
        {
            e.last_used = Instant::now();
        }
    }

    async fn connect(
        &self,
        src: &LocalPod,
        dst: SocketAddr,
        expected: &Identity,
    ) -> Result<SendRequest<Bytes>, ProxyError> {
        let tcp = super::connect_from(src, dst, self.socket_mark, self.connect_timeout)
            .await
            .map_err(|e| match e {
                ProxyError::ConnectTimeout { addr, .. } => ProxyError::HboneTimeout { addr },
                other => other,
            })?;
        let config = self
            .certs
            .client_config(&src.identity, expected.clone())
            .map_err(|e| ProxyError::Tls {
                addr: dst,
                code: "client_config",
                reason: e.to_string(),
            })?;
        // No SNI is sent; the name only satisfies the API.
        let name = ServerName::IpAddress(dst.ip().into());
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| ProxyError::HboneTimeout { addr: dst })?
        .map_err(|e| ProxyError::Tls {
            addr: dst,
            code: crate::tls::failure_reason(&e),
            reason: e.to_string(),
        })?;
        let (send, mut connection) = h2_client()
            .handshake(tls)
            .await
            .map_err(|source| ProxyError::Hbone { addr: dst, source })?;
        let mut ping_pong = connection.ping_pong();
        self.opened.fetch_add(1, Ordering::Relaxed);
        info!(src = %src.identity, %dst, %expected, "HBONE connection opened");
        tokio::spawn(async move {
            let keepalive = async {
                let Some(pp) = ping_pong.as_mut() else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(PING_EVERY).await;
                    match tokio::time::timeout(PING_TIMEOUT, pp.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => {}
                        _ => return,
                    }
                }
            };
            tokio::select! {
                r = connection => if let Err(e) = r { debug!(%dst, "HBONE connection ended: {e}") },
                () = keepalive => info!(%dst, "HBONE peer stopped answering PINGs; connection closed"),
            }
        });
        Ok(send)
    }
}

/// Client HTTP/2 settings; the windows as the server's (measured, see
/// `inbound::h2_server`).
fn h2_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_header_list_size(16 * 1024)
        // Until the server's SETTINGS arrive, assume its limit is ours.
        .initial_max_send_streams(MAX_STREAMS)
        .enable_push(false);
    b
}
