//! One JSON line per connection, written off the data path.
use std::{io::Write as _, path::Path};

use serde::Serialize;
use tokio::sync::mpsc;

#[derive(Debug, Serialize)]
pub struct Entry {
    /// `source`: the agent of the pod that connected; `destination`: the
    /// agent of the pod connected to (HBONE inbound).
    pub reporter: &'static str,
    /// Unix time of the accept, milliseconds.
    pub start_ms: u128,
    pub duration_ms: u128,
    /// `namespace/name` of the pod that connected (source reports).
    pub src_workload: Option<String>,
    pub src_addr: String,
    pub src_identity: Option<String>,
    /// Where the application was connecting to (from the kernel), or the
    /// HBONE authority (destination reports).
    pub orig_dst: String,
    /// The service the destination is a VIP of, if any.
    pub service: Option<String>,
    /// `namespace/name` of the destination pod, if it is in the mesh.
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    /// The address the agent connected to.
    pub upstream: Option<String>,
    /// `mutual_tls` across nodes (HBONE), `none` otherwise.
    pub security: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The policy that decided (an ALLOW that matched, or the DENY).
    pub policy: Option<String>,
    /// `ok`, or where it failed: `redirect`, `no_endpoints`, `connect`,
    /// `tls`, `hbone`, `bad_request`, `denied`, `transfer`.
    pub result: &'static str,
    pub error: Option<String>,
}

impl Entry {
    pub fn new(reporter: &'static str, src_addr: std::net::SocketAddr) -> Self {
        Self {
            reporter,
            start_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            duration_ms: 0,
            src_workload: None,
            src_addr: src_addr.to_string(),
            src_identity: None,
            orig_dst: String::new(),
            service: None,
            dst_workload: None,
            dst_identity: None,
            upstream: None,
            security: "none",
            bytes_sent: 0,
            bytes_received: 0,
            policy: None,
            result: "ok",
            error: None,
        }
    }
}

enum Message {
    Entry(Box<Entry>),
    /// Write out everything before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::UnboundedSender<Message>>,
}

impl AccessLog {
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                let handle = |m: Message, out: &mut std::io::BufWriter<std::fs::File>| match m {
                    Message::Entry(e) => {
                        let _ = serde_json::to_writer(&mut *out, &e);
                        let _ = out.write_all(b"\n");
                    }
                    Message::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.send(());
                    }
                };
                while let Some(m) = rx.blocking_recv() {
                    handle(m, &mut out);
                    // Batch whatever else is queued into one write.
                    while let Ok(more) = rx.try_recv() {
                        handle(more, &mut out);
                    }
                    let _ = out.flush();
                }
            })?;
        Ok(Self { tx: Some(tx) })
    }

    pub fn log(&self, entry: Entry) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Message::Entry(Box::new(entry)));
        }
    }

    /// Waits (at most `limit`) until everything logged so far is written.
    pub fn flush(&self, limit: std::time::Duration) {
        if let Some(tx) = &self.tx {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            if tx.send(Message::Flush(done_tx)).is_ok() {
                let _ = done_rx.recv_timeout(limit);
            }
        }
    }
}
