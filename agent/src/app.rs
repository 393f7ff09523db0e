//! Composition: [`build`] checks the files, attaches the kernel programs,
//! starts the servers, sources and watchers and enrols the local pods, and
//! returns the running agent ([`Bound`]); [`Bound::wait_termination`] keeps
//! enrolment in line with the workload state until shutdown, then drains.
//! (ztunnel's `build_with_cert` and `Bound::wait_termination`.)
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Admin, Server},
    cni::{self, CniMetrics, CniRecords, CniRequest},
    config::Config,
    datapath::{Datapath, PodNetworks},
    dns::{DnsProxy, DnsRecords},
    drain::Drain,
    ebpf::{Kernel, Settings},
    enrolment::{Enrolment, EnrolmentMetrics},
    fswatch::{self, ReloadMetrics},
    identity::{CertManager, CertificateAuthority, FileCa},
    inpod::{self, NetnsPaths},
    metrics::MetricsRegistry,
    policy::{PolicyMetrics, PolicyStore},
    proxy::{
        ProxyConfig, ProxyInputs,
        access_log::AccessLog,
        balance::{Balancer, BalancerMetrics, Destination},
        limits::Limits,
        metrics::ProxyMetrics,
        pool::Pool,
    },
    readiness::Readiness,
    state::{FileSourceMetrics, FileWorkloadSource, StateMetrics, WorkloadStore, WorkloadsFile},
    tls::{TlsContext, TrustBundle, read_bundle},
};

/// How often enrolment is retried for pods that failed (netns not there yet).
const RETRY: Duration = Duration::from_secs(2);
/// How often enrolled pods are checked against the kernel.
const VERIFY: Duration = Duration::from_secs(5);
/// How often waiting CNI ADDs are checked for their deadline (and, every
/// tenth time, pods the CNI plugin enrolled for an unmounted netns).
const CNI_CHECK: Duration = Duration::from_millis(100);

