//! Enrolment: keeps the node's local pods in the mesh as the workload state
//! changes. A local pod gets listeners inside its netns (outbound, DNS,
//! HBONE, plaintext capture), its certificate, its capture program and its
//! enrolment entry, in that order; a pod that goes loses them (and the DNS
//! answers recorded for it).
//!
//! A pod's netns comes from the CNI plugin ([`crate::cni`]: handed over
//! while the runtime creates the sandbox) or, outside Kubernetes, from the
//! workload source's netns path. A pod the plugin enrolled leaves the mesh
//! on its CNI DEL, when the source says it is out of the mesh, or when its
//! netns is unmounted, never merely because the source stopped listing it
//! (a restart before the API watch synced, a cut file).
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use nodemesh_common::{
    DNS_PORT, ENROLLED_FLAG_SOCKMAP, EnrolledPod, INBOUND_CAPTURE_PORT, OUTBOUND_PORT,
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use nodemesh_cni::protocol::{Outcome, Response};
use tokio::{sync::oneshot, time::Instant};

use crate::{
    cni::{CniNetns, CniRecord, CniRecords, CniRequest, server::error},
    datapath::{NetnsHandle, PodNetworks},
    proxy::{self, LocalPod, ProxyInputs, capture, dns, inbound, outbound},
    readiness::Pending,
    state::{Pod, PodKey},
};

#[derive(Default)]
pub struct EnrolmentMetrics {
    enrolled_pods: Gauge,
    repairs: Counter,
}

impl EnrolmentMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "enrolled_pods",
            "Local pods enrolled in the mesh",
            m.enrolled_pods.clone(),
        );
        registry.register(
            "enrolment_repairs",
            "Enrolled pods found without their kernel state (enrolment entry or capture link), or whose netns path had come to name another namespace, and enrolled again",
            m.repairs.clone(),
        );
        m
    }
}

struct EnrolledState {
    local: Arc<LocalPod>,
    /// The sandbox the CNI plugin enrolled it in, if it did.
    container: Option<String>,
    listeners: JoinSet<()>,
}

/// A CNI ADD waiting for its pod: to appear in the workload source (while
/// `adopt` still holds its netns), then to be enrolled.
struct PendingAdd {
    key: PodKey,
    uid: Option<String>,
    container_id: String,
    adopt: Option<(CniRecord, std::fs::File)>,
    deadline: Instant,
    wait: std::time::Duration,
    reply: oneshot::Sender<Response>,
}

/// A local pod as it should be enrolled.
struct Desired {
    /// As the source gave it, with the CNI's addresses (or as last
    /// enrolled, for a kept CNI pod).
    effective: Arc<Pod>,
    container: Option<String>,
}

pub struct Enrolment {
    inputs: Arc<ProxyInputs>,
    networks: Arc<dyn PodNetworks>,
    metrics: EnrolmentMetrics,
    /// Done once every local pod is enrolled (with its certificate).
    certificates: Option<Pending>,
    pods: HashMap<PodKey, EnrolledState>,
    ids: HashMap<PodKey, u32>,
    next_id: u32,
    /// Pods that failed to enrol, and why (retried).
    failed: HashMap<PodKey, String>,
    /// Local pods without an address yet, reported once each.
    waiting_for_ip: HashSet<PodKey>,
    /// Local pods waiting for their CNI ADD (no netns yet), reported once.
    waiting_for_netns: HashSet<PodKey>,
    /// Pods the CNI plugin handed over, by pod.
    cni: CniRecords,
    pending: Vec<PendingAdd>,
    /// Whether pods without a netns path wait for their CNI ADD (or fail).
    cni_enabled: bool,
    /// CNI pods kept although the source does not list them (warned once).
    kept: HashSet<PodKey>,
    stale_removed: bool,
}

