//! Why a proxied connection failed, and where: every failure of every path
//! (denials included) is a [`ProxyError`], which names its stage for the
//! access log and its Istio response flag for the metrics.
use std::net::SocketAddr;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use thiserror::Error;

/// Envoy/ztunnel response flags: why a connection failed, `-` when it did not.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    None,
    /// Denied by an AuthorizationPolicy (or PeerAuthentication STRICT).
    Deny,
    /// The upstream refused, timed out or could not be reached.
    Connect,
    /// The mTLS handshake failed.
    TlsFailure,
    /// Refused at once: a connection limit was reached (load shedding).
    ConnectionLimit,
    /// Refused: `outboundTrafficPolicy: REGISTRY_ONLY` and the destination
    /// is not in the registry (or its SNI is refused).
    RegistryOnly,
    /// Refused at once: the destination's `maxConnections` are open
    /// (Envoy's UO).
    UpstreamOverflow,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
            Self::TlsFailure => "TLS_FAILURE",
            Self::ConnectionLimit => "CONNECTION_LIMIT",
            Self::RegistryOnly => "REGISTRY_ONLY",
            Self::UpstreamOverflow => "UPSTREAM_OVERFLOW",
        }
    }
}

impl serde::Serialize for ResponseFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error(
        "connection to the outbound port was not redirected by the kernel (no original-destination record); refused"
    )]
    NotRedirected,
    #[error(
        "redirect record names workload id {recorded} but the connection arrived in pod {pod}; refused"
    )]
    WrongPod { recorded: u32, pod: String },
    #[error(
        "captured plaintext connection to {addr}: not one of the pod's addresses, or an agent port; refused"
    )]
    NotCapturable { addr: SocketAddr },
    #[error(
        "{}plaintext refused: PeerAuthentication {} requires mutual TLS (STRICT) on port {port}; the client must be in the mesh",
        if *after_reload { "closed: after a policy reload, " } else { "" },
        policy.as_deref().unwrap_or("(none)")
    )]
    PlaintextRefused {
        policy: Option<String>,
        port: u16,
        after_reload: bool,
    },
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error(
        "connect to {addr} timed out after {ms} ms; is the destination up and routable from the pod?"
    )]
    ConnectTimeout { addr: SocketAddr, ms: u128 },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("creating the upstream socket in {pod}'s netns: {source}")]
    Socket { pod: String, source: std::io::Error },
    #[error("transfer: {0}")]
    Transfer(std::io::Error),
    #[error("denied by {}", denied_by(policy))]
    Denied { policy: Option<String> },
    #[error("closed: after a policy reload, denied by {}", denied_by(policy))]
    DeniedAfterReload { policy: Option<String> },
    #[error("HBONE to {addr}: TLS failed ({code}): {reason}")]
    Tls {
        addr: SocketAddr,
        /// Bounded, for the metric label (`tls::failure_reason`).
        code: &'static str,
        reason: String,
    },
    #[error("HBONE from {peer}: TLS handshake refused ({code}): {reason}")]
    TlsHandshake {
        peer: SocketAddr,
        code: &'static str,
        reason: String,
    },
    #[error(
        "HBONE to {addr}: no answer in time; is the destination node's agent running and port 15008 reachable?"
    )]
    HboneTimeout { addr: SocketAddr },
    #[error("HBONE to {addr}: {source}")]
    Hbone { addr: SocketAddr, source: h2::Error },
    #[error("HBONE to {addr}: destination answered {status}{}", status_hint(*status))]
    HboneStatus { addr: SocketAddr, status: u16 },
    #[error("HBONE to {addr}: failed {ago_ms} ms ago ({reason}); not retried for {retry_in_ms} ms")]
    HboneRecentlyFailed {
        addr: SocketAddr,
        reason: String,
        ago_ms: u128,
        retry_in_ms: u128,
    },
    #[error("HBONE request refused (400): {0}")]
    BadRequest(String),
    #[error("in pod {pod}: {source}")]
    InPod {
        pod: String,
        #[source]
        source: Box<ProxyError>,
    },
    #[error("no certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("refused: the {limit} connection limit ({max}) is reached (README: Limits)")]
    Overloaded { limit: &'static str, max: usize },
    #[error("refused: {what} would re-enter the agent")]
    ReentersAgent { what: String },
    #[error("HBONE connection closed: {0}")]
    HboneClosed(String),
    #[error(
        "outboundTrafficPolicy REGISTRY_ONLY: {dst}{} is neither in the mesh nor a ServiceEntry host; refused",
        if names.is_empty() { String::new() } else { format!(" (resolved by this pod as {names})") }
    )]
    NotInRegistry { dst: SocketAddr, names: String },
    #[error(
        "outboundTrafficPolicy REGISTRY_ONLY: TLS to {dst} with SNI {sni}, which is not a ServiceEntry host; refused"
    )]
    SniNotInRegistry { sni: String, dst: SocketAddr },
    #[error(
        "TLS to {dst} with SNI {sni}: this pod did not resolve {sni} to {} ({}); refused, as the SNI may claim an allowed name for another address",
        dst.ip(),
        if resolved.is_empty() { "it resolved no name to that address".to_string() } else { format!("it resolved {resolved} to it") }
    )]
    SniNotResolved {
        sni: String,
        dst: SocketAddr,
        resolved: String,
    },
    #[error("refused: {destination} has its maxConnections ({max}) open (DestinationRule {rule})")]
    UpstreamOverflow {
        destination: String,
        max: u32,
        rule: String,
    },
    #[error("TLS to {host} at {addr} failed ({code}): {reason}")]
    OriginationTls {
        host: String,
        addr: SocketAddr,
        code: &'static str,
        reason: String,
    },
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("{destination}: no endpoint could be reached ({attempts})")]
    Unreachable {
        destination: String,
        attempts: String,
        last: Box<ProxyError>,
    },
}

