//! Enrolment: keeps the node's local pods in the mesh as the workload state
//! changes. A local pod gets listeners inside its netns (outbound, HBONE,
//! plaintext capture), its certificate, its capture program and its
//! enrolment entry, in that order; a pod that goes loses them.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use nodemesh_common::{ENROLLED_FLAG_SOCKMAP, EnrolledPod, INBOUND_CAPTURE_PORT, OUTBOUND_PORT};
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::{
    datapath::PodNetworks,
    proxy::{self, LocalPod, ProxyInputs, capture, inbound, outbound},
    readiness::Pending,
    state::{Pod, PodKey},
};

#[derive(Default)]
pub struct EnrolmentMetrics {
    enrolled_pods: Gauge,
}

impl EnrolmentMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "enrolled_pods",
            "Local pods enrolled in the mesh",
            m.enrolled_pods.clone(),
        );
        m
    }
}

struct EnrolledState {
    local: Arc<LocalPod>,
    listeners: JoinSet<()>,
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
    failed: HashSet<PodKey>,
    /// Local pods without an address yet, reported once each.
    waiting_for_ip: HashSet<PodKey>,
    stale_removed: bool,
}

impl Enrolment {
    pub fn new(
        inputs: Arc<ProxyInputs>,
        networks: Arc<dyn PodNetworks>,
        metrics: EnrolmentMetrics,
        certificates: Pending,
    ) -> Self {
        Self {
            inputs,
            networks,
            metrics,
            certificates: Some(certificates),
            pods: HashMap::new(),
            ids: HashMap::new(),
            next_id: 1,
            failed: HashSet::new(),
            waiting_for_ip: HashSet::new(),
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
    /// left for pods that are gone is removed (once).
    pub async fn reconcile(&mut self) {
        let mut desired: HashMap<PodKey, Arc<Pod>> = HashMap::new();
        for pod in self.inputs.workloads.local_pods() {
            let key = pod.key();
            if pod.ips.is_empty() {
                if self.waiting_for_ip.insert(key.clone()) {
                    info!(pod = %key, "local pod has no IP yet; enrolled once it has one");
                }
                continue;
            }
            self.waiting_for_ip.remove(&key);
            desired.insert(key, pod);
        }
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
                info!(pod = %key, "unenrolled");
            }
        }
        self.failed.retain(|k| desired.contains_key(k));
        self.waiting_for_ip.retain(|k| {
            self.inputs
                .workloads
                .pod(k)
                .is_some_and(|p| p.ips.is_empty())
        });
        self.forget_unused_identities(&desired);
        for (key, pod) in desired {
            if self.pods.get(&key).is_some_and(|st| *st.local.pod == *pod) {
                continue;
            }
            match self.enrol(&pod).await {
                Ok(st) => {
                    info!(
                        pod = %key,
                        netns = %st.local.network.describe(),
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
                            self.inputs.datapath.unenrol(old.local.netns_cookie);
                        }
                    }
                }
                Err(e) => {
                    if self.failed.insert(key.clone()) {
                        error!(pod = %key, "enrolment failed (retrying): {e}");
                    }
                }
            }
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
        if !self.stale_removed {
            self.stale_removed = self.remove_stale();
        }
    }

    async fn enrol(&mut self, pod: &Arc<Pod>) -> Result<EnrolledState, String> {
        let network = self
            .networks
            .open(pod)
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
    fn forget_unused_identities(&self, desired: &HashMap<PodKey, Arc<Pod>>) {
        let wanted: HashSet<_> = desired
            .values()
            .map(|p| self.inputs.identity_of(p))
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
