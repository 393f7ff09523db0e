//! Finding the netns of pods that already run, for pods whose CNI ADD this
//! agent never saw (installed on a running node, or its saved records
//! lost): istio-cni's and Kmesh's /proc scan. A process's pod comes from
//! its cgroup path (the kubelet names pod cgroups after the pod UID); its
//! netns is accepted only if it holds one of the pod's addresses, since a
//! foreign process may be visiting another pod's netns.
use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::datapath::NetnsHandle;

/// The pod UID in a `/proc/<pid>/cgroup` text, from either cgroup driver:
/// cgroupfs `.../pod<uid>/<container>`, systemd
/// `.../kubepods-<qos>-pod<uid with _>.slice/...`.
pub fn pod_uid_of_cgroup(text: &str) -> Option<String> {
    for line in text.lines() {
        let mut rest = line;
        while let Some(i) = rest.find("pod") {
            rest = &rest[i + 3..];
            let Some(candidate) = rest.get(..36) else {
                break;
            };
            let uid = candidate.replace('_', "-");
            if is_uid(&uid) {
                return Some(uid);
            }
        }
    }
    None
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// For each wanted pod UID, the netns of the oldest process of that pod
/// (lowest pid) not in the agent's own netns, named by a path under
/// `netns_dir` when the runtime mounted it there (a stable name), else by
/// the process's `/proc/<pid>/ns/net`.
pub fn scan(
    proc_root: &Path,
    netns_dir: &Path,
    wanted: &HashMap<String, crate::state::PodKey>,
) -> Vec<(crate::state::PodKey, NetnsHandle)> {
    if wanted.is_empty() {
        return Vec::new();
    }
    let own = std::fs::metadata(proc_root.join("self/ns/net"))
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mounted = mounted_namespaces(netns_dir);
    let mut found: HashMap<String, NetnsHandle> = HashMap::new();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = pod_uid_of_cgroup(&cgroup) else {
            continue;
        };
        if !wanted.contains_key(&uid) || found.contains_key(&uid) {
            continue;
        }
        let ns_path = dir.join("ns/net");
        let Ok(file) = File::open(&ns_path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        let id = (meta.dev(), meta.ino());
        if Some(id) == own {
            continue;
        }
        let path = mounted.get(&id).cloned().unwrap_or(ns_path);
        found.insert(uid, NetnsHandle { file, path });
    }
    found
        .into_iter()
        .filter_map(|(uid, handle)| Some((wanted.get(&uid)?.clone(), handle)))
        .collect()
}

/// The namespaces bind-mounted in `dir` (the runtime's `/var/run/netns`),
/// by identity.
fn mounted_namespaces(dir: &Path) -> HashMap<(u64, u64), PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let m = std::fs::metadata(&path).ok()?;
            Some(((m.dev(), m.ino()), path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_come_from_either_cgroup_driver() {
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d4b3c8e_3f1a_4c1e_9d7e_5b2f6a1c9e01.slice/cri-containerd-5f1e.scope\n";
        assert_eq!(
            pod_uid_of_cgroup(systemd).as_deref(),
            Some("0d4b3c8e-3f1a-4c1e-9d7e-5b2f6a1c9e01")
        );
        let cgroupfs = "0::/kubepods/burstable/pod0d4b3c8e-3f1a-4c1e-9d7e-5b2f6a1c9e01/5f1e\n";
        assert_eq!(
            pod_uid_of_cgroup(cgroupfs).as_deref(),
            Some("0d4b3c8e-3f1a-4c1e-9d7e-5b2f6a1c9e01")
        );
        // Guaranteed pods sit directly under kubepods; "pod" may appear
        // earlier in the path without a UID after it.
        let guaranteed = "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod0d4b3c8e_3f1a_4c1e_9d7e_5b2f6a1c9e01.slice/x\n";
        assert!(pod_uid_of_cgroup(guaranteed).is_some());
        assert_eq!(pod_uid_of_cgroup("0::/system.slice/podman.service\n"), None);
        assert_eq!(pod_uid_of_cgroup("0::/user.slice/pod-not-a-uid\n"), None);
    }

    #[test]
    fn a_scan_finds_the_oldest_process_of_a_wanted_pod_and_skips_the_agents_own_netns() {
        let root = std::env::temp_dir().join(format!("nm-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "0d4b3c8e-3f1a-4c1e-9d7e-5b2f6a1c9e01";
        // A process of the pod, in a netns that is not the agent's: stood in
        // for by /proc/1's (a test runs in the same netns as pid 1, so the
        // fake "self" gets another namespace file: the user namespace).
        for (pid, cgroup) in [
            ("7", format!("0::/kubepods/pod{uid}/c1\n")),
            ("9", format!("0::/kubepods/pod{uid}/c2\n")),
            ("8", "0::/system.slice/sshd.service\n".into()),
        ] {
            let dir = root.join(pid);
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
            std::os::unix::fs::symlink("/proc/self/ns/net", dir.join("ns/net")).unwrap();
        }
        std::fs::create_dir_all(root.join("self/ns")).unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/user", root.join("self/ns/net")).unwrap();
        let key = crate::state::PodKey {
            namespace: "shop".into(),
            name: "cart".into(),
        };
        let wanted = HashMap::from([(uid.to_string(), key.clone())]);
        let found = scan(&root, &root.join("no-netns-dir"), &wanted);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, key);
        assert_eq!(found[0].1.path, root.join("7/ns/net"));
        // The agent's own netns is never a pod's.
        std::fs::remove_file(root.join("self/ns/net")).unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", root.join("self/ns/net")).unwrap();
        assert!(scan(&root, &root, &wanted).is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}
