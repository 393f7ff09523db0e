//! What the agent knows about workloads: pods and services, kept in one
//! incrementally indexed store, and the sources that update it (the
//! workloads file now; the Kubernetes API next).
pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kube;
mod model;
mod store;

pub use file::{FileSourceMetrics, FileWorkloadSource, WorkloadsFile};
#[cfg(feature = "kubernetes")]
pub use kube::{KubeCache, KubeWorkloadSource, WatchEvent};
pub use model::{Endpoint, Pod, PodKey, Resolved, Service, ServiceKey, ServicePort};
pub use store::{StateMetrics, WorkloadStore, WorkloadUpdate};
