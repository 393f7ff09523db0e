//! The node's filesystems (`nodemesh_agent::nodefs`) for real: bpffs and
//! cgroup2 mounts made in a private mount namespace (so nothing reaches the
//! host's), and agents on the virtual cluster that find their pods' cgroup
//! (`cgroupPath: auto`) and mount their bpffs themselves. Root; fails,
//! never skips, when it cannot set up.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, unshare},
};
use nodemesh_agent::nodefs::{self, FsKind, Host as _, Node, Root};
use nodemesh_lab::{Cluster, ClusterSpec, cluster::require_root, sys};

/// (mount point, type) of every mount of the calling thread's namespace.
fn mounts() -> Vec<(PathBuf, String)> {
    nodefs::mounts(&fs::read_to_string("/proc/thread-self/mountinfo").unwrap())
}

fn mounts_of(fstype: &str) -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, t)| t == fstype)
        .map(|(at, _)| at)
        .collect()
}

/// What the test makes in the host's namespaces, removed on drop (also
/// when it fails): cgroups, and the scratch directory (empty there: its
/// tmpfs is mounted in the private namespace only).
struct HostParts {
    cgroups: PathBuf,
    scratch: PathBuf,
}

impl Drop for HostParts {
    fn drop(&mut self) {
        if let Err(e) = sys::remove_cgroup_tree(&self.cgroups) {
            eprintln!("removing {}: {e:#}", self.cgroups.display());
        }
        if let Err(e) = fs::remove_dir(&self.scratch) {
            eprintln!("removing {}: {e}", self.scratch.display());
        }
    }
}

fn bind(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .unwrap_or_else(|e| panic!("bind {} at {}: {e}", from.display(), to.display()));
}

/// Runs on a thread of its own in a new, private mount namespace: its
/// mounts go with the thread.
fn in_private_mount_namespace(parts: &HostParts) {
    unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("making every mount private");
    let s = &parts.scratch;
    mount(
        Some("tmpfs"),
        s,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("tmpfs on the scratch directory");
    let node = Node;

    // bpffs: mounted on bpffsDir's parent, an empty directory that is no
    // bpffs (as /sys/fs/bpf on a node without one)...
    let parent = s.join("bpf");
    fs::create_dir(&parent).unwrap();
    let dir = parent.join("nodemesh");
    assert_eq!(
        nodefs::ensure_bpffs(&node, &dir).unwrap(),
        Some(parent.clone())
    );
    assert_eq!(node.fs_kind(&parent).unwrap(), FsKind::Bpf);
    let bpf_mounts = |at: &Path| mounts_of("bpf").iter().filter(|m| *m == at).count();
    assert_eq!(bpf_mounts(&parent), 1);
    assert_eq!(
        fs::metadata(&parent).unwrap().permissions().mode() & 0o7777,
        0o1700,
        "for root only"
    );
    // ...where pins can go (the agent makes maps/ and links/ there)...
    fs::create_dir_all(dir.join("maps")).unwrap();
    // ...and found, not mounted again, from then on.
    assert_eq!(nodefs::ensure_bpffs(&node, &dir).unwrap(), None);
    assert_eq!(
        nodefs::ensure_bpffs(&node, &dir.join("maps")).unwrap(),
        None
    );
    assert_eq!(bpf_mounts(&parent), 1);
    // Never over a directory that holds something.
    let busy = s.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep"), "x").unwrap();
    let err = nodefs::ensure_bpffs(&node, &busy.join("nodemesh"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{} is not empty", busy.display())),
        "{err}"
    );
    assert_eq!(node.fs_kind(&busy).unwrap(), FsKind::Other);
    assert_eq!(bpf_mounts(&busy), 0);

    // cgroupRoot: a tmpfs (a v1 layout) while cgroup2 is mounted elsewhere.
    let host_cgroup2 = mounts_of("cgroup2");
    assert!(!host_cgroup2.is_empty(), "the host has cgroup2 mounted");
    let v1 = s.join("v1");
    fs::create_dir_all(v1.join("cpu/kubepods.slice")).unwrap();
    let mount_dir = s.join("cgroupv2");
    let err = nodefs::pods_cgroup(&node, Some(&v1), &mount_dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "cgroupRoot {} is not a cgroup2 filesystem",
            v1.display()
        )) && err.contains(&host_cgroup2[0].display().to_string()),
        "{err}"
    );
    // A hybrid layout (cgroup2 at unified/) without the pods' cgroup.
    let empty = s.join("empty-host");
    bind(&parts.cgroups.join("empty"), &empty.join("unified"));
    let err = nodefs::pods_cgroup(&node, Some(&empty), &mount_dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "no cgroup of the node's pods under {}/unified (cgroupRoot/unified: a hybrid host)",
            empty.display()
        )) && err.contains("set cgroupPath"),
        "{err}"
    );
    // With it: a real cgroup2 directory, by the systemd driver's name.
    let host = s.join("host");
    bind(&parts.cgroups.join("node"), &host.join("unified"));
    let d = nodefs::pods_cgroup(&node, Some(&host), &mount_dir).unwrap();
    assert_eq!(d.path, host.join("unified/kubepods.slice"));
    assert_eq!(d.root_from, Root::Unified);
    assert_eq!(node.fs_kind(&d.path).unwrap(), FsKind::Cgroup2);
    // kind's: the kubelet in a container.
    let kind = s.join("kind");
    bind(&parts.cgroups.join("kind"), &kind);
    let d = nodefs::pods_cgroup(&node, Some(&kind), &mount_dir).unwrap();
    assert_eq!(
        (d.path, d.root_from),
        (
            kind.join("kubelet.slice/kubelet-kubepods.slice"),
            Root::CgroupRoot
        )
    );
    assert!(!mount_dir.exists(), "nothing mounted while cgroup2 is");

    // A cgroup v1-only host: no cgroup2 mounted anywhere (in this
    // namespace). The agent mounts one, once.
    for at in mounts_of("cgroup2").iter().rev() {
        umount2(at, MntFlags::MNT_DETACH)
            .unwrap_or_else(|e| panic!("umount {}: {e}", at.display()));
    }
    assert!(mounts_of("cgroup2").is_empty());
    let root = nodefs::cgroup2_root(&node, Some(&v1), &mount_dir).unwrap();
    assert_eq!(root, (mount_dir.clone(), Root::MountedByAgent));
    assert_eq!(node.fs_kind(&mount_dir).unwrap(), FsKind::Cgroup2);
    assert_eq!(mounts_of("cgroup2"), vec![mount_dir.clone()]);
    // The whole hierarchy: the test's own cgroups are in it.
    let name = parts.cgroups.file_name().unwrap();
    assert!(mount_dir.join(name).join("node/kubepods.slice").is_dir());
    for configured in [None, Some(v1.as_path())] {
        let again = nodefs::cgroup2_root(&node, configured, &mount_dir).unwrap();
        assert_eq!(again, (mount_dir.clone(), Root::MountedByAgent));
    }
    assert_eq!(mounts_of("cgroup2").len(), 1);
}

