//! Loading, attaching and pinning the kernel programs, and the agent's view
//! of their maps.
//!
//! Layout under the configured bpffs directory (one per agent):
//! `maps/NM_*` (pinned by name, reused across restarts) and
//! `links/<program>` (bpf_links to the cgroup: pinned, so the programs keep
//! redirecting — and a dead agent fails closed — until `uninstall`) and
//! `links/capture-<netns cookie>` (the sk_lookup program's link to each
//! enrolled pod's netns, pinned for the same reason; removed on unenrol).
use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use nodemesh_common::{
    EnrolledPod, FlowKey, Ip6Words, MAP_CAPTURE, MAP_CONFIG, MAP_COUNTERS, MAP_DNS_ORIG,
    MAP_ENROLLED, MAP_ORIG_DST, MAP_PENDING, MAP_SOCKHASH, OrigDst, ProgramConfig, SockKey,
    counter, user::ip_to_words,
};
use tracing::{debug, info, warn};

use crate::{
    config::EbpfLog,
    datapath::{Datapath, PodNetwork},
};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodemesh"));

/// Cgroup programs, by function name in the eBPF crate.
const CGROUP_PROGRAMS: [&str; 8] = [
    "nm_connect4",
    "nm_connect6",
    "nm_sock_ops",
    "nm_sendmsg4",
    "nm_sendmsg6",
    "nm_recvmsg4",
    "nm_recvmsg6",
    "nm_sock_release",
];
const SK_MSG_PROGRAM: &str = "nm_sk_msg";
const SK_LOOKUP_PROGRAM: &str = "nm_sk_lookup";
/// Prefix of the per-pod sk_lookup link pins under `links/`.
const CAPTURE_LINK_PREFIX: &str = "capture-";

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "{0} is not on a bpf filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or set bpffsDir"
    )]
    NotBpffs(PathBuf),
    #[error(
        "cgroup {path}: {source}; set cgroupPath to a cgroup v2 directory (see `mount | grep cgroup2`)"
    )]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory; set cgroupPath to one (see `mount | grep cgroup2`)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("link {name}: {detail}")]
    Link { name: &'static str, detail: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Io { what, source }
}

/// Loads a cgroup program, attaches it with a bpf_link and returns the link.
macro_rules! attach_to_cgroup {
    ($program:expr, $ty:ty, $cgroup:expr, $name:expr) => {{
        let name: &'static str = $name;
        let program_error = |source| KernelError::Program { name, source };
        let p: &mut $ty = $program.try_into().map_err(program_error)?;
        p.load().map_err(program_error)?;
        let id = p
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(program_error)?;
        let link: FdLink = p.take_link(id).map_err(program_error)?.try_into().map_err(
            |e: aya::programs::links::LinkError| KernelError::Link {
                name,
                detail: e.to_string(),
            },
        )?;
        link
    }};
}

/// A program of the object as its typed handle.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::Link {
            name,
            detail: "program missing from the object".into(),
        })?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// Takes a map out of the object as its typed handle.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    typed_map(name, map)
}

fn typed_map<T>(name: &'static str, map: aya::maps::Map) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// The programs, attached, and typed handles on their maps.
pub struct Kernel {
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    orig_dst: HashMap<MapData, FlowKey, OrigDst>,
    sockhash: Mutex<SockHash<MapData, SockKey>>,
    capture: Mutex<SockHash<MapData, Ip6Words>>,
    counters: PerCpuArray<MapData, u64>,
    logger: Mutex<Option<EbpfLogger>>,
    links_dir: PathBuf,
    // Owns the programs (the sk_lookup one is attached per pod, later).
    ebpf: Mutex<Ebpf>,
}

pub type EbpfLogger = aya_log::EbpfLogger<ProgramLog>;

/// Passes the programs' aya-log records into the agent's log under the
/// target `nodemesh::ebpf`. They are only produced when `ebpfLog: debug`, so
/// they are shown at info level: asking for them is the filter.
pub struct ProgramLog;

impl log::Log for ProgramLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "nodemesh::ebpf", program_level = %record.level(), "{}", record.args());
    }

    fn flush(&self) {}
}

