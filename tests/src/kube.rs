//! The virtual cluster in Kubernetes mode (the default): the agents read
//! pods, services, namespaces and policies from the lab's fake of the API
//! server (`crate::apiserver`, in the fabric netns at [`API_SERVER`]), and
//! every pod is created through its node's CNI chain, as a kubelet and a
//! container runtime create them. What the lab writes is what the API
//! would hold: Namespaces (labelled into the mesh), Nodes, Pods (first
//! Pending, then Running with the IPs the chain gave), Services with
//! their EndpointSlices, and the policies as custom resources.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use serde_json::Value;

use crate::{
    apiserver::{self, ApiObjects},
    cluster::{Cluster, PodInfo},
    sys,
};

/// The API server's address: on the fabric, the nodes' network, as a
/// control plane's address is.
pub const API_SERVER: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 250);
const API_PORT: u16 = 6443;
/// Labels a namespace into the mesh.
const MESH_LABEL: (&str, &str) = ("nodemesh.dev/mesh", "enabled");
/// Istio's opt-out, on a pod.
const OPT_OUT: (&str, &str) = ("istio.io/dataplane-mode", "none");
/// The groups whose CRDs the fake serves: Istio's (security and
/// networking: ServiceEntry, DestinationRule) and ours, as on a cluster
/// with Istio's CRDs and nodemesh's manifests.
const POLICY_GROUPS: [&str; 3] = [
    "security.istio.io",
    "security.nodemesh.dev",
    "networking.istio.io",
];

/// An object as `delete` names it: `Kind.group`, namespace, name.
pub type ObjectKey = (String, String, String);

/// Node k's local pods are meshed exactly when the function says so.
pub type MeshedOverride<'a> = Option<(usize, &'a dyn Fn(&PodInfo) -> bool)>;

impl Cluster {
    /// The API objects (the fake's state); only in Kubernetes mode.
    pub fn api(&self) -> &ApiObjects {
        self.api
            .as_ref()
            .expect("the cluster runs with workloads files, not the API")
    }

    /// Starts the fake API server in the fabric netns and waits for its
    /// kubeconfig.
    pub(crate) fn start_api_server(&mut self) -> Result<()> {
        let fabric = self.ns_fabric();
        sys::ip_in(
            &fabric,
            &["addr", "add", &format!("{API_SERVER}/24"), "dev", "br0"],
        )?;
        let dir = self.state_dir.join("api");
        std::fs::create_dir_all(&dir)?;
        let listen = format!("{API_SERVER}:{API_PORT}");
        let dir_arg = dir.display().to_string();
        let mut args = vec!["apiserver", "--dir", &dir_arg, "--listen", &listen];
        for g in POLICY_GROUPS {
            args.extend(["--group", g]);
        }
        let cmd = self.fabric_command(&args);
        self.spawn_background(cmd, "apiserver")?;
        let api = ApiObjects { dir };
        api.wait_ready(Duration::from_secs(10))
            .context("the lab's API server did not start")?;
        self.api = Some(api);
        Ok(())
    }

    /// The agent config lines that point node k's agent at the API.
    pub(crate) fn kube_agent_config(&self, k: usize) -> String {
        format!(
            "kubernetes:\n  nodeName: node-{k}\n  kubeconfig: {}\n",
            self.api().kubeconfig().display()
        )
    }

    /// Nodes, Namespaces and Services (without endpoints) before any pod.
    pub(crate) fn publish_cluster_objects(&self) -> Result<()> {
        let api = self.api();
        for k in 0..self.spec.nodes {
            api.apply(&apiserver::node(
                &format!("node-{k}"),
                &labels(&[
                    ("topology.kubernetes.io/region", "lab"),
                    ("topology.kubernetes.io/zone", &format!("lab-{k}")),
                ]),
            ))?;
        }
        self.sync_api(None)
    }

    /// Creates the spec's pods through their nodes' CNI chains.
    pub(crate) fn create_pods_via_cni(&mut self) -> Result<()> {
        for spec in self.spec.pods.clone() {
            let id = format!("lab-{}-{}", self.run, spec.name);
            // Each waits until every agent knows the pod's addresses.
            self.cni_add_pod(spec, &id)?;
        }
        Ok(())
    }

