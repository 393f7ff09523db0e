//! The node's filesystems the kernel programs need, made ready before they
//! are attached: a bpffs under `bpffsDir` (mounted when there is none) and
//! the cgroup v2 directory of the node's pods (`cgroupPath: auto`: detected
//! under `cgroupRoot`).
//!
//! Rules (docs/architecture.md, "Node filesystems"):
//! - bpffs: if the nearest existing ancestor of `bpffsDir` is on a bpffs,
//!   nothing is done. Otherwise a bpffs is mounted on `bpffsDir`'s parent
//!   (`/sys/fs/bpf` for the default `/sys/fs/bpf/nodemesh`, as Cilium
//!   mounts it there when the node has none) — only if that parent is an
//!   existing, empty directory other than `/`; anything else is an error
//!   naming the path. Never mounted over a directory that holds anything.
//! - cgroup2 root: `cgroupRoot` if it is a cgroup2 filesystem, else
//!   `<cgroupRoot>/unified` (hybrid hosts); unset, the first cgroup2 mount
//!   of the agent's mount namespace. With no cgroup2 mounted at all (a
//!   cgroup v1-only host) the agent mounts one at `cgroupMountDir`.
//! - pods' cgroup: the first of [`LAYOUTS`] under the root, else a single
//!   `kubepods`, `kubepods.slice` or `*-kubepods.slice` at most
//!   [`SEARCH_DEPTH`] levels down (breadth first, in name order; two at the
//!   same depth are an error: guessing would attach to another node's
//!   pods). On a v1-only host, where the kubelet makes no cgroup2
//!   directories and every process is in the root, the root itself.
//!
//! What the agent mounts stays mounted when it exits: the pins must outlive
//! restarts (the programs keep redirecting, and the next agent reuses the
//! maps).
use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::config::{CgroupPath, Config};

/// What the module asks of the node, so that the rules can be tested
/// without root on a directory tree.
pub trait Host {
    /// The type of the filesystem `path` is on (statfs).
    fn fs_kind(&self, path: &Path) -> io::Result<FsKind>;
    /// The agent's mount table (`/proc/thread-self/mountinfo`).
    fn mountinfo(&self) -> io::Result<String>;
    /// Mounts a new `fs` at `target`.
    fn mount(&self, fs: NewMount, target: &Path) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// CGROUP2_SUPER_MAGIC (0x63677270).
    Cgroup2,
    /// BPF_FS_MAGIC (0xcafe4a11).
    Bpf,
    Other,
}

/// A filesystem the agent may mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewMount {
    Cgroup2,
    Bpf,
}

/// The node itself: statfs(2), mount(2) and procfs.
pub struct Node;

impl Host for Node {
    fn fs_kind(&self, path: &Path) -> io::Result<FsKind> {
        use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
        let kind = statfs(path)?.filesystem_type();
        Ok(if kind == CGROUP2_SUPER_MAGIC {
            FsKind::Cgroup2
        } else if kind == BPF_FS_MAGIC {
            FsKind::Bpf
        } else {
            FsKind::Other
        })
    }

    /// The calling thread's: a thread may have a mount namespace of its own.
    fn mountinfo(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/thread-self/mountinfo")
    }

    fn mount(&self, fs: NewMount, target: &Path) -> io::Result<()> {
        use nix::mount::{MsFlags, mount};
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let (fstype, data) = match fs {
            NewMount::Cgroup2 => ("cgroup2", None),
            // As systemd mounts /sys/fs/bpf: pins are for root only.
            NewMount::Bpf => ("bpf", Some("mode=0700")),
        };
        mount(Some(fstype), target, Some(fstype), flags, data)?;
        Ok(())
    }
}

/// The cgroup layouts of the kubelet, tried in this order under the root.
pub const LAYOUTS: [(&str, &str); 4] = [
    ("kubepods.slice", "the kubelet's systemd cgroup driver"),
    ("kubepods", "the kubelet's cgroupfs driver"),
    (
        "kubelet.slice/kubelet-kubepods.slice",
        "a kubelet in a container, as in kind; systemd driver",
    ),
    (
        "kubelet/kubepods",
        "a kubelet in a container, as in kind; cgroupfs driver",
    ),
];

