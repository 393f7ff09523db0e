//! The workloads file and the indexed snapshot built from it.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use serde::Deserialize;

use crate::yaml::{self, YamlError};

/// The file as users write it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadsFile {
    /// The node this agent runs on; pods with this `node` are local.
    pub node: String,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Path of the pod's network namespace; required for local pods.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

fn default_service_account() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Pods backing the service: `name` (same namespace) or `namespace/name`.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    pub fn app(&self) -> &str {
        self.labels
            .get("app")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .map(String::as_str)
            .unwrap_or(&self.name)
    }
}

/// An indexed, validated snapshot of the workloads file.
#[derive(Debug, Default)]
pub struct Workloads {
    pub node: String,
    pods: Vec<Pod>,
    by_ip: HashMap<IpAddr, usize>,
    by_key: HashMap<PodKey, usize>,
    /// (vip, port) -> endpoints as (pod index, target port).
    by_vip: HashMap<(IpAddr, u16), ServiceBackends>,
}

#[derive(Debug)]
pub struct ServiceBackends {
    pub service: String,
    pub endpoints: Vec<(usize, u16)>,
    next: AtomicUsize,
}

impl Workloads {
    pub fn load(path: &Path) -> Result<Self, YamlError> {
        let file: WorkloadsFile = yaml::read_file(path)?;
        Self::from_file(path, file)
    }

    pub fn from_file(path: &Path, file: WorkloadsFile) -> Result<Self, YamlError> {
        let invalid = |field: String, message: String| YamlError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let mut w = Workloads {
            node: file.node,
            ..Default::default()
        };
        for (i, pod) in file.pods.into_iter().enumerate() {
            if pod.name.is_empty() || pod.namespace.is_empty() {
                return Err(invalid(
                    format!("pods[{i}]"),
                    "name and namespace must not be empty".into(),
                ));
            }
            if pod.ips.is_empty() {
                return Err(invalid(
                    format!("pods[{i}].ips"),
                    "a pod needs an IP".into(),
                ));
            }
            if pod.node == w.node && pod.netns.is_none() {
                return Err(invalid(
                    format!("pods[{i}].netns"),
                    format!(
                        "pod {} runs on this node ({}) so its network namespace path is required",
                        pod.key(),
                        w.node
                    ),
                ));
            }
            if w.by_key.insert(pod.key(), i).is_some() {
                return Err(invalid(
                    format!("pods[{i}]"),
                    format!("pod {} is listed twice", pod.key()),
                ));
            }
            for (j, ip) in pod.ips.iter().enumerate() {
                if let Some(other) = w.by_ip.insert(*ip, i) {
                    return Err(invalid(
                        format!("pods[{i}].ips[{j}]"),
                        format!("{ip} is also the IP of pod {}", w.pods[other].key()),
                    ));
                }
            }
            w.pods.push(pod);
        }
        for (i, svc) in file.services.into_iter().enumerate() {
            let mut endpoints = Vec::new();
            for (j, ep) in svc.endpoints.iter().enumerate() {
                let key = match ep.split_once('/') {
                    Some((ns, name)) => PodKey {
                        namespace: ns.into(),
                        name: name.into(),
                    },
                    None => PodKey {
                        namespace: svc.namespace.clone(),
                        name: ep.clone(),
                    },
                };
                let Some(&pod) = w.by_key.get(&key) else {
                    return Err(invalid(
                        format!("services[{i}].endpoints[{j}]"),
                        format!("no pod {key} in this file"),
                    ));
                };
                endpoints.push(pod);
            }
            for (k, port) in svc.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == Some(0) {
                    return Err(invalid(
                        format!("services[{i}].ports[{k}]"),
                        "port 0 is not a port".into(),
                    ));
                }
                for vip in &svc.vips {
                    if w.by_ip.contains_key(vip) {
                        return Err(invalid(
                            format!("services[{i}].vips"),
                            format!("{vip} is a pod IP"),
                        ));
                    }
                    let backends = ServiceBackends {
                        service: format!("{}.{}", svc.name, svc.namespace),
                        endpoints: endpoints
                            .iter()
                            .map(|&p| (p, port.target_port.unwrap_or(port.port)))
                            .collect(),
                        next: AtomicUsize::new(0),
                    };
                    if w.by_vip.insert((*vip, port.port), backends).is_some() {
                        return Err(invalid(
                            format!("services[{i}].ports[{k}]"),
                            format!("{vip}:{} belongs to two services", port.port),
                        ));
                    }
                }
            }
        }
        Ok(w)
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pods that run on this agent's node.
    pub fn local_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(move |p| p.node == self.node)
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.by_ip.get(&ip).map(|&i| &self.pods[i])
    }

    /// A service `pod` backs on `target_port` (the first, if several), as
    /// the destination agent labels a connection it cannot ask the source
    /// about (ztunnel guesses the inbound service the same way).
    pub fn service_of(&self, pod: &Pod, target_port: u16) -> Option<&str> {
        let index = *self.by_key.get(&pod.key())?;
        let mut backing: Vec<&str> = self
            .by_vip
            .values()
            .filter(|b| b.endpoints.contains(&(index, target_port)))
            .map(|b| b.service.as_str())
            .collect();
        // One answer whatever the map's order.
        backing.sort_unstable();
        backing.first().copied()
    }

    /// Where a connection to `dst` should go: a service VIP is resolved to
    /// one of its endpoints (round robin), anything else goes as addressed.
    pub fn resolve(&self, dst: SocketAddr) -> Resolved<'_> {
        if let Some(backends) = self.by_vip.get(&(dst.ip(), dst.port())) {
            if backends.endpoints.is_empty() {
                return Resolved::NoEndpoints {
                    service: &backends.service,
                };
            }
            let n = backends.next.fetch_add(1, Ordering::Relaxed) % backends.endpoints.len();
            let (pod_index, port) = backends.endpoints[n];
            let pod = &self.pods[pod_index];
            // Prefer an endpoint address of the family the client used.
            let ip = pod
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .unwrap_or(&pod.ips[0]);
            return Resolved::Service {
                service: &backends.service,
                pod,
                addr: SocketAddr::new(*ip, port),
            };
        }
        match self.pod_by_ip(dst.ip()) {
            Some(pod) => Resolved::Pod { pod, addr: dst },
            None => Resolved::External { addr: dst },
        }
    }
}

