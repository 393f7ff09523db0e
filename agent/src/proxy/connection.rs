//! One connection's outcome: its access-log line and its traffic report,
//! built up while it is served and recorded exactly once, when it is
//! dropped (as ztunnel's `ConnectionResult`), whichever way it ended.
use std::{net::SocketAddr, sync::Arc};

use tokio::time::Instant;

use super::{
    ProxyInputs,
    access_log::{AccessLog, Entry},
    balance::ConnectionSlot,
    error::ProxyError,
    metrics::{ActiveConnection, ByteCount, ConnectionTraffic, ProxyMetrics, Report, Reporter},
};
use crate::policy::Decision;

pub struct ConnectionResult {
    entry: Entry,
    traffic: Option<ConnectionTraffic>,
    started: Instant,
    /// `outbound`, `inbound` (HBONE) or `inbound_plaintext` (captured).
    direction: &'static str,
    access_log: AccessLog,
    /// False: the metrics only (a flood of refusals is sampled in the log).
    logged: bool,
    metrics: Arc<ProxyMetrics>,
    _active: ActiveConnection,
    /// One of the destination's `maxConnections`, while the connection is.
    slot: Option<ConnectionSlot>,
}

/// The two directions' byte counters of a connection's reports.
#[derive(Clone, Default)]
pub struct Bytes {
    pub client_to_server: ByteCount,
    pub server_to_client: ByteCount,
}

impl ConnectionResult {
    /// A connection from `src` that this agent serves as `reporter`.
    pub fn new(
        inputs: &ProxyInputs,
        reporter: Reporter,
        direction: &'static str,
        src: SocketAddr,
    ) -> Self {
        Self {
            entry: Entry::new(reporter.as_str(), src),
            traffic: None,
            started: Instant::now(),
            direction,
            access_log: inputs.access_log.clone(),
            logged: true,
            metrics: inputs.metrics.clone(),
            _active: inputs.metrics.active(direction),
            slot: None,
        }
    }

    /// Holds a destination's connection slot until the connection ends.
    pub fn hold(&mut self, slot: ConnectionSlot) {
        self.slot = Some(slot);
    }

    pub fn entry(&mut self) -> &mut Entry {
        &mut self.entry
    }

    /// Counts the connection opened under each report; returns the byte
    /// counters the copy loops add to while bytes flow.
    pub fn open(&mut self, reports: &[Report<'_>]) -> Bytes {
        let traffic = self.metrics.open(reports);
        let bytes = Bytes {
            client_to_server: traffic.client_to_server.clone(),
            server_to_client: traffic.server_to_client.clone(),
        };
        self.traffic = Some(traffic);
        bytes
    }

    /// Records which policy decided, for the access log.
    pub fn decided(&mut self, decision: &Decision) {
        self.entry.policy = match decision {
            Decision::Allow { policy } | Decision::Deny { policy } => policy.clone(),
        };
    }

    /// Bytes client -> server and back, once the copy ended.
    pub fn transferred(&mut self, client_to_server: u64, server_to_client: u64) {
        // A source report's "sent" is what its client sent; a destination
        // report's is what its server sent back (ztunnel's orientation).
        if self.entry.reporter == Reporter::Source.as_str() {
            self.entry.bytes_sent = client_to_server;
            self.entry.bytes_received = server_to_client;
        } else {
            self.entry.bytes_sent = server_to_client;
            self.entry.bytes_received = client_to_server;
        }
    }

    /// Marks the connection failed with `e`: its stage, flag and reason in
    /// the access log, the flag on the closed (and failed) series, the
    /// policy for a denial, the reason for a TLS failure.
    pub fn fail(&mut self, e: &ProxyError) {
        self.entry.result = e.stage();
        self.entry.response_flags = e.response_flags();
        self.entry.error = Some(e.to_string());
        if let Some(policy) = e.policy() {
            self.entry.policy = policy.clone();
        }
        if let Some(code) = e.tls_code() {
            let direction = if self.direction == "outbound" {
                "outbound"
            } else {
                "inbound"
            };
            self.metrics.tls_failure(direction, code);
        }
    }

    /// Leaves this connection out of the access log (its metrics stay).
    pub fn quiet(&mut self) {
        self.logged = false;
    }

    pub fn failed(&self) -> bool {
        self.entry.result != "ok"
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        self.entry.duration_ms = self.started.elapsed().as_millis();
        if let Some(t) = self.traffic.take() {
            t.close(self.entry.response_flags, self.failed());
        }
        if self.logged {
            let placeholder = Entry::new("", SocketAddr::from(([0, 0, 0, 0], 0)));
            self.access_log
                .log(std::mem::replace(&mut self.entry, placeholder));
        }
    }
}