/// How deep below the root the search for other layouts looks.
pub const SEARCH_DEPTH: usize = 3;

fn is_kubepods(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

#[derive(Debug, thiserror::Error)]
pub enum NodeFsError {
    #[error(
        "bpffsDir {dir} is not on a bpf filesystem, and the agent mounts one only on bpffsDir's parent when that is an existing, empty directory: {at} {why}; mount one (mount -t bpf bpf {at}; in a DaemonSet, the host's /sys/fs/bpf with mountPropagation: Bidirectional) or set bpffsDir to a directory under a bpffs"
    )]
    NoBpffs {
        dir: PathBuf,
        at: PathBuf,
        why: &'static str,
    },
    #[error("{what} {}: {source}; {hint}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "cgroupRoot {root} is not a cgroup2 filesystem, nor is {root}/unified, while cgroup2 is mounted at {}; set cgroupRoot to the host's cgroup2 hierarchy (in a DaemonSet, the host's /sys/fs/cgroup mounted into the pod), or set cgroupPath",
        list(mounted)
    )]
    RootNotCgroup2 {
        root: PathBuf,
        mounted: Vec<PathBuf>,
    },
    #[error(
        "no cgroup2 is mounted, and cgroupMountDir {dir} is not empty: cannot mount one there; empty it or set cgroupMountDir to an empty directory"
    )]
    MountDirNotEmpty { dir: PathBuf },
    #[error("{path} is not on a {expected} filesystem right after mounting one there")]
    MountNotSeen {
        path: PathBuf,
        expected: &'static str,
    },
    #[error(
        "cgroupPath: auto found no cgroup of the node's pods under {root} ({how}): looked for {}, then for kubepods, kubepods.slice or *-kubepods.slice up to {SEARCH_DEPTH} levels down; set cgroupPath to the cgroup v2 directory that holds the node's pods (or cgroupRoot to where the host's cgroup2 hierarchy is mounted)",
        LAYOUTS.map(|(l, how)| format!("{l} ({how})")).join(", ")
    )]
    NotFound { root: PathBuf, how: Root },
    #[error(
        "cgroupPath: auto found several candidate cgroups for the node's pods under {root} ({how}): {}; set cgroupPath to the one of this node",
        list(found)
    )]
    Ambiguous {
        root: PathBuf,
        how: Root,
        found: Vec<PathBuf>,
    },
    #[error("cgroupPath: auto chose {path}, which is not on a cgroup2 filesystem; set cgroupPath")]
    NotCgroup2 { path: PathBuf },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_error(
    what: &'static str,
    path: &Path,
    hint: &'static str,
) -> impl FnOnce(io::Error) -> NodeFsError {
    let path = path.to_owned();
    move |source| NodeFsError::Io {
        what,
        path,
        source,
        hint,
    }
}

/// Where the cgroup2 root came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    CgroupRoot,
    Unified,
    FirstMount,
    MountedByAgent,
}

impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Root::CgroupRoot => "cgroupRoot",
            Root::Unified => "cgroupRoot/unified: a hybrid host",
            Root::FirstMount => "the first cgroup2 mount; set cgroupRoot to look elsewhere",
            Root::MountedByAgent => "mounted at cgroupMountDir: no cgroup2 was mounted",
        })
    }
}

/// What the node's filesystems are once ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The cgroup to attach the programs to.
    pub cgroup: PathBuf,
    /// Where the agent mounted a bpffs, if it did.
    pub bpffs_mounted: Option<PathBuf>,
}

/// Makes `bpffsDir` usable (mounting a bpffs if needed) and resolves
/// `cgroupPath`; call before `Kernel::install`.
pub fn prepare(config: &Config) -> Result<Prepared, NodeFsError> {
    prepare_on(&Node, config)
}