impl Enrolment {
    pub fn new(
        inputs: Arc<ProxyInputs>,
        networks: Arc<dyn PodNetworks>,
        metrics: EnrolmentMetrics,
        certificates: Pending,
        cni: CniRecords,
        cni_enabled: bool,
    ) -> Self {
        Self {
            inputs,
            networks,
            metrics,
            certificates: Some(certificates),
            pods: HashMap::new(),
            ids: HashMap::new(),
            next_id: 1,
            failed: HashMap::new(),
            waiting_for_ip: HashSet::new(),
            waiting_for_netns: HashSet::new(),
            cni,
            pending: Vec::new(),
            cni_enabled,
            kept: HashSet::new(),
            stale_removed: false,
        }
    }

    pub fn enrolled(&self) -> usize {
        self.pods.len()
    }

    pub fn has_failures(&self) -> bool {
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

    /// Brings enrolment in line with the workload state: new local pods get
    /// listeners and a map entry, removed ones lose both. A changed pod is
    /// enrolled anew *before* its old state goes (listeners share the port
    /// through SO_REUSEPORT), so its traffic never bypasses the mesh.
    /// Afterwards, once every local pod enrolled, what a previous agent
    /// left for pods that are gone is removed (once). CNI ADDs waiting for
    /// their pod are answered as soon as it is enrolled (or cannot be).
    pub async fn reconcile(&mut self) {
        loop {
            self.reconcile_once().await;
            if !self.adopt_pending() {
                break;
            }
        }
        self.answer_pending();
    }

    async fn reconcile_once(&mut self) {
        let local = self.inputs.workloads.local_pods();
        let listed: HashSet<PodKey> = local.iter().map(|p| p.key()).collect();
        self.forget_cni_records(&listed);
        let mut desired: HashMap<PodKey, Desired> = HashMap::new();
        self.waiting_for_netns.retain(|k| listed.contains(k));
        let mut unknown_running = 0;
        // Local pods that cannot be enrolled at all (failures kept below).
        let mut no_netns = HashSet::new();
        for pod in local {
            let key = pod.key();
            let cni = self.cni.pods.get(&key);
            if cni.is_none() && pod.netns.is_none() {
                if !self.cni_enabled {
                    no_netns.insert(key.clone());
                    self.fail(
                        &key,
                        "no netns path, and enrolment by CNI is off (no `cni` section in the agent config)".into(),
                    );
                    continue;
                }
                if !pod.ips.is_empty() {
                    // Running (it has an address) with its netns unknown.
                    unknown_running += 1;
                }
                if self.waiting_for_netns.insert(key.clone()) {
                    info!(pod = %key, "local pod has no netns yet; enrolled by its CNI ADD");
                }
                continue;
            }
            self.waiting_for_netns.remove(&key);
            // The CNI's addresses are the kernel's: the API may not have
            // them yet when the sandbox is created.
            let effective = match cni {
                Some(c) if c.record.ips != pod.ips => Arc::new(Pod {
                    ips: c.record.ips.clone(),
                    ..(*pod).clone()
                }),
                _ => pod.clone(),
            };
            if effective.ips.is_empty() {
                if self.waiting_for_ip.insert(key.clone()) {
                    info!(pod = %key, "local pod has no IP yet; enrolled once it has one");
                }
                continue;
            }
            self.waiting_for_ip.remove(&key);
            let container = cni.map(|c| c.record.container_id.clone());
            desired.insert(
                key,
                Desired {
                    effective,
                    container,
                },
            );
        }
        // Pods the plugin enrolled that the source does not list: kept as
        // last enrolled while their netns is mounted.
        let mut kept = HashSet::new();
        for (key, c) in &self.cni.pods {
            if listed.contains(key) {
                continue;
            }
            if let Some(pod) = &c.record.pod {
                kept.insert(key.clone());
                if !self.kept.contains(key) {
                    warn!(pod = %key, netns = %c.record.netns.display(), "pod enrolled by CNI is missing from the workload source while its netns is mounted: kept in the mesh until its CNI DEL, its removal as out of the mesh, or its netns unmounted");
                }
                desired.insert(
                    key.clone(),
                    Desired {
                        effective: Arc::new(pod.clone()),
                        container: Some(c.record.container_id.clone()),
                    },
                );
            }
        }
        self.kept = kept;
        let removed: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in removed {
            if let Some(mut st) = self.pods.remove(&key) {
                self.inputs.datapath.unenrol(st.local.netns_cookie);
                st.listeners.abort_all();
                self.inputs.dns.forget(st.local.workload_id);
                info!(pod = %key, "unenrolled");
            }
        }
        self.failed
            .retain(|k, _| desired.contains_key(k) || no_netns.contains(k));
        self.waiting_for_ip.retain(|k| {
            self.inputs
                .workloads
                .pod(k)
                .is_some_and(|p| p.ips.is_empty())
        });
        self.forget_unused_identities(&desired);
        let mut records_changed = false;
        for (key, d) in desired {
            if self
                .pods
                .get(&key)
                .is_some_and(|st| *st.local.pod == *d.effective && st.container == d.container)
            {
                continue;
            }
            let handle = match self.cni.pods.get(&key).map(|c| c.handle.try_clone()) {
                Some(Ok(h)) => Some(h),
                Some(Err(e)) => {
                    self.fail(&key, format!("duplicating its netns descriptor: {e}"));
                    continue;
                }
                None => None,
            };
            match self.enrol(&d.effective, handle.as_ref()).await {
                Ok(mut st) => {
                    info!(
                        pod = %key,
                        netns = %st.local.network.describe(),
                        netns_cookie = st.local.netns_cookie,
                        "enrolled"
                    );
                    self.failed.remove(&key);
                    st.container = d.container;
                    let new_cookie = st.local.netns_cookie;
                    if let Some(c) = self.cni.pods.get_mut(&key) {
                        c.record.cookie = new_cookie;
                        c.record.pod = Some((*d.effective).clone());
                        records_changed = true;
                    }
                    if let Some(mut old) = self.pods.insert(key, st) {
                        old.listeners.abort_all();
                        // A new netns (the pod was recreated): the old one's
                        // entry goes; the same netns was just overwritten.
                        if old.local.netns_cookie != new_cookie {
                            self.inputs.datapath.unenrol(old.local.netns_cookie);
                        }
                    }
                }
                Err(e) => self.fail(&key, e),
            }
        }
        if records_changed {
            self.cni.save();
        }
        let local: HashMap<PodKey, Arc<LocalPod>> = self
            .pods
            .iter()
            .map(|(k, st)| (k.clone(), st.local.clone()))
            .collect();
        self.inputs.local_pods.store(Arc::new(local));
        self.metrics.enrolled_pods.set(self.pods.len() as i64);
        if self.failed.is_empty()
            && let Some(pending) = self.certificates.take()
        {
            pending.done();
        }
        // Not while a running pod's netns is unknown: its entries may be
        // among those a previous agent left, and removing them would take
        // it out of the mesh with nothing to put it back.
        if !self.stale_removed && unknown_running == 0 {
            self.stale_removed = self.remove_stale();
        }
    }

    fn fail(&mut self, key: &PodKey, reason: String) {
        if self.failed.insert(key.clone(), reason.clone()).is_none() {
            error!(pod = %key, "enrolment failed (retrying): {reason}");
        }
    }

    /// Drops the records of pods the plugin enrolled that have left: taken
    /// out of the mesh by the source, their netns unmounted (the sandbox is
    /// gone), or superseded by a newer pod of the same name in the source.
    fn forget_cni_records(&mut self, listed: &HashSet<PodKey>) {
        let workloads = &self.inputs.workloads;
        let before = self.cni.pods.len();
        self.cni.pods.retain(|key, c| {
            if workloads.is_out_of_mesh(key, c.record.uid.as_deref()) {
                info!(pod = %key, "pod taken out of the mesh; its CNI record is dropped");
                return false;
            }
            if !c.still_mounted() {
                info!(pod = %key, netns = %c.record.netns.display(), "netns of a pod enrolled by CNI is unmounted: the pod left");
                return false;
            }
            if listed.contains(key)
                && let (Some(recorded), Some(current)) = (
                    &c.record.uid,
                    workloads.pod(key).and_then(|p| p.uid.clone()),
                )
                && *recorded != current
            {
                info!(pod = %key, old_uid = %recorded, uid = %current, "a newer pod of this name replaced the one enrolled; waiting for its CNI ADD");
                return false;
            }
            true
        });
        if self.cni.pods.len() != before {
            self.cni.save();
        }
    }

    /// Checks every enrolled pod against the kernel: its enrolment entry and
    /// capture link must still be there, and a pod enrolled by netns path
    /// must still have that namespace at its path (a sandbox replaced under
    /// the same name and path gets no new enrolment otherwise: Istio's node
    /// reboot bugs). A pod that fails is enrolled again; true if any did.
    pub fn verify(&mut self) -> bool {
        let mut lost = Vec::new();
        for (key, st) in &self.pods {
            let cookie = st.local.netns_cookie;
            if !self.inputs.datapath.enrolment_intact(cookie) {
                error!(pod = %key, netns_cookie = cookie, "the kernel no longer has this pod's enrolment (entry or capture link gone): enrolling it again");
                lost.push((key.clone(), None));
                continue;
            }
            if st.container.is_none()
                && st.local.pod.netns.is_some()
                && let Ok(now) = self
                    .networks
                    .open(&st.local.pod, None)
                    .and_then(|n| n.cookie())
                && now != cookie
            {
                warn!(pod = %key, netns = %st.local.network.describe(), "the netns path now names another namespace: enrolling the pod in it");
                lost.push((key.clone(), Some(cookie)));
            }
        }
        for (key, stale) in &lost {
            if let Some(mut st) = self.pods.remove(key) {
                st.listeners.abort_all();
            }
            if let Some(cookie) = stale {
                self.inputs.datapath.unenrol(*cookie);
            }
            self.metrics.repairs.inc();
        }
        !lost.is_empty()
    }

    /// Local pods in the mesh whose netns is unknown (no CNI ADD seen, no
    /// netns path) but whose processes run: found by their cgroup in
    /// `proc_root` ([`crate::cni::recover`]) and enrolled in their netns if
    /// it holds one of their addresses. True if any was found.
    pub fn recover_running_pods(
        &mut self,
        proc_root: &std::path::Path,
        netns_dir: &std::path::Path,
        holds: &dyn Fn(&NetnsHandle, std::net::IpAddr) -> bool,
    ) -> bool {
        let workloads = &self.inputs.workloads;
        let wanted: HashMap<String, PodKey> = workloads
            .local_pods()
            .into_iter()
            .filter(|p| p.netns.is_none() && !p.ips.is_empty())
            .filter(|p| !self.cni.pods.contains_key(&p.key()))
            .filter_map(|p| Some((p.uid.clone()?, p.key())))
            .collect();
        let mut found = false;
        for (key, handle) in crate::cni::recover::scan(proc_root, netns_dir, &wanted) {
            let Some(pod) = workloads.pod(&key) else {
                continue;
            };
            if !pod.ips.iter().any(|ip| holds(&handle, *ip)) {
                warn!(pod = %key, netns = %handle.path.display(), "a process of this pod runs in a netns without the pod's addresses; not taken as the pod's");
                continue;
            }
            info!(pod = %key, netns = %handle.path.display(), "running pod found by its processes: enrolling it in their netns");
            let record = CniRecord {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: pod.uid.clone(),
                container_id: String::new(),
                netns: handle.path.clone(),
                ips: pod.ips.clone(),
                cookie: 0,
                pod: None,
            };
            self.cni.pods.insert(key, CniNetns { record, handle });
            found = true;
        }
        if found {
            self.cni.save();
        }
        found
    }

    /// Whether a pod whose netns the plugin handed over left (its netns
    /// unmounted); checked every second, as a DEL may never come.
    pub fn cni_pods_left(&self) -> bool {
        self.cni.pods.values().any(|c| !c.still_mounted())
    }

    /// Carries out one request of the CNI plugin (answered through its
    /// reply channel, an ADD once its pod is enrolled or cannot be).
    pub async fn handle_cni(&mut self, request: CniRequest) {
        match request {
            CniRequest::Add {
                record,
                netns,
                wait,
                reply,
            } => {
                let key = record.key();
                let workloads = &self.inputs.workloads;
                if workloads.is_out_of_mesh(&key, record.uid.as_deref()) {
                    let _ = reply.send(Response {
                        outcome: Outcome::NotMeshed,
                        message: String::new(),
                    });
                    return;
                }
                if record.ips.is_empty() {
                    let _ = reply.send(error(format!(
                        "the previous plugin gave pod {key} no address; nothing to capture"
                    )));
                    return;
                }
                if crate::inpod::is_agent_netns(&netns) {
                    let _ = reply.send(error(format!(
                        "the netns handed over for pod {key} is the agent's own"
                    )));
                    return;
                }
                // A newer ADD for the same pod replaces a waiting one.
                for p in std::mem::take(&mut self.pending) {
                    if p.key == key {
                        let _ = p.reply.send(error(format!(
                            "superseded by the ADD of sandbox {}",
                            record.container_id
                        )));
                    } else {
                        self.pending.push(p);
                    }
                }
                self.pending.push(PendingAdd {
                    key,
                    uid: record.uid.clone(),
                    container_id: record.container_id.clone(),
                    adopt: Some((*record, netns)),
                    deadline: Instant::now() + wait,
                    wait,
                    reply,
                });
                self.reconcile().await;
            }
            CniRequest::Del {
                pod,
                container_id,
                reply,
            } => {
                let same = |c: &str| container_id.is_empty() || c == container_id;
                for p in std::mem::take(&mut self.pending) {
                    if p.key == pod && same(&p.container_id) {
                        let _ = p.reply.send(error("the sandbox was deleted".into()));
                    } else {
                        self.pending.push(p);
                    }
                }
                // A record the /proc scan made knows no sandbox: any DEL
                // of the pod is for it.
                if self.cni.pods.get(&pod).is_some_and(|c| {
                    c.record.container_id.is_empty() || same(&c.record.container_id)
                }) {
                    self.cni.pods.remove(&pod);
                    self.cni.save();
                    self.reconcile().await;
                }
                let _ = reply.send(Response {
                    outcome: Outcome::Removed,
                    message: String::new(),
                });
            }
            CniRequest::Check {
                pod,
                container_id,
                reply,
            } => {
                let response = if self.inputs.workloads.is_out_of_mesh(&pod, None) {
                    Response {
                        outcome: Outcome::NotMeshed,
                        message: String::new(),
                    }
                } else if self
                    .pods
                    .get(&pod)
                    .is_some_and(|st| st.container.as_deref() == Some(container_id.as_str()))
                {
                    Response {
                        outcome: Outcome::Enrolled,
                        message: String::new(),
                    }
                } else {
                    error(format!(
                        "pod {pod} is not enrolled in sandbox {container_id}"
                    ))
                };
                let _ = reply.send(response);
            }
        }
    }

    /// Takes the netns of waiting ADDs whose pod the source now lists as a
    /// local pod (of the same UID, where both know it); true if any was
    /// taken, so enrolment runs again.
    fn adopt_pending(&mut self) -> bool {
        let mut adopted = false;
        for p in &mut self.pending {
            let Some((record, _)) = &p.adopt else {
                continue;
            };
            let Some(pod) = self.inputs.workloads.pod(&p.key) else {
                continue;
            };
            if !self.inputs.workloads.is_local(&pod) {
                continue;
            }
            if let (Some(a), Some(b)) = (&record.uid, &pod.uid)
                && a != b
            {
                continue;
            }
            let Some((mut record, file)) = p.adopt.take() else {
                continue;
            };
            // The same sandbox again (a repeated ADD): what it was enrolled
            // with stays, so a restart still recognises its netns.
            if let Some(old) = self.cni.pods.get(&p.key)
                && old.record.container_id == record.container_id
                && old.record.netns == record.netns
            {
                record.cookie = old.record.cookie;
                record.pod = old.record.pod.clone();
            }
            let handle = NetnsHandle {
                file,
                path: record.netns.clone(),
            };
            self.cni
                .pods
                .insert(p.key.clone(), CniNetns { record, handle });
            adopted = true;
        }
        if adopted {
            self.cni.save();
        }
        adopted
    }

    /// Answers the waiting ADDs that are done: enrolled, failed, out of the
    /// mesh, on another node, or past their deadline.
    pub fn answer_pending(&mut self) {
        let now = Instant::now();
        for p in std::mem::take(&mut self.pending) {
            match self.outcome(&p, now) {
                Some(response) => {
                    match response.outcome {
                        Outcome::Enrolled => info!(pod = %p.key, "CNI ADD answered: enrolled"),
                        Outcome::NotMeshed => {
                            info!(pod = %p.key, "CNI ADD answered: not in the mesh")
                        }
                        _ => {}
                    }
                    let _ = p.reply.send(response);
                }
                None => self.pending.push(p),
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn outcome(&self, p: &PendingAdd, now: Instant) -> Option<Response> {
        let workloads = &self.inputs.workloads;
        let answer = |outcome| {
            Some(Response {
                outcome,
                message: String::new(),
            })
        };
        if workloads.is_out_of_mesh(&p.key, p.uid.as_deref()) {
            return answer(Outcome::NotMeshed);
        }
        if p.adopt.is_none() {
            if self
                .pods
                .get(&p.key)
                .is_some_and(|st| st.container.as_deref() == Some(p.container_id.as_str()))
            {
                return answer(Outcome::Enrolled);
            }
            if let Some(reason) = self.failed.get(&p.key) {
                return Some(error(format!("enrolling pod {}: {reason}", p.key)));
            }
        } else if let Some(pod) = workloads.pod(&p.key)
            && !workloads.is_local(&pod)
        {
            return Some(error(format!(
                "pod {} runs on node {} in the workload source, not on this node ({})",
                p.key,
                pod.node,
                workloads.node()
            )));
        }
        (now >= p.deadline).then(|| {
            let why = match &p.adopt {
                Some(_) => "is not in the workload source (or not with this UID)",
                None => "was not enrolled",
            };
            error(format!(
                "pod {} {why} after {} ms; the runtime retries",
                p.key,
                p.wait.as_millis()
            ))
        })
    }

    async fn enrol(
        &mut self,
        pod: &Arc<Pod>,
        netns: Option<&NetnsHandle>,
    ) -> Result<EnrolledState, String> {
        let network = self
            .networks
            .open(pod, netns)
            .map_err(|e| format!("opening its network namespace: {e}"))?;
        let context = |what: String| move |e: std::io::Error| format!("{what}: {e}");
        // Listeners first: a map entry without a listener would refuse the
        // pod's connections.
        let v4 = network
            .listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))
            .map_err(context(format!(
                "outbound listener 127.0.0.1:{OUTBOUND_PORT}"
            )))?;
        let v6 = match network.listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(pod = %pod.key(), "no IPv6 outbound listener (IPv6 off in the pod?): {e}");
                None
            }
        };
        // DNS: the kernel sends the pod's UDP queries to port 53 here.
        let (dns_v4, dns_v6) = if self.inputs.config.dns_capture {
            let v4 = network
                .udp_bind(SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT)))
                .map_err(context(format!("DNS listener 127.0.0.1:{DNS_PORT}")))?;
            let v6 = match network.udp_bind(SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PORT))) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(pod = %pod.key(), "no IPv6 DNS listener (IPv6 off in the pod?): {e}");
                    None
                }
            };
            (Some(v4), v6)
        } else {
            (None, None)
        };
        // HBONE: peers' agents connect to <pod IP>:15008.
        let hbone_v4 = network
            .listen(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                inbound::HBONE_PORT,
            )))
            .map_err(context(format!(
                "HBONE listener 0.0.0.0:{}",
                inbound::HBONE_PORT
            )))?;
        let hbone_v6 = network
            .listen(SocketAddr::from((
                Ipv6Addr::UNSPECIFIED,
                inbound::HBONE_PORT,
            )))
            .ok();
        // Plaintext inbound, steered here by the sk_lookup program.
        let capture = network
            .listen_any(INBOUND_CAPTURE_PORT)
            .map_err(context(format!(
                "inbound capture listener port {INBOUND_CAPTURE_PORT}"
            )))?;
        for ip in &pod.ips {
            self.inputs
                .datapath
                .add_capture_listener(*ip, &capture)
                .map_err(context(format!("capture map entry for {ip}")))?;
        }
        let cookie = network.cookie().map_err(context("netns cookie".into()))?;
        let identity = self.inputs.identity_of(pod);
        // Issued now, so the first handshake does not wait for it.
        self.inputs
            .tls
            .certs()
            .get(&identity)
            .await
            .map_err(|e| format!("certificate for {identity}: {e}"))?;
        let workload_id = self.id_for(&pod.key());
        let local = Arc::new(LocalPod {
            pod: pod.clone(),
            identity,
            workload_id,
            netns_cookie: cookie,
            network,
        });
        let mut listeners = JoinSet::new();
        for l in std::iter::once(v4).chain(v6) {
            let (inputs, local) = (self.inputs.clone(), local.clone());
            listeners.spawn(proxy::accept_loop(inputs, local, l, outbound::serve));
        }
        for s in dns_v4.into_iter().chain(dns_v6) {
            let (inputs, local) = (self.inputs.clone(), local.clone());
            listeners.spawn(dns::serve_udp(inputs, local, s));
        }
        for l in std::iter::once(hbone_v4).chain(hbone_v6) {
            let (inputs, local) = (self.inputs.clone(), local.clone());
            listeners.spawn(proxy::accept_loop(inputs, local, l, inbound::serve));
        }
        listeners.spawn(proxy::accept_loop(
            self.inputs.clone(),
            local.clone(),
            capture,
            capture::serve,
        ));
        let flags = if self.inputs.config.sockmap {
            ENROLLED_FLAG_SOCKMAP
        } else {
            0
        };
        // Capture first: a failure here leaves no map entry behind.
        self.inputs
            .datapath
            .attach_capture(&*local.network, cookie)
            .map_err(context(
                "attaching inbound capture (sk_lookup) to the pod's netns".into(),
            ))?;
        self.inputs
            .datapath
            .enrol(cookie, EnrolledPod { workload_id, flags })
            .map_err(context("enrolment map entry".into()))?;
        Ok(EnrolledState {
            local,
            container: None,
            listeners,
        })
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
        let datapath = &self.inputs.datapath;
        for cookie in datapath.enrolled_cookies() {
            if !current.contains(&cookie) {
                datapath.unenrol(cookie);
                info!(netns_cookie = cookie, "removed a stale enrolment");
            }
        }
        true
    }

    /// Certificates of identities no local pod runs as any more.
    fn forget_unused_identities(&self, desired: &HashMap<PodKey, Desired>) {
        let wanted: HashSet<_> = desired
            .values()
            .map(|d| self.inputs.identity_of(&d.effective))
            .collect();
        for st in self.pods.values() {
            if !wanted.contains(&st.local.identity) {
                self.inputs.tls.forget(&st.local.identity);
            }
        }
    }

    pub fn stop_listening(&mut self) {
        for st in self.pods.values_mut() {
            st.listeners.abort_all();
        }
    }
}
