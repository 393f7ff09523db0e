//! Small wrappers over the commands and files the lab drives.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Runs `ip` with the arguments; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n NS ...`
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Sets a sysctl inside a named netns (procfs is per-netns for net.*).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
        .arg(format!("{key}={value}"))
        .output()
        .context("running sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl {key}={value} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup v2 mount to build under: `NODEMESH_LAB_CGROUP_ROOT`, else the
/// first cgroup2 mount (hybrid layouts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NODEMESH_LAB_CGROUP_ROOT") {
        return Ok(PathBuf::from(p));
    }
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        if fstype == Some("cgroup2")
            && let Some(m) = mnt
        {
            return Ok(PathBuf::from(m));
        }
    }
    bail!("no cgroup2 filesystem mounted; mount one or set NODEMESH_LAB_CGROUP_ROOT")
}

/// Kills every process in a cgroup subtree (cgroup.kill, Linux 5.14+) and
/// removes the directories bottom-up.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    // Processes take a moment to leave after SIGKILL.
    for attempt in 0..100 {
        match remove_dirs(dir) {
            Ok(()) => return Ok(()),
            Err(e) if attempt == 99 => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    Ok(())
}

fn remove_dirs(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_dirs(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let p = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.as_ref()))
}

/// True while `pid` runs; a zombie (killed, not yet reaped) counts as gone.
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}