pub fn prepare_on(host: &dyn Host, config: &Config) -> Result<Prepared, NodeFsError> {
    let bpffs_mounted = ensure_bpffs(host, &config.bpffs_dir)?;
    let cgroup = match &config.cgroup_path {
        CgroupPath::Dir(dir) => dir.clone(),
        CgroupPath::Auto => {
            pods_cgroup(
                host,
                config.cgroup_root.as_deref(),
                &config.cgroup_mount_dir,
            )?
            .path
        }
    };
    Ok(Prepared {
        cgroup,
        bpffs_mounted,
    })
}

/// Makes sure `dir` is (or will be, once created) on a bpffs; returns where
/// it mounted one, if it did.
pub fn ensure_bpffs(host: &dyn Host, dir: &Path) -> Result<Option<PathBuf>, NodeFsError> {
    let at = dir.parent().unwrap_or(Path::new("/"));
    let no_bpffs = |why| NodeFsError::NoBpffs {
        dir: dir.to_owned(),
        at: at.to_owned(),
        why,
    };
    if !dir.is_absolute() {
        return Err(no_bpffs("is relative: bpffsDir must be an absolute path"));
    }
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    let kind = host
        .fs_kind(existing)
        .map_err(io_error("statfs", existing, "check bpffsDir"))?;
    if kind == FsKind::Bpf {
        return Ok(None);
    }
    if at == Path::new("/") {
        return Err(no_bpffs("is the root directory"));
    }
    if !at.is_dir() {
        return Err(no_bpffs("is not an existing directory"));
    }
    let mut entries =
        std::fs::read_dir(at).map_err(io_error("reading", at, "check bpffsDir's parent"))?;
    if entries.next().is_some() {
        return Err(no_bpffs("is not empty"));
    }
    let shared = host.mountinfo().ok().and_then(|m| is_shared(&m, at));
    host.mount(NewMount::Bpf, at).map_err(io_error(
        "mounting a bpffs at",
        at,
        "the agent needs CAP_SYS_ADMIN to mount it, or mount one there yourself",
    ))?;
    if host.fs_kind(at).ok() != Some(FsKind::Bpf) {
        return Err(NodeFsError::MountNotSeen {
            path: at.to_owned(),
            expected: "bpf",
        });
    }
    if shared == Some(false) {
        // A container's hostPath without Bidirectional propagation: the
        // bpffs would go with the container, and the programs with it.
        warn!(
            at = %at.display(),
            bpffs_dir = %dir.display(),
            "mounted a bpffs (bpffsDir was on none) on a mount that is not shared: it stays in the agent's mount namespace; if that is a container's, the pins, and the programs with them, go when it ends: mount a bpffs on the node, or give this path Bidirectional mount propagation"
        );
    } else {
        info!(
            at = %at.display(),
            bpffs_dir = %dir.display(),
            "mounted a bpffs (bpffsDir was on none); it stays mounted, so the pins outlive the agent"
        );
    }
    Ok(Some(at.to_owned()))
}

/// The pods' cgroup `cgroupPath: auto` chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub path: PathBuf,
    /// The layout that matched.
    pub layout: String,
    pub root: PathBuf,
    pub root_from: Root,
}

/// `cgroupPath: auto`: the cgroup2 root (mounted at `mount_dir` when no
/// cgroup2 is mounted), then the pods' cgroup under it; logged.
pub fn pods_cgroup(
    host: &dyn Host,
    cgroup_root: Option<&Path>,
    mount_dir: &Path,
) -> Result<Detected, NodeFsError> {
    let (root, root_from) = cgroup2_root(host, cgroup_root, mount_dir)?;
    let found = match find_pods_cgroup(host, &root, root_from)? {
        Some(found) => found,
        // The kubelet of a v1 host makes no cgroup2 directories: every
        // process is in the root, and the programs only act on enrolled
        // pods anyway (as Cilium attaches to its own cgroup2 mount).
        None if root_from == Root::MountedByAgent => (
            root.clone(),
            "the root: on a cgroup v1 host every process is in the cgroup2 root".to_owned(),
        ),
        None => {
            return Err(NodeFsError::NotFound {
                root,
                how: root_from,
            });
        }
    };
    let detected = Detected {
        path: found.0,
        layout: found.1,
        root,
        root_from,
    };
    info!(
        cgroup = %detected.path.display(),
        layout = %detected.layout,
        root = %detected.root.display(),
        root_from = %detected.root_from,
        "cgroupPath auto: attaching to the pods' cgroup"
    );
    Ok(detected)
}