pub struct Settings<'a> {
    pub bpffs_dir: &'a Path,
    pub cgroup_path: &'a Path,
    pub socket_mark: u32,
    pub sockmap: bool,
    pub ebpf_log: EbpfLog,
    /// Enrolled pods' UDP DNS to the agent (`dns.capture`).
    pub dns_capture: bool,
}

fn check_bpffs(dir: &Path) -> Result<(), KernelError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| KernelError::Io {
        what: format!("statfs {}", dir.display()),
        source: e.into(),
    })?;
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(KernelError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, KernelError> {
    let fs = nix::sys::statfs::statfs(path).map_err(|e| KernelError::Cgroup {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(KernelError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    File::open(path).map_err(|source| KernelError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

impl Kernel {
    /// Loads the programs (reusing pinned maps), attaches them to the cgroup
    /// and pins the links, replacing links a previous agent left pinned so
    /// that there is no moment with no program attached.
    pub fn install(s: &Settings<'_>) -> Result<Self, KernelError> {
        check_bpffs(s.bpffs_dir)?;
        let maps_dir = s.bpffs_dir.join("maps");
        let links_dir = s.bpffs_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let cgroup = open_cgroup(s.cgroup_path)?;
        let log_level: u8 = match s.ebpf_log {
            EbpfLog::Off => 0,
            EbpfLog::Debug => 4,
        };
        drop_resized_pins(&maps_dir);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(OBJECT)?;
        let logger = if s.ebpf_log == EbpfLog::Off {
            None
        } else {
            match aya_log::EbpfLogger::init_with_logger(&mut ebpf, ProgramLog) {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!("eBPF log unavailable: {e}");
                    None
                }
            }
        };

        // Settings first, so the programs never run with stale ones.
        let mut cfg: Array<_, ProgramConfig> = Array::try_from(
            ebpf.map_mut(MAP_CONFIG)
                .ok_or(KernelError::MissingMap(MAP_CONFIG))?,
        )
        .map_err(|source| KernelError::Map {
            name: MAP_CONFIG,
            source,
        })?;
        cfg.set(
            0,
            ProgramConfig {
                agent_mark: s.socket_mark,
                sockmap_enabled: u32::from(s.sockmap),
                dns_capture: u32::from(s.dns_capture),
            },
            0,
        )
        .map_err(|source| KernelError::Map {
            name: MAP_CONFIG,
            source,
        })?;

        // bpf_link attachments always coexist with other programs on the
        // cgroup (the kernel rejects ALLOW_MULTI in link_create flags), so
        // "Single" here means flags 0, not exclusive.
        for name in CGROUP_PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(KernelError::Link {
                name,
                detail: "program missing from the object".into(),
            })?;
            let link = match name {
                "nm_sock_ops" => attach_to_cgroup!(program, SockOps, &cgroup, name),
                "nm_sock_release" => attach_to_cgroup!(program, CgroupSock, &cgroup, name),
                _ => attach_to_cgroup!(program, CgroupSockAddr, &cgroup, name),
            };
            replace_pinned_link(&links_dir.join(name), link, name)?;
        }

        let sockhash: SockHash<MapData, SockKey> = take_map(&mut ebpf, MAP_SOCKHASH)?;
        {
            let name = SK_MSG_PROGRAM;
            let p: &mut SkMsg = program(&mut ebpf, name)?;
            p.load()
                .map_err(|source| KernelError::Program { name, source })?;
            match p.attach(sockhash.fd()) {
                Ok(id) => {
                    // The map keeps the program attached: it lives as long as
                    // the pinned sockhash, like the pinned cgroup links.
                    let link = p
                        .take_link(id)
                        .map_err(|source| KernelError::Program { name, source })?;
                    std::mem::forget(link);
                }
                // A previous agent's program is still attached to the
                // pinned map; it uses the same maps, so keep it.
                Err(e) if is_busy(&e) => {
                    info!("sk_msg program from a previous agent still attached; keeping it")
                }
                Err(source) => return Err(KernelError::Program { name, source }),
            }
        }

        // Loaded now, attached to each pod's netns at enrolment.
        program::<SkLookup>(&mut ebpf, SK_LOOKUP_PROGRAM)?
            .load()
            .map_err(|source| KernelError::Program {
                name: SK_LOOKUP_PROGRAM,
                source,
            })?;
        let capture = take_map(&mut ebpf, MAP_CAPTURE)?;
        let enrolled = take_map(&mut ebpf, MAP_ENROLLED)?;
        let orig_dst = take_map(&mut ebpf, MAP_ORIG_DST)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        info!(
            cgroup = %s.cgroup_path.display(),
            bpffs = %s.bpffs_dir.display(),
            sockmap = s.sockmap,
            dns_capture = s.dns_capture,
            "eBPF programs attached"
        );
        Ok(Kernel {
            enrolled: Mutex::new(enrolled),
            orig_dst,
            sockhash: Mutex::new(sockhash),
            capture: Mutex::new(capture),
            counters,
            logger: Mutex::new(logger),
            links_dir,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// The aya-log reader, for a task that drains it.
    pub fn take_logger(&self) -> Option<EbpfLogger> {
        lock(&self.logger).take()
    }

    fn capture_pin(&self, netns_cookie: u64) -> PathBuf {
        self.links_dir
            .join(format!("{CAPTURE_LINK_PREFIX}{netns_cookie}"))
    }

    fn detach_capture(&self, netns_cookie: u64) {
        let pin = self.capture_pin(netns_cookie);
        if !pin.exists() {
            return;
        }
        // Removing the last reference (the pin) detaches the link.
        if let Err(e) = std::fs::remove_file(&pin) {
            warn!(link = %pin.display(), "removing the capture link: {e}");
        }
    }

    /// Registers `nodemesh_ebpf_events_total`, read from the counter map
    /// at scrape time.
    pub fn register_metrics(
        self: &std::sync::Arc<Self>,
        registry: &mut prometheus_client::registry::Registry,
    ) {
        registry.register_collector(Box::new(CounterCollector(std::sync::Arc::downgrade(self))));
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Vec<u64> {
        (0..counter::COUNT)
            .map(|i| {
                self.counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// The eBPF counters' names, by index in `NM_COUNTERS`.
fn event_name(index: usize) -> Option<&'static str> {
    use nodemesh_common::counter as c;
    Some(match index as u32 {
        c::REDIRECTED => "redirected",
        c::SKIPPED_AGENT => "skipped_agent",
        c::PENDING_FULL => "pending_full",
        c::ORIG_DST_RECORDED => "orig_dst_recorded",
        c::ORIG_DST_FULL => "orig_dst_full",
        c::SOCKMAP_ADDED => "sockmap_added",
        c::MSG_REDIRECTED => "msg_redirected",
        c::INBOUND_CAPTURED => "inbound_captured",
        c::INBOUND_NO_LISTENER => "inbound_no_listener",
        c::DNS_REDIRECTED => "dns_redirected",
        c::DNS_REVERSED => "dns_reversed",
        c::DNS_ORIG_FULL => "dns_orig_full",
        _ => return None,
    })
}

struct CounterCollector(std::sync::Weak<Kernel>);

impl std::fmt::Debug for CounterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CounterCollector")
    }
}

impl prometheus_client::collector::Collector for CounterCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric as _, metrics::counter::ConstCounter};
        let Some(kernel) = self.0.upgrade() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "ebpf_events",
            "Events counted by the kernel programs (NM_COUNTERS), summed over CPUs.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (i, v) in kernel.counters().iter().enumerate() {
            if let Some(event) = event_name(i) {
                ConstCounter::new(*v).encode(family.encode_family(&[("event", event)])?)?;
            }
        }
        Ok(())
    }
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> std::io::Error {
    move |source| std::io::Error::other(KernelError::Map { name, source })
}

impl Datapath for Kernel {
    fn orig_dst(&self, key: &FlowKey) -> Option<OrigDst> {
        self.orig_dst.get(key, 0).ok()
    }

    /// The agent's side of an app connection: what the agent writes skips
    /// the loopback stack.
    fn add_to_sockhash(&self, key: SockKey, socket: &tokio::net::TcpStream) -> std::io::Result<()> {
        lock(&self.sockhash)
            .insert(key, socket.as_raw_fd(), 0)
            .map_err(map_error(MAP_SOCKHASH))
    }

    fn enrol(&self, netns_cookie: u64, pod: EnrolledPod) -> std::io::Result<()> {
        lock(&self.enrolled)
            .insert(netns_cookie, pod, 0)
            .map_err(map_error(MAP_ENROLLED))
    }

    /// Removes the pod's map entry and detaches its inbound capture.
    fn unenrol(&self, netns_cookie: u64) {
        if let Err(e) = lock(&self.enrolled).remove(&netns_cookie) {
            debug!("unenrol {netns_cookie}: {e}");
        }
        self.detach_capture(netns_cookie);
    }

    /// Map entries and capture link pins (a previous agent's too).
    fn enrolled_cookies(&self) -> Vec<u64> {
        let mut cookies: Vec<u64> = lock(&self.enrolled).keys().filter_map(Result::ok).collect();
        if let Ok(entries) = std::fs::read_dir(&self.links_dir) {
            cookies.extend(entries.filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix(CAPTURE_LINK_PREFIX)?
                    .parse::<u64>()
                    .ok()
            }));
        }
        cookies.sort_unstable();
        cookies.dedup();
        cookies
    }

    fn enrolment_intact(&self, netns_cookie: u64) -> bool {
        lock(&self.enrolled).get(&netns_cookie, 0).is_ok()
            && self.capture_pin(netns_cookie).exists()
    }

    /// `listener` is a listening socket inside the pod.
    fn add_capture_listener(
        &self,
        ip: IpAddr,
        listener: &tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        lock(&self.capture)
            .insert(ip_to_words(ip), listener.as_raw_fd(), 0)
            .map_err(map_error(MAP_CAPTURE))
    }

    /// Attaches the sk_lookup program to the pod's netns and pins the link;
    /// a link a previous agent pinned for the same netns is replaced after.
    /// Call once the pod's capture listeners are in the map: from here on,
    /// plaintext connections to the pod without a listener are refused.
    fn attach_capture(&self, network: &dyn PodNetwork, netns_cookie: u64) -> std::io::Result<()> {
        let netns = network.namespace_fd().ok_or_else(|| {
            std::io::Error::other(format!("{} is not a network namespace", network.describe()))
        })?;
        let name = SK_LOOKUP_PROGRAM;
        let attach = || -> Result<(), KernelError> {
            let link: FdLink = {
                let mut ebpf = lock(&self.ebpf);
                let p: &mut SkLookup = program(&mut ebpf, name)?;
                let id = p
                    .attach(netns)
                    .map_err(|source| KernelError::Program { name, source })?;
                p.take_link(id)
                    .map_err(|source| KernelError::Program { name, source })?
                    .into()
            };
            replace_pinned_link(&self.capture_pin(netns_cookie), link, name)
        };
        attach().map_err(std::io::Error::other)
    }
}

/// A poisoned lock only means another thread panicked mid-update of a map
/// handle; the kernel map itself is consistent, so carry on.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_busy(e: &aya::programs::ProgramError) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32);
        }
        cur = err.source();
    }
    false
}

/// aya reuses a pinned map whatever its size: a counter array pinned by an
/// agent with fewer counters would silently drop the new ones, and a
/// settings value pinned by an agent with fewer settings would fail the
/// programs' load (the verifier checks reads against the value size).
/// Counters are only statistics and the settings are written at every
/// start (programs still attached keep the map they were loaded with), so
/// a differently sized pin is removed and recreated.
fn drop_resized_pins(maps_dir: &Path) {
    let config_size = std::mem::size_of::<ProgramConfig>() as u32;
    for name in [MAP_COUNTERS, MAP_CONFIG] {
        let pin = maps_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        let resized = match name {
            MAP_COUNTERS => info.max_entries() != counter::COUNT,
            _ => info.value_size() != config_size,
        };
        if resized {
            match std::fs::remove_file(&pin) {
                Ok(()) => info!(map = name, "recreating a resized pinned map"),
                Err(e) => warn!("removing the resized map {}: {e}", pin.display()),
            }
        }
    }
}

/// Pins `new` at `path`; a link already pinned there (a previous agent's) is
/// detached only after `new` is attached.
fn replace_pinned_link(path: &Path, new: FdLink, name: &'static str) -> Result<(), KernelError> {
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(old) => {
                let old = old.unpin().map_err(|e| KernelError::Link {
                    name,
                    detail: format!("unpinning {}: {e}", path.display()),
                })?;
                drop(old);
                info!(link = %path.display(), "replaced the previous agent's link");
            }
            Err(e) => {
                return Err(KernelError::Link {
                    name,
                    detail: format!("{} exists but is not a link: {e}", path.display()),
                });
            }
        }
    }
    new.pin(path).map_err(|e| KernelError::Link {
        name,
        detail: format!("pinning at {}: {e}", path.display()),
    })?;
    Ok(())
}

