//! The agent's own configuration file (`nodemesh-agent run --config FILE`).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::yaml::{self, YamlError};

/// Where a policy set comes from in Kubernetes: the AuthorizationPolicy
/// and PeerAuthentication objects, and the ServiceEntry and
/// DestinationRule objects of the egress registry, all as one set.
/// ServiceEntry and DestinationRule exist only in Istio's
/// `networking.istio.io/v1` (nodemesh ships no copy of that group); it is
/// watched whenever the API server serves it, and never waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    /// Every group the API server serves of Istio's `security.istio.io`,
    /// `security.nodemesh.dev` and Istio's `networking.istio.io`.
    #[default]
    Auto,
    /// Istio's groups only: `security.istio.io` (waited for) and
    /// `networking.istio.io` (where served).
    Istio,
    /// `security.nodemesh.dev` only (waited for): none of Istio's objects,
    /// so no ServiceEntry or DestinationRule either; the egress registry
    /// then holds the mesh's own services only (under REGISTRY_ONLY, no
    /// third party is reachable). For a cluster whose Istio objects are
    /// meant for another mesh; use `auto` to have them too.
    Nodemesh,
    /// No objects are watched (policyDir may still be set).
    Off,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesSettings {
    /// This node's name (the pods it enrols have `spec.nodeName` equal to
    /// it). Empty: the `NODE_NAME` environment variable (the DaemonSet
    /// sets it from the downward API).
    #[serde(default)]
    pub node_name: String,
    /// A kubeconfig file. Unset: the pod's service account (in-cluster).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The AuthorizationPolicy / PeerAuthentication and ServiceEntry /
    /// DestinationRule objects to watch.
    #[serde(default)]
    pub policies: PolicySource,
}

