//! Workloads from the Kubernetes API: objects translated to the model
//! ([`translate`]), watch events turned into store updates ([`cache`]),
//! and the watches themselves ([`KubeWorkloadSource`]).
pub mod cache;
mod source;
pub mod translate;

#[cfg(test)]
pub(crate) mod fake_apiserver;
#[cfg(test)]
mod fixtures;

pub use cache::{KubeCache, WatchEvent};
pub use source::KubeWorkloadSource;
pub use translate::{PodPlacement, PodRecord, TranslateError};
