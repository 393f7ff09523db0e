//! nodemesh-cni: a chained CNI plugin that asks the node agent to enrol a
//! pod's network namespace in the mesh before any of its containers start.
//!
//! - [`protocol`]: the plugin <-> agent messages (the agent uses it too).
//! - [`plugin`]: the CNI commands, driven by [`plugin::run`].
//! - [`conflist`]: installing the plugin into the node's primary CNI config.
#![forbid(unsafe_code)]

pub mod conflist;
pub mod plugin;
pub mod protocol;
