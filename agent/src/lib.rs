//! The nodemesh node agent.
//!
//! `unsafe` is denied workspace-wide; the only exceptions are the eBPF crate
//! and `nodemesh_common::user` (map types and one socket option).
pub mod admin;
pub mod app;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod dns;
pub mod drain;
pub mod ebpf;
pub mod enrolment;
pub mod files;
pub mod fswatch;
pub mod hostname;
pub mod identity;
pub mod inpod;
pub mod ipblock;
pub mod metrics;
pub mod nodefs;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod registry;
pub mod state;
pub mod tls;
pub mod yaml;