/// Entry counts of the pinned maps, for `nodemesh-agent maps`.
pub fn pinned_map_sizes(bpffs_dir: &Path) -> Result<Vec<(&'static str, usize)>, KernelError> {
    let maps_dir = bpffs_dir.join("maps");
    let open = |name: &'static str| {
        MapData::from_pin(maps_dir.join(name)).map_err(|source| KernelError::Map { name, source })
    };
    use aya::maps::Map::{HashMap as H, LruHashMap as L, SockHash as S};
    let enrolled: HashMap<_, u64, EnrolledPod> = typed_map(MAP_ENROLLED, H(open(MAP_ENROLLED)?))?;
    let pending: HashMap<_, u64, OrigDst> = typed_map(MAP_PENDING, L(open(MAP_PENDING)?))?;
    let orig: HashMap<_, FlowKey, OrigDst> = typed_map(MAP_ORIG_DST, H(open(MAP_ORIG_DST)?))?;
    let sockhash: SockHash<_, SockKey> = typed_map(MAP_SOCKHASH, S(open(MAP_SOCKHASH)?))?;
    let capture: SockHash<_, Ip6Words> = typed_map(MAP_CAPTURE, S(open(MAP_CAPTURE)?))?;
    let dns: HashMap<_, u64, OrigDst> = typed_map(MAP_DNS_ORIG, L(open(MAP_DNS_ORIG)?))?;
    Ok(vec![
        (MAP_ENROLLED, enrolled.keys().count()),
        (MAP_PENDING, pending.keys().count()),
        (MAP_ORIG_DST, orig.keys().count()),
        (MAP_SOCKHASH, sockhash.keys().count()),
        (MAP_CAPTURE, capture.keys().count()),
        (MAP_DNS_ORIG, dns.keys().count()),
    ])
}

/// Removes the links (detaching the programs) and the pinned maps.
pub fn uninstall(bpffs_dir: &Path) -> Result<(), KernelError> {
    let links_dir = bpffs_dir.join("links");
    if links_dir.is_dir() {
        for entry in std::fs::read_dir(&links_dir).map_err(io("reading links"))? {
            let path = entry.map_err(io("reading links"))?.path();
            std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
            info!(link = %path.display(), "removed");
        }
    }
    for sub in ["links", "maps"] {
        let dir = bpffs_dir.join(sub);
        if dir.is_dir() {
            for entry in std::fs::read_dir(&dir).map_err(io("reading pins"))? {
                let path = entry.map_err(io("reading pins"))?.path();
                std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
            }
            std::fs::remove_dir(&dir).map_err(io(format!("removing {}", dir.display())))?;
        }
    }
    if bpffs_dir.is_dir() {
        let _ = std::fs::remove_dir(bpffs_dir);
    }
    Ok(())
}
