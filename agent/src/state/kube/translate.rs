//! Kubernetes API objects to the agent's model. Pure functions: each object
//! becomes a compact record at once and the object is dropped (a full Pod
//! is ~32 KB in memory, its record under 1 KB; every agent sees every pod).
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
};

use crate::state::{
    file::DATAPLANE_MODE_LABEL,
    model::{Pod, PodKey, Service, ServiceKey, ServicePort},
};

/// nodemesh's own enablement label: `enabled` or `disabled`, on a pod or
/// (`enabled` only) a namespace.
pub const MESH_LABEL: &str = "nodemesh.dev/mesh";
/// Istio's label naming a pod's workload, overriding its owners.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Set by the Deployment controller on its ReplicaSets' pods; the suffix of
/// the ReplicaSet's name.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

pub type Labels = BTreeMap<String, String>;

/// An object the agent cannot use, by kind, `namespace/name` and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {message}")]
pub struct TranslateError {
    pub kind: &'static str,
    pub object: String,
    pub field: String,
    pub message: String,
}

/// Names an object in errors; built before the fields are read.
struct Object<'a> {
    kind: &'static str,
    meta: &'a ObjectMeta,
}

impl Object<'_> {
    fn name(&self) -> String {
        let name = self.meta.name.as_deref().unwrap_or("<unnamed>");
        match &self.meta.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        }
    }

    fn error(&self, field: impl Into<String>, message: impl Into<String>) -> TranslateError {
        TranslateError {
            kind: self.kind,
            object: self.name(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Namespace and name, both required of namespaced objects.
    fn key(&self) -> Result<(String, String), TranslateError> {
        let ns = self.meta.namespace.clone().filter(|s| !s.is_empty());
        let name = self.meta.name.clone().filter(|s| !s.is_empty());
        match (ns, name) {
            (Some(ns), Some(name)) => Ok((ns, name)),
            (None, _) => Err(self.error("metadata.namespace", "missing")),
            (_, None) => Err(self.error("metadata.name", "missing")),
        }
    }

    fn ip(&self, field: impl FnOnce() -> String, text: &str) -> Result<IpAddr, TranslateError> {
        text.parse()
            .map_err(|_| self.error(field(), format!("{text:?} is not an IP")))
    }

    fn port(&self, field: impl FnOnce() -> String, n: i32) -> Result<u16, TranslateError> {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.error(field(), format!("{n} is not a port")))
    }
}

/// `(namespace, name)` of an EndpointSlice.
pub type SliceKey = (String, String);

// ---------------------------------------------------------------- pods

/// A pod as the cache keeps it: the model pod (whose labels decide its
/// membership together with its namespace's) and what the model does not
/// carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub pod: Arc<Pod>,
    /// For the `*_workload` metric labels: see [`workload_name`].
    pub workload_name: String,
    /// Tells which of two pods under one name is the newer (a pod
    /// recreated under its name has a new UID and a later creation).
    pub created: Option<Time>,
}

/// A pod's record, or None for a pod the mesh never handles: terminal
/// (Succeeded, Failed: its IPs are reused), on the host network (its IPs are
/// the node's), not scheduled yet (no node, no IPs).
pub fn translate_pod(pod: &core::Pod) -> Result<Option<PodRecord>, TranslateError> {
    let object = Object {
        kind: "Pod",
        meta: &pod.metadata,
    };
    let (namespace, name) = object.key()?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) || spec.and_then(|s| s.host_network) == Some(true)
    {
        return Ok(None);
    }
    let Some(node) = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    match status
        .and_then(|s| s.pod_ips.as_deref())
        .filter(|l| !l.is_empty())
    {
        Some(pod_ips) => {
            for (i, ip) in pod_ips.iter().enumerate() {
                ips.push(object.ip(|| format!("status.podIPs[{i}]"), &ip.ip)?);
            }
        }
        None => {
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .filter(|s| !s.is_empty())
            {
                ips.push(object.ip(|| "status.podIP".into(), ip)?);
            }
        }
    }
    ips.dedup();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let workload = workload_name(&pod.metadata);
    let record = PodRecord {
        workload_name: workload.clone(),
        created: pod.metadata.creation_timestamp.clone(),
        pod: Arc::new(Pod {
            name,
            namespace,
            uid: pod.metadata.uid.clone().filter(|u| !u.is_empty()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            labels,
            ips,
            node,
            netns: None,
            workload: Some(workload),
        }),
    };
    Ok(Some(record))
}

