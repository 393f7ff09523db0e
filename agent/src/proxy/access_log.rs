//! One line per connection (JSON or `key=value` text), written off the
//! data path, rotated by size (one previous file is kept as `<file>.1`).
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tokio::sync::mpsc;

use super::error::ResponseFlags;
use crate::config::AccessLogFormat;

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
    /// The TCP peer (destination reports: the source pod's address, as
    /// the connection arrived).
    pub src_addr: String,
    pub src_identity: Option<String>,
    /// What the peer agent's `forwarded` header claims the application's
    /// address was: telemetry only, never verified, never used to decide.
    pub forwarded_for: Option<String>,
    /// Where the application was connecting to (from the kernel), or the
    /// HBONE authority (destination reports).
    pub orig_dst: String,
    /// The service the destination is a VIP of, if any, or the registry
    /// host (ServiceEntry) it was named as.
    pub service: Option<String>,
    /// A destination outside the mesh: the registry host it was named as.
    pub host: Option<String>,
    /// The SNI of a TLS client's ClientHello, when the agent read it.
    pub sni: Option<String>,
    /// `namespace/name` of the destination pod, if it is in the mesh.
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    /// The address the agent connected to.
    pub upstream: Option<String>,
    /// Each connect attempt (several when a failed one was retried on
    /// another endpoint), with why it failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Why no further attempt was made, when one failed and retries stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_stopped: Option<&'static str>,
    /// `mutual_tls` across nodes (HBONE), `none` otherwise.
    pub security: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The policy that decided (an ALLOW that matched, or the DENY).
    pub policy: Option<String>,
    /// `ok`, or where it failed: `redirect`, `no_endpoints`, `connect`,
    /// `tls`, `hbone`, `bad_request`, `denied`, `transfer`.
    pub result: &'static str,
    /// Istio's response flags: `-`, or `DENY`, `CONNECT`, `TLS_FAILURE`.
    pub response_flags: ResponseFlags,
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
            forwarded_for: None,
            src_identity: None,
            orig_dst: String::new(),
            service: None,
            host: None,
            sni: None,
            dst_workload: None,
            dst_identity: None,
            upstream: None,
            attempts: Vec::new(),
            retry_stopped: None,
            security: "none",
            bytes_sent: 0,
            bytes_received: 0,
            policy: None,
            result: "ok",
            response_flags: ResponseFlags::None,
            error: None,
        }
    }
}

/// One connect attempt of a connection.
#[derive(Debug, Serialize)]
pub struct Attempt {
    pub endpoint: String,
    pub ms: u128,
    /// Why it failed; none: it connected.
    pub error: Option<String>,
    /// The failure ejected the endpoint (outlier detection).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ejected: bool,
}

impl Attempt {
    pub fn ok(endpoint: std::net::SocketAddr, took: std::time::Duration) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            ms: took.as_millis(),
            error: None,
            ejected: false,
        }
    }

    pub fn failed(
        endpoint: std::net::SocketAddr,
        took: std::time::Duration,
        error: &super::ProxyError,
        ejected: bool,
    ) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            ms: took.as_millis(),
            error: Some(error.to_string()),
            ejected,
        }
    }
}

