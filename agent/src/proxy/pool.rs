//! HBONE client connections, pooled per (source identity, destination
//! pod:15008): many CONNECT streams share one mTLS HTTP/2 connection.
//!
//! Callers that find no connection with room share one connect in flight
//! (it runs in its own task, so a caller that gives up does not cancel it
//! for the others), and a failed connect is remembered for
//! [`FAILURE_MEMORY`]: callers in that time fail at once with the reason,
//! so a dead node costs one timeout, not one per caller.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use rustls_pki_types::ServerName;
use tokio::{sync::watch, time::Instant};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{LocalPod, ProxyError, SocketOptions};
use crate::{identity::Identity, tls::TlsContext};

/// Streams per connection; past it another connection is opened (as
/// ztunnel: min(100, the server's limit)), so a busy pool never queues.
const MAX_STREAMS: usize = 100;
/// Idle pooled connections are closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// How long a failed connect answers for its destination.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// Pooled connections (and connects in flight) at most, all destinations
/// together: half the descriptors kept out of the connection limits. An
/// app that dials many mesh pods cannot make idle ones take the rest.
pub const MAX_CONNECTIONS: usize = super::limits::RESERVED_FDS / 2;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    src: Identity,
    /// The source pod's netns: connections are made from inside it (its
    /// address is their source), so two pods of one identity, or a pod
    /// recreated under its name, never share one (ztunnel keys by source
    /// address too).
    netns: u64,
    dst: SocketAddr,
}

struct Conn {
    send: SendRequest<Bytes>,
    last_used: Instant,
    active: Arc<AtomicUsize>,
}

/// A connect's outcome as every waiter sees it.
#[derive(Clone)]
enum Outcome {
    Connected,
    Failed(Arc<Failure>),
}

/// A failed connect, kept to answer callers for a while.
struct Failure {
    at: Instant,
    error: FailedWith,
}

/// What is kept of the error: enough to give each caller the same one.
#[derive(Clone)]
enum FailedWith {
    Timeout,
    Tls {
        code: &'static str,
        reason: String,
    },
    Connect {
        kind: std::io::ErrorKind,
        reason: String,
    },
    Other(String),
}

impl FailedWith {
    fn of(e: &ProxyError) -> Self {
        match e {
            ProxyError::HboneTimeout { .. } | ProxyError::ConnectTimeout { .. } => Self::Timeout,
            ProxyError::Tls { code, reason, .. } => Self::Tls {
                code,
                reason: reason.clone(),
            },
            ProxyError::Connect { source, .. } => Self::Connect {
                kind: source.kind(),
                reason: source.to_string(),
            },
            other => Self::Other(other.to_string()),
        }
    }

    /// The error of the connect itself, for the callers that waited on it.
    fn error(&self, addr: SocketAddr) -> ProxyError {
        match self.clone() {
            Self::Timeout => ProxyError::HboneTimeout { addr },
            Self::Tls { code, reason } => ProxyError::Tls { addr, code, reason },
            Self::Connect { kind, reason } => ProxyError::Connect {
                addr,
                source: std::io::Error::new(kind, reason),
            },
            Self::Other(reason) => ProxyError::HboneRecentlyFailed {
                addr,
                reason,
                ago_ms: 0,
                retry_in_ms: FAILURE_MEMORY.as_millis(),
            },
        }
    }

    fn reason(&self) -> String {
        match self {
            Self::Timeout => "no answer in time".into(),
            Self::Tls { code, reason } => format!("TLS failed ({code}): {reason}"),
            Self::Connect { reason, .. } | Self::Other(reason) => reason.clone(),
        }
    }
}