/// The next request of the CNI plugin; never, without CNI enrolment.
async fn recv(requests: &mut Option<mpsc::Receiver<CniRequest>>) -> Option<CniRequest> {
    match requests {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Parts that replace the node's own: the in-process tests run the agent
/// with `datapath::loopback` instead of the kernel programs and netns.
#[derive(Default)]
pub struct Components {
    /// Default: the eBPF programs, attached to `cgroupPath`.
    pub datapath: Option<Arc<dyn Datapath>>,
    /// Default: each local pod's netns path.
    pub networks: Option<Arc<dyn PodNetworks>>,
    /// Default: the file CA of `caCertFile` / `caKeyFile`.
    pub ca: Option<Arc<dyn CertificateAuthority>>,
}

/// A running agent.
pub struct Bound {
    config: Config,
    inputs: Arc<ProxyInputs>,
    admin: Arc<Admin>,
    enrolment: Enrolment,
    /// Requests of the CNI plugin (none without `cni`).
    cni_requests: Option<mpsc::Receiver<CniRequest>>,
    cni_server: Option<tokio::task::JoinHandle<()>>,
    // Dropping these stops their watches.
    _workload_source: WorkloadSource,
    #[cfg(feature = "kubernetes")]
    _policy_source: Option<crate::policy::kube::KubePolicySource>,
    _watches: Vec<fswatch::Watch>,
}

/// Where the store's pods and services come from.
#[expect(dead_code, reason = "held, never read: dropping it stops its watches")]
enum WorkloadSource {
    File(FileWorkloadSource),
    #[cfg(feature = "kubernetes")]
    Kube(crate::state::KubeWorkloadSource),
}

/// A client of the API server: the kubeconfig's when one is set, else the
/// pod's service account.
#[cfg(feature = "kubernetes")]
async fn kube_client(settings: &crate::config::KubernetesSettings) -> anyhow::Result<kube::Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "the in-cluster Kubernetes config (KUBERNETES_SERVICE_HOST and the service account token): run in a pod, or set kubernetes.kubeconfig",
        )?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// The policy objects the settings ask for; none with `policies: off`.
#[cfg(feature = "kubernetes")]
fn kube_policy_source(
    client: &kube::Client,
    settings: &crate::config::KubernetesSettings,
    policies: &Arc<PolicyStore>,
    node: &str,
    state_dir: &std::path::Path,
) -> Option<crate::policy::kube::KubePolicySource> {
    use crate::{
        config::PolicySource,
        policy::kube::{ISTIO_GROUP, KubePolicySource, NETWORKING_GROUP, NODEMESH_GROUP},
    };
    // (required, optional): Istio's networking group (ServiceEntry,
    // DestinationRule) is watched where served, never waited for.
    let (required, optional) = match settings.policies {
        PolicySource::Off => return None,
        PolicySource::Auto => (vec![], vec![ISTIO_GROUP, NODEMESH_GROUP, NETWORKING_GROUP]),
        PolicySource::Istio => (vec![ISTIO_GROUP], vec![NETWORKING_GROUP]),
        PolicySource::Nodemesh => (vec![NODEMESH_GROUP], vec![]),
    };
    Some(KubePolicySource::start(
        client.clone(),
        policies.clone(),
        required,
        optional,
        node,
        state_dir.join("policies.json"),
    ))
}

/// Waits for `flag` to turn true, saying every 10 s what it waits for.
#[cfg(feature = "kubernetes")]
async fn wait_until(
    mut flag: tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), flag.wait_for(|v| *v)).await {
            Ok(Ok(_)) => return Ok(()),
            // The source's task ended (a panic): never go on without it.
            Ok(Err(_)) => anyhow::bail!("the source of {what} stopped"),
            Err(_) => warn!(
                waited_s = started.elapsed().as_secs(),
                "still waiting for {what}"
            ),
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let bound = build(config, Components::default()).await?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    bound
        .wait_termination(async move {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await
}

pub async fn build(config: Config, components: Components) -> anyhow::Result<Bound> {
    inpod::remember_agent_netns().context("reading the agent's own netns")?;
    raise_fd_limit();
    // First, so readiness is observable while the rest starts.
    let registry = MetricsRegistry::new();
    let readiness = Readiness::default();
    let attached = readiness.pending("programs attached");
    let policy_loaded = readiness.pending("policy set loaded");
    let certificates = readiness.pending("local workload certificates issued");
    let workloads_synced = config
        .kubernetes
        .is_some()
        .then(|| readiness.pending("workloads synced from the Kubernetes API"));
    let admin = admin::start(&config, registry.clone(), readiness).await?;

    // Everything that can be wrong in files is checked before the kernel is
    // touched.
    let workloads_file = match &config.workloads_file {
        Some(path) => Some(WorkloadsFile::read(path)?),
        None => None,
    };
    let node = match (&workloads_file, &config.kubernetes) {
        (Some(file), _) => file.node.clone(),
        (None, Some(kube)) => kube.node_name.clone(),
        (None, None) => anyhow::bail!("no source of workloads (Config::load requires one)"),
    };
    #[cfg(feature = "kubernetes")]
    let kube_client = match &config.kubernetes {
        Some(settings) => Some(kube_client(settings).await?),
        None => None,
    };
    #[cfg(not(feature = "kubernetes"))]
    if config.kubernetes.is_some() {
        anyhow::bail!("this agent was built without the `kubernetes` feature");
    }
    let (ca, issuer_root): (Arc<dyn CertificateAuthority>, _) = match components.ca {
        Some(ca) => (ca, None),
        None => {
            let ca = FileCa::load(
                &config.ca_cert_file,
                &config.ca_key_file,
                config.cert_lifetime(),
            )?;
            let root = ca.root().clone();
            (Arc::new(ca), Some(root))
        }
    };
    let bundle_path = config.trust_bundle_file().to_owned();
    let roots = read_bundle(&bundle_path)?;
    let bundle = Arc::new(
        TrustBundle::new(&roots)
            .with_context(|| format!("trust bundle {}", bundle_path.display()))?,
    );
    let certs = CertManager::new(ca);
    registry.own(|r| certs.register_metrics(r));
    let tls = TlsContext::new(certs.clone(), bundle, issuer_root);
    tls.check_roots(&bundle_path, &roots);
    // Policy: an invalid set at start-up stops the agent (there is no last
    // good set to keep, and starting with none would allow what it denies).
    let policies = Arc::new(PolicyStore::new(
        &config.root_namespace,
        registry.own(PolicyMetrics::new),
    ));
    if let Some(dir) = &config.policy_dir
        && !policies.reload(dir)
    {
        anyhow::bail!("the policy set in {} is invalid (see above)", dir.display());
    }
    #[cfg(feature = "kubernetes")]
    let policy_source = match (&kube_client, &config.kubernetes) {
        (Some(client), Some(settings)) => {
            kube_policy_source(client, settings, &policies, &node, &config.state_dir)
        }
        _ => None,
    };
    #[cfg(feature = "kubernetes")]
    if let Some(source) = &policy_source {
        // As with an invalid directory at start-up, nothing is enrolled
        // before a valid set is in force: pods never run unprotected.
        wait_until(
            source.loaded(),
            "a valid policy set from the Kubernetes API",
        )
        .await?;
    }
    policy_loaded.done();

    let datapath: Arc<dyn Datapath> = match components.datapath {
        Some(d) => d,
        None => {
            // A bpffs mounted if there is none; `cgroupPath: auto` detected.
            let node = crate::nodefs::prepare(&config)?;
            let kernel = Arc::new(Kernel::install(&Settings {
                bpffs_dir: &config.bpffs_dir,
                cgroup_path: &node.cgroup,
                socket_mark: config.socket_mark,
                sockmap: config.sockmap,
                ebpf_log: config.ebpf_log,
                dns_capture: config.dns.capture,
            })?);
            registry.own(|r| kernel.register_metrics(r));
            if let Some(logger) = kernel.take_logger() {
                tokio::spawn(drain_ebpf_log(logger));
            }
            kernel
        }
    };
    attached.done();
    let access_log = match &config.access_log {
        Some(path) => AccessLog::open(path, config.access_log_format, config.access_log_max_bytes)
            .with_context(|| format!("opening the access log {}", path.display()))?,
        None => AccessLog::disabled(),
    };
    let workloads = Arc::new(WorkloadStore::new(&node, registry.own(StateMetrics::new)));
    let reloads = registry.own(ReloadMetrics::new);
    let workload_source = match &workloads_file {
        Some(file) => WorkloadSource::File(
            FileWorkloadSource::start(
                file,
                workloads.clone(),
                registry.own(|r| FileSourceMetrics::new(r, reloads.clone())),
                &config.state_dir,
            )
            .map_err(anyhow::Error::msg)?,
        ),
        #[cfg(feature = "kubernetes")]
        None => match kube_client {
            Some(client) => {
                let source = crate::state::KubeWorkloadSource::start(client, workloads.clone());
                // Enrolment and the CNI server wait for the whole state, so a
                // local pod is never judged against a partial list.
                wait_until(
                    source.synced(),
                    "the Kubernetes API's pods, services and namespaces",
                )
                .await?;
                if let Some(synced) = workloads_synced {
                    synced.done();
                }
                WorkloadSource::Kube(source)
            }
            None => anyhow::bail!("no source of workloads"),
        },
        #[cfg(not(feature = "kubernetes"))]
        None => anyhow::bail!("no source of workloads"),
    };
    let proxy_config = ProxyConfig::from_config(&config);
    let pool = Pool::new(tls.clone(), proxy_config.sockets.clone(), &config.hbone);
    registry.own(|r| pool.register_metrics(r));
    let dns = Arc::new(DnsRecords::default());
    let dns_proxy =
        Arc::new(registry.own(|r| DnsProxy::new(&config.dns, config.socket_mark, dns.clone(), r)));
    let inputs = Arc::new(ProxyInputs {
        config: proxy_config,
        datapath,
        workloads,
        balancer: Balancer::new(registry.own(BalancerMetrics::new)),
        tls: tls.clone(),
        pool,
        policies: policies.clone(),
        limits: registry.own(|r| Limits::new(&config.limits, r)),
        access_log,
        metrics: ProxyMetrics::new(&registry),
        drain: Drain::default(),
        dns,
        resolver: Arc::new(crate::dns::Resolver::new(
            dns_proxy.upstreams().to_vec(),
            std::time::Duration::from_millis(config.dns.timeout_ms),
        )),
        dns_proxy,
        local_pods: Default::default(),
    });
    admin.set_config_dump(admin::config_dump(config.clone(), inputs.clone()));
    let mut watches = Vec::new();
    if let Some(dir) = &config.policy_dir {
        let (store, d) = (policies.clone(), dir.clone());
        let yaml = |n: &std::ffi::OsStr| {
            n.to_str()
                .is_some_and(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        };
        watches.push(fswatch::watch(dir, yaml, move || {
            store.reload(&d);
        }));
    }
    watches.push(watch_trust_bundle(
        tls.clone(),
        &bundle_path,
        reloads.clone(),
    ));
    tokio::spawn(renew_certificates(certs));

    let networks = components.networks.unwrap_or_else(|| Arc::new(NetnsPaths));
    let records = match &config.cni {
        Some(_) => CniRecords::restore(&config.state_dir, &inpod::cookie_of),
        None => CniRecords::unsaved(),
    };
    let mut enrolment = Enrolment::new(
        inputs.clone(),
        networks,
        registry.own(EnrolmentMetrics::new),
        certificates,
        records,
        config.cni.is_some(),
    );
    if let Some(cni) = &config.cni {
        enrolment.recover_running_pods(&cni.proc_root, &cni.netns_dir, &inpod::holds_address);
    }
    enrolment.reconcile().await;
    // The CNI server starts once the pods enrolled before are back, so an
    // ADD never races their re-enrolment.
    let (mut cni_requests, mut cni_server) = (None, None);
    if let Some(settings) = &config.cni {
        let (tx, rx) = mpsc::channel(64);
        let server =
            cni::server::start(settings, tx, registry.own(CniMetrics::new)).with_context(|| {
                format!(
                    "starting the CNI server on {}",
                    settings.socket_path.display()
                )
            })?;
        cni_requests = Some(rx);
        cni_server = Some(server);
        if let Some(install) = &settings.install {
            watches.push(cni::install::start(settings, install, reloads.clone()));
        }
    }
    info!(
        node = %inputs.workloads.node(),
        enrolled = enrolment.enrolled(),
        admin = %admin.address(Server::Admin),
        stats = %admin.address(Server::Stats),
        "nodemesh agent ready"
    );
    Ok(Bound {
        config,
        inputs,
        admin,
        enrolment,
        cni_requests,
        cni_server,
        _workload_source: workload_source,
        #[cfg(feature = "kubernetes")]
        _policy_source: policy_source,
        _watches: watches,
    })
}

impl Bound {
    pub fn inputs(&self) -> &Arc<ProxyInputs> {
        &self.inputs
    }

    /// Where one of the agent's servers listens (its port when configured
    /// as 0).
    pub fn address(&self, server: Server) -> SocketAddr {
        self.admin.address(server)
    }

    /// Keeps enrolment in line with the workload state until `shutdown`
    /// resolves; then stops accepting, lets open connections finish for
    /// `drainTimeoutSeconds` and flushes the access log.
    pub async fn wait_termination(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut changes = self.inputs.workloads.subscribe();
        let mut retry = tokio::time::interval(RETRY);
        let mut cni_check = tokio::time::interval(CNI_CHECK);
        let mut verify = tokio::time::interval(VERIFY);
        verify.reset();
        let mut cni_requests = self.cni_requests.take();
        let mut ticks: u32 = 0;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                Some(request) = recv(&mut cni_requests) => {
                    self.enrolment.handle_cni(request).await;
                }
                _ = cni_check.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(10) && self.enrolment.cni_pods_left() {
                        self.enrolment.reconcile().await;
                    } else if self.enrolment.has_pending() {
                        self.enrolment.answer_pending();
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() { break; }
                    self.enrolment.reconcile().await;
                    let workloads = self.inputs.workloads.clone();
                    let services: std::collections::HashSet<_> =
                        workloads.services().iter().map(|s| s.key()).collect();
                    let registry = self.inputs.policies.registry();
                    self.inputs.balancer.retain(|k| match k {
                        Destination::Service(s) => services.contains(s),
                        Destination::Host(h) => registry.knows_host(h),
                    });
                }
                _ = verify.tick() => {
                    let recovered = match &self.config.cni {
                        Some(cni) => self.enrolment.recover_running_pods(
                            &cni.proc_root,
                            &cni.netns_dir,
                            &inpod::holds_address,
                        ),
                        None => false,
                    };
                    if self.enrolment.verify() || recovered {
                        self.enrolment.reconcile().await;
                    }
                }
                _ = retry.tick() => {
                    if self.enrolment.has_failures() {
                        self.enrolment.reconcile().await;
                    }
                }
                () = &mut shutdown => break,
            }
        }
        if let Some(server) = self.cni_server.take() {
            server.abort();
        }
        let drain = self.inputs.drain.clone();
        info!(
            active = drain.active(),
            limit_s = self.config.drain_timeout_seconds,
            "draining: no new connections accepted"
        );
        self.enrolment.stop_listening();
        let left = drain.drain(self.config.drain_timeout()).await;
        if left > 0 {
            warn!(
                left,
                "drain deadline reached; closing remaining connections"
            );
        } else {
            info!("drained");
        }
        self.inputs.access_log.flush(Duration::from_secs(2));
        Ok(())
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
async fn renew_certificates(certs: Arc<CertManager>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        certs.renew_due().await;
    }
}

/// Reloads the trust bundle when its file changes (old and new roots can be
/// listed together during a rotation). A bad file keeps the old roots.
fn watch_trust_bundle(
    tls: Arc<TlsContext>,
    path: &std::path::Path,
    reloads: ReloadMetrics,
) -> fswatch::Watch {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let name = path.file_name().map(|n| n.to_owned());
    let path = path.to_owned();
    fswatch::watch(
        &dir,
        move |n| Some(n) == name.as_deref(),
        move || match tls.reload_bundle(&path) {
            Ok(n) => {
                info!(roots = n, file = %path.display(), "trust bundle reloaded");
                reloads.record("trust_bundle", "applied");
            }
            Err(e) => {
                error!("trust bundle rejected, keeping the previous roots: {e}");
                reloads.record("trust_bundle", "rejected");
            }
        },
    )
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!("raising the open-file limit: {e}");
    }
}
