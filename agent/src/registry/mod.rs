//! The egress registry: what meshed pods may reach outside the mesh
//! (Istio's ServiceEntry) and how the agent connects to each destination
//! (Istio's DestinationRule `trafficPolicy`), compiled from the policy
//! directory with the authorization policies, as one all-or-nothing set.
//!
//! Mesh services come from the workload state; a DestinationRule for one
//! (`orders.shop.svc.cluster.local`) sets its connection policy too.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use crate::{hostname, ipblock::IpBlock};

/// A ServiceEntry or DestinationRule host: a name, or `*.suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (stored with the
    /// leading dot).
    Suffix(String),
}

impl HostMatch {
    pub fn parse(v: &str) -> Result<Self, String> {
        let lower = v.trim_end_matches('.').to_ascii_lowercase();
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        match lower.strip_prefix("*.") {
            Some(rest) if valid_name(rest) => Ok(Self::Suffix(format!(".{rest}"))),
            None if valid_name(&lower) => Ok(Self::Exact(lower)),
            _ => Err(format!(
                "{v:?} is not a host name or a wildcard `*.domain` (a bare `*` is not allowed)"
            )),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(e) => e == name,
            Self::Suffix(s) => name.ends_with(s.as_str()) && name.len() > s.len(),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self, Self::Suffix(_))
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(e) => f.write_str(e),
            Self::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Connect to the address the app connected to.
    None,
    /// Connect to the entry's endpoints (addresses).
    Static,
    /// Connect to the agent's own resolution of the host (or of the
    /// endpoints' names), every address balanced.
    Dns,
    /// The same, one address of each resolution at a time.
    DnsRoundRobin,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Static => "STATIC",
            Self::Dns => "DNS",
            Self::DnsRoundRobin => "DNS_ROUND_ROBIN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub number: u16,
    pub name: String,
    /// Upper case, as Istio writes it: TCP, TLS, HTTPS, HTTP, HTTP2, GRPC...
    pub protocol: String,
    /// Where the endpoints listen, when not `number`.
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// Whether connections to this port start with a TLS ClientHello.
    pub fn is_tls(&self) -> bool {
        self.protocol == "TLS" || self.protocol == "HTTPS"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(IpAddr),
    /// With `resolution: DNS`: a name the agent resolves.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    pub address: EndpointAddress,
    /// Port name -> port, overriding the service port's target.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub locality: Option<String>,
}

impl ServiceEndpoint {
    /// The port this endpoint serves `port` on.
    pub fn port_for(&self, port: &ServicePort) -> u16 {
        self.ports
            .get(&port.name)
            .copied()
            .or(port.target_port)
            .unwrap_or(port.number)
    }
}

#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<HostMatch>,
    pub addresses: Vec<IpBlock>,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub endpoints: Vec<ServiceEndpoint>,
    /// MESH_EXTERNAL (the default) or MESH_INTERNAL.
    pub mesh_external: bool,
}

impl ServiceEntry {
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Simple,
    Mutual,
}

/// TLS the agent originates (DestinationRule `trafficPolicy.tls`).
#[derive(Debug, Clone)]
pub struct OriginationTls {
    pub mode: TlsMode,
    /// The SNI sent; default: the host.
    pub sni: Option<String>,
    /// Roots the server's chain must lead to; default: the system roots.
    pub ca_certificates: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// Names the certificate may carry instead of the host.
    pub subject_alt_names: Vec<String>,
    /// Built when the set is compiled, so a bad file rejects the set.
    pub config: Arc<rustls::ClientConfig>,
}

/// Envoy's outlier detection for connect failures (`outlierDetection`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Connect failures in a row that eject an endpoint (for opaque TCP,
    /// Istio counts them as 5xx and gateway errors alike: the lower of the
    /// two set wins).
    pub consecutive_errors: u32,
    /// How often ejections are reviewed: an endpoint whose ejection ended
    /// has its ejection count lowered by one per interval without one.
    pub interval: Duration,
    /// An endpoint's n-th ejection lasts n times this.
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// TCP keepalive for upstream connections (`connectionPool.tcp.tcpKeepalive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

/// How the agent connects to one destination: the fields a DestinationRule
/// set (port-level settings over the rule's own).
#[derive(Debug, Clone, Default)]
pub struct ConnectPolicy {
    /// The rule that set it (`namespace/name`).
    pub rule: Option<String>,
    pub connect_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub keepalive: Option<Keepalive>,
    pub outlier: Option<OutlierPolicy>,
    pub tls: Option<OriginationTls>,
}

impl ConnectPolicy {
    /// `self`'s fields where set, else `base`'s (Istio merges port-level
    /// settings over the top level field by field).
    fn over(&self, base: &ConnectPolicy) -> ConnectPolicy {
        ConnectPolicy {
            rule: self.rule.clone().or_else(|| base.rule.clone()),
            connect_timeout: self.connect_timeout.or(base.connect_timeout),
            max_connections: self.max_connections.or(base.max_connections),
            keepalive: self.keepalive.or(base.keepalive),
            outlier: self.outlier.clone().or_else(|| base.outlier.clone()),
            tls: self.tls.clone().or_else(|| base.tls.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    pub host: HostMatch,
    pub policy: ConnectPolicy,
    pub ports: BTreeMap<u16, ConnectPolicy>,
}

/// A registry match: the entry, the host name it was matched under, and
/// the port.
#[derive(Debug, Clone)]
pub struct Matched {
    pub entry: Arc<ServiceEntry>,
    /// The name the destination is known by: the host the app resolved or
    /// sent as SNI, or the entry's first host when matched by address.
    pub host: String,
    pub port: ServicePort,
}

/// The registry in force, indexed so that a decision costs a few hash
/// lookups whatever the number of entries (it is made for every connection
/// that leaves the mesh).
#[derive(Debug, Default)]
pub struct ServiceRegistry {
    entries: Vec<Arc<ServiceEntry>>,
    rules: Vec<DestinationRule>,
    /// Exact host -> entries (in file order).
    hosts: HashMap<String, Vec<usize>>,
    /// `*.suffix` as `.suffix` -> entries.
    wildcards: HashMap<String, Vec<usize>>,
    /// A single address (STATIC endpoint, one-address `addresses`) -> entries.
    addresses: HashMap<IpAddr, Vec<usize>>,
    /// Entries with an `addresses` block wider than one address.
    blocks: Vec<usize>,
    tls_ports: HashSet<u16>,
    /// DestinationRules by exact host and by wildcard suffix (first wins).
    rule_hosts: HashMap<String, usize>,
    rule_wildcards: HashMap<String, usize>,
}

/// `name`'s parent suffixes, longest first: `a.b.c` -> `.b.c`, `.c`.
fn suffixes(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.').map(|(i, _)| &name[i..])
}

impl ServiceRegistry {
    pub fn new(entries: Vec<ServiceEntry>, rules: Vec<DestinationRule>) -> Self {
        let mut r = Self {
            entries: entries.into_iter().map(Arc::new).collect(),
            rules,
            ..Self::default()
        };
        for (i, e) in r.entries.iter().enumerate() {
            for h in &e.hosts {
                let map = match h {
                    HostMatch::Exact(n) => r.hosts.entry(n.clone()),
                    HostMatch::Suffix(s) => r.wildcards.entry(s.clone()),
                };
                map.or_default().push(i);
            }
            for b in &e.addresses {
                match b.single() {
                    Some(ip) => r.addresses.entry(ip).or_default().push(i),
                    None => r.blocks.push(i),
                }
            }
            if e.resolution == Resolution::Static {
                for ep in &e.endpoints {
                    if let EndpointAddress::Ip(ip) = ep.address {
                        let list = r.addresses.entry(ip.to_canonical()).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
            }
            r.tls_ports
                .extend(e.ports.iter().filter(|p| p.is_tls()).map(|p| p.number));
        }
        for (i, rule) in r.rules.iter().enumerate() {
            let map = match &rule.host {
                HostMatch::Exact(n) => r.rule_hosts.entry(n.clone()),
                HostMatch::Suffix(s) => r.rule_wildcards.entry(s.clone()),
            };
            map.or_insert(i);
        }
        r
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.rules.is_empty()
    }

    pub fn entries(&self) -> &[Arc<ServiceEntry>] {
        &self.entries
    }

    pub fn rules(&self) -> &[DestinationRule] {
        &self.rules
    }

    /// The entry an address belongs to: in its `addresses`, or one of its
    /// STATIC endpoints, with the port it serves (the first such entry in
    /// file order).
    pub fn by_address(&self, dst: SocketAddr) -> Option<Matched> {
        let ip = dst.ip().to_canonical();
        let mut candidates: Vec<usize> = self.addresses.get(&ip).cloned().unwrap_or_default();
        candidates.extend(
            self.blocks
                .iter()
                .copied()
                .filter(|&i| self.entries[i].addresses.iter().any(|b| b.contains(ip))),
        );
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().find_map(|i| {
            let e = &self.entries[i];
            if let Some(port) = e.port(dst.port()) {
                return Some(e.matched_first(port));
            }
            // A STATIC endpoint reached on its own port (the target port).
            let port = e.ports.iter().find(|p| {
                e.endpoints
                    .iter()
                    .any(|ep| ep.address == EndpointAddress::Ip(ip) && ep.port_for(p) == dst.port())
            })?;
            Some(e.matched_first(port))
        })
    }

    /// The entry a host name on `port` belongs to (exact hosts before
    /// wildcards, longer wildcards first, then file order).
    pub fn by_name(&self, name: &str, port: u16) -> Option<Matched> {
        let name = hostname::normalize(name);
        let exact = self.hosts.get(&name).into_iter();
        let wild = suffixes(&name).filter_map(|s| self.wildcards.get(s));
        exact.chain(wild).flatten().find_map(|&i| {
            let e = &self.entries[i];
            Some(Matched {
                entry: e.clone(),
                host: name.clone(),
                port: e.port(port)?.clone(),
            })
        })
    }

    /// Whether some entry names `host` (on any port).
    pub fn knows_host(&self, host: &str) -> bool {
        self.hosts.contains_key(host) || suffixes(host).any(|s| self.wildcards.contains_key(s))
    }

    /// Whether any entry declares `port` as TLS (its connections carry an
    /// SNI worth reading).
    pub fn is_tls_port(&self, port: u16) -> bool {
        self.tls_ports.contains(&port)
    }

    /// The connection policy for `host` on `port`: the most specific rule
    /// whose host matches, its port-level settings over its own.
    pub fn connect_policy(&self, host: &str, port: u16) -> ConnectPolicy {
        let found = self
            .rule_hosts
            .get(host)
            .or_else(|| suffixes(host).find_map(|s| self.rule_wildcards.get(s)));
        let Some(rule) = found.map(|&i| &self.rules[i]) else {
            return ConnectPolicy::default();
        };
        match rule.ports.get(&port) {
            Some(p) => p.over(&rule.policy),
            None => rule.policy.clone(),
        }
    }

    /// For `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let entries: Vec<serde_json::Value> = self
            .entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "hosts": e.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "addresses": e.addresses.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>(),
                    "ports": e.ports.iter().map(|p| serde_json::json!({
                        "number": p.number, "name": p.name, "protocol": p.protocol,
                        "targetPort": p.target_port,
                    })).collect::<Vec<_>>(),
                    "resolution": e.resolution.as_str(),
                    "location": if e.mesh_external { "MESH_EXTERNAL" } else { "MESH_INTERNAL" },
                    "endpoints": e.endpoints.iter().map(|ep| serde_json::json!({
                        "address": match &ep.address {
                            EndpointAddress::Ip(ip) => ip.to_string(),
                            EndpointAddress::Name(n) => n.clone(),
                        },
                        "ports": ep.ports, "labels": ep.labels, "locality": ep.locality,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let rules: Vec<serde_json::Value> = self
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "host": r.host.to_string(),
                    "trafficPolicy": format!("{:?}", r.policy),
                    "portLevelSettings": r.ports.iter().map(|(p, c)| (p.to_string(), format!("{c:?}"))).collect::<BTreeMap<_, _>>(),
                })
            })
            .collect();
        serde_json::json!({ "serviceEntries": entries, "destinationRules": rules })
    }
}

impl ServiceEntry {
    fn matched_first(self: &Arc<Self>, port: &ServicePort) -> Matched {
        Matched {
            entry: self.clone(),
            host: self
                .hosts
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            port: port.clone(),
        }
    }
}

/// A duration as Istio writes one: `10s`, `1.5s`, `100ms`, `1m30s`, `1h`
/// (Go's units from `ms` up; a bare number is not accepted).
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let err = || format!("{v:?} is not a duration (e.g. 500ms, 10s, 1m30s)");
    let mut rest = v.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let number: f64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * scale).map_err(|_| err())?;
    }
    Ok(total)
}