/// Serialize: shown by `/config_dump` (it holds file paths, never keys).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// The workloads file (pods and services); watched for changes. The
    /// source outside Kubernetes (and for the lab); exactly one of this
    /// and `kubernetes` is set.
    #[serde(default)]
    pub workloads_file: Option<PathBuf>,
    /// Pods, services and policies from the Kubernetes API.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSettings>,
    /// cgroup v2 directory whose subtree holds the node's pods. Programs
    /// attach here (in Kubernetes: the kubepods cgroup). `auto`: detected
    /// under `cgroupRoot` at start (`nodefs`).
    pub cgroup_path: CgroupPath,
    /// Where `cgroupPath: auto` looks: the host's cgroup hierarchy (in a
    /// DaemonSet, its /sys/fs/cgroup mounted e.g. at /host/sys/fs/cgroup);
    /// `<cgroupRoot>/unified` when it is not cgroup2 itself (hybrid hosts).
    /// Unset: the first cgroup2 mount the agent sees.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Where the agent mounts cgroup2 when none is mounted (a cgroup v1-only
    /// host), for `cgroupPath: auto`; left mounted.
    #[serde(default = "default_cgroup_mount_dir")]
    pub cgroup_mount_dir: PathBuf,
    /// Directory on a bpffs where maps and links are pinned. One per agent.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Where the agent keeps what must outlive its restart: the local pods
    /// it last enrolled (so a restart never unenrols a running pod that a
    /// cut workloads file leaves out). A node-local directory (hostPath);
    /// one per agent.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `SO_MARK` on the agent's own sockets, so the kernel never redirects them.
    #[serde(default = "default_socket_mark")]
    pub socket_mark: u32,
    /// How long open connections may finish after SIGTERM.
    #[serde(default = "default_drain_seconds")]
    pub drain_timeout_seconds: u64,
    /// How long establishing a connection may take: the TCP connect, and
    /// for HBONE the TLS handshake.
    #[serde(default = "default_connect_seconds")]
    pub connect_timeout_seconds: u64,
    /// The mesh's trust domain: identities are spiffe://<trustDomain>/ns/../sa/..
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The mesh CA's certificate and key (PEM); the agent issues its local
    /// workloads' certificates with them.
    pub ca_cert_file: PathBuf,
    pub ca_key_file: PathBuf,
    /// Roots peers' chains may lead to (PEM, several during a rotation);
    /// watched. Defaults to caCertFile.
    #[serde(default)]
    pub trust_bundle_file: Option<PathBuf>,
    /// Lifetime of issued workload certificates; renewed at half-life.
    #[serde(default = "default_cert_lifetime")]
    pub cert_lifetime_seconds: u64,
    /// Directory of AuthorizationPolicy / PeerAuthentication files (a
    /// ConfigMap mount); watched. None: no policy, everything allowed.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Namespace whose policies apply mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Sources (addresses or CIDR blocks) whose plaintext connections to
    /// meshed pods skip PeerAuthentication and authorization, as Istio's
    /// ambient mode exempts kubelet probes: in Kubernetes, the node's own
    /// addresses (or the address probes are SNATed to). Empty by default.
    #[serde(default)]
    pub inbound_exempt_sources: Vec<String>,
    /// The sk_msg fast path for data the agent sends to apps.
    #[serde(default)]
    pub sockmap: bool,
    /// Where to write one line per connection; none: no access log.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// `json` (one object per line) or `text` (`key=value` pairs).
    #[serde(default)]
    pub access_log_format: AccessLogFormat,
    /// Past this size the access log is moved to `<accessLog>.1` (the one
    /// before is dropped) and a new one started.
    #[serde(default = "default_access_log_max_bytes")]
    pub access_log_max_bytes: u64,
    /// The admin server: every endpoint, `/config_dump` included. Loopback
    /// only (as ztunnel's 15000).
    #[serde(default = "default_admin_address")]
    pub admin_address: std::net::SocketAddr,
    /// `/metrics` and `/stats/prometheus`, for Prometheus (ztunnel's 15020).
    #[serde(default = "default_stats_address")]
    pub stats_address: std::net::SocketAddr,
    /// `/healthz/ready` and `/healthz/live`, for the kubelet (ztunnel's 15021).
    #[serde(default = "default_readiness_address")]
    pub readiness_address: std::net::SocketAddr,
    /// Bounds on what clients may make the agent hold.
    #[serde(default)]
    pub limits: Limits,
    /// TCP keepalive on the agent's proxied and HBONE sockets: an idle
    /// peer that stops answering is given up after `timeSeconds +
    /// intervalSeconds × probes`.
    #[serde(default)]
    pub tcp_keepalive: TcpKeepalive,
    /// Liveness of inbound HBONE connections.
    #[serde(default)]
    pub hbone: HboneSettings,
    /// Threads of the data path. A node agent shares the node with its pods.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    /// Level of the eBPF programs' own log lines (aya-log): off or debug.
    #[serde(default)]
    pub ebpf_log: EbpfLog,
    /// Enrolment by the chained CNI plugin `nodemesh-cni` (Kubernetes):
    /// the agent answers its requests on a unix socket, so a pod is in the
    /// mesh before any of its containers starts. None: local pods are
    /// enrolled from the netns paths of the workload source only.
    #[serde(default)]
    pub cni: Option<CniSettings>,
    /// What meshed pods may reach outside the mesh (Istio's
    /// `meshConfig.outboundTrafficPolicy`, same names and meaning).
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// DNS of enrolled pods, answered through the agent (README: "DNS").
    #[serde(default)]
    pub dns: DnsSettings,
}

/// Istio's `outboundTrafficPolicy`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundMode,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Destinations outside the mesh and the registry pass (named when the
    /// registry knows them).
    #[default]
    AllowAny,
    /// Only mesh workloads and services and ServiceEntry hosts; anything
    /// else is refused (a reset), logged and counted.
    RegistryOnly,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DnsSettings {
    /// Enrolled pods' DNS (UDP and TCP port 53) goes to the agent, which
    /// forwards it and records the answers per pod.
    pub capture: bool,
    /// Where the agent forwards captured queries. Empty: the nameservers
    /// of the agent's own `/etc/resolv.conf` (as ztunnel's DNS proxy does;
    /// in a DaemonSet with `dnsPolicy: ClusterFirstWithHostNet`, the
    /// cluster's DNS).
    pub upstreams: Vec<std::net::SocketAddr>,
    /// How long the agent waits for an upstream's answer.
    pub timeout_ms: u64,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            capture: true,
            upstreams: Vec::new(),
            timeout_ms: 5000,
        }
    }
}