/// The cgroup2 hierarchy to look in, and where it came from (mounted at
/// `mount_dir` when no cgroup2 is mounted).
pub fn cgroup2_root(
    host: &dyn Host,
    configured: Option<&Path>,
    mount_dir: &Path,
) -> Result<(PathBuf, Root), NodeFsError> {
    let mountinfo = || {
        host.mountinfo()
            .map(|text| {
                mounts(&text)
                    .into_iter()
                    .filter(|(_, fstype)| fstype == "cgroup2")
                    .map(|(at, _)| at)
                    .collect::<Vec<_>>()
            })
            .map_err(io_error(
                "reading",
                Path::new("/proc/thread-self/mountinfo"),
                "set cgroupRoot",
            ))
    };
    if let Some(root) = configured {
        let kind = host.fs_kind(root).map_err(io_error(
            "cgroupRoot",
            root,
            "mount the host's cgroup hierarchy there (in a DaemonSet, a hostPath of /sys/fs/cgroup) or leave cgroupRoot unset",
        ))?;
        if kind == FsKind::Cgroup2 {
            return Ok((root.to_owned(), Root::CgroupRoot));
        }
        let unified = root.join("unified");
        if host.fs_kind(&unified).ok() == Some(FsKind::Cgroup2) {
            return Ok((unified, Root::Unified));
        }
        // A cgroup v1-only host mounts no cgroup2 at all; one the agent
        // mounted before does not count.
        let mut mounted = mountinfo()?;
        mounted.retain(|m| m != mount_dir);
        if !mounted.is_empty() {
            return Err(NodeFsError::RootNotCgroup2 {
                root: root.to_owned(),
                mounted,
            });
        }
    } else if let Some(first) = mountinfo()?.into_iter().next() {
        // The agent's own, from before a restart: still a v1-only host.
        let from = if first == mount_dir {
            Root::MountedByAgent
        } else {
            Root::FirstMount
        };
        return Ok((first, from));
    }
    mount_cgroup2(host, mount_dir)?;
    Ok((mount_dir.to_owned(), Root::MountedByAgent))
}

/// Mounts cgroup2 at `dir` unless it is there already (a previous agent's).
fn mount_cgroup2(host: &dyn Host, dir: &Path) -> Result<(), NodeFsError> {
    const HINT: &str = "set cgroupMountDir to a directory the agent can create and mount on";
    if dir.is_dir() {
        if host.fs_kind(dir).ok() == Some(FsKind::Cgroup2) {
            info!(at = %dir.display(), "cgroup2 already mounted at cgroupMountDir");
            return Ok(());
        }
        let mut entries = std::fs::read_dir(dir).map_err(io_error("reading", dir, HINT))?;
        if entries.next().is_some() {
            return Err(NodeFsError::MountDirNotEmpty {
                dir: dir.to_owned(),
            });
        }
    } else {
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir, HINT))?;
    }
    host.mount(NewMount::Cgroup2, dir).map_err(io_error(
        "mounting cgroup2 at",
        dir,
        "the agent needs CAP_SYS_ADMIN in the host's cgroup namespace; or set cgroupPath",
    ))?;
    if host.fs_kind(dir).ok() != Some(FsKind::Cgroup2) {
        return Err(NodeFsError::MountNotSeen {
            path: dir.to_owned(),
            expected: "cgroup2",
        });
    }
    warn!(
        at = %dir.display(),
        "no cgroup2 was mounted (a cgroup v1-only host?): mounted one at cgroupMountDir; it stays mounted"
    );
    Ok(())
}