impl Entry {
    /// `key=value` pairs in the JSON field order; values with spaces or
    /// quotes are quoted, missing ones are `-`.
    pub fn to_text(&self) -> String {
        fn value(v: Option<&str>) -> String {
            match v {
                None | Some("") => "-".into(),
                Some(v) if v.contains([' ', '"', '=']) => format!("{v:?}"),
                Some(v) => v.into(),
            }
        }
        let attempts = (self.attempts.len() > 1).then(|| {
            self.attempts
                .iter()
                .map(|a| format!("{}:{}", a.endpoint, a.error.as_deref().unwrap_or("ok")))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let fields: [(&str, String); 22] = [
            ("reporter", self.reporter.into()),
            ("start_ms", self.start_ms.to_string()),
            ("duration_ms", self.duration_ms.to_string()),
            ("src_workload", value(self.src_workload.as_deref())),
            ("src_addr", value(Some(&self.src_addr))),
            ("src_identity", value(self.src_identity.as_deref())),
            ("forwarded_for", value(self.forwarded_for.as_deref())),
            ("orig_dst", value(Some(&self.orig_dst))),
            ("service", value(self.service.as_deref())),
            ("host", value(self.host.as_deref())),
            ("sni", value(self.sni.as_deref())),
            ("dst_workload", value(self.dst_workload.as_deref())),
            ("dst_identity", value(self.dst_identity.as_deref())),
            ("upstream", value(self.upstream.as_deref())),
            ("attempts", value(attempts.as_deref())),
            ("security", self.security.into()),
            ("bytes_sent", self.bytes_sent.to_string()),
            ("bytes_received", self.bytes_received.to_string()),
            ("policy", value(self.policy.as_deref())),
            ("result", self.result.into()),
            ("response_flags", self.response_flags.as_str().into()),
            ("error", value(self.error.as_deref())),
        ];
        let pairs: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(" ")
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

    /// Appends to `path`; past `max_bytes` the file is renamed to
    /// `<path>.1` (replacing the previous one) and a new one started.
    pub fn open(path: &Path, format: AccessLogFormat, max_bytes: u64) -> std::io::Result<Self> {
        let mut out = Rotating::open(path, max_bytes)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let handle = |m: Message, out: &mut Rotating| match m {
                    Message::Entry(e) => {
                        let mut line = match format {
                            AccessLogFormat::Json => serde_json::to_vec(&e).unwrap_or_default(),
                            AccessLogFormat::Text => e.to_text().into_bytes(),
                        };
                        line.push(b'\n');
                        out.write(&line);
                    }
                    Message::Flush(done) => {
                        out.flush();
                        let _ = done.send(());
                    }
                };
                while let Some(m) = rx.blocking_recv() {
                    handle(m, &mut out);
                    // Batch whatever else is queued into one write.
                    while let Ok(more) = rx.try_recv() {
                        handle(more, &mut out);
                    }
                    out.flush();
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

/// A file that starts anew past a size, keeping one previous file.
struct Rotating {
    path: PathBuf,
    max_bytes: u64,
    written: u64,
    out: std::io::BufWriter<std::fs::File>,
}

impl Rotating {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            written,
            out: std::io::BufWriter::new(file),
        })
    }

    fn write(&mut self, line: &[u8]) {
        if self.written > 0 && self.written + line.len() as u64 > self.max_bytes {
            self.rotate();
        }
        if self.out.write_all(line).is_ok() {
            self.written += line.len() as u64;
        }
    }

    fn rotate(&mut self) {
        let _ = self.out.flush();
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        if let Err(e) = std::fs::rename(&self.path, &old) {
            tracing::warn!(file = %self.path.display(), "rotating the access log: {e}");
        }
        match Self::open(&self.path, self.max_bytes) {
            Ok(new) => *self = new,
            Err(e) => tracing::warn!(file = %self.path.display(), "reopening the access log: {e}"),
        }
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_quote_what_needs_it() {
        let mut e = Entry::new("destination", ([10, 0, 0, 1], 4000).into());
        e.result = "denied";
        e.response_flags = ResponseFlags::Deny;
        e.policy = Some("shop/no-promo".into());
        e.error = Some("denied by policy shop/no-promo".into());
        let line = e.to_text();
        assert!(line.starts_with("reporter=destination start_ms="), "{line}");
        assert!(
            line.contains(" src_addr=10.0.0.1:4000 src_identity=- "),
            "{line}"
        );
        assert!(
            line.ends_with(
                " policy=shop/no-promo result=denied response_flags=DENY error=\"denied by policy shop/no-promo\""
            ),
            "{line}"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["response_flags"], "DENY");
    }

    #[test]
    fn rotates_past_the_size_limit_keeping_one_file() {
        let dir = std::env::temp_dir().join(format!("nm-alog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::open(&path, AccessLogFormat::Json, 2000).unwrap();
        for _ in 0..20 {
            log.log(Entry::new("source", ([10, 0, 0, 1], 4000).into()));
            log.flush(std::time::Duration::from_secs(2));
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let rotated = dir.join("access.log.1");
        assert!(size(&path) <= 2000 && size(&path) > 0, "{}", size(&path));
        assert!(
            size(&rotated) <= 2000 && size(&rotated) > 1000,
            "{}",
            size(&rotated)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