#[derive(Default)]
struct KeyState {
    conns: Vec<Conn>,
    /// The connect in flight: its outcome once known.
    connecting: Option<watch::Receiver<Option<Outcome>>>,
    failed: Option<Arc<Failure>>,
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
    tls: Arc<TlsContext>,
    sockets: SocketOptions,
    /// Keepalive: a PING this often, and the connection is dead without a
    /// PONG in the timeout (`hbone` in the config).
    ping_every: Duration,
    ping_timeout: Duration,
    keys: Mutex<HashMap<Key, KeyState>>,
    opened: AtomicUsize,
}

enum Next {
    Use(SendRequest<Bytes>, Arc<AtomicUsize>),
    Wait(watch::Receiver<Option<Outcome>>),
}

impl Pool {
    pub fn new(
        tls: Arc<TlsContext>,
        sockets: SocketOptions,
        hbone: &crate::config::HboneSettings,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            tls,
            sockets,
            ping_every: Duration::from_secs(hbone.ping_interval_seconds),
            ping_timeout: Duration::from_secs(hbone.ping_timeout_seconds),
            keys: Mutex::new(HashMap::new()),
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
            .flat_map(|s| &s.conns)
            .fold((0, 0), |(conns, streams), c| {
                (conns + 1, streams + c.active.load(Ordering::Acquire))
            })
    }