/// The pods' cgroup under `root` and the layout that matched; `None` when
/// there is none.
pub fn find_pods_cgroup(
    host: &dyn Host,
    root: &Path,
    root_from: Root,
) -> Result<Option<(PathBuf, String)>, NodeFsError> {
    let checked = |path: PathBuf, layout: String| {
        if host.fs_kind(&path).ok() == Some(FsKind::Cgroup2) {
            Ok(Some((path, layout)))
        } else {
            Err(NodeFsError::NotCgroup2 { path })
        }
    };
    for (layout, how) in LAYOUTS {
        let path = root.join(layout);
        if path.is_dir() {
            return checked(path, format!("{layout} ({how})"));
        }
    }
    let mut level = vec![root.to_owned()];
    for _ in 0..SEARCH_DEPTH {
        let (mut found, mut next) = (Vec::new(), Vec::new());
        for dir in &level {
            for (name, path) in subdirs(dir) {
                if is_kubepods(&name) {
                    found.push(path);
                } else {
                    next.push(path);
                }
            }
        }
        match found.len() {
            0 => level = next,
            1 => {
                let path = found.remove(0);
                let layout = format!(
                    "{} (found by search)",
                    path.strip_prefix(root).unwrap_or(&path).display()
                );
                return checked(path, layout);
            }
            _ => {
                return Err(NodeFsError::Ambiguous {
                    root: root.to_owned(),
                    how: root_from,
                    found,
                });
            }
        }
    }
    Ok(None)
}

/// The directories in `dir` (not following symlinks), by name.
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    dirs.sort();
    dirs
}

/// (mount point, filesystem type) of each line of a mountinfo file.
pub fn mounts(mountinfo: &str) -> Vec<(PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let at = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((PathBuf::from(unescape(at)), unescape(fstype)))
        })
        .collect()
}

/// Whether the mount holding `path` (the deepest mount point above it, the
/// last one mounted if several) is shared: mounts made under it reach its
/// peers (the node's, for a hostPath with Bidirectional propagation).
/// None: no mount holds it.
pub fn is_shared(mountinfo: &str, path: &Path) -> Option<bool> {
    let mut holder: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let Some((left, _)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let Some(at) = fields.get(4).map(|a| PathBuf::from(unescape(a))) else {
            continue;
        };
        let deeper = match &holder {
            Some((h, _)) => at.as_os_str().len() >= h.as_os_str().len(),
            None => true,
        };
        if path.starts_with(&at) && deeper {
            let shared = fields.iter().skip(6).any(|f| f.starts_with("shared:"));
            holder = Some((at, shared));
        }
    }
    holder.map(|(_, shared)| shared)
}

