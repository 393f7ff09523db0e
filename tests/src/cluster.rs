//! The virtual cluster: nodes and pods from network namespaces, veths and
//! bridges, one cgroup per pod, one agent per node in its node's netns.
//!
//! Topology (names carry a per-run id, so runs never collide):
//! - `nmlab-<run>-fabric`: a bridge joining every node's `eth0`
//!   (10.240.0.<k+1>/24, fd00:240::<k+1>/64) and an external host `ext`
//!   (10.240.0.200) that is outside the cluster.
//!   Third parties (`thirdparty`) get addresses of their own on `ext`:
//!   10.240.0.201..=220 and fd00:240::201..=220.
//! - `nmlab-<run>-n<k>`: node k; bridge `cbr0` (10.244.k.1/24,
//!   fd00:244:k::1/64) with one veth per pod, forwarding on, routes to the
//!   other nodes' pod CIDRs via their node IPs.
//! - `nmlab-<run>-n<k>-<pod>`: a pod; `eth0` 10.244.k.<10+j>, fd00:244:k::<10+j>.
//! - cgroups `<cgroup2>/nodemesh-lab-<run>/node-<k>/{pod-<name>,agent}`;
//!   agent k attaches to `node-<k>` and pins under `<state>/bpffs/node-<k>`.
//!
//! Everything is removed on drop, also after a failed test; a later run
//! removes what a killed run left (its owner pid is gone).
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::sys;

pub const STATE_ROOT: &str = "/run/nodemesh-lab";
const NETNS_PREFIX: &str = "nmlab-";
const CGROUP_PREFIX: &str = "nodemesh-lab-";

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub app: String,
    pub node: usize,
    /// Listed in the agent's workloads file as a local pod (meshed).
    pub enrolled: bool,
    /// Created through the node's CNI chain (`Cluster::cni_add_pod`), as a
    /// runtime creates a sandbox: listed without a netns path, with the
    /// address the CNI gave it once it has one.
    pub cni: bool,
    /// The pod's UID, listed when set (CNI pods: their cgroup is named
    /// after it, as the kubelet names pod cgroups).
    pub uid: Option<String>,
    /// Kubernetes mode: the Deployment the pod belongs to (the pod is
    /// owned by its ReplicaSet `<workload>-<hash>`, as a Deployment's are).
    pub workload: Option<String>,
}

impl PodSpec {
    pub fn new(name: &str, node: usize) -> Self {
        Self {
            name: name.into(),
            namespace: "shop".into(),
            service_account: name.into(),
            app: name.into(),
            node,
            enrolled: true,
            cni: false,
            uid: None,
            workload: None,
        }
    }

    pub fn via_cni(mut self) -> Self {
        self.cni = true;
        self
    }

    pub fn unenrolled(mut self) -> Self {
        self.enrolled = false;
        self
    }
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub target_port: u16,
    /// Pod names.
    pub endpoints: Vec<String>,
}