/// The name of the workload a pod belongs to, as istiod derives it: the
/// `service.istio.io/workload-name` label; else the controlling owner, a
/// ReplicaSet `<deployment>-<pod-template-hash>` named as its Deployment and
/// a Job `<cronjob>-<digits>` as its CronJob; else the pod's own name.
pub fn workload_name(meta: &ObjectMeta) -> String {
    let labels = meta.labels.as_ref();
    if let Some(name) = labels
        .and_then(|l| l.get(WORKLOAD_NAME_LABEL))
        .filter(|n| !n.is_empty())
    {
        return name.clone();
    }
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let Some(owner) = owner else {
        return meta.name.clone().unwrap_or_default();
    };
    let name = owner.name.as_str();
    let stripped = match owner.kind.as_str() {
        "ReplicaSet" => labels
            .and_then(|l| l.get(POD_TEMPLATE_HASH_LABEL))
            .and_then(|hash| name.strip_suffix(hash.as_str()))
            .and_then(|rest| rest.strip_suffix('-')),
        "Job" => name
            .rsplit_once('-')
            .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .map(|(cronjob, _)| cronjob),
        _ => None,
    };
    stripped
        .filter(|s| !s.is_empty())
        .unwrap_or(name)
        .to_owned()
}

/// Whether a pod is in the mesh: opted in by its own labels or its
/// namespace's (`istio.io/dataplane-mode: ambient` or `nodemesh.dev/mesh:
/// enabled`), and not opted out by its own (`istio.io/dataplane-mode: none`
/// or `nodemesh.dev/mesh: disabled`), which wins.
pub fn is_meshed(pod_labels: &Labels, namespace_labels: Option<&Labels>) -> bool {
    let opted_in = |labels: &Labels| {
        label(labels, DATAPLANE_MODE_LABEL, "ambient") || label(labels, MESH_LABEL, "enabled")
    };
    if opted_out(pod_labels) {
        return false;
    }
    opted_in(pod_labels) || namespace_labels.is_some_and(opted_in)
}

fn label(labels: &Labels, key: &str, value: &str) -> bool {
    labels.get(key).map(String::as_str) == Some(value)
}

/// Out of the mesh by its own labels, whatever its namespace says.
fn opted_out(pod_labels: &Labels) -> bool {
    label(pod_labels, DATAPLANE_MODE_LABEL, "none") || label(pod_labels, MESH_LABEL, "disabled")
}

/// What the workload state holds for a pod key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodPlacement {
    Meshed(Arc<Pod>),
    /// A pod on this node outside the mesh: its CNI request is answered
    /// "not meshed" at once.
    OutOfMesh(Arc<Pod>),
    /// No pod, or one on another node outside the mesh (plain TCP to it).
    Absent,
}

/// Where a pod's record puts it, given its namespace's labels and this
/// agent's node.
pub fn place_pod(
    record: Option<&PodRecord>,
    namespace_labels: Option<&Labels>,
    node: &str,
) -> PodPlacement {
    match record {
        None => PodPlacement::Absent,
        Some(r) if is_meshed(&r.pod.labels, namespace_labels) => {
            PodPlacement::Meshed(r.pod.clone())
        }
        // A local pod of a namespace not seen yet (its watch may lag the
        // pod's) is held back, neither in nor out: its CNI ADD waits for
        // the namespace instead of letting the pod start outside the mesh.
        Some(r)
            if r.pod.node == node && namespace_labels.is_none() && !opted_out(&r.pod.labels) =>
        {
            PodPlacement::Absent
        }
        Some(r) if r.pod.node == node => PodPlacement::OutOfMesh(r.pod.clone()),
        Some(_) => PodPlacement::Absent,
    }
}

// ----------------------------------------------------------- namespaces

/// A namespace's name and labels (all pod translation needs of it). Takes
/// the metadata alone, so a metadata-only watch serves.
pub fn translate_namespace(meta: &ObjectMeta) -> Result<(String, Labels), TranslateError> {
    let object = Object {
        kind: "Namespace",
        meta,
    };
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| object.error("metadata.name", "missing"))?;
    Ok((name, meta.labels.clone().unwrap_or_default()))
}

// ------------------------------------------------------------- services

/// A Service as the cache keeps it, until joined with its EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub key: ServiceKey,
    /// Empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// TCP ports only: the mesh carries nothing else.
    pub ports: Vec<ServicePortSpec>,
    pub publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// "" for an unnamed port (allowed when it is the only one).
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod by the EndpointSlice
    /// controller (slices carry the numbers).
    Name(String),
    /// Not set: the service port itself.
    Unset,
}

