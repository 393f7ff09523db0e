//! Composition: kernel programs, workload source, enrolment, proxy, drain.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use nodemesh_common::{ENROLLED_FLAG_SOCKMAP, EnrolledPod, OUTBOUND_PORT, user::netns_cookie};
use tokio::{signal::unix::SignalKind, task::JoinSet};
use tracing::{error, info, warn};

use crate::{
    access_log::AccessLog,
    config::Config,
    drain::Drain,
    ebpf::{Kernel, Settings},
    inpod::{self, PodNetns},
    proxy::outbound::{self, LocalPod, Shared},
    state::{FileWorkloadSource, Pod, PodKey, WorkloadSource as _, Workloads},
};

/// How often enrolment is retried for pods that failed (netns not there yet).
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(config: Config) -> anyhow::Result<()> {
    inpod::remember_agent_netns().context("reading the agent's own netns")?;
    raise_fd_limit();
    let source = FileWorkloadSource::start(&config.workloads_file)?;
    let mut workloads = source.subscribe();

    let kernel = Arc::new(Kernel::install(&Settings {
        bpffs_dir: &config.bpffs_dir,
        cgroup_path: &config.cgroup_path,
        socket_mark: config.socket_mark,
        sockmap: config.sockmap,
        ebpf_log: config.ebpf_log,
    })?);
    if let Some(logger) = kernel.take_logger() {
        tokio::spawn(drain_ebpf_log(logger));
    }
    let access_log = match &config.access_log {
        Some(path) => AccessLog::open(path)
            .with_context(|| format!("opening the access log {}", path.display()))?,
        None => AccessLog::disabled(),
    };
    let drain = Drain::default();
    let shared = Arc::new(Shared {
        kernel: kernel.clone(),
        workloads: workloads.clone(),
        access_log,
        drain: drain.clone(),
        socket_mark: config.socket_mark,
        sockmap: config.sockmap,
        connect_timeout: config.connect_timeout(),
    });

    let mut enrolment = Enrolment::new(shared.clone());
    let snapshot = workloads.borrow_and_update().clone();
    enrolment.reconcile(&snapshot);
    // Entries a previous agent left for pods that are gone.
    let current: HashSet<u64> = enrolment
        .pods
        .values()
        .map(|p| p.local.netns_cookie)
        .collect();
    for cookie in kernel.enrolled_cookies() {
        if !current.contains(&cookie) {
            kernel.unenrol(cookie);
            info!(netns_cookie = cookie, "removed a stale enrolment");
        }
    }
    info!(
        node = %snapshot.node,
        enrolled = enrolment.pods.len(),
        "nodemesh agent ready"
    );

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut retry = tokio::time::interval(RETRY);
    loop {
        tokio::select! {
            changed = workloads.changed() => {
                if changed.is_err() { break; }
                let snapshot = workloads.borrow_and_update().clone();
                enrolment.reconcile(&snapshot);
            }
            _ = retry.tick() => {
                if enrolment.has_failures() {
                    let snapshot = workloads.borrow().clone();
                    enrolment.reconcile(&snapshot);
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }

    info!(
        active = drain.active(),
        limit_s = config.drain_timeout_seconds,
        "draining: no new connections accepted"
    );
    enrolment.stop_listening();
    let left = drain.drain(config.drain_timeout()).await;
    if left > 0 {
        warn!(
            left,
            "drain deadline reached; closing remaining connections"
        );
    } else {
        info!("drained");
    }
    shared.access_log.flush(Duration::from_secs(2));
    Ok(())
}

struct EnrolledState {
    local: Arc<LocalPod>,
    listeners: JoinSet<()>,
}

struct Enrolment {
    shared: Arc<Shared>,
    pods: HashMap<PodKey, EnrolledState>,
    ids: HashMap<PodKey, u32>,
    next_id: u32,
    failed: HashSet<PodKey>,
}

impl Enrolment {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            pods: HashMap::new(),
            ids: HashMap::new(),
            next_id: 1,
            failed: HashSet::new(),
        }
    }

    fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    fn id_for(&mut self, key: &PodKey) -> u32 {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(key.clone(), id);
        id
    }

    /// Brings enrolment in line with the snapshot: new local pods get
    /// listeners and a map entry, removed ones lose both. A changed pod is
    /// enrolled anew *before* its old state goes (listeners share the port
    /// through SO_REUSEPORT), so its traffic never bypasses the mesh.
    fn reconcile(&mut self, workloads: &Workloads) {
        let desired: HashMap<PodKey, &Pod> = workloads.local_pods().map(|p| (p.key(), p)).collect();
        let removed: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in removed {
            if let Some(mut st) = self.pods.remove(&key) {
                self.shared.kernel.unenrol(st.local.netns_cookie);
                st.listeners.abort_all();
                info!(pod = %key, "unenrolled");
            }
        }
        self.failed.retain(|k| desired.contains_key(k));
        for (key, pod) in desired {
            if self.pods.get(&key).is_some_and(|st| st.local.pod == *pod) {
                continue;
            }
            match self.enrol(pod) {
                Ok(st) => {
                    info!(
                        pod = %key,
                        netns = %st.local.netns.path().display(),
                        netns_cookie = st.local.netns_cookie,
                        "enrolled"
                    );
                    self.failed.remove(&key);
                    let new_cookie = st.local.netns_cookie;
                    if let Some(mut old) = self.pods.insert(key, st) {
                        old.listeners.abort_all();
                        // A new netns (the pod was recreated): the old one's
                        // entry goes; the same netns was just overwritten.
                        if old.local.netns_cookie != new_cookie {
                            self.shared.kernel.unenrol(old.local.netns_cookie);
                        }
                    }
                }
                Err(e) => {
                    if self.failed.insert(key.clone()) {
                        error!(pod = %key, "enrolment failed (retrying): {e:#}");
                    }
                }
            }
        }
    }

    fn enrol(&mut self, pod: &Pod) -> anyhow::Result<EnrolledState> {
        let netns_path = pod
            .netns
            .as_ref()
            .context("local pod without a netns path")?;
        let netns = PodNetns::open(netns_path)?;
        // Listeners first: a map entry without a listener would refuse the
        // pod's connections.
        let v4 = netns
            .listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))
            .with_context(|| format!("outbound listener 127.0.0.1:{OUTBOUND_PORT}"))?;
        let v6 = match netns.listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(pod = %pod.key(), "no IPv6 outbound listener (IPv6 off in the pod?): {e}");
                None
            }
        };
        let cookie = netns_cookie(v4.as_fd()).context("SO_NETNS_COOKIE (Linux 5.14+)")?;
        let workload_id = self.id_for(&pod.key());
        let local = Arc::new(LocalPod {
            pod: pod.clone(),
            workload_id,
            netns_cookie: cookie,
            netns,
        });
        let mut listeners = JoinSet::new();
        for l in std::iter::once(v4).chain(v6) {
            listeners.spawn(outbound::accept_loop(self.shared.clone(), local.clone(), l));
        }
        let flags = if self.shared.sockmap {
            ENROLLED_FLAG_SOCKMAP
        } else {
            0
        };
        self.shared
            .kernel
            .enrol(cookie, EnrolledPod { workload_id, flags })?;
        Ok(EnrolledState { local, listeners })
    }

    fn stop_listening(&mut self) {
        for st in self.pods.values_mut() {
            st.listeners.abort_all();
        }
    }
}

/// The programs' log lines (debug only, never on by default): polled, as
/// they are for diagnosis and need no low latency.
async fn drain_ebpf_log(mut logger: crate::ebpf::EbpfLogger) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        logger.flush();
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!("raising the open-file limit: {e}");
    }
}