impl ServiceSpec {
    pub fn new(name: &str, port: u16, target_port: u16, endpoints: &[&str]) -> Self {
        Self {
            name: name.into(),
            namespace: "shop".into(),
            port,
            target_port,
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    pub sockmap: bool,
    /// `ebpfLog: debug`: the programs' own log lines in the agent log.
    pub ebpf_log_debug: bool,
    /// Workload certificate lifetime (default 24 h).
    pub cert_lifetime_seconds: Option<u64>,
    pub drain_timeout_seconds: Option<u64>,
    /// `inboundExemptSources`.
    pub inbound_exempt_sources: Vec<String>,
    /// More agent config, as YAML lines (e.g. `limits`, `hbone`).
    pub extra: String,
    /// Enrolment by the CNI plugin: each agent serves `cni.sock` in its
    /// directory and installs `nodemesh-cni` into the node's CNI config
    /// (`net.d`, `cni-bin` there; see `crate::cni`). Always on in
    /// Kubernetes mode.
    pub cni: bool,
    /// Per-node workloads files (pods with netns paths) and a policy
    /// directory instead of the default Kubernetes mode (the API fake,
    /// pods through the CNI chain; see `crate::kube`): for what only the
    /// file sources do.
    pub workloads_file: bool,
    /// The node's filesystems as the agent finds them on a Kubernetes
    /// node: pods (and the agent) under `node-<k>/kubepods.slice`, the agent
    /// configured with `cgroupPath: auto` and `cgroupRoot: node-<k>`, and
    /// no bpffs mounted for it (the first agent mounts one on `bpffs`,
    /// which the run's cleanup unmounts).
    pub node_fs_auto: bool,
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    pub agent: AgentOptions,
}

impl ClusterSpec {
    /// Two nodes: `client`, `promo` and `server-local` on node 0,
    /// `server-remote` on node 1, and `outsider` (out of the mesh) on node 0.
    pub fn two_nodes() -> Self {
        Self {
            nodes: 2,
            pods: vec![
                PodSpec::new("client", 0),
                PodSpec::new("promo", 0),
                PodSpec::new("server-local", 0),
                PodSpec::new("server-remote", 1),
                PodSpec::new("outsider", 0).unenrolled(),
            ],
            services: vec![],
            agent: AgentOptions::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PodInfo {
    pub spec: PodSpec,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub spec: ServiceSpec,
    pub vip4: Ipv4Addr,
    pub vip6: Ipv6Addr,
}

pub struct Agent {
    pub node: usize,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub access_log: PathBuf,
    pub workloads: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub run: String,
    pub state_dir: PathBuf,
    pub cgroup_dir: PathBuf,
    pub bpffs: PathBuf,
    pub pods: BTreeMap<String, PodInfo>,
    pub services: BTreeMap<String, ServiceInfo>,
    pub agents: Vec<Agent>,
    pub spec: ClusterSpec,
    pub lab_bin: PathBuf,
    pub agent_bin: PathBuf,
    background: Vec<Child>,
    /// The fake API server's objects (Kubernetes mode).
    pub(crate) api: Option<crate::apiserver::ApiObjects>,
    /// The objects each policy file applied (Kubernetes mode).
    pub(crate) policy_objects: std::sync::Mutex<BTreeMap<String, Vec<crate::kube::ObjectKey>>>,
    /// Third-party hosts given an address on `ext` so far (`thirdparty`).
    pub(crate) third_party_hosts: std::sync::atomic::AtomicUsize,
}

pub const EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 200);
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0x200);

fn node_ip4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, k as u8 + 1)
}
fn node_ip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, k as u16 + 1)
}
fn pod_ip4(k: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 10 + j as u8)
}
fn pod_ip6(k: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, k as u16, 0, 0, 0, 0, 10 + j as u16)
}
fn gw4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 1)
}
fn gw6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, k as u16, 0, 0, 0, 0, 1)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Where the lab and agent binaries are: beside the running executable
/// (target/<profile>/), or `NODEMESH_AGENT_BIN` / `NODEMESH_LAB_BIN`.
pub fn default_binaries() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Integration tests run from target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let pick = |var: &str, name: &str| -> Result<PathBuf> {
        let p = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join(name));
        if !p.is_file() {
            bail!(
                "{} not found (looked in {}); build it first: cargo xtask build",
                name,
                p.display()
            );
        }
        Ok(p)
    };
    Ok((
        pick("NODEMESH_LAB_BIN", "nodemesh-lab")?,
        pick("NODEMESH_AGENT_BIN", "nodemesh-agent")?,
    ))
}

/// Fails with a clear message unless the lab can run: root tests must fail,
/// never skip, when they cannot set up.
pub fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the virtual cluster needs root (network namespaces, cgroups, bpffs): run as root");
    }
    Ok(())
}

impl Cluster {
    pub fn start(spec: ClusterSpec) -> Result<Self> {
        let (lab_bin, agent_bin) = default_binaries()?;
        Self::start_with(spec, lab_bin, agent_bin)
    }

    pub fn start_with(mut spec: ClusterSpec, lab_bin: PathBuf, agent_bin: PathBuf) -> Result<Self> {
        require_root()?;
        let kubernetes = !spec.agent.workloads_file;
        if kubernetes {
            spec.agent.cni = true;
        }
        sweep_leftovers();
        let run = format!(
            "{:x}{}",
            std::process::id() % 0x10000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let state_dir = Path::new(STATE_ROOT).join(&run);
        fs::create_dir_all(&state_dir)?;
        fs::write(state_dir.join("owner"), std::process::id().to_string())?;
        let cgroup_dir = sys::cgroup2_root()?.join(format!("{CGROUP_PREFIX}{run}"));
        let mut cluster = Cluster {
            run: run.clone(),
            bpffs: state_dir.join("bpffs"),
            state_dir,
            cgroup_dir,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            agents: Vec::new(),
            spec: spec.clone(),
            lab_bin,
            agent_bin,
            background: Vec::new(),
            api: None,
            policy_objects: Default::default(),
            third_party_hosts: Default::default(),
        };
        // On error the half-built cluster is dropped, which cleans up.
        cluster.build_network()?;
        cluster.build_cgroups()?;
        cluster.mount_bpffs()?;
        cluster.create_ca()?;
        if kubernetes {
            cluster.start_api_server()?;
        }
        for (i, s) in spec.services.iter().enumerate() {
            cluster.services.insert(
                s.name.clone(),
                ServiceInfo {
                    spec: s.clone(),
                    vip4: Ipv4Addr::new(10, 96, 0, 10 + i as u8),
                    vip6: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 10 + i as u16),
                },
            );
        }
        for k in 0..spec.nodes {
            let dir = cluster.state_dir.join(format!("node-{k}"));
            fs::create_dir_all(&dir)?;
            let agent = Agent {
                node: k,
                config: dir.join("agent.yaml"),
                log: dir.join("agent.log"),
                access_log: dir.join("access.log"),
                workloads: dir.join("workloads.yaml"),
                dir,
                child: None,
            };
            cluster.agents.push(agent);
            if spec.agent.cni {
                cluster.prepare_cni(k)?;
            }
            if !kubernetes {
                cluster.write_workloads(k)?;
            }
            cluster.write_agent_config(k)?;
        }
        if kubernetes {
            cluster.publish_cluster_objects()?;
        }
        for k in 0..spec.nodes {
            cluster.start_agent(k)?;
        }
        if kubernetes {
            cluster.create_pods_via_cni()?;
        }
        Ok(cluster)
    }