pub fn denied_by(policy: &Option<String>) -> String {
    match policy {
        Some(p) => format!("policy {p}"),
        None => "policy: ALLOW policies select the destination and none matched".into(),
    }
}

fn status_hint(status: u16) -> &'static str {
    match status {
        400 => " (bad request: the destination agent did not accept the CONNECT)",
        401 => " (denied by the destination's policy)",
        503 => " (the destination agent could not reach the pod)",
        _ => "",
    }
}

impl ProxyError {
    /// The stage name used in the access log.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::NotRedirected | Self::WrongPod { .. } | Self::NotCapturable { .. } => "redirect",
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::ConnectTimeout { .. } | Self::Connect { .. } | Self::Socket { .. } => "connect",
            Self::Transfer(_) => "transfer",
            Self::Denied { .. }
            | Self::DeniedAfterReload { .. }
            | Self::PlaintextRefused { .. }
            | Self::HboneStatus { status: 401, .. } => "denied",
            Self::Tls { .. } | Self::TlsHandshake { .. } | Self::Certificate { .. } => "tls",
            Self::HboneTimeout { .. }
            | Self::Hbone { .. }
            | Self::HboneStatus { .. }
            | Self::HboneRecentlyFailed { .. } => "hbone",
            Self::BadRequest(_) | Self::ReentersAgent { .. } => "bad_request",
            Self::InPod { source, .. } => source.stage(),
            Self::Overloaded { .. } => "overload",
            Self::HboneClosed(_) => "hbone",
            Self::NotInRegistry { .. }
            | Self::SniNotInRegistry { .. }
            | Self::SniNotResolved { .. } => "registry",
            Self::UpstreamOverflow { .. } => "overflow",
            Self::OriginationTls { .. } => "tls",
            Self::Resolve { .. } => "no_endpoints",
            Self::Unreachable { last, .. } => last.stage(),
        }
    }

    /// The Istio response flag a failure is reported with.
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            Self::Denied { .. }
            | Self::DeniedAfterReload { .. }
            | Self::PlaintextRefused { .. }
            | Self::HboneStatus { status: 401, .. } => ResponseFlags::Deny,
            Self::NoEndpoints { .. }
            | Self::ConnectTimeout { .. }
            | Self::Connect { .. }
            | Self::HboneTimeout { .. }
            | Self::HboneRecentlyFailed { .. }
            | Self::HboneStatus { status: 503, .. } => ResponseFlags::Connect,
            Self::Tls { .. } | Self::TlsHandshake { .. } => ResponseFlags::TlsFailure,
            Self::Overloaded { .. } => ResponseFlags::ConnectionLimit,
            Self::InPod { source, .. } => source.response_flags(),
            Self::NotInRegistry { .. }
            | Self::SniNotInRegistry { .. }
            | Self::SniNotResolved { .. } => ResponseFlags::RegistryOnly,
            Self::UpstreamOverflow { .. } => ResponseFlags::UpstreamOverflow,
            Self::OriginationTls { .. } => ResponseFlags::TlsFailure,
            Self::Resolve { .. } => ResponseFlags::Connect,
            Self::Unreachable { last, .. } => last.response_flags(),
            Self::NotRedirected
            | Self::WrongPod { .. }
            | Self::NotCapturable { .. }
            | Self::Socket { .. }
            | Self::Transfer(_)
            | Self::Hbone { .. }
            | Self::HboneStatus { .. }
            | Self::BadRequest(_)
            | Self::ReentersAgent { .. }
            | Self::HboneClosed(_)
            | Self::Certificate { .. } => ResponseFlags::None,
        }
    }

    /// The policy a denial names, for the access log's `policy` field.
    pub fn policy(&self) -> Option<&Option<String>> {
        match self {
            Self::Denied { policy }
            | Self::DeniedAfterReload { policy }
            | Self::PlaintextRefused { policy, .. } => Some(policy),
            Self::InPod { source, .. } => source.policy(),
            _ => None,
        }
    }

    /// The bounded TLS failure reason, for `nodemesh_tls_handshake_failures_total`.
    pub fn tls_code(&self) -> Option<&'static str> {
        match self {
            Self::Tls { code, .. }
            | Self::TlsHandshake { code, .. }
            | Self::OriginationTls { code, .. } => Some(code),
            Self::Unreachable { last, .. } => last.tls_code(),
            _ => None,
        }
    }

    /// A failure to reach one endpoint, which another endpoint may not
    /// have (so it counts for outlier detection and may be retried).
    pub fn is_connect_failure(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Tls { .. }
            | Self::OriginationTls { .. }
            | Self::HboneTimeout { .. }
            | Self::Hbone { .. }
            | Self::HboneRecentlyFailed { .. }
            | Self::HboneClosed(_)
            | Self::HboneStatus { status: 503, .. } => true,
            Self::InPod { source, .. } => source.is_connect_failure(),
            _ => false,
        }
    }

    /// Why the registry refused a connection (a bounded metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotInRegistry { .. } => "not_in_registry",
            Self::SniNotInRegistry { .. } => "sni_not_in_registry",
            Self::SniNotResolved { .. } => "sni_not_resolved",
            _ => "other",
        }
    }

    /// The same failure after a policy reload (a re-check found it).
    pub fn after_reload(self) -> Self {
        match self {
            Self::Denied { policy } => Self::DeniedAfterReload { policy },
            Self::PlaintextRefused { policy, port, .. } => Self::PlaintextRefused {
                policy,
                port,
                after_reload: true,
            },
            other => other,
        }
    }
}
