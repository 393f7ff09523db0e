//! One line per connection (JSON or `key=value` text), written off the
//! data path.
use std::{io::Write as _, path::Path};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{config::AccessLogFormat, metrics::ResponseFlags};

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
            response_flags: ResponseFlags::None,
            error: None,
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
        let fields: [(&str, String); 18] = [
            ("reporter", self.reporter.into()),
            ("start_ms", self.start_ms.to_string()),
            ("duration_ms", self.duration_ms.to_string()),
            ("src_workload", value(self.src_workload.as_deref())),
            ("src_addr", value(Some(&self.src_addr))),
            ("src_identity", value(self.src_identity.as_deref())),
            ("orig_dst", value(Some(&self.orig_dst))),
            ("service", value(self.service.as_deref())),
            ("dst_workload", value(self.dst_workload.as_deref())),
            ("dst_identity", value(self.dst_identity.as_deref())),
            ("upstream", value(self.upstream.as_deref())),
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

    pub fn open(path: &Path, format: AccessLogFormat) -> std::io::Result<Self> {
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
                        let _ = match format {
                            AccessLogFormat::Json => {
                                serde_json::to_writer(&mut *out, &e).map_err(std::io::Error::from)
                            }
                            AccessLogFormat::Text => out.write_all(e.to_text().as_bytes()),
                        };
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
}
