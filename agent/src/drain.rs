//! Graceful shutdown: stop accepting, let open connections finish for a
//! bounded time.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    active: AtomicUsize,
    idle: Notify,
    stop_tx: watch::Sender<bool>,
}

/// Held by each open connection.
pub struct ConnectionGuard {
    inner: Arc<Inner>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        let (stop_tx, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                idle: Notify::new(),
                stop_tx,
            }),
        }
    }
}

impl Drain {
    pub fn connection(&self) -> ConnectionGuard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            inner: self.inner.clone(),
        }
    }

    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Resolves once draining has started.
    pub async fn stopped(&self) {
        let mut rx = self.inner.stop_tx.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Starts draining and waits for open connections, at most `limit`.
    /// Returns how many were still open at the deadline.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.inner.stop_tx.send_replace(true);
        let wait = async {
            loop {
                let idle = self.inner.idle.notified();
                if self.active() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        self.active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_connections_then_gives_up_at_the_deadline() {
        let drain = Drain::default();
        let guard = drain.connection();
        let d = drain.clone();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(guard);
        });
        assert_eq!(d.drain(Duration::from_secs(5)).await, 0);
        release.await.unwrap();

        let stuck = Drain::default();
        let _held = stuck.connection();
        assert_eq!(stuck.drain(Duration::from_millis(50)).await, 1);
    }
}
