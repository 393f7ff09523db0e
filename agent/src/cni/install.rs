//! Puts the plugin on the node (istio-cni's installer): its binary into the
//! host's CNI bin dir, its entry at the end of the primary network config's
//! plugin list, and the entry back whenever the cluster's CNI rewrites that
//! config (a node agent of the primary CNI may do so at any time).
use std::ffi::OsStr;

use nodemesh_cni::conflist;
use tracing::{error, info};

use crate::{
    config::{CniInstall, CniSettings},
    fswatch::{self, ReloadMetrics},
};

/// Installs once now and again on every change in the config dir. The
/// returned watch must be kept.
pub fn start(
    settings: &CniSettings,
    install: &CniInstall,
    reloads: ReloadMetrics,
) -> fswatch::Watch {
    let socket = settings.socket_path.display().to_string();
    let entry = conflist::default_entry(&socket, &install.exclude_namespaces);
    let conf_dir = install.conf_dir.clone();
    let install = install.clone();
    let run = move || match conflist::ensure_installed(
        &install.conf_dir,
        &install.bin_dir,
        &install.binary,
        &entry,
    ) {
        Ok(done) => {
            match &done.primary {
                None => info!(
                    conf_dir = %install.conf_dir.display(),
                    "no CNI network config yet; the plugin is inserted once the cluster's CNI writes one"
                ),
                Some(primary) => {
                    if done.binary_copied || done.config.is_some() {
                        info!(
                            config = %primary.display(),
                            binary_copied = done.binary_copied,
                            edited = ?done.config,
                            "CNI plugin installed"
                        );
                    }
                }
            }
            reloads.record(
                "cni_config",
                if done.config.is_some() {
                    "applied"
                } else {
                    "unchanged"
                },
            );
        }
        Err(e) => {
            error!(conf_dir = %install.conf_dir.display(), "installing the CNI plugin: {e}");
            reloads.record("cni_config", "rejected");
        }
    };
    let first = run.clone();
    first();
    let relevant = |n: &OsStr| {
        n.to_str().is_some_and(|n| {
            !n.starts_with('.')
                && (n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
        })
    };
    fswatch::watch(&conf_dir, relevant, run)
}

/// Takes the plugin out of the primary config and removes its binary
/// (`nodemesh-agent uninstall`).
pub fn uninstall(install: &CniInstall) -> std::io::Result<()> {
    if let Some(config) = conflist::uninstall(&install.conf_dir, &install.bin_dir)? {
        info!(config = %config.display(), "CNI plugin taken out of the network config");
    }
    Ok(())
}
