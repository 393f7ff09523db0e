//! A container runtime's CNI side, for the virtual cluster.
//!
//! A node's network config is a real conflist in `<agent dir>/net.d`: the
//! reference `bridge` plugin with `host-local` IPAM (Debian's
//! containernetworking-plugins), joining pods to the node's `cbr0`. The
//! agent inserts `nodemesh-cni` into it, as on a real node. A sandbox is
//! created as libcni does it: each plugin of the primary conflist in turn,
//! with the network's name and version and the previous plugin's result;
//! a failed ADD is undone by a DEL of the whole list, as runtimes do. What
//! this cannot show (labelled so in the README): a real runtime's timing,
//! its retries and its pause container.
use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    cluster::{Cluster, PodInfo, PodSpec},
    sys,
};

/// Where Debian's containernetworking-plugins are.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const PRIMARY: &str = "10-lab.conflist";

/// The UID of the pod a sandbox is for, derived from the sandbox's id (a
/// UUID in the API's format; a recreated pod has a new sandbox and UID).
pub fn pod_uid(container_id: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let h = Sha256::digest(container_id.as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The address of each family in a CNI result (unspecified if none).
pub fn result_ips(result: &Value) -> (Ipv4Addr, Ipv6Addr) {
    let mut ips = (Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED);
    let addresses = result["ips"].as_array().into_iter().flatten();
    for ip in addresses.filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok()) {
        match ip {
            IpAddr::V4(v4) if ips.0.is_unspecified() => ips.0 = v4,
            IpAddr::V6(v6) if ips.1.is_unspecified() => ips.1 = v6,
            _ => {}
        }
    }
    ips
}

/// The IPv4 address in a CNI result.
pub fn result_ip4(result: &Value) -> Option<Ipv4Addr> {
    Some(result_ips(result).0).filter(|ip| !ip.is_unspecified())
}

/// A failed CNI command: the plugin's error object (`code`, `msg`).
#[derive(Debug)]
pub struct CniFailure {
    pub plugin: String,
    pub error: Value,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.plugin, self.error)
    }
}

impl Cluster {
    pub fn cni_conf_dir(&self, k: usize) -> PathBuf {
        self.agents[k].dir.join("net.d")
    }

    pub fn cni_bin_dir(&self, k: usize) -> PathBuf {
        self.agents[k].dir.join("cni-bin")
    }

    pub fn cni_socket(&self, k: usize) -> PathBuf {
        self.agents[k].dir.join("cni.sock")
    }

