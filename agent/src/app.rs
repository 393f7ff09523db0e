//! Composition: kernel programs, workload source, enrolment, proxy, drain.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use nodemesh_common::{
    ENROLLED_FLAG_SOCKMAP, EnrolledPod, INBOUND_CAPTURE_PORT, OUTBOUND_PORT, user::netns_cookie,
};
use tokio::{signal::unix::SignalKind, task::JoinSet};
use tracing::{error, info, warn};

use crate::{
    access_log::AccessLog,
    admin,
    config::Config,
    drain::Drain,
    ebpf::{Kernel, Settings},
    fswatch,
    identity::{CertStore, FileCa, store::read_bundle},
    inpod::{self, PodNetns},
    metrics::Metrics,
    policy::PolicyStore,
    proxy::{
        self, capture,
        inbound::{self, HBONE_PORT},
        outbound::{self, LocalPod, Shared},
        pool::Pool,
    },
    readiness::{Pending, Readiness},
    state::{FileWorkloadSource, Pod, PodKey, WorkloadSource as _, Workloads},
    tls::TrustBundle,
};

/// How often enrolment is retried for pods that failed (netns not there yet).
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(config: Config) -> anyhow::Result<()> {
    inpod::remember_agent_netns().context("reading the agent's own netns")?;
    raise_fd_limit();
    // First, so readiness is observable while the rest starts.
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let attached = readiness.pending("programs attached");
    let policy_loaded = readiness.pending("policy set loaded");
    let certificates = readiness.pending("local workload certificates issued");
    let admin = admin::start(config.admin_address, metrics.clone(), readiness).await?;
    let source = FileWorkloadSource::start(&config.workloads_file)?;
    let mut workloads = source.subscribe();
    // Everything that can be wrong in files is checked before the kernel is
    // touched.
    let ca = FileCa::load(&config.ca_cert_file, &config.ca_key_file)?;
    let bundle_path = config.trust_bundle_file().to_owned();
    let roots = read_bundle(&bundle_path)?;
    let bundle = Arc::new(
        TrustBundle::new(&roots)
            .with_context(|| format!("trust bundle {}", bundle_path.display()))?,
    );
    let certs = Arc::new(CertStore::new(Arc::new(ca), bundle, config.cert_lifetime()));
    // Policy: an invalid set at start-up stops the agent (there is no last
    // good set to keep, and starting with none would allow what it denies).
    let policies = Arc::new(PolicyStore::new(&config.root_namespace));
    if let Some(dir) = &config.policy_dir {
        let applied = policies.reload(dir);
        metrics.policy_reload(applied, policies.generation());
        if !applied {
            anyhow::bail!("the policy set in {} is invalid (see above)", dir.display());
        }
    }
    policy_loaded.done();

    let kernel = Arc::new(Kernel::install(&Settings {
        bpffs_dir: &config.bpffs_dir,
        cgroup_path: &config.cgroup_path,
        socket_mark: config.socket_mark,
        sockmap: config.sockmap,
        ebpf_log: config.ebpf_log,
    })?);
    attached.done();
    if let Some(logger) = kernel.take_logger() {
        tokio::spawn(drain_ebpf_log(logger));
    }
    let access_log = match &config.access_log {
        Some(path) => AccessLog::open(path, config.access_log_format)
            .with_context(|| format!("opening the access log {}", path.display()))?,
        None => AccessLog::disabled(),
    };
    let pool = Pool::new(certs.clone(), config.socket_mark, config.connect_timeout());
    let drain = Drain::default();
    let shared = Arc::new(Shared {
        kernel: kernel.clone(),
        workloads: workloads.clone(),
        access_log,
        drain: drain.clone(),
        socket_mark: config.socket_mark,
        sockmap: config.sockmap,
        connect_timeout: config.connect_timeout(),
        trust_domain: config.trust_domain.clone(),
        certs: certs.clone(),
        pool,
        policies: policies.clone(),
        inbound_exempt_sources: config.inbound_exempt_sources(),
        local_pods: Default::default(),
        metrics: metrics.clone(),
    });
    metrics.scrape_from(kernel.clone(), certs.clone(), shared.pool.clone());
    admin.set_config_dump(admin::config_dump(config.clone(), shared.clone()));
    let _policy_watch = match &config.policy_dir {
        Some(dir) => {
            let (store, d, metrics) = (policies.clone(), dir.clone(), metrics.clone());
            let yaml = |n: &std::ffi::OsStr| {
                n.to_str()
                    .is_some_and(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            };
            Some(fswatch::watch(dir, yaml, move || {
                let applied = store.reload(&d);
                metrics.policy_reload(applied, store.generation());
            })?)
        }
        None => None,
    };
    let _bundle_watch = watch_trust_bundle(certs.clone(), &bundle_path)?;
    tokio::spawn(renew_certificates(certs.clone()));

    let mut enrolment = Enrolment::new(shared.clone(), certificates);
    let snapshot = workloads.borrow_and_update().clone();
    enrolment.reconcile(&snapshot);
    let mut stale_removed = enrolment.remove_stale();
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
                if !stale_removed {
                    stale_removed = enrolment.remove_stale();
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
    /// Done once every local pod is enrolled (with its certificate).
    certificates: Option<Pending>,
    pods: HashMap<PodKey, EnrolledState>,
    ids: HashMap<PodKey, u32>,
    next_id: u32,
    failed: HashSet<PodKey>,
}

impl Enrolment {
    fn new(shared: Arc<Shared>, certificates: Pending) -> Self {
        Self {
            shared,
            certificates: Some(certificates),
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
        self.forget_unused_identities(&desired);
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
        let local: HashMap<PodKey, Arc<LocalPod>> = self
            .pods
            .iter()
            .map(|(k, st)| (k.clone(), st.local.clone()))
            .collect();
        self.shared.local_pods.store(Arc::new(local));
        self.shared.metrics.set_enrolled_pods(self.pods.len());
        if self.failed.is_empty()
            && let Some(pending) = self.certificates.take()
        {
            pending.done();
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
        // HBONE: peers' agents connect to <pod IP>:15008.
        let hbone_v4 = netns
            .listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)))
            .with_context(|| format!("HBONE listener 0.0.0.0:{HBONE_PORT}"))?;
        let hbone_v6 = netns
            .listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, HBONE_PORT)))
            .ok();
        // Plaintext inbound, steered here by the sk_lookup program.
        let capture = netns
            .listen_any(INBOUND_CAPTURE_PORT)
            .with_context(|| format!("inbound capture listener port {INBOUND_CAPTURE_PORT}"))?;
        for ip in &pod.ips {
            self.shared
                .kernel
                .add_capture_listener(*ip, &capture)
                .with_context(|| format!("capture map entry for {ip}"))?;
        }
        let cookie = netns_cookie(v4.as_fd()).context("SO_NETNS_COOKIE (Linux 5.14+)")?;
        let identity = self.shared.identity_of(pod);
        // Issued now, so the first handshake does not wait for it.
        self.shared.certs.get(&identity)?;
        let workload_id = self.id_for(&pod.key());
        let local = Arc::new(LocalPod {
            pod: pod.clone(),
            identity,
            workload_id,
            netns_cookie: cookie,
            netns,
        });
        let mut listeners = JoinSet::new();
        for l in std::iter::once(v4).chain(v6) {
            let (shared, local) = (self.shared.clone(), local.clone());
            listeners.spawn(proxy::accept_loop(shared, local, l, outbound::serve));
        }
        for l in std::iter::once(hbone_v4).chain(hbone_v6) {
            let (shared, local) = (self.shared.clone(), local.clone());
            listeners.spawn(proxy::accept_loop(shared, local, l, inbound::serve));
        }
        listeners.spawn(proxy::accept_loop(
            self.shared.clone(),
            local.clone(),
            capture,
            capture::serve,
        ));
        let flags = if self.shared.sockmap {
            ENROLLED_FLAG_SOCKMAP
        } else {
            0
        };
        // Capture first: a failure here leaves no map entry behind.
        self.shared
            .kernel
            .attach_capture(&local.netns, cookie)
            .context("attaching inbound capture (sk_lookup) to the pod's netns")?;
        self.shared
            .kernel
            .enrol(cookie, EnrolledPod { workload_id, flags })?;
        Ok(EnrolledState { local, listeners })
    }

    /// Removes what a previous agent left for pods that are gone (map
    /// entries, capture links); true once done. Not while any local pod
    /// failed to enrol: its netns cookie is unknown, and removing its old
    /// entries would drop the protection a previous agent set up for it.
    fn remove_stale(&self) -> bool {
        if self.has_failures() {
            return false;
        }
        let current: HashSet<u64> = self.pods.values().map(|p| p.local.netns_cookie).collect();
        let kernel = &self.shared.kernel;
        for cookie in kernel.enrolled_cookies() {
            if !current.contains(&cookie) {
                kernel.unenrol(cookie);
                info!(netns_cookie = cookie, "removed a stale enrolment");
            }
        }
        true
    }

    /// Certificates of identities no local pod runs as any more.
    fn forget_unused_identities(&self, desired: &HashMap<PodKey, &Pod>) {
        let wanted: HashSet<_> = desired
            .values()
            .map(|p| self.shared.identity_of(p))
            .collect();
        for st in self.pods.values() {
            if !wanted.contains(&st.local.identity) {
                self.shared.certs.forget(&st.local.identity);
            }
        }
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

/// Renews certificates at half-life; checked every second, so short test
/// lifetimes work too.
async fn renew_certificates(certs: Arc<CertStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let certs = certs.clone();
        let _ = tokio::task::spawn_blocking(move || certs.renew_due()).await;
    }
}

/// Reloads the trust bundle when its file changes (old and new roots can be
/// listed together during a rotation). A bad file keeps the old roots.
fn watch_trust_bundle(
    certs: Arc<CertStore>,
    path: &std::path::Path,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let name = path.file_name().map(|n| n.to_owned());
    let path = path.to_owned();
    Ok(fswatch::watch(
        &dir,
        move |n| Some(n) == name.as_deref(),
        move || match certs.reload_bundle(&path) {
            Ok(n) => info!(roots = n, file = %path.display(), "trust bundle reloaded"),
            Err(e) => error!("trust bundle rejected, keeping the previous roots: {e}"),
        },
    )?)
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!("raising the open-file limit: {e}");
    }
}
