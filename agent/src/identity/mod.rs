//! Workload identities (SPIFFE IDs) and the certificates that carry them.
pub mod ca;
pub mod manager;

use std::{fmt, str::FromStr};

pub use ca::{CaError, CertificateAuthority, FileCa, IssueFuture, WorkloadCert};
pub use manager::CertManager;

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{uri:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
)]
pub struct IdentityParseError {
    pub uri: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Characters allowed in a trust domain and path segments (SPIFFE ID spec).
fn valid_segment(s: &str, trust_domain: bool) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'-'
                || b == b'.'
                || b == b'_'
                || (!trust_domain && b.is_ascii_uppercase())
        })
}

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = || IdentityParseError {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(err)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        if !valid_segment(td, true) || !valid_segment(ns, false) || !valid_segment(sa, false) {
            return Err(err());
        }
        Ok(Identity::new(td, ns, sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "cart"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/cart/x",
            "https://cluster.local/ns/shop/sa/cart",
            "spiffe://Cluster.Local/ns/shop/sa/cart",
            "spiffe:///ns/shop/sa/cart",
            "spiffe://cluster.local/sa/cart/ns/shop",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
