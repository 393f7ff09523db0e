//! One JSON line per connection, written off the data path.
use std::{io::Write as _, path::Path};

use serde::Serialize;
use tokio::sync::mpsc;

#[derive(Debug, Serialize)]
pub struct Entry {
    /// Unix time of the accept, milliseconds.
    pub start_ms: u128,
    pub duration_ms: u128,
    /// `namespace/name` of the pod that connected.
    pub src_workload: String,
    pub src_addr: String,
    /// Where the application was connecting to (from the kernel).
    pub orig_dst: String,
    /// The service the destination is a VIP of, if any.
    pub service: Option<String>,
    /// `namespace/name` of the destination pod, if it is in the mesh.
    pub dst_workload: Option<String>,
    /// The address the agent connected to.
    pub upstream: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `ok`, or where it failed: `no_endpoints`, `connect`, `transfer`.
    pub result: &'static str,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::UnboundedSender<Entry>>,
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
        let (tx, mut rx) = mpsc::unbounded_channel::<Entry>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Some(entry) = rx.blocking_recv() {
                    let mut write = |e: &Entry| {
                        let _ = serde_json::to_writer(&mut out, e);
                        let _ = out.write_all(b"\n");
                    };
                    write(&entry);
                    while let Ok(more) = rx.try_recv() {
                        write(&more);
                    }
                    let _ = out.flush();
                }
            })?;
        Ok(Self { tx: Some(tx) })
    }

    pub fn log(&self, entry: Entry) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(entry);
        }
    }
}