    /// Registers `nodemesh_hbone_pool_*`, read at scrape time.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(PoolCollector(Arc::downgrade(self))));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, KeyState>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release_idle(&self) {
        let now = Instant::now();
        self.lock().retain(|key, state| {
            state.conns.retain(|c| {
                let keep = c.active.load(Ordering::Acquire) > 0 || now - c.last_used < IDLE;
                if !keep {
                    debug!(dst = %key.dst, "closing idle HBONE connection");
                }
                keep
            });
            state.failed = state.failed.take().filter(|f| now - f.at < FAILURE_MEMORY);
            !state.conns.is_empty() || state.connecting.is_some() || state.failed.is_some()
        });
    }

    /// A ready sender on a pooled (or new) connection, and a guard that
    /// counts the stream until dropped.
    pub async fn sender(
        self: &Arc<Self>,
        src: &Arc<LocalPod>,
        dst: SocketAddr,
        expected: &Identity,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), ProxyError> {
        let key = Key {
            src: src.identity.clone(),
            netns: src.netns_cookie,
            dst,
        };
        // A pooled connection that turns out dead is dropped and another
        // tried, a few times at most (a peer that accepts and closes at
        // once must not keep a caller looping).
        let mut dead = 0;
        loop {
            match self.next(&key, src, expected)? {
                Next::Use(send, active) => {
                    // Counted before awaiting, so concurrent callers spread out.
                    let guard = StreamGuard::new(active.clone());
                    match send.ready().await {
                        Ok(ready) => {
                            self.touch(&key, &active);
                            return Ok((ready, guard));
                        }
                        Err(e) => {
                            debug!(%dst, "pooled HBONE connection gone ({e}); dropping it");
                            if let Some(state) = self.lock().get_mut(&key) {
                                state.conns.retain(|c| !Arc::ptr_eq(&c.active, &active));
                            }
                            dead += 1;
                            if dead == 4 {
                                return Err(ProxyError::HboneRecentlyFailed {
                                    addr: dst,
                                    reason: "every new connection closed before its first stream"
                                        .into(),
                                    ago_ms: 0,
                                    retry_in_ms: 0,
                                });
                            }
                        }
                    }
                }
                Next::Wait(mut rx) => {
                    let outcome = rx
                        .wait_for(Option::is_some)
                        .await
                        .map(|o| o.clone())
                        .ok()
                        .flatten();
                    match outcome {
                        Some(Outcome::Connected) => continue,
                        Some(Outcome::Failed(f)) => return Err(f.error.error(dst)),
                        // The connecting task ended without a word (the
                        // runtime is shutting down).
                        None => {
                            return Err(ProxyError::HboneRecentlyFailed {
                                addr: dst,
                                reason: "connect abandoned".into(),
                                ago_ms: 0,
                                retry_in_ms: 0,
                            });
                        }
                    }
                }
            }
        }
    }

    /// What to do now for `key`: use a connection with room, wait for the
    /// connect in flight (starting one if none is), or fail at once while
    /// a recent failure stands.
    fn next(
        self: &Arc<Self>,
        key: &Key,
        src: &Arc<LocalPod>,
        expected: &Identity,
    ) -> Result<Next, ProxyError> {
        let mut keys = self.lock();
        let state = keys.entry(key.clone()).or_default();
        if let Some(c) = state
            .conns
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < MAX_STREAMS)
        {
            return Ok(Next::Use(c.send.clone(), c.active.clone()));
        }
        if let Some(rx) = &state.connecting {
            return Ok(Next::Wait(rx.clone()));
        }
        let now = Instant::now();
        if let Some(f) = state
            .failed
            .as_ref()
            .filter(|f| now - f.at < FAILURE_MEMORY)
        {
            let ago = now - f.at;
            return Err(ProxyError::HboneRecentlyFailed {
                addr: key.dst,
                reason: f.error.reason(),
                ago_ms: ago.as_millis(),
                retry_in_ms: (FAILURE_MEMORY - ago).as_millis(),
            });
        }
        // Room for one more connection: an idle one elsewhere may go.
        let open: usize = keys
            .values()
            .map(|s| s.conns.len() + usize::from(s.connecting.is_some()))
            .sum();
        if open >= MAX_CONNECTIONS && !close_least_recently_used(&mut keys) {
            return Err(ProxyError::Overloaded {
                limit: "hbone_pool",
                max: MAX_CONNECTIONS,
            });
        }
        let state = keys.entry(key.clone()).or_default();
        let (tx, rx) = watch::channel(None);
        state.connecting = Some(rx.clone());
        let (pool, key, src, expected) = (self.clone(), key.clone(), src.clone(), expected.clone());
        tokio::spawn(async move {
            let connected = pool.connect(&src, key.dst, &expected).await;
            let (outcome, driver) = {
                let mut keys = pool.lock();
                let state = keys.entry(key.clone()).or_default();
                state.connecting = None;
                match connected {
                    Ok((send, driver)) => {
                        state.failed = None;
                        let active = Arc::new(AtomicUsize::new(0));
                        state.conns.push(Conn {
                            send,
                            last_used: Instant::now(),
                            active: active.clone(),
                        });
                        (Outcome::Connected, Some((driver, active)))
                    }
                    Err(e) => {
                        let failure = Arc::new(Failure {
                            at: Instant::now(),
                            error: FailedWith::of(&e),
                        });
                        state.failed = Some(failure.clone());
                        (Outcome::Failed(failure), None)
                    }
                }
            };
            let _ = tx.send(Some(outcome));
            // The connection runs here; once it ends (closed by the peer,
            // idle, or dead) it leaves the pool at once.
            if let Some((driver, active)) = driver {
                driver.await;
                if let Some(state) = pool.lock().get_mut(&key) {
                    state.conns.retain(|c| !Arc::ptr_eq(&c.active, &active));
                }
            }
        });
        Ok(Next::Wait(rx))
    }

    fn touch(&self, key: &Key, active: &Arc<AtomicUsize>) {
        if let Some(c) = self
            .lock()
            .get_mut(key)
            .and_then(|s| s.conns.iter_mut().find(|c| Arc::ptr_eq(&c.active, active)))
        {
            c.last_used = Instant::now();
        }
    }

    async fn connect(
        &self,
        src: &LocalPod,
        dst: SocketAddr,
        expected: &Identity,
    ) -> Result<
        (
            SendRequest<Bytes>,
            impl std::future::Future<Output = ()> + use<>,
        ),
        ProxyError,
    > {
        let tcp = super::connect_from(src, dst, &self.sockets)
            .await
            .map_err(|e| match e {
                ProxyError::ConnectTimeout { addr, .. } => ProxyError::HboneTimeout { addr },
                other => other,
            })?;
        let config = self
            .tls
            .client_config(&src.identity, expected.clone())
            .await
            .map_err(|e| ProxyError::Tls {
                addr: dst,
                code: "client_config",
                reason: e.to_string(),
            })?;
        // No SNI is sent; the name only satisfies the API. The handshake
        // gets the connect timeout too: both establish the connection.
        let name = ServerName::IpAddress(dst.ip().into());
        let tls = tokio::time::timeout(
            self.sockets.connect_timeout,
            TlsConnector::from(config).connect(name, super::read_buffer::ReadBuffered::new(tcp)),
        )
        .await
        .map_err(|_| ProxyError::HboneTimeout { addr: dst })?
        .map_err(|e| ProxyError::Tls {
            addr: dst,
            code: crate::tls::failure_reason(&e),
            reason: e.to_string(),
        })?;
        let (key_exchange, suite) = crate::tls::negotiated(tls.get_ref().1);
        let (send, mut connection) = h2_client()
            .handshake(tls)
            .await
            .map_err(|source| ProxyError::Hbone { addr: dst, source })?;
        let mut ping_pong = connection.ping_pong();
        self.opened.fetch_add(1, Ordering::Relaxed);
        info!(src = %src.identity, %dst, %expected, key_exchange, suite, "HBONE connection opened");
        let (every, timeout) = (self.ping_every, self.ping_timeout);
        let driver = async move {
            tokio::select! {
                r = connection => match r {
                    Ok(()) => debug!(%dst, "HBONE connection closed"),
                    Err(e) => debug!(%dst, "HBONE connection ended: {e}"),
                },
                () = keepalive(ping_pong.as_mut(), every, timeout) => {
                    info!(%dst, "HBONE peer stopped answering PINGs; connection closed")
                }
            }
        };
        Ok((send, driver))
    }
}

