//! What the agent knows about workloads: pods and services, and where that
//! knowledge comes from (a file now; the Kubernetes API later).
mod source;
mod workloads;

pub use source::{FileWorkloadSource, WorkloadSource};
pub use workloads::{Pod, PodKey, Resolved, Service, ServicePort, Workloads, WorkloadsFile};