/// Undoes the kernel's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, fs};

    use super::*;

    /// A directory tree whose filesystem types are said, not real.
    struct Fake {
        dir: PathBuf,
        /// Longest prefix wins; everything else is `Other`.
        kinds: RefCell<Vec<(PathBuf, FsKind)>>,
        mountinfo: String,
        mounted: RefCell<Vec<(NewMount, PathBuf)>>,
    }

    impl Fake {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("nodemesh-nodefs-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Fake {
                dir,
                kinds: RefCell::default(),
                mountinfo: String::new(),
                mounted: RefCell::default(),
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.join(rel)
        }

        /// Creates `rel` (and its parents).
        fn mkdir(&self, rel: &str) -> PathBuf {
            let p = self.path(rel);
            fs::create_dir_all(&p).unwrap();
            p
        }

        fn set_kind(&self, rel: &str, kind: FsKind) {
            self.kinds.borrow_mut().push((self.path(rel), kind));
        }

        fn detect(&self, root: &str) -> Result<Option<(PathBuf, String)>, NodeFsError> {
            find_pods_cgroup(self, &self.path(root), Root::CgroupRoot)
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    impl Host for Fake {
        fn fs_kind(&self, path: &Path) -> io::Result<FsKind> {
            if !path.exists() {
                return Err(io::ErrorKind::NotFound.into());
            }
            Ok(self
                .kinds
                .borrow()
                .iter()
                .filter(|(p, _)| path.starts_with(p))
                .max_by_key(|(p, _)| p.as_os_str().len())
                .map_or(FsKind::Other, |(_, k)| *k))
        }

        fn mountinfo(&self) -> io::Result<String> {
            Ok(self.mountinfo.clone())
        }

        fn mount(&self, fs: NewMount, target: &Path) -> io::Result<()> {
            self.mounted.borrow_mut().push((fs, target.to_owned()));
            let kind = match fs {
                NewMount::Cgroup2 => FsKind::Cgroup2,
                NewMount::Bpf => FsKind::Bpf,
            };
            self.kinds.borrow_mut().push((target.to_owned(), kind));
            Ok(())
        }
    }

    fn mountinfo_line(at: &Path, fstype: &str) -> String {
        format!(
            "41 31 0:38 / {} rw,relatime shared:9 - {fstype} {fstype} rw\n",
            at.display().to_string().replace(' ', "\\040")
        )
    }

    #[test]
    fn layouts_are_tried_in_order() {
        let f = Fake::new("order");
        f.set_kind("cg", FsKind::Cgroup2);
        for layout in LAYOUTS.map(|(l, _)| l) {
            f.mkdir(&format!("cg/{layout}/pod-a"));
        }
        // A decoy the search would find: the fixed layouts come first.
        f.mkdir("cg/a/kubepods");
        for layout in LAYOUTS.map(|(l, _)| l) {
            let (path, how) = f.detect("cg").unwrap().unwrap();
            assert_eq!(path, f.path(&format!("cg/{layout}")), "{how}");
            assert!(how.starts_with(layout), "{how}");
            fs::remove_dir_all(&path).unwrap();
        }
        let (path, how) = f.detect("cg").unwrap().unwrap();
        assert_eq!(path, f.path("cg/a/kubepods"));
        assert!(how.contains("found by search"), "{how}");
    }

    #[test]
    fn nested_kind_layouts_and_the_bounded_search() {
        let f = Fake::new("nested");
        f.set_kind("cg", FsKind::Cgroup2);
        f.mkdir("cg/init.scope");
        f.mkdir("cg/system.slice/containerd.service");
        f.mkdir("cg/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice");
        let (path, _) = f.detect("cg").unwrap().unwrap();
        assert_eq!(path, f.path("cg/kubelet.slice/kubelet-kubepods.slice"));
        fs::remove_dir_all(f.path("cg/kubelet.slice")).unwrap();

        // A kind node's cgroup seen from the host's cgroup namespace:
        // three levels down.
        f.mkdir("cg/system.slice/docker-1234.scope/kubelet.slice/kubelet-kubepods.slice");
        assert_eq!(
            f.detect("cg").unwrap(),
            None,
            "four levels down: not searched"
        );
        f.mkdir("cg/docker/1234/kubepods/burstable");
        let (path, how) = f.detect("cg").unwrap().unwrap();
        assert_eq!(path, f.path("cg/docker/1234/kubepods"));
        assert!(how.starts_with("docker/1234/kubepods"), "{how}");

        // Two at the same depth: which one is this node's is a guess.
        f.mkdir("cg/docker/5678/kubepods");
        let err = f.detect("cg").unwrap_err().to_string();
        assert!(
            err.contains("several candidate")
                && err.contains("docker/1234/kubepods, ")
                && err.contains("docker/5678/kubepods")
                && err.contains("set cgroupPath"),
            "{err}"
        );
        // A shallower one wins over deeper ones.
        f.mkdir("cg/machine/custom-kubepods.slice");
        let (path, _) = f.detect("cg").unwrap().unwrap();
        assert_eq!(path, f.path("cg/machine/custom-kubepods.slice"));
    }

    #[test]
    fn hybrid_hosts_use_unified() {
        let f = Fake::new("hybrid");
        // /sys/fs/cgroup as a hybrid host mounts it: a tmpfs of v1
        // hierarchies and cgroup2 at unified/.
        f.mkdir("host/cpu/kubepods.slice");
        f.mkdir("host/unified/kubepods.slice");
        f.set_kind("host/unified", FsKind::Cgroup2);
        let mount_dir = f.path("mnt");
        let d = pods_cgroup(&f, Some(&f.path("host")), &mount_dir).unwrap();
        assert_eq!(d.path, f.path("host/unified/kubepods.slice"));
        assert_eq!(d.root_from, Root::Unified);
        assert!(f.mounted.borrow().is_empty());
        // The root itself when it is cgroup2.
        let d = pods_cgroup(&f, Some(&f.path("host/unified")), &mount_dir).unwrap();
        assert_eq!(
            (d.path, d.root_from),
            (f.path("host/unified/kubepods.slice"), Root::CgroupRoot)
        );
    }

    #[test]
    fn nothing_found_says_what_was_looked_for_and_where() {
        let f = Fake::new("none");
        f.set_kind("cg", FsKind::Cgroup2);
        f.mkdir("cg/system.slice/sshd.service");
        f.mkdir("cg/user.slice");
        let err = pods_cgroup(&f, Some(&f.path("cg")), &f.path("mnt"))
            .unwrap_err()
            .to_string();
        for part in [
            f.path("cg").display().to_string().as_str(),
            "(cgroupRoot)",
            "kubepods.slice (the kubelet's systemd cgroup driver)",
            "kubepods (the kubelet's cgroupfs driver)",
            "kubelet.slice/kubelet-kubepods.slice",
            "kubelet/kubepods",
            "up to 3 levels down",
            "set cgroupPath",
        ] {
            assert!(err.contains(part), "{part:?} missing: {err}");
        }
        // A cgroupRoot that is missing, or that is no cgroup2 while one is
        // mounted elsewhere.
        let err = pods_cgroup(&f, Some(&f.path("absent")), &f.path("mnt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("cgroupRoot {}: ", f.path("absent").display()))
                && err.contains("hostPath"),
            "{err}"
        );
        let mut f = f;
        f.mountinfo = mountinfo_line(Path::new("/sys/fs/cgroup/unified"), "cgroup2");
        f.mkdir("v1/cpu");
        let err = pods_cgroup(&f, Some(&f.path("v1")), &f.path("mnt"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "cgroupRoot {} is not a cgroup2 filesystem",
                f.path("v1").display()
            )) && err.contains("cgroup2 is mounted at /sys/fs/cgroup/unified;"),
            "{err}"
        );
        assert!(f.mounted.borrow().is_empty());
    }

    #[test]
    fn default_root_is_the_first_cgroup2_mount() {
        let mut f = Fake::new("first mount");
        f.set_kind("my cg", FsKind::Cgroup2);
        f.mkdir("my cg/kubepods");
        f.mountinfo = mountinfo_line(Path::new("/sys/fs/cgroup/cpu"), "cgroup")
            + &mountinfo_line(&f.path("my cg"), "cgroup2")
            + &mountinfo_line(Path::new("/elsewhere"), "cgroup2");
        let d = pods_cgroup(&f, None, &f.path("mnt")).unwrap();
        assert_eq!(d.path, f.path("my cg/kubepods"));
        assert_eq!(d.root_from, Root::FirstMount);
        assert!(f.mounted.borrow().is_empty());
    }

    #[test]
    fn v1_only_hosts_get_a_cgroup2_mount_once() {
        let mut f = Fake::new("v1");
        f.mountinfo = mountinfo_line(Path::new("/sys/fs/cgroup/cpu"), "cgroup");
        f.mkdir("host/cpu/kubepods");
        let mount_dir = f.path("run/cgroupv2");
        let d = pods_cgroup(&f, Some(&f.path("host")), &mount_dir).unwrap();
        // No cgroup2 directories of the kubelet's: the root itself.
        assert_eq!((&d.path, d.root_from), (&mount_dir, Root::MountedByAgent));
        assert_eq!(
            *f.mounted.borrow(),
            vec![(NewMount::Cgroup2, mount_dir.clone())]
        );
        // Restarted: mounted already (and listed in mountinfo), no second
        // mount; unset cgroupRoot finds it too.
        f.mountinfo += &mountinfo_line(&mount_dir, "cgroup2");
        let d = pods_cgroup(&f, Some(&f.path("host")), &mount_dir).unwrap();
        assert_eq!(d.path, mount_dir);
        let d = pods_cgroup(&f, None, &mount_dir).unwrap();
        assert_eq!(d.path, mount_dir);
        assert_eq!(f.mounted.borrow().len(), 1);
        // Never over a directory that holds something.
        f.mountinfo.clear();
        let busy = f.mkdir("busy");
        fs::write(busy.join("file"), "x").unwrap();
        let err = pods_cgroup(&f, None, &busy).unwrap_err().to_string();
        assert!(
            err.contains(&format!("cgroupMountDir {} is not empty", busy.display())),
            "{err}"
        );
        assert_eq!(f.mounted.borrow().len(), 1);
    }

    #[test]
    fn bpffs_is_mounted_on_an_empty_parent_only() {
        let f = Fake::new("bpffs");
        // /sys/fs/bpf on a node without a bpffs: an empty directory.
        let parent = f.mkdir("sys/fs/bpf");
        let dir = parent.join("nodemesh");
        assert_eq!(ensure_bpffs(&f, &dir).unwrap(), Some(parent.clone()));
        assert_eq!(*f.mounted.borrow(), vec![(NewMount::Bpf, parent.clone())]);
        // Mounted now (or by the node): nothing to do, however deep.
        assert_eq!(ensure_bpffs(&f, &dir).unwrap(), None);
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(ensure_bpffs(&f, &dir.join("a/b")).unwrap(), None);
        assert_eq!(f.mounted.borrow().len(), 1);

        // A parent that holds something is never mounted over.
        let busy = f.mkdir("var/lib/nodemesh");
        fs::write(busy.join("state.json"), "{}").unwrap();
        let err = ensure_bpffs(&f, &busy.join("bpf")).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{} is not empty", busy.display()))
                && err.contains(&format!("mount -t bpf bpf {}", busy.display()))
                && err.contains("set bpffsDir"),
            "{err}"
        );
        // Nor one that does not exist, nor /.
        let err = ensure_bpffs(&f, &f.path("nowhere/bpf/nodemesh"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nowhere/bpf is not an existing directory"),
            "{err}"
        );
        let err = ensure_bpffs(&f, Path::new("/nodemesh"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/ is the root directory"), "{err}");
        let err = ensure_bpffs(&f, Path::new("bpf/nodemesh"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be an absolute path"), "{err}");
        assert_eq!(f.mounted.borrow().len(), 1);
    }

    #[test]
    fn explicit_cgroup_paths_are_kept() {
        let f = Fake::new("explicit");
        f.mkdir("bpf");
        f.set_kind("bpf", FsKind::Bpf);
        let text = format!(
            "workloadsFile: w.yaml\ncgroupPath: /sys/fs/cgroup/kubepods.slice\nbpffsDir: {}\ncaCertFile: ca.pem\ncaKeyFile: ca.key\n",
            f.path("bpf/nodemesh").display()
        );
        fs::write(f.path("agent.yaml"), text).unwrap();
        let config = Config::load(&f.path("agent.yaml")).unwrap();
        let prepared = prepare_on(&f, &config).unwrap();
        assert_eq!(
            prepared,
            Prepared {
                cgroup: PathBuf::from("/sys/fs/cgroup/kubepods.slice"),
                bpffs_mounted: None
            }
        );
    }

    #[test]
    fn shared_mounts() {
        let text = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n\
                    90 27 0:50 / /sys/fs/bpf rw master:7 - ext4 /dev/vda rw\n";
        assert_eq!(is_shared(text, Path::new("/var/lib")), Some(true));
        assert_eq!(is_shared(text, Path::new("/sys/fs")), Some(false));
        // A HostToContainer hostPath: a slave, not shared.
        assert_eq!(is_shared(text, Path::new("/sys/fs/bpf")), Some(false));
        let text =
            format!("{text}91 90 0:51 / /sys/fs/bpf rw shared:8 master:7 - ext4 /dev/vda rw\n");
        assert_eq!(is_shared(&text, Path::new("/sys/fs/bpf")), Some(true));
        assert_eq!(is_shared("", Path::new("/")), None);
    }

    #[test]
    fn mountinfo_fields() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    41 31 0:38 / /a\\040b\\134c rw,relatime shared:1 master:2 - cgroup2 cgroup2 rw\n\
                    garbage\n";
        assert_eq!(
            mounts(text),
            vec![
                (PathBuf::from("/sys/fs/cgroup"), "tmpfs".to_owned()),
                (PathBuf::from("/a b\\c"), "cgroup2".to_owned()),
            ]
        );
    }
}
