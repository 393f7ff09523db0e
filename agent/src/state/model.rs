//! Pods and services as the agent knows them, whichever source told it.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

/// A pod. Deserialised as the workloads file writes it (and serialised so,
/// for the agent's saved state); other sources build it from their own
/// objects.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    /// The pod's UID where the source knows it: a pod recreated under the
    /// same name is another pod (a CNI request names the one it is for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Empty while the pod has no address yet (normal during start-up).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Path of the pod's network namespace, for local pods that are not
    /// enrolled by the CNI plugin (which hands the agent the netns itself;
    /// the Kubernetes API never knows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The workload the pod belongs to, as Istio names it (a Deployment,
    /// not its ReplicaSet; a CronJob, not its Job): the `*_workload`
    /// metric labels. Unset: the pod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

fn default_service_account() -> String {
    "default".into()
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The pod's workload name (see [`Pod::workload`]).
    pub fn workload(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }

    pub fn app(&self) -> &str {
        self.labels
            .get("app")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .map(String::as_str)
            .unwrap_or(&self.name)
    }

    /// The pod's address in the family of `like`, else its first; None
    /// while it has none.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .or(self.ips.first())
            .copied()
    }
}

/// `namespace/name` of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service: virtual IPs, ports, and the pods behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<PodKey>,
}

impl Service {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// A service by namespace and name; shown as `name.namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    /// Istio's host name of the service.
    pub fn host(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// One backend of a service port: a pod and the address to reach it at.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub pod: Arc<Pod>,
    pub addr: SocketAddr,
}

/// Where a connection to an address goes, before an endpoint is picked.
#[derive(Debug)]
pub enum Resolved {
    /// A service VIP and port; `endpoints` may be empty.
    Service {
        service: ServiceKey,
        endpoints: Vec<Endpoint>,
    },
    /// A pod's own address.
    Pod { pod: Arc<Pod>, addr: SocketAddr },
    /// Nothing the mesh knows.
    External { addr: SocketAddr },
}
