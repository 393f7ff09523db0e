//! The virtual cluster and what runs on it: the test workloads, the demo
//! and the benchmarks.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod bench;
pub mod bench_client;
pub mod capture;
pub mod cluster;
pub mod cni;
pub mod demo;
pub mod dns;
pub mod hbone_probe;
pub mod http;
pub mod kube;
pub mod prometheus;
pub mod sys;
pub mod thirdparty;
pub mod workload;

pub use cluster::{AgentOptions, Cluster, ClusterSpec, PodSpec, ServiceSpec};