    /// The node's network config before the agent adds itself: what the
    /// cluster's own CNI writes.
    pub fn cni_primary_config(&self, k: usize) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "plugins": [{
                "type": "bridge",
                "bridge": "cbr0",
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": format!("10.244.{k}.0/24"),
                        "rangeStart": format!("10.244.{k}.100"),
                        "rangeEnd": format!("10.244.{k}.200"),
                        "gateway": format!("10.244.{k}.1"),
                    }], [{
                        "subnet": format!("fd00:244:{k}::/64"),
                        "rangeStart": format!("fd00:244:{k}::100"),
                        "rangeEnd": format!("fd00:244:{k}::200"),
                        "gateway": format!("fd00:244:{k}::1"),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                    "dataDir": self.agents[k].dir.join("ipam"),
                },
            }],
        })
    }

    /// Writes the primary config and puts the reference plugins into the
    /// node's CNI bin dir (the agent adds `nodemesh-cni` to both).
    pub(crate) fn prepare_cni(&self, k: usize) -> Result<()> {
        let bin = self.cni_bin_dir(k);
        fs::create_dir_all(&bin)?;
        for plugin in ["bridge", "host-local"] {
            let from = PathBuf::from(REFERENCE_PLUGINS).join(plugin);
            if !from.is_file() {
                bail!(
                    "{} missing: the CNI tests need Debian's containernetworking-plugins (cargo xtask setup installs it)",
                    from.display()
                );
            }
            fs::copy(&from, bin.join(plugin))?;
        }
        self.write_cni_primary(k, &self.cni_primary_config(k))
    }

    /// Replaces the primary config, as the cluster's CNI does when it
    /// rewrites it.
    pub fn write_cni_primary(&self, k: usize, config: &Value) -> Result<()> {
        let dir = self.cni_conf_dir(k);
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(".tmp-primary");
        fs::write(&tmp, serde_json::to_string_pretty(config)?)?;
        fs::rename(&tmp, dir.join(PRIMARY))?;
        Ok(())
    }

    /// The primary config as it is now.
    pub fn cni_config(&self, k: usize) -> Result<Value> {
        let text = fs::read_to_string(self.cni_conf_dir(k).join(PRIMARY))?;
        Ok(serde_json::from_str(&text)?)
    }

    pub(crate) fn cni_agent_config(&self, k: usize) -> String {
        let plugin = self
            .lab_bin
            .parent()
            .map(|d| d.join("nodemesh-cni"))
            .unwrap_or_default();
        format!(
            "cni:\n  socketPath: {}\n  podWaitMs: 2000\n  netnsDir: /run/netns\n  install:\n    binDir: {}\n    confDir: {}\n    binary: {}\n",
            self.cni_socket(k).display(),
            self.cni_bin_dir(k).display(),
            self.cni_conf_dir(k).display(),
            plugin.display(),
        )
    }

    /// Creates pod `spec` as a runtime creates a sandbox on its node: the
    /// pod is listed first (the API knows a pod before its sandbox), then
    /// its netns is created and the node's CNI chain run; then the address
    /// the chain gave it is listed (the kubelet's status update).
    pub fn cni_add_pod(&mut self, spec: PodSpec, container_id: &str) -> Result<PodInfo> {
        let k = spec.node;
        let name = spec.name.clone();
        let netns = format!("{}-{}", self.ns_node(k), name);
        let uid = pod_uid(container_id);
        // Named as the kubelet's systemd driver names a pod's cgroup.
        let cgroup = self.pods_cgroup(k).join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        fs::create_dir_all(&cgroup)?;
        let info = PodInfo {
            spec: PodSpec {
                cni: true,
                uid: Some(uid),
                ..spec
            },
            netns: netns.clone(),
            cgroup,
            ip4: Ipv4Addr::UNSPECIFIED,
            ip6: Ipv6Addr::UNSPECIFIED,
        };
        self.pods.insert(name.clone(), info);
        self.rewrite_workloads()?;
        if !sys::netns_list().contains(&netns) {
            sys::ip(&["netns", "add", &netns])?;
            sys::ip_in(&netns, &["link", "set", "lo", "up"])?;
            // No duplicate address detection on the lab's own addresses:
            // the chain would wait seconds for each IPv6 address.
            sys::sysctl_in(&netns, "net.ipv6.conf.default.accept_dad", "0")?;
            sys::sysctl_in(&netns, "net.ipv6.conf.all.accept_dad", "0")?;
        }
        let result = self
            .cni_run("ADD", &name, container_id)
            .map_err(|e| anyhow!("{e}"))?;
        let ip4 = result_ip4(&result)
            .ok_or_else(|| anyhow!("the chain gave {name} no IPv4 address: {result}"))?;
        let pod = self.pods.get_mut(&name).expect("listed above");
        pod.ip4 = ip4;
        pod.ip6 = result_ips(&result).1;
        let pod = pod.clone();
        self.rewrite_workloads()?;
        if self.kubernetes() {
            self.wait_for_agents_to_know_pods()?;
        }
        Ok(pod)
    }

    /// Deletes a pod's sandbox: DEL through the chain, then its netns, then
    /// the pod from the listing.
    pub fn cni_delete_pod(&mut self, name: &str, container_id: &str) -> Result<()> {
        self.cni_run("DEL", name, container_id)
            .map_err(|e| anyhow!("{e}"))?;
        let netns = self.pod(name).netns.clone();
        sys::ip(&["netns", "del", &netns])?;
        if let Some(pod) = self.pods.remove(name)
            && self.kubernetes()
        {
            self.delete_api_pod(&pod)?;
        }
        self.rewrite_workloads()
    }

    /// Rewrites every node's workloads file from `pods` (the API's view);
    /// in Kubernetes mode, the API's objects.
    pub fn rewrite_workloads(&self) -> Result<()> {
        if self.kubernetes() {
            return self.sync_api(None);
        }
        for k in 0..self.spec.nodes {
            self.set_enrolled(k, &|p| p.spec.enrolled)?;
        }
        Ok(())
    }

    /// Runs `command` (ADD, DEL, CHECK) for pod `name`'s sandbox through
    /// the node's primary conflist, as libcni does; the last result.
    pub fn cni_run(
        &self,
        command: &str,
        name: &str,
        container_id: &str,
    ) -> std::result::Result<Value, CniFailure> {
        let failure = |plugin: &str, e: anyhow::Error| CniFailure {
            plugin: plugin.into(),
            error: json!({"msg": format!("{e:#}")}),
        };
        let pod = self.pod(name);
        let k = pod.spec.node;
        let list = self.cni_config(k).map_err(|e| failure("(config)", e))?;
        let plugins: Vec<Value> = list["plugins"].as_array().cloned().unwrap_or_default();
        let cache = self.agents[k].dir.join(format!("cni-result-{name}.json"));
        let netns = format!("/run/netns/{}", pod.netns);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
            pod.spec.namespace,
            name,
            pod_uid(container_id)
        );
        let run_one = |plugin: &Value, prev: Option<&Value>, cmd: &str| {
            let mut conf = plugin.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            if let Some(prev) = prev {
                conf["prevResult"] = prev.clone();
            }
            let kind = plugin["type"].as_str().unwrap_or("?").to_owned();
            self.exec_plugin(k, &kind, cmd, container_id, &netns, &args, &conf)
                .map_err(|error| CniFailure {
                    plugin: kind,
                    error,
                })
        };
        match command {
            "ADD" => {
                let mut prev: Option<Value> = None;
                for plugin in &plugins {
                    match run_one(plugin, prev.as_ref(), "ADD") {
                        Ok(result) => prev = Some(result),
                        Err(e) => {
                            // The runtime tears the sandbox's network down.
                            for p in plugins.iter().rev() {
                                let _ = run_one(p, prev.as_ref(), "DEL");
                            }
                            return Err(e);
                        }
                    }
                }
                let result = prev.unwrap_or(Value::Null);
                let _ = fs::write(&cache, result.to_string());
                Ok(result)
            }
            "DEL" | "CHECK" => {
                let prev: Option<Value> = fs::read_to_string(&cache)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                let order: Vec<&Value> = match command {
                    "DEL" => plugins.iter().rev().collect(),
                    _ => plugins.iter().collect(),
                };
                for plugin in order {
                    run_one(plugin, prev.as_ref(), command)?;
                }
                if command == "DEL" {
                    let _ = fs::remove_file(&cache);
                }
                Ok(prev.unwrap_or(Value::Null))
            }
            other => Err(failure(other, anyhow!("not a command this harness runs"))),
        }
    }

    /// One plugin, in node k's netns (the runtime's), from the node's CNI
    /// bin dir; its stdout parsed, or its error object.
    #[allow(clippy::too_many_arguments)]
    fn exec_plugin(
        &self,
        k: usize,
        kind: &str,
        command: &str,
        container_id: &str,
        netns: &str,
        args: &str,
        conf: &Value,
    ) -> std::result::Result<Value, Value> {
        let bin = self.cni_bin_dir(k);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns_node(k)])
            .arg(bin.join(kind))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| json!({"msg": format!("starting {kind}: {e}")}))?;
        let written = child
            .stdin
            .take()
            .map(|mut i| i.write_all(conf.to_string().as_bytes()));
        let out = child
            .wait_with_output()
            .context("waiting for the plugin")
            .map_err(|e| json!({"msg": format!("{e:#}")}))?;
        if let Some(Err(e)) = written {
            return Err(json!({"msg": format!("writing {kind}'s config: {e}")}));
        }
        let stdout: Value = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap_or_else(
                |_| json!({"msg": String::from_utf8_lossy(&out.stdout).into_owned()}),
            )
        };
        if out.status.success() {
            Ok(stdout)
        } else {
            let mut e = stdout;
            e["stderr"] = String::from_utf8_lossy(&out.stderr).into_owned().into();
            e["status"] = out.status.code().into();
            Err(e)
        }
    }
}