/// A Service's record, or None for an ExternalName service (a DNS alias,
/// nothing to proxy).
pub fn translate_service(svc: &core::Service) -> Result<Option<ServiceRecord>, TranslateError> {
    let object = Object {
        kind: "Service",
        meta: &svc.metadata,
    };
    let (namespace, name) = object.key()?;
    let Some(spec) = svc.spec.as_ref() else {
        return Err(object.error("spec", "missing"));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    // Each VIP with the field it came from, for errors.
    let texts: Vec<(String, &str)> = match spec.cluster_ips.as_deref().filter(|l| !l.is_empty()) {
        Some(ips) => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        None => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip.as_str()))
            .collect(),
    };
    let mut vips = Vec::new();
    for (field, text) in texts {
        // "None": headless, no VIP; "": not allocated yet.
        if text == "None" || text.is_empty() {
            continue;
        }
        vips.push(object.ip(|| field, text)?);
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if !is_tcp(p.protocol.as_deref()) {
            continue;
        }
        let port = object.port(|| format!("spec.ports[{i}].port"), p.port)?;
        let target = match &p.target_port {
            None => TargetPort::Unset,
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(object.port(|| format!("spec.ports[{i}].targetPort"), *n)?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Unset,
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                // The API accepts a number written as a string.
                Ok(n) => {
                    TargetPort::Number(object.port(|| format!("spec.ports[{i}].targetPort"), n)?)
                }
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePortSpec {
            name: p.name.clone().unwrap_or_default(),
            port,
            target,
        });
    }
    Ok(Some(ServiceRecord {
        key: ServiceKey { namespace, name },
        vips,
        ports,
        publish_not_ready: spec.publish_not_ready_addresses == Some(true),
    }))
}

fn is_tcp(protocol: Option<&str>) -> bool {
    // The API's default protocol is TCP.
    protocol.is_none_or(|p| p == "TCP")
}

/// An EndpointSlice as the cache keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRecord {
    pub key: SliceKey,
    pub service: ServiceKey,
    /// TCP ports by name ("" for an unnamed one), already resolved.
    pub ports: Vec<(String, u16)>,
    /// Endpoints that are pods; others (manual addresses) have no identity.
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub pod: PodKey,
    pub ready: bool,
    pub serving: bool,
}

/// An EndpointSlice's record, or None for a slice of no Service (without
/// the `kubernetes.io/service-name` label).
pub fn translate_slice(
    slice: &discovery::EndpointSlice,
) -> Result<Option<SliceRecord>, TranslateError> {
    let object = Object {
        kind: "EndpointSlice",
        meta: &slice.metadata,
    };
    let (namespace, name) = object.key()?;
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // A port without a number means "all ports": nothing to resolve.
        let (true, Some(n)) = (is_tcp(p.protocol.as_deref()), p.port) else {
            continue;
        };
        let port = object.port(|| format!("ports[{i}].port"), n)?;
        ports.push((p.name.clone().unwrap_or_default(), port));
    }
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|ep| {
            let target = ep.target_ref.as_ref()?;
            if target.kind.as_deref() != Some("Pod") {
                return None;
            }
            let conditions = ep.conditions.as_ref();
            // The API: a ready unset means ready; a serving unset defers to ready.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            Some(SliceEndpoint {
                pod: PodKey {
                    namespace: target
                        .namespace
                        .clone()
                        .unwrap_or_else(|| namespace.clone()),
                    name: target.name.clone()?,
                },
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            })
        })
        .collect();
    Ok(Some(SliceRecord {
        service: ServiceKey {
            namespace: namespace.clone(),
            name: service.clone(),
        },
        key: (namespace, name),
        ports,
        endpoints,
    }))
}

/// A Service joined with its EndpointSlices (all address families: a
/// dual-stack service has an IPv4 and an IPv6 slice for the same pods).
///
/// A named target port takes the number of the slice port of the same name
/// (the model has one target port per service port: pods that number a
/// named port differently are not told apart). Endpoints are the ready
/// pods (terminating ones are not ready), or the serving ones when the
/// service publishes not-ready addresses.
pub fn build_service<'a>(
    service: &ServiceRecord,
    slices: impl IntoIterator<Item = &'a SliceRecord>,
) -> Service {
    let slices: Vec<&SliceRecord> = slices.into_iter().collect();
    let ports = service
        .ports
        .iter()
        .map(|p| {
            let resolved = slices
                .iter()
                .flat_map(|s| &s.ports)
                .find(|(name, _)| *name == p.name)
                .map(|(_, n)| *n);
            let target_port = resolved.or(match p.target {
                TargetPort::Number(n) => Some(n),
                TargetPort::Name(_) | TargetPort::Unset => None,
            });
            ServicePort {
                port: p.port,
                target_port,
            }
        })
        .collect();
    let mut endpoints: Vec<PodKey> = slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|ep| ep.ready || (service.publish_not_ready && ep.serving))
        .map(|ep| ep.pod.clone())
        .collect();
    endpoints.sort();
    endpoints.dedup();
    Service {
        name: service.key.name.clone(),
        namespace: service.key.namespace.clone(),
        vips: service.vips.clone(),
        ports,
        endpoints,
    }
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