    pub fn ns_fabric(&self) -> String {
        format!("{NETNS_PREFIX}{}-fabric", self.run)
    }
    pub(crate) fn ns_ext(&self) -> String {
        format!("{NETNS_PREFIX}{}-ext", self.run)
    }
    pub fn ns_node(&self, k: usize) -> String {
        format!("{NETNS_PREFIX}{}-n{k}", self.run)
    }

    fn build_network(&mut self) -> Result<()> {
        let fabric = self.ns_fabric();
        sys::ip(&["netns", "add", &fabric])?;
        sys::ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        sys::ip_in(&fabric, &["link", "set", "br0", "up"])?;
        sys::ip_in(&fabric, &["link", "set", "lo", "up"])?;
        let nodes = self.spec.nodes;
        // The external host.
        let ext = self.ns_ext();
        sys::ip(&["netns", "add", &ext])?;
        self.attach_to_fabric(
            &ext,
            "ext",
            &format!("{EXTERNAL_V4}/24"),
            &format!("{EXTERNAL_V6}/64"),
        )?;
        for k in 0..nodes {
            sys::ip_in(
                &ext,
                &[
                    "route",
                    "add",
                    &format!("10.244.{k}.0/24"),
                    "via",
                    &node_ip4(k).to_string(),
                ],
            )?;
            sys::ip_in(
                &ext,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:244:{k}::/64"),
                    "via",
                    &node_ip6(k).to_string(),
                ],
            )?;
        }
        for k in 0..nodes {
            let node = self.ns_node(k);
            sys::ip(&["netns", "add", &node])?;
            self.attach_to_fabric(
                &node,
                &format!("n{k}"),
                &format!("{}/24", node_ip4(k)),
                &format!("{}/64", node_ip6(k)),
            )?;
            sys::sysctl_in(&node, "net.ipv4.ip_forward", "1")?;
            sys::sysctl_in(&node, "net.ipv6.conf.all.forwarding", "1")?;
            sys::ip_in(&node, &["link", "add", "cbr0", "type", "bridge"])?;
            sys::ip_in(
                &node,
                &["addr", "add", &format!("{}/24", gw4(k)), "dev", "cbr0"],
            )?;
            sys::ip_in(
                &node,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", gw6(k)),
                    "dev",
                    "cbr0",
                    "nodad",
                ],
            )?;
            sys::ip_in(&node, &["link", "set", "cbr0", "up"])?;
            for m in (0..nodes).filter(|m| *m != k) {
                sys::ip_in(
                    &node,
                    &[
                        "route",
                        "add",
                        &format!("10.244.{m}.0/24"),
                        "via",
                        &node_ip4(m).to_string(),
                    ],
                )?;
                sys::ip_in(
                    &node,
                    &[
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:244:{m}::/64"),
                        "via",
                        &node_ip6(m).to_string(),
                    ],
                )?;
            }
        }
        let mut per_node = vec![0usize; nodes];
        // In Kubernetes mode pods come from the CNI chain, later.
        let manual = match self.kubernetes() {
            true => Vec::new(),
            false => self.spec.pods.clone(),
        };
        for spec in manual {
            if spec.node >= nodes {
                bail!(
                    "pod {} is on node {} but the cluster has {nodes} nodes",
                    spec.name,
                    spec.node
                );
            }
            let k = spec.node;
            let j = per_node[k];
            per_node[k] += 1;
            let node = self.ns_node(k);
            let ns = format!("{node}-{}", spec.name);
            sys::ip(&["netns", "add", &ns])?;
            sys::ip_in(&ns, &["link", "set", "lo", "up"])?;
            let host_if = format!("p{j}");
            sys::ip_in(
                &node,
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            sys::ip_in(&node, &["link", "set", &host_if, "master", "cbr0", "up"])?;
            let (ip4, ip6) = (pod_ip4(k, j), pod_ip6(k, j));
            sys::ip_in(&ns, &["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
            sys::ip_in(
                &ns,
                &["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"],
            )?;
            sys::ip_in(&ns, &["link", "set", "eth0", "up"])?;
            sys::ip_in(
                &ns,
                &["route", "add", "default", "via", &gw4(k).to_string()],
            )?;
            sys::ip_in(
                &ns,
                &["-6", "route", "add", "default", "via", &gw6(k).to_string()],
            )?;
            let cgroup = self.pods_cgroup(k).join(format!("pod-{}", spec.name));
            self.pods.insert(
                spec.name.clone(),
                PodInfo {
                    spec,
                    netns: ns,
                    cgroup,
                    ip4,
                    ip6,
                },
            );
        }
        Ok(())
    }

    fn attach_to_fabric(&self, ns: &str, port: &str, v4: &str, v6: &str) -> Result<()> {
        let fabric = self.ns_fabric();
        sys::ip_in(
            &fabric,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        sys::ip_in(&fabric, &["link", "set", port, "master", "br0", "up"])?;
        sys::ip_in(ns, &["link", "set", "lo", "up"])?;
        sys::ip_in(ns, &["addr", "add", v4, "dev", "eth0"])?;
        sys::ip_in(ns, &["addr", "add", v6, "dev", "eth0", "nodad"])?;
        sys::ip_in(ns, &["link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn build_cgroups(&self) -> Result<()> {
        fs::create_dir_all(self.cgroup_dir.join("external"))
            .with_context(|| format!("creating cgroups under {}", self.cgroup_dir.display()))?;
        for k in 0..self.spec.nodes {
            fs::create_dir_all(self.agent_cgroup(k))
                .with_context(|| format!("creating cgroups under {}", self.cgroup_dir.display()))?;
        }
        for pod in self.pods.values() {
            fs::create_dir_all(&pod.cgroup)?;
        }
        Ok(())
    }

    /// The mesh CA every agent issues its workloads' certificates with.
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        (self.state_dir.join("ca.pem"), self.state_dir.join("ca.key"))
    }

    /// The policy directory every agent watches (a ConfigMap in Kubernetes).
    pub fn policy_dir(&self) -> PathBuf {
        self.state_dir.join("policies")
    }

    /// Writes (atomically) one policy file into the shared policy
    /// directory; in Kubernetes mode, applies its documents as custom
    /// resources instead, as `kubectl apply -f` would.
    pub fn write_policy(&self, name: &str, yaml: &str) -> Result<()> {
        match self.kubernetes() {
            true => self.apply_policy_file(name, yaml),
            false => write_atomically(&self.policy_dir().join(name), yaml),
        }
    }

    /// Whether the agents read the (fake) Kubernetes API.
    pub fn kubernetes(&self) -> bool {
        !self.spec.agent.workloads_file
    }

    /// The roots every agent trusts; starts as the CA's certificate.
    pub fn trust_bundle_file(&self) -> PathBuf {
        self.state_dir.join("bundle.pem")
    }

    fn create_ca(&self) -> Result<()> {
        let (cert, key) = self.ca_files();
        let out = Command::new(&self.agent_bin)
            .args(["create-ca", "--trust-domain", "cluster.local", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .output()?;
        if !out.status.success() {
            bail!(
                "nodemesh-agent create-ca: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::copy(&cert, self.trust_bundle_file())?;
        fs::create_dir_all(self.policy_dir())?;
        Ok(())
    }

    /// The cgroup holding node k's pods (where its agent attaches).
    pub fn pods_cgroup(&self, k: usize) -> PathBuf {
        let node = self.cgroup_dir.join(format!("node-{k}"));
        match self.spec.agent.node_fs_auto {
            true => node.join("kubepods.slice"),
            false => node,
        }
    }

    /// Node k's agent's cgroup: among its pods, as a DaemonSet's pod is.
    fn agent_cgroup(&self, k: usize) -> PathBuf {
        self.pods_cgroup(k).join("agent")
    }

    fn mount_bpffs(&self) -> Result<()> {
        fs::create_dir_all(&self.bpffs)?;
        if self.spec.agent.node_fs_auto {
            return Ok(());
        }
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.bpffs)
            .output()?;
        if !out.status.success() {
            bail!(
                "mount -t bpf: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The workloads file for node k, as the agent reads it. Every pod is
    /// listed, as the Kubernetes API lists it; those out of the mesh with
    /// Istio's `istio.io/dataplane-mode: none` (the explicit way out: a
    /// running pod the file merely leaves out stays enrolled).
    pub fn workloads_yaml(&self, k: usize, enrolled: &dyn Fn(&PodInfo) -> bool) -> String {
        let mut y = format!("node: node-{k}\npods:\n");
        for p in self.pods.values() {
            let local = p.spec.node == k;
            let meshed = if local { enrolled(p) } else { p.spec.enrolled };
            let opt_out = if meshed {
                ""
            } else {
                ", istio.io/dataplane-mode: none"
            };
            let ips: Vec<String> = [IpAddr::from(p.ip4), IpAddr::from(p.ip6)]
                .iter()
                .filter(|ip| !ip.is_unspecified())
                .map(|ip| format!("\"{ip}\""))
                .collect();
            y += &format!(
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    labels: {{app: {}{opt_out}}}\n    ips: [{}]\n    node: node-{}\n",
                p.spec.name,
                p.spec.namespace,
                p.spec.service_account,
                p.spec.app,
                ips.join(", "),
                p.spec.node
            );
            if let Some(uid) = &p.spec.uid {
                y += &format!("    uid: {uid}\n");
            }
            if local && !p.spec.cni {
                y += &format!("    netns: /run/netns/{}\n", p.netns);
            }
        }
        if self.services.is_empty() {
            y += "services: []\n";
        } else {
            y += "services:\n";
        }
        for s in self.services.values() {
            y += &format!(
                "  - name: {}\n    namespace: {}\n    vips: [\"{}\", \"{}\"]\n    ports: [{{port: {}, targetPort: {}}}]\n    endpoints: [{}]\n",
                s.spec.name,
                s.spec.namespace,
                s.vip4,
                s.vip6,
                s.spec.port,
                s.spec.target_port,
                s.spec.endpoints.join(", ")
            );
        }
        y
    }

    fn write_workloads(&self, k: usize) -> Result<()> {
        let y = self.workloads_yaml(k, &|p| p.spec.enrolled);
        write_atomically(&self.agents[k].workloads, &y)
    }

    /// Rewrites node k's workloads file, enrolling exactly the local pods
    /// for which `enrolled` is true (the agent picks the change up live).
    pub fn set_enrolled(&self, k: usize, enrolled: &dyn Fn(&PodInfo) -> bool) -> Result<()> {
        if self.kubernetes() {
            return self.sync_api(Some((k, enrolled)));
        }
        let y = self.workloads_yaml(k, enrolled);
        write_atomically(&self.agents[k].workloads, &y)
    }

    /// Rewrites node k's agent config from `spec.agent` (takes effect at the
    /// next start).
    pub fn rewrite_agent_config(&self, k: usize) -> Result<()> {
        self.write_agent_config(k)
    }

    fn write_agent_config(&self, k: usize) -> Result<()> {
        let a = &self.agents[k];
        let source = match self.kubernetes() {
            true => self.kube_agent_config(k),
            false => format!(
                "workloadsFile: {}\npolicyDir: {}\n",
                a.workloads.display(),
                self.policy_dir().display()
            ),
        };
        let cgroup = match self.spec.agent.node_fs_auto {
            true => format!(
                "cgroupPath: auto\ncgroupRoot: {}\n",
                self.cgroup_dir.join(format!("node-{k}")).display()
            ),
            false => format!("cgroupPath: {}\n", self.pods_cgroup(k).display()),
        };
        let y = format!(
            "{source}{cgroup}bpffsDir: {}\nstateDir: {}\naccessLog: {}\nsockmap: {}\ndrainTimeoutSeconds: {}\nebpfLog: {}\ncaCertFile: {}\ncaKeyFile: {}\ntrustBundleFile: {}\ncertLifetimeSeconds: {}\nadminAddress: {}\nstatsAddress: {}\nreadinessAddress: {}\ninboundExemptSources: [{}]\n{}",
            self.bpffs.join(format!("node-{k}")).display(),
            self.state_dir.join(format!("agent-state-{k}")).display(),
            a.access_log.display(),
            self.spec.agent.sockmap,
            self.spec.agent.drain_timeout_seconds.unwrap_or(2),
            if self.spec.agent.ebpf_log_debug {
                "debug"
            } else {
                "off"
            },
            self.ca_files().0.display(),
            self.ca_files().1.display(),
            self.trust_bundle_file().display(),
            self.spec.agent.cert_lifetime_seconds.unwrap_or(86400),
            self.admin_address(k),
            self.stats_address(k),
            self.readiness_address(k),
            self.spec.agent.inbound_exempt_sources.join(", "),
            self.spec.agent.extra,
        );
        let y = if self.spec.agent.cni {
            y + &self.cni_agent_config(k)
        } else {
            y
        };
        // Pods' captured DNS goes to the lab's DNS server (`start_dns`).
        let y = match self.spec.agent.extra.lines().any(|l| l.starts_with("dns:")) {
            true => y,
            false => y + crate::dns::AGENT_DNS_CONFIG,
        };
        fs::write(&a.config, y)?;
        Ok(())
    }

    /// Node k's agent's admin server (`/config_dump` and the rest):
    /// loopback in the node's netns.
    pub fn admin_address(&self, _k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000)
    }

    /// Node k's agent's stats server (`/metrics`): on the node IP, so a
    /// Prometheus on the external host reaches every agent.
    pub fn stats_address(&self, k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(node_ip4(k)), 15020)
    }

    /// Node k's agent's readiness server (`/healthz/*`), on the node IP as
    /// the kubelet would probe it.
    pub fn readiness_address(&self, k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(node_ip4(k)), 15021)
    }

    /// Node k's netns, e.g. for `http::get` to its admin server.
    pub fn node_netns(&self, k: usize) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns_node(k)))
    }

    /// A GET to the server of node k's agent that serves `path`: readiness
    /// and metrics from the external host, the rest from the node itself.
    pub fn admin_get(
        &self,
        k: usize,
        path: &str,
        accept: Option<&str>,
    ) -> Result<crate::http::Response> {
        let (netns, addr) = if path.starts_with("/healthz/") {
            (self.external_netns(), self.readiness_address(k))
        } else if path == "/metrics" || path == "/stats/prometheus" {
            (self.external_netns(), self.stats_address(k))
        } else {
            (self.node_netns(k), self.admin_address(k))
        };
        crate::http::get(&netns, addr, path, accept)
    }

    /// Starts node k's agent (in the node's netns and its agent cgroup) and
    /// waits until it reports ready.
    pub fn start_agent(&mut self, k: usize) -> Result<()> {
        let offset = self.spawn_agent(k)?;
        let a = &mut self.agents[k];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = fs::read_to_string(&a.log).unwrap_or_default();
            let new = text.get(offset as usize..).unwrap_or("");
            if new.contains("nodemesh agent ready") {
                return Ok(());
            }
            if let Some(status) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent {k} exited ({status}) before ready:\n{new}");
            }
            if Instant::now() > deadline {
                bail!("agent {k} not ready after 20 s:\n{new}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node k's agent without waiting for it; returns where its new
    /// log lines begin.
    pub fn spawn_agent(&mut self, k: usize) -> Result<u64> {
        let cgroup = self.agent_cgroup(k);
        let netns = format!("/run/netns/{}", self.ns_node(k));
        let a = &mut self.agents[k];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)?;
        let offset = log.metadata()?.len();
        let child = Command::new(&self.lab_bin)
            .process_group(0)
            .arg("pod-exec")
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--netns")
            .arg(&netns)
            .arg("--")
            .arg(&self.agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&a.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        a.child = Some(child);
        Ok(offset)
    }

    pub fn agent_pid(&self, k: usize) -> Option<u32> {
        self.agents[k].child.as_ref().map(Child::id)
    }

    /// SIGKILL, like a crash or an OOM kill.
    pub fn kill_agent(&mut self, k: usize) -> Result<()> {
        if let Some(mut c) = self.agents[k].child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop_agent(&mut self, k: usize) -> Result<std::process::ExitStatus> {
        let mut c = self.agents[k]
            .child
            .take()
            .ok_or_else(|| anyhow!("agent {k} not running"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(c.wait()?)
    }

    pub fn agent_log(&self, k: usize) -> String {
        fs::read_to_string(&self.agents[k].log).unwrap_or_default()
    }

    /// The access log of node k's agent, one JSON object per connection.
    pub fn access_log(&self, k: usize) -> Vec<Value> {
        let Ok(f) = fs::File::open(&self.agents[k].access_log) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// Node k's access-log entries for which `f` holds, waiting up to 3 s
    /// for the first (entries are written when connections end).
    pub fn log_entries(&self, k: usize, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let found: Vec<Value> = self.access_log(k).into_iter().filter(|e| f(e)).collect();
            if !found.is_empty() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nodemesh-agent maps` for node k: entry counts of the pinned maps.
    pub fn map_sizes(&self, k: usize) -> Result<Value> {
        let out = Command::new(&self.agent_bin)
            .arg("maps")
            .arg("--config")
            .arg(&self.agents[k].config)
            .output()?;
        if !out.status.success() {
            bail!(
                "nodemesh-agent maps: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn pod(&self, name: &str) -> &PodInfo {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name} in the cluster"))
    }

    pub fn service(&self, name: &str) -> &ServiceInfo {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("no service {name} in the cluster"))
    }

    /// A command running the lab binary inside a pod (its cgroup, then its
    /// netns), e.g. `["serve", "--port", "8080"]`.
    pub fn pod_command(&self, pod: &str, args: &[&str]) -> Command {
        self.pod_program(pod, &self.lab_bin.to_string_lossy(), args)
    }

    /// The same for the external host. Its cgroup is outside every node's
    /// subtree (no programs run for it) but inside the run's, so a sweep of
    /// a killed run finds its processes too.
    pub fn external_command(&self, args: &[&str]) -> Command {
        self.command_in(
            &self.cgroup_dir.join("external"),
            &format!("/run/netns/{}", self.ns_ext()),
            args,
        )
    }

    /// The same in node k's own netns (as a process of the node's host,
    /// outside its pods' cgroups).
    pub fn node_command(&self, k: usize, args: &[&str]) -> Command {
        self.command_in(
            &self.cgroup_dir.join("external"),
            &format!("/run/netns/{}", self.ns_node(k)),
            args,
        )
    }

    /// The external host's netns, e.g. for `http::get`.
    pub fn external_netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns_ext()))
    }

    /// Any program on the external host (its cgroup and netns), e.g. a
    /// Prometheus; the caller owns the child.
    pub fn external_program(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.process_group(0)
            .arg("pod-exec")
            .arg("--cgroup")
            .arg(self.cgroup_dir.join("external"))
            .arg("--netns")
            .arg(self.external_netns())
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }

    /// Any program in a pod (its cgroup and netns), e.g. iperf3.
    pub fn pod_program(&self, pod: &str, program: &str, args: &[&str]) -> Command {
        let p = self.pod(pod);
        let mut cmd = Command::new(&self.lab_bin);
        cmd.arg("pod-exec")
            .arg("--cgroup")
            .arg(&p.cgroup)
            .arg("--netns")
            .arg(format!("/run/netns/{}", p.netns));
        // Resolving with the lab's DNS server once it runs (`start_dns`).
        if let Some(resolv_conf) = self.pod_resolv_conf() {
            cmd.arg("--resolv-conf").arg(resolv_conf);
        }
        cmd.arg("--").arg(program).args(args);
        cmd
    }

    /// Starts a program in a pod in the background (killed with the
    /// cluster), without waiting for it: the caller checks it serves.
    pub fn spawn_program_in_pod(
        &mut self,
        pod: &str,
        program: &str,
        args: &[&str],
    ) -> Result<PathBuf> {
        let cmd = self.pod_program(pod, program, args);
        self.spawn_background(cmd, &format!("{pod}-{}", self.background.len()))
    }

    /// The same for the fabric (the node-to-node link), e.g. a capture.
    pub fn fabric_command(&self, args: &[&str]) -> Command {
        self.command_in(
            &self.cgroup_dir.join("external"),
            &format!("/run/netns/{}", self.ns_fabric()),
            args,
        )
    }

    pub fn spawn_in_fabric(&mut self, args: &[&str]) -> Result<PathBuf> {
        let cmd = self.fabric_command(args);
        self.spawn(cmd, &format!("fabric-{}", self.background.len()))
    }

    /// Resident memory of node k's agent, KiB.
    pub fn agent_rss_kib(&self, k: usize) -> u64 {
        let Some(pid) = self.agent_pid(k) else {
            return 0;
        };
        fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn command_in(&self, cgroup: &Path, netns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.arg("pod-exec")
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--netns")
            .arg(netns)
            .arg("--")
            .arg(&self.lab_bin)
            .args(args);
        cmd
    }

    /// Runs a lab command in a pod and parses the JSON it prints last.
    pub fn run_in_pod(&self, pod: &str, args: &[&str]) -> Result<Value> {
        run_json(self.pod_command(pod, args))
    }

    /// A `PEER` round trip from `pod` to `to`: `{"result": "ok", ...}` or
    /// how it failed (refused, reset, eof, timeout).
    pub fn probe(&self, pod: &str, to: &str) -> Value {
        self.run_in_pod(pod, &["client", "probe", "--to", to])
            .expect("running the probe client")
    }

    /// An `hbone-probe` from `from` to `to`'s HBONE port (15008) with a
    /// certificate of the mesh CA, asking CONNECT to `authority`; its
    /// JSON report.
    pub fn hbone_probe(&self, from: &str, to: &str, mode: &str, authority: &str) -> Value {
        let (cert, key) = self.ca_files();
        let port = format!("{}:15008", self.pod(to).ip4);
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        self.run_in_pod(
            from,
            &[
                "hbone-probe",
                "--to",
                &port,
                "--mode",
                mode,
                "--ca-cert",
                &cert,
                "--ca-key",
                &key,
                "--authority",
                authority,
            ],
        )
        .expect("running the HBONE probe")
    }

    /// Starts a long-running lab command (a server) in a pod; it is killed
    /// with the cluster. Waits until it prints its first line ("listening").
    pub fn spawn_in_pod(&mut self, pod: &str, args: &[&str]) -> Result<PathBuf> {
        let cmd = self.pod_command(pod, args);
        self.spawn(cmd, &format!("{pod}-{}", self.background.len()))
    }

    pub fn spawn_external(&mut self, args: &[&str]) -> Result<PathBuf> {
        let cmd = self.external_command(args);
        self.spawn(cmd, &format!("ext-{}", self.background.len()))
    }

    /// Starts a long-running process (killed with the cluster) without
    /// waiting for it; its output goes to `<name>.out`.
    pub(crate) fn spawn_background(&mut self, mut cmd: Command, name: &str) -> Result<PathBuf> {
        let out = self.state_dir.join(format!("{name}.out"));
        let f = fs::File::create(&out)?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        self.background.push(child);
        Ok(out)
    }

    fn spawn(&mut self, cmd: Command, name: &str) -> Result<PathBuf> {
        let out = self.spawn_background(cmd, name)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_to_string(&out).unwrap_or_default().is_empty() {
            if Instant::now() > deadline {
                bail!("{name} printed nothing in 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = fs::read_to_string(&out)?;
        if !text.contains("listening") {
            bail!("{name} failed to start: {text}");
        }
        Ok(out)
    }
}

/// Polls `f` until it holds; panics (a test failure) after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_json(mut cmd: Command) -> Result<Value> {
    let out = cmd.output().context("running a lab command")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{'));
    match last {
        Some(l) => serde_json::from_str(l).with_context(|| format!("parsing {l}")),
        None => bail!(
            "lab command printed no result ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.background.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for a in self.agents.iter_mut() {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Err(e) = cleanup_run(&self.run) {
            eprintln!("lab cleanup of run {}: {e:#}", self.run);
        }
    }
}

/// Removes everything a run created, whether or not it is still running.
pub fn cleanup_run(run: &str) -> Result<()> {
    let mut errors = Vec::new();
    let cg = sys::cgroup2_root()?.join(format!("{CGROUP_PREFIX}{run}"));
    if let Err(e) = sys::remove_cgroup_tree(&cg) {
        errors.push(format!("{e:#}"));
    }
    let prefix = format!("{NETNS_PREFIX}{run}-");
    for ns in sys::netns_list() {
        if ns.starts_with(&prefix)
            && let Err(e) = sys::ip(&["netns", "del", &ns])
        {
            errors.push(format!("{e:#}"));
        }
    }
    let state = Path::new(STATE_ROOT).join(run);
    let bpffs = state.join("bpffs");
    if sys::is_mountpoint(&bpffs) {
        // Pins go with the mount once nothing else holds them.
        let _ = fs::remove_dir_all(&bpffs);
        let out = Command::new("umount").arg(&bpffs).output();
        if let Ok(o) = out
            && !o.status.success()
        {
            errors.push(format!(
                "umount {}: {}",
                bpffs.display(),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    if !sys::is_mountpoint(&bpffs) {
        let _ = fs::remove_dir_all(&state);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

/// Removes what runs whose owner process is gone left behind.
pub fn sweep_leftovers() {
    let Ok(dir) = fs::read_dir(STATE_ROOT) else {
        return;
    };
    for entry in dir.filter_map(|e| e.ok()) {
        let run = entry.file_name().to_string_lossy().into_owned();
        let owner = fs::read_to_string(entry.path().join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let orphaned = match owner {
            Some(pid) => !sys::pid_alive(pid),
            None => true,
        };
        if orphaned {
            eprintln!("lab: removing leftovers of run {run}");
            if let Err(e) = cleanup_run(&run) {
                eprintln!("lab: {e:#}");
            }
        }
    }
}

/// An address of a pod or service in the family asked for.
pub fn addr(ip4: Ipv4Addr, ip6: Ipv6Addr, v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(ip6), port)
    } else {
        SocketAddr::new(IpAddr::V4(ip4), port)
    }
}