/// Closes the pooled connection without streams that was used least
/// recently; false if every one has streams.
fn close_least_recently_used(keys: &mut HashMap<Key, KeyState>) -> bool {
    let oldest = keys
        .iter()
        .flat_map(|(k, s)| s.conns.iter().map(move |c| (k, c)))
        .filter(|(_, c)| c.active.load(Ordering::Acquire) == 0)
        .min_by_key(|(_, c)| c.last_used)
        .map(|(k, c)| (k.clone(), c.active.clone()));
    let Some((key, active)) = oldest else {
        return false;
    };
    if let Some(state) = keys.get_mut(&key) {
        state.conns.retain(|c| !Arc::ptr_eq(&c.active, &active));
    }
    debug!(dst = %key.dst, "closing the least recently used idle HBONE connection to make room");
    true
}

/// Resolves when the peer of an HTTP/2 connection stopped answering PINGs
/// (sent every `every`, each given `timeout`); never without a PingPong.
/// Runs beside the connection's own future, which carries the PONGs.
pub async fn keepalive(ping_pong: Option<&mut h2::PingPong>, every: Duration, timeout: Duration) {
    let Some(pp) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
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

#[derive(Debug)]
struct PoolCollector(std::sync::Weak<Pool>);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(pool) = self.0.upgrade() else {
            return Ok(());
        };
        let (connections, streams) = pool.usage();
        let gauge = ConstGauge::new(connections as i64);
        gauge.encode(encoder.encode_descriptor(
            "hbone_pool_connections",
            "Pooled HBONE client connections.",
            None,
            gauge.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(streams as i64);
        gauge.encode(encoder.encode_descriptor(
            "hbone_pool_streams",
            "CONNECT streams open on pooled HBONE client connections.",
            None,
            gauge.metric_type(),
        )?)?;
        let opened = ConstCounter::new(pool.opened() as u64);
        opened.encode(encoder.encode_descriptor(
            "hbone_pool_connections_opened",
            "HBONE client connections opened.",
            None,
            opened.metric_type(),
        )?)?;
        Ok(())
    }
}