#[test]
fn mounts_and_detection_in_a_private_mount_namespace() {
    require_root().unwrap();
    let cgroup2 = sys::cgroup2_root().expect("a cgroup2 mount");
    let id = std::process::id();
    let parts = HostParts {
        cgroups: cgroup2.join(format!("nodemesh-nodefs-{id}")),
        scratch: PathBuf::from(format!("/run/nodemesh-nodefs-{id}")),
    };
    for dir in [
        "empty",
        "node/kubepods.slice/pod-a",
        "kind/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice",
    ] {
        fs::create_dir_all(parts.cgroups.join(dir)).expect("creating test cgroups");
    }
    fs::create_dir_all(&parts.scratch).unwrap();
    let host_cgroup2 = mounts_of("cgroup2");

    let result =
        std::thread::scope(|scope| scope.spawn(|| in_private_mount_namespace(&parts)).join());
    // Nothing reached the host's mount namespace.
    let leaked: Vec<_> = mounts()
        .into_iter()
        .filter(|(at, _)| at.starts_with(&parts.scratch))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    assert_eq!(mounts_of("cgroup2"), host_cgroup2);
    assert_eq!(fs::read_dir(&parts.scratch).unwrap().count(), 0);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn log_after(log: &str, mark: usize) -> &str {
    log.get(mark..).unwrap_or("")
}

#[test]
fn agents_find_kubepods_and_mount_their_bpffs() {
    let mut spec = ClusterSpec::two_nodes();
    spec.agent.node_fs_auto = true;
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    c.spawn_in_pod("server-remote", &["serve", "--port", "8080"])
        .unwrap();
    let bpffs = c.bpffs.clone();
    let bpf_mounts = || mounts_of("bpf").iter().filter(|m| **m == bpffs).count();

    for k in 0..2 {
        let log = c.agent_log(k);
        let chosen = format!(
            "cgroupPath auto: attaching to the pods' cgroup cgroup={} layout=kubepods.slice (the kubelet's systemd cgroup driver)",
            c.pods_cgroup(k).display()
        );
        assert!(log.contains(&chosen), "agent {k}:\n{log}");
        assert!(
            log.contains(&format!("cgroup={}", c.pods_cgroup(k).display()))
                && log.contains("eBPF programs attached"),
            "agent {k}:\n{log}"
        );
        // The first agent mounted the bpffs, the second found it.
        let mounted = log.lines().any(|l| {
            l.contains("mounted a bpffs (bpffsDir was on none)")
                && l.contains(&format!("at={}", c.bpffs.display()))
        });
        assert_eq!(mounted, k == 0, "agent {k}:\n{log}");
    }
    assert_eq!(bpf_mounts(), 1);
    assert!(c.pod("client").cgroup.starts_with(c.pods_cgroup(0)));

    // The pods in kubepods.slice are redirected: the connection goes
    // through both agents, over mutual TLS.
    let remote = format!("{}:8080", c.pod("server-remote").ip4);
    let r = c.probe("client", &remote);
    assert_eq!(r["result"], "ok", "{r}");
    let e = c.log_entries(0, |e| e["orig_dst"] == remote.as_str());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["security"], "mutual_tls");

    // A restarted agent reuses the mount and its pins; the commands that
    // read the config accept `auto`.
    let mark = c.agent_log(0).len();
    c.stop_agent(0).unwrap();
    c.start_agent(0).unwrap();
    let log = c.agent_log(0);
    assert!(!log_after(&log, mark).contains("mounted a bpffs"), "{log}");
    assert_eq!(bpf_mounts(), 1);
    let r = c.probe("client", &remote);
    assert_eq!(r["result"], "ok", "{r}");
    let sizes = c.map_sizes(0).unwrap();
    assert!(sizes["NM_ENROLLED"].as_u64().unwrap() >= 1, "{sizes}");
    let out = Command::new(&c.agent_bin)
        .args(["validate", "--config"])
        .arg(&c.agents[0].config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop_agent(1).unwrap();
    let out = Command::new(&c.agent_bin)
        .args(["uninstall", "--config"])
        .arg(&c.agents[1].config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.bpffs.join("node-1").exists());
}