/// `cgroupPath`: a directory, or `auto`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(from = "PathBuf", into = "PathBuf")]
pub enum CgroupPath {
    /// Detected at start under `cgroupRoot` (`nodefs::pods_cgroup`).
    Auto,
    Dir(PathBuf),
}

impl From<PathBuf> for CgroupPath {
    fn from(p: PathBuf) -> Self {
        if p.as_os_str() == "auto" {
            CgroupPath::Auto
        } else {
            CgroupPath::Dir(p)
        }
    }
}

impl From<CgroupPath> for PathBuf {
    fn from(c: CgroupPath) -> Self {
        match c {
            CgroupPath::Auto => PathBuf::from("auto"),
            CgroupPath::Dir(p) => p,
        }
    }
}

/// The CNI plugin's side of the agent (README: "Enrolment by CNI").
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CniSettings {
    /// The unix socket the plugin asks on (a hostPath shared with the
    /// node's container runtime).
    #[serde(default = "default_cni_socket")]
    pub socket_path: PathBuf,
    /// How long an ADD waits for its pod to appear in the workload source
    /// (the API watch may lag the runtime) before it fails and the runtime
    /// retries. Kept below the plugin's own timeout.
    #[serde(default = "default_cni_pod_wait_ms")]
    pub pod_wait_ms: u64,
    /// The host's /proc (mounted into the agent's pod, e.g. at /host/proc):
    /// scanned for pods that already run when their netns is not known (an
    /// agent installed on a running node, or its saved state lost).
    #[serde(default = "default_proc_root")]
    pub proc_root: PathBuf,
    /// Where the runtime mounts pods' netns (mounted with HostToContainer
    /// propagation): the stable name of a netns found by the scan.
    #[serde(default = "default_netns_dir")]
    pub netns_dir: PathBuf,
    /// Installs the plugin on the node: the binary into `binDir`, an entry
    /// into the primary network config in `confDir`, put back whenever that
    /// config is rewritten. None: installed by other means.
    #[serde(default)]
    pub install: Option<CniInstall>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CniInstall {
    /// The host's CNI binary directory (`/opt/cni/bin`, mounted).
    pub bin_dir: PathBuf,
    /// The host's CNI config directory (`/etc/cni/net.d`, mounted).
    pub conf_dir: PathBuf,
    /// The plugin binary to install (in the agent's image).
    pub binary: PathBuf,
    /// Namespaces whose pods the plugin never sends (the agent's own must be
    /// one: its pod cannot wait for itself).
    #[serde(default = "default_cni_exclude")]
    pub exclude_namespaces: Vec<String>,
}

/// Connection limits (README: "Limits"). Past one, a new connection is
/// refused at once (a reset, flag `CONNECTION_LIMIT`, counted and logged,
/// the log sampled) and the agent keeps serving the rest.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Limits {
    /// Proxied connections (and HBONE streams) at once, all pods together;
    /// 0: derived from the open-file limit, keeping a reserve for the
    /// servers and HBONE.
    pub max_connections: usize,
    /// Per local workload and direction (outbound, HBONE inbound,
    /// plaintext inbound); 0: half of the total, so one busy or abused pod
    /// leaves the other half to the rest of the node.
    pub max_connections_per_workload: usize,
    /// Per source address, for the inbound paths (HBONE connections,
    /// captured plaintext connections); 0: a quarter of the total.
    pub max_connections_per_source: usize,
    /// Per admin, stats and readiness server.
    pub max_admin_connections: usize,
    /// How long an admin request may take to send its headers, and how long
    /// an admin connection may stay open at most.
    pub admin_header_timeout_seconds: u64,
    pub admin_connection_timeout_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 0,
            max_connections_per_workload: 0,
            max_connections_per_source: 0,
            max_admin_connections: 64,
            admin_header_timeout_seconds: 5,
            admin_connection_timeout_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TcpKeepalive {
    pub enabled: bool,
    pub time_seconds: u64,
    pub interval_seconds: u64,
    pub probes: u32,
    /// TCP_USER_TIMEOUT: unacknowledged data given up after this long; 0
    /// (default): off, the kernel's retransmission limits apply. Off by
    /// default because recent kernels also abort a connection whose
    /// receiver kept a zero window that long (an app that stopped reading
    /// for a while); HBONE's PINGs already bound a partitioned peer.
    pub user_timeout_seconds: u64,
}

impl Default for TcpKeepalive {
    fn default() -> Self {
        Self {
            enabled: true,
            time_seconds: 60,
            interval_seconds: 10,
            probes: 3,
            user_timeout_seconds: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HboneSettings {
    /// An HTTP/2 PING this often on every HBONE connection (both ends)...
    pub ping_interval_seconds: u64,
    /// ...and the connection is closed when none is answered in this long.
    pub ping_timeout_seconds: u64,
    /// An inbound HBONE connection with no stream for this long is closed
    /// (longer than a client pool's 60 s, so clients close first).
    pub idle_timeout_seconds: u64,
}

impl Default for HboneSettings {
    fn default() -> Self {
        Self {
            ping_interval_seconds: 10,
            ping_timeout_seconds: 20,
            idle_timeout_seconds: 120,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EbpfLog {
    #[default]
    Off,
    Debug,
}

fn default_admin_address() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 15000).into()
}
fn default_stats_address() -> std::net::SocketAddr {
    ([0, 0, 0, 0], 15020).into()
}
fn default_readiness_address() -> std::net::SocketAddr {
    ([0, 0, 0, 0], 15021).into()
}
fn default_access_log_max_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_cni_socket() -> PathBuf {
    PathBuf::from(nodemesh_cni::protocol::DEFAULT_SOCKET_PATH)
}
fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}
fn default_netns_dir() -> PathBuf {
    PathBuf::from("/var/run/netns")
}
fn default_cni_pod_wait_ms() -> u64 {
    5000
}
fn default_cni_exclude() -> Vec<String> {
    vec!["kube-system".into(), "nodemesh-system".into()]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/run/nodemesh")
}
fn default_cgroup_mount_dir() -> PathBuf {
    PathBuf::from("/var/run/nodemesh/cgroupv2")
}
fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/nodemesh")
}
fn default_socket_mark() -> u32 {
    0x4e4d // "NM"
}
fn default_root_namespace() -> String {
    crate::policy::DEFAULT_ROOT_NAMESPACE.into()
}
fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_cert_lifetime() -> u64 {
    24 * 3600
}
fn default_worker_threads() -> usize {
    2
}
fn default_drain_seconds() -> u64 {
    5
}
fn default_connect_seconds() -> u64 {
    10
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, YamlError> {
        let mut cfg: Config = yaml::read_file(path)?;
        // Relative paths are relative to the config file, not the cwd.
        let base = path.parent().unwrap_or(Path::new("."));
        let invalid = |field: &str, message: String| YamlError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            message,
        };
        if cfg.dns.timeout_ms == 0 {
            return Err(invalid(
                "dns.timeoutMs",
                "0: an upstream would never be given time to answer (default 5000)".into(),
            ));
        }
        match (&cfg.workloads_file, &mut cfg.kubernetes) {
            (Some(file), None) => cfg.workloads_file = Some(base.join(file)),
            (None, Some(kube)) => {
                if kube.node_name.is_empty() {
                    kube.node_name = std::env::var("NODE_NAME").unwrap_or_default();
                }
                if kube.node_name.is_empty() {
                    return Err(invalid(
                        "kubernetes.nodeName",
                        "empty, and NODE_NAME is not set: set it, or NODE_NAME from the downward API (fieldRef spec.nodeName)".into(),
                    ));
                }
                // Empty is unset (in-cluster), as an empty string in a
                // ConfigMap is.
                kube.kubeconfig = kube
                    .kubeconfig
                    .take()
                    .filter(|k| !k.as_os_str().is_empty())
                    .map(|k| base.join(k));
                if cfg.policy_dir.is_some() && kube.policies != PolicySource::Off {
                    return Err(invalid(
                        "policyDir",
                        "set with kubernetes.policies watching the API: one set has one source; set kubernetes.policies: off to use policyDir".into(),
                    ));
                }
                if cfg.cni.is_none() {
                    return Err(invalid(
                        "cni",
                        "required with kubernetes: pods from the API carry no netns path; the CNI plugin hands the agent each pod's netns".into(),
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "kubernetes",
                    "workloadsFile and kubernetes are both set; choose one source of workloads"
                        .into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "workloadsFile",
                    "missing: set workloadsFile, or kubernetes to read workloads from the API"
                        .into(),
                ));
            }
        }
        cfg.state_dir = base.join(&cfg.state_dir);
        if let Some(cni) = &mut cfg.cni {
            cni.socket_path = base.join(&cni.socket_path);
            if let Some(i) = &mut cni.install {
                i.bin_dir = base.join(&i.bin_dir);
                i.conf_dir = base.join(&i.conf_dir);
                i.binary = base.join(&i.binary);
            }
        }
        if let Some(log) = &cfg.access_log {
            cfg.access_log = Some(base.join(log));
        }
        if let Some(dir) = &cfg.policy_dir {
            cfg.policy_dir = Some(base.join(dir));
        }
        cfg.ca_cert_file = base.join(&cfg.ca_cert_file);
        cfg.ca_key_file = base.join(&cfg.ca_key_file);
        cfg.trust_bundle_file =
            Some(base.join(cfg.trust_bundle_file.as_ref().unwrap_or(&cfg.ca_cert_file)));
        if cfg.cert_lifetime_seconds < 2 {
            return Err(YamlError::Invalid {
                path: path.to_owned(),
                field: "certLifetimeSeconds".into(),
                message: "must be at least 2 (certificates renew at half-life)".into(),
            });
        }
        if cfg.worker_threads == 0 {
            return Err(YamlError::Invalid {
                path: path.to_owned(),
                field: "workerThreads".into(),
                message: "must be at least 1".into(),
            });
        }
        for (i, block) in cfg.inbound_exempt_sources.iter().enumerate() {
            if let Err(message) = crate::policy::IpBlock::parse(block) {
                return Err(YamlError::Invalid {
                    path: path.to_owned(),
                    field: format!("inboundExemptSources[{i}]"),
                    message,
                });
            }
        }
        if !cfg.admin_address.ip().is_loopback() {
            return Err(invalid(
                "adminAddress",
                format!(
                    "{} is not a loopback address: the admin server (/config_dump) is for the node only; Prometheus scrapes statsAddress, the kubelet probes readinessAddress",
                    cfg.admin_address
                ),
            ));
        }
        let l = &cfg.limits;
        if l.max_admin_connections == 0 {
            return Err(invalid(
                "limits.maxAdminConnections",
                "must be at least 1".into(),
            ));
        }
        if l.admin_header_timeout_seconds == 0 || l.admin_connection_timeout_seconds == 0 {
            return Err(invalid(
                "limits.adminHeaderTimeoutSeconds",
                "admin timeouts must be at least 1 s".into(),
            ));
        }
        let k = &cfg.tcp_keepalive;
        if k.enabled && (k.time_seconds == 0 || k.interval_seconds == 0 || k.probes == 0) {
            return Err(invalid(
                "tcpKeepalive",
                "timeSeconds, intervalSeconds and probes must be at least 1".into(),
            ));
        }
        let h = &cfg.hbone;
        if h.ping_interval_seconds == 0
            || h.ping_timeout_seconds == 0
            || h.idle_timeout_seconds == 0
        {
            return Err(invalid(
                "hbone",
                "every interval and timeout must be at least 1 s".into(),
            ));
        }
        if cfg.socket_mark == 0 {
            return Err(YamlError::Invalid {
                path: path.to_owned(),
                field: "socketMark".into(),
                message: "must not be 0: the kernel programs tell the agent's sockets by it".into(),
            });
        }
        if let CgroupPath::Dir(dir) = &cfg.cgroup_path
            && !dir.is_absolute()
        {
            return Err(YamlError::Invalid {
                path: path.to_owned(),
                field: "cgroupPath".into(),
                message: format!(
                    "{} is neither an absolute path nor `auto` (detection under cgroupRoot, for Kubernetes)",
                    dir.display()
                ),
            });
        }
        Ok(cfg)
    }

    /// `inboundExemptSources`, parsed (checked by `load`).
    pub fn inbound_exempt_sources(&self) -> Vec<crate::policy::IpBlock> {
        self.inbound_exempt_sources
            .iter()
            .filter_map(|b| crate::policy::IpBlock::parse(b).ok())
            .collect()
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_seconds)
    }

    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_seconds)
    }

    pub fn trust_bundle_file(&self) -> &Path {
        self.trust_bundle_file
            .as_deref()
            .unwrap_or(&self.ca_cert_file)
    }

    pub fn keepalive(&self) -> Option<socket2::TcpKeepalive> {
        let k = &self.tcp_keepalive;
        k.enabled.then(|| {
            socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(k.time_seconds))
                .with_interval(Duration::from_secs(k.interval_seconds))
                .with_retries(k.probes)
        })
    }

    /// How long unacknowledged data may wait before a connection is given
    /// up, when set.
    pub fn user_timeout(&self) -> Option<Duration> {
        let t = self.tcp_keepalive.user_timeout_seconds;
        (t > 0).then(|| Duration::from_secs(t))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "workloadsFile: w.yaml\ncgroupPath: /sys/fs/cgroup\ncaCertFile: ca.pem\ncaKeyFile: ca.key\n";

    fn load(text: &str) -> Result<Config, YamlError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nodemesh-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        let result = Config::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// The DaemonSet's ConfigMap: a key this agent rejects would stop every
    /// agent of a cluster.
    #[test]
    fn the_kubernetes_manifests_config_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/agent.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        // NODE_NAME comes from the downward API there.
        let text = text.replace("nodeName: \"\"", "nodeName: node-1");
        assert_ne!(
            text,
            std::fs::read_to_string(&path).unwrap(),
            "nodeName line changed"
        );
        let cfg = load(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kube = cfg.kubernetes.expect("Kubernetes mode");
        assert_eq!(kube.node_name, "node-1");
        assert_eq!(kube.kubeconfig, None);
        assert!(cfg.cni.is_some() && cfg.workloads_file.is_none());
    }

    #[test]
    fn exactly_one_source_of_workloads() {
        const REST: &str = "cgroupPath: /sys/fs/cgroup\ncaCertFile: ca.pem\ncaKeyFile: ca.key\n";
        let err = load(REST).unwrap_err().to_string();
        assert!(
            err.contains("workloadsFile") && err.contains("kubernetes"),
            "{err}"
        );
        let both = format!("{BASE}kubernetes: {{nodeName: n1}}\ncni: {{}}\n");
        let err = load(&both).unwrap_err().to_string();
        assert!(err.contains("both set"), "{err}");
        let no_cni = format!("{REST}kubernetes: {{nodeName: n1}}\n");
        let err = load(&no_cni).unwrap_err().to_string();
        assert!(err.contains("cni") && err.contains("netns"), "{err}");
        let cfg = load(&format!(
            "{REST}kubernetes: {{nodeName: n1, kubeconfig: kc, policies: istio}}\ncni: {{}}\n"
        ))
        .unwrap();
        let unset = load(&format!(
            "{REST}kubernetes: {{nodeName: n1, kubeconfig: \"\"}}\ncni: {{}}\n"
        ))
        .unwrap();
        assert_eq!(unset.kubernetes.unwrap().kubeconfig, None);
        let kube = cfg.kubernetes.unwrap();
        assert_eq!(kube.node_name, "n1");
        assert!(kube.kubeconfig.unwrap().is_absolute());
        assert_eq!(kube.policies, PolicySource::Istio);
        let err = load(&format!(
            "{REST}kubernetes: {{nodeName: n1, policies: all}}\ncni: {{}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("policies"), "{err}");
    }

    #[test]
    fn egress_settings_default_to_istios_and_are_checked() {
        let cfg = load(BASE).unwrap();
        assert_eq!(cfg.outbound_traffic_policy.mode, OutboundMode::AllowAny);
        assert!(cfg.dns.capture && cfg.dns.upstreams.is_empty());
        let cfg = load(&format!(
            "{BASE}outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\ndns: {{upstreams: [\"10.96.0.10:53\"]}}\n"
        ))
        .unwrap();
        assert_eq!(cfg.outbound_traffic_policy.mode, OutboundMode::RegistryOnly);
        assert_eq!(cfg.dns.upstreams, vec!["10.96.0.10:53".parse().unwrap()]);
        let err = load(&format!(
            "{BASE}outboundTrafficPolicy: {{mode: DENY_ALL}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("DENY_ALL"), "{err}");
        let err = load(&format!("{BASE}dns: {{timeoutMs: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dns.timeoutMs"), "{err}");
    }

    #[test]
    fn defaults_and_relative_paths() {
        let cfg = load(&format!("{BASE}accessLog: a.log\n")).unwrap();
        let file = cfg.workloads_file.as_ref().unwrap();
        assert!(file.ends_with("w.yaml") && file.is_absolute());
        assert!(cfg.access_log.as_ref().unwrap().is_absolute());
        assert_eq!(cfg.bpffs_dir, PathBuf::from("/sys/fs/bpf/nodemesh"));
        assert_eq!(cfg.drain_timeout(), Duration::from_secs(5));
        assert!(!cfg.sockmap);
        assert_eq!(cfg.ebpf_log, EbpfLog::Off);
        assert_eq!(cfg.trust_domain, "cluster.local");
        assert_eq!(cfg.trust_bundle_file(), cfg.ca_cert_file.as_path());
        assert_eq!(cfg.admin_address.to_string(), "127.0.0.1:15000");
        assert_eq!(cfg.stats_address.to_string(), "0.0.0.0:15020");
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.access_log_format, AccessLogFormat::Json);
        let cfg = load(&format!(
            "{BASE}adminAddress: 127.0.0.2:9999\naccessLogFormat: text\n"
        ))
        .unwrap();
        assert_eq!(cfg.admin_address.to_string(), "127.0.0.2:9999");
        assert_eq!(cfg.access_log_format, AccessLogFormat::Text);
    }

    #[test]
    fn cgroup_path_auto_and_its_keys() {
        const REST: &str = "workloadsFile: w.yaml\ncaCertFile: ca.pem\ncaKeyFile: ca.key\n";
        let cfg = load(&format!(
            "{REST}cgroupPath: /sys/fs/cgroup/kubepods.slice\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.cgroup_path,
            CgroupPath::Dir("/sys/fs/cgroup/kubepods.slice".into())
        );
        assert_eq!(cfg.cgroup_root, None);
        assert_eq!(
            cfg.cgroup_mount_dir,
            PathBuf::from("/var/run/nodemesh/cgroupv2")
        );
        let cfg = load(&format!(
            "{REST}cgroupPath: auto\ncgroupRoot: /host/sys/fs/cgroup\ncgroupMountDir: /run/x\n"
        ))
        .unwrap();
        assert_eq!(cfg.cgroup_path, CgroupPath::Auto);
        assert_eq!(cfg.cgroup_root, Some(PathBuf::from("/host/sys/fs/cgroup")));
        assert_eq!(cfg.cgroup_mount_dir, PathBuf::from("/run/x"));
        // /config_dump shows it as written.
        let dump = serde_json::to_value(&cfg).unwrap();
        assert_eq!(dump["cgroupPath"], "auto");
        let err = load(&format!("{REST}cgroupPath: Auto\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cgroupPath: Auto is neither an absolute path nor `auto`"),
            "{err}"
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let err = load(&format!("{BASE}socketMark: 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.yaml: socketMark: must not be 0"),
            "{err}"
        );
        let err = load(&format!("{BASE}sockMap: true\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 5 column 1") && err.contains("sockMap"),
            "{err}"
        );
        let err = load(&format!(
            "{BASE}inboundExemptSources: [10.0.0.1/32, 10.1.0.0/40]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("inboundExemptSources[1]") && err.contains("prefix length"),
            "{err}"
        );
        let ok = load(&format!(
            "{BASE}inboundExemptSources: [10.0.0.1, \"fd00::/8\"]\n"
        ))
        .unwrap();
        assert_eq!(ok.inbound_exempt_sources().len(), 2);
        let err = load(&format!("{BASE}adminAddress: 10.0.0.1:15000\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("adminAddress: 10.0.0.1:15000 is not a loopback address"),
            "{err}"
        );
        let err = load(&format!("{BASE}limits: {{maxAdminConnections: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("limits.maxAdminConnections: must be at least 1"),
            "{err}"
        );
        let err = load("workloadsFile: w.yaml\n").unwrap_err().to_string();
        assert!(err.contains("cgroupPath"), "{err}");
    }
}