#[derive(Debug)]
pub enum Resolved<'a> {
    Service {
        service: &'a str,
        pod: &'a Pod,
        addr: SocketAddr,
    },
    NoEndpoints {
        service: &'a str,
    },
    Pod {
        pod: &'a Pod,
        addr: SocketAddr,
    },
    External {
        addr: SocketAddr,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Workloads, YamlError> {
        let path = Path::new("workloads.yaml");
        let file: WorkloadsFile = yaml::parse_str(path, text)?;
        Workloads::from_file(path, file)
    }

    const GOOD: &str = r#"
node: node-0
pods:
  - name: cart-1
    namespace: shop
    serviceAccount: cart
    labels: {app: cart}
    ips: [10.244.0.10, "fd00:244::10"]
    node: node-0
    netns: /run/netns/cart-1
  - name: orders-1
    namespace: shop
    ips: [10.244.1.10]
    node: node-1
services:
  - name: cart
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [cart-1, shop/orders-1]
"#;

    #[test]
    fn resolves_vips_pods_and_external() {
        let w = parse(GOOD).unwrap();
        assert_eq!(w.local_pods().count(), 1);
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            match w.resolve(vip) {
                Resolved::Service { addr, service, .. } => {
                    assert_eq!(service, "cart.shop");
                    seen.push(addr);
                }
                other => panic!("{other:?}"),
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![
                "10.244.0.10:8080".parse().unwrap(),
                "10.244.1.10:8080".parse().unwrap()
            ]
        );
        assert!(matches!(
            w.resolve("10.244.1.10:9000".parse().unwrap()),
            Resolved::Pod { .. }
        ));
        assert!(matches!(
            w.resolve("192.0.2.1:443".parse().unwrap()),
            Resolved::External { .. }
        ));
        assert_eq!(w.pods()[0].app(), "cart");
        assert_eq!(w.pods()[1].app(), "orders-1");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err = parse("node: a\npods:\n  - name: x\n    namespace: y\n    ips: [1.2.3.4]\n    node: b\n    servceAccount: z\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("workloads.yaml: "), "{err}");
        assert!(err.contains("line 7 column 5"), "{err}");
        assert!(err.contains("servceAccount"), "{err}");

        let err = parse("node: a\nnode: b\n").unwrap_err().to_string();
        assert!(err.contains("duplicate mapping key: node"), "{err}");
        assert!(err.contains("line 2"), "{err}");

        let err = parse("node: a\npods:\n  - {name: x, namespace: y, ips: [1.2.3.4], node: a}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pods[0].netns"), "{err}");

        let err = parse("node: a\npods:\n  - {name: x, namespace: y, ips: [1.2.3.4], node: b}\n  - {name: z, namespace: y, ips: [1.2.3.4], node: b}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pods[1].ips[0]") && err.contains("y/x"),
            "{err}"
        );

        let err = parse("node: a\nservices:\n  - {name: s, namespace: y, vips: [10.0.0.1], ports: [{port: 80}], endpoints: [nope]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("services[0].endpoints[0]"), "{err}");
    }
}