    /// Writes every pod, Service and EndpointSlice as the API would hold
    /// them now. With `override_node`, node k's local pods are in the mesh
    /// exactly when the function says so (else: their spec).
    pub(crate) fn sync_api(&self, override_node: MeshedOverride<'_>) -> Result<()> {
        let api = self.api();
        let mut namespaces: Vec<&str> = self
            .spec
            .pods
            .iter()
            .map(|p| p.namespace.as_str())
            .chain(self.pods.values().map(|p| p.spec.namespace.as_str()))
            .chain(self.services.values().map(|s| s.spec.namespace.as_str()))
            .collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            api.apply(&apiserver::namespace(ns, &labels(&[MESH_LABEL])))?;
        }
        for p in self.pods.values() {
            let meshed = match override_node {
                Some((k, f)) if p.spec.node == k => f(p),
                _ => p.spec.enrolled,
            };
            api.apply(&pod_object(p, meshed))?;
        }
        for s in self.services.values() {
            let selector = s
                .spec
                .endpoints
                .first()
                .and_then(|e| self.pods.get(e))
                .map(|p| labels(&[("app", &p.spec.app)]))
                .unwrap_or_default();
            let ports = [("tcp".to_owned(), s.spec.port, s.spec.target_port)];
            api.apply(&apiserver::service(
                &s.spec.name,
                &s.spec.namespace,
                &[IpAddr::V4(s.vip4), IpAddr::V6(s.vip6)],
                &ports,
                &selector,
            ))?;
            for (family, v6) in [("IPv4", false), ("IPv6", true)] {
                let endpoints: Vec<(IpAddr, String, String, bool)> = s
                    .spec
                    .endpoints
                    .iter()
                    .filter_map(|e| self.pods.get(e))
                    .filter_map(|p| {
                        let ip = match v6 {
                            false => IpAddr::V4(p.ip4),
                            true => IpAddr::V6(p.ip6),
                        };
                        (!ip.is_unspecified()).then(|| {
                            (
                                ip,
                                p.spec.name.clone(),
                                format!("node-{}", p.spec.node),
                                true,
                            )
                        })
                    })
                    .collect();
                api.apply(&apiserver::endpoint_slice(
                    &s.spec.name,
                    &s.spec.namespace,
                    family,
                    &endpoints,
                    &[("tcp".to_owned(), s.spec.target_port)],
                ))?;
            }
        }
        Ok(())
    }

    /// Waits until every running agent knows every meshed pod's addresses,
    /// as they are now in the API (the watches take a moment; until then a
    /// connection to a pod the source agent does not know goes as plain
    /// TCP, as it would on a real cluster).
    pub fn wait_for_agents_to_know_pods(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for k in 0..self.agents.len() {
            if self.agent_pid(k).is_none() {
                continue;
            }
            loop {
                let dump: Value = self
                    .admin_get(k, "/config_dump", None)
                    .ok()
                    .and_then(|r| serde_json::from_str(&r.body).ok())
                    .unwrap_or_default();
                let known: std::collections::HashSet<(String, String)> = dump["workloads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|w| {
                        let pod = w["pod"].as_str().unwrap_or_default().to_owned();
                        w["ips"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|ip| ip.as_str().map(String::from))
                            .map(move |ip| (pod.clone(), ip))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let missing: Vec<String> = self
                    .pods
                    .values()
                    .filter(|p| p.spec.enrolled)
                    .flat_map(|p| {
                        let key = format!("{}/{}", p.spec.namespace, p.spec.name);
                        [IpAddr::V4(p.ip4), IpAddr::V6(p.ip6)]
                            .into_iter()
                            .filter(|ip| !ip.is_unspecified())
                            .map(move |ip| (key.clone(), ip.to_string()))
                    })
                    .filter(|k| !known.contains(k))
                    .map(|(pod, ip)| format!("{pod} {ip}"))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(anyhow!("agent {k} does not know {missing:?} after 10 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Removes a pod from the API (its sandbox is the caller's).
    pub(crate) fn delete_api_pod(&self, p: &PodInfo) -> Result<()> {
        self.api().delete("Pod", &p.spec.namespace, &p.spec.name)
    }

    /// Applies the documents of a policy file as custom resources, as
    /// `kubectl apply -f` does; the objects the same file applied before
    /// and no longer holds are deleted. Istio's older versions are served
    /// as v1 (the CRDs convert them unchanged).
    pub(crate) fn apply_policy_file(&self, name: &str, yaml: &str) -> Result<()> {
        let docs: Vec<Value> =
            nodemesh_agent::yaml::parse_documents(std::path::Path::new(name), yaml)
                .map_err(|e| anyhow!("{e}"))?;
        let api = self.api();
        let mut applied = Vec::new();
        for mut doc in docs {
            let version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
            let group = version.split('/').next().unwrap_or_default().to_owned();
            doc["apiVersion"] = format!("{group}/v1").into();
            if doc["metadata"]["namespace"].is_null() {
                doc["metadata"]["namespace"] = "default".into();
            }
            let key = (
                format!("{}.{group}", doc["kind"].as_str().unwrap_or_default()),
                doc["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                doc["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            api.apply(&doc)?;
            applied.push(key);
        }
        let mut files = self
            .policy_objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, ns, n) in files.get(name).into_iter().flatten() {
            if !applied.contains(&(kind.clone(), ns.clone(), n.clone())) {
                api.delete(kind, ns, n)?;
            }
        }
        files.insert(name.to_owned(), applied);
        Ok(())
    }

    /// The Events agents posted about an object (`kind`, `namespace/name`).
    pub fn events_about(&self, kind: &str, namespace: &str, name: &str) -> Vec<Value> {
        self.api()
            .events()
            .into_iter()
            .filter(|e| {
                e["regarding"]["kind"] == kind
                    && e["regarding"]["namespace"] == namespace
                    && e["regarding"]["name"] == name
            })
            .collect()
    }
}

/// A pod as the API holds it: Pending until the chain gave it an address.
fn pod_object(p: &PodInfo, meshed: bool) -> Value {
    let mut l: Vec<(&str, &str)> = vec![("app", &p.spec.app)];
    if !meshed {
        l.push(OPT_OUT);
    }
    const TEMPLATE_HASH: &str = "7d9f8c6b5";
    if p.spec.workload.is_some() {
        l.push(("pod-template-hash", TEMPLATE_HASH));
    }
    let ips: Vec<IpAddr> = [IpAddr::V4(p.ip4), IpAddr::V6(p.ip6)]
        .into_iter()
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let phase = if ips.is_empty() { "Pending" } else { "Running" };
    let mut pod = apiserver::pod(
        &p.spec.name,
        &p.spec.namespace,
        p.spec.uid.as_deref().unwrap_or_default(),
        &format!("node-{}", p.spec.node),
        &p.spec.service_account,
        &labels(&l),
        &ips,
        phase,
    );
    if let Some(workload) = &p.spec.workload {
        pod["metadata"]["ownerReferences"] = serde_json::json!([{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": format!("{workload}-{TEMPLATE_HASH}"),
            "uid": format!("rs-{workload}"),
            "controller": true,
        }]);
    }
    pod
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
