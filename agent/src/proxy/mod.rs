//! The data path.
pub mod outbound;
mod splice;

use thiserror::Error;

/// Why a proxied connection failed, and where.
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
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error(
        "connect to {addr} timed out after {secs} s; is the destination up and routable from the pod?"
    )]
    ConnectTimeout {
        addr: std::net::SocketAddr,
        secs: u64,
    },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("creating the upstream socket in {pod}'s netns: {source}")]
    Socket { pod: String, source: std::io::Error },
    #[error("transfer: {0}")]
    Transfer(std::io::Error),
}

impl ProxyError {
    /// The stage name used in the access log.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::NotRedirected | Self::WrongPod { .. } => "redirect",
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::ConnectTimeout { .. } | Self::Connect { .. } | Self::Socket { .. } => "connect",
            Self::Transfer(_) => "transfer",
        }
    }
}
