//! AuthorizationPolicy and PeerAuthentication objects from the Kubernetes
//! API, with the egress registry's ServiceEntry and DestinationRule
//! objects, applied as one set through the same checks as the policy
//! directory: all or nothing, the last good set stays in force. An invalid
//! object is logged and counted by the store and reported as a Kubernetes
//! Event on the object itself, naming the field (`kubectl describe`
//! shows it to whoever applied it).
//!
//! Watched: the kinds of every group asked for that the API server serves
//! (Istio's `security.istio.io` and the same schema as
//! `security.nodemesh.dev`; Istio's `networking.istio.io`), found by
//! discovery and looked up again every minute, so CRDs installed after the
//! agent are picked up.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher::{self, watcher},
    },
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{LoadError, PolicyStore};
use crate::yaml::YamlError;

/// Istio's group, unchanged.
pub const ISTIO_GROUP: &str = "security.istio.io";
/// Ours, with Istio's schema, for clusters without Istio's CRDs.
pub const NODEMESH_GROUP: &str = "security.nodemesh.dev";
/// Istio's ServiceEntry and DestinationRule (the egress registry),
/// unchanged; no group of ours has them.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
const VERSION: &str = "v1";
const SECURITY_KINDS: [&str; 2] = ["AuthorizationPolicy", "PeerAuthentication"];
const NETWORKING_KINDS: [&str; 2] = ["ServiceEntry", "DestinationRule"];
/// How often the served groups are looked up again.
const REDISCOVER: Duration = Duration::from_secs(60);
/// Between discovery attempts that failed (API server unreachable).
const DISCOVERY_RETRY: Duration = Duration::from_secs(2);
/// An Event's note is at most 1 kB.
const MAX_NOTE: usize = 1000;

/// One policy object, as the compiler reads it.
struct Object {
    /// Names the object in errors: `Kind namespace/name (group/version)`.
    path: PathBuf,
    /// The object as JSON (a YAML document): apiVersion, kind, name,
    /// namespace and spec; status and the rest of metadata are dropped.
    text: String,
    reference: ObjectReference,
}

/// The kinds watched in `group` (a group is served when all are).
fn kinds_of(group: &str) -> &'static [&'static str] {
    match group {
        NETWORKING_GROUP => &NETWORKING_KINDS,
        _ => &SECURITY_KINDS,
    }
}

/// Keeps the policy store in line with the API while it is kept.
pub struct KubePolicySource {
    task: tokio::task::JoinHandle<()>,
    loaded: watch::Receiver<bool>,
}

impl Drop for KubePolicySource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubePolicySource {
    /// Watches the groups of `required` and `optional`, each when served.
    /// A `required` group that is not served keeps the agent waiting
    /// (logged); an optional one is watched once it is, and none served
    /// means an empty set. `node` names the reporter of Events.
    pub fn start(
        client: Client,
        store: Arc<PolicyStore>,
        required: Vec<&'static str>,
        optional: Vec<&'static str>,
        node: &str,
        saved: PathBuf,
    ) -> Self {
        let (loaded_tx, loaded) = watch::channel(false);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "nodemesh-agent".into(),
                instance: Some(node.to_owned()),
            },
        );
        let sink = Sink {
            store,
            recorder,
            loaded: loaded_tx,
            saved,
        };
        let task = tokio::spawn(run(client, sink, required, optional));
        Self { task, loaded }
    }

    /// Turns true once a valid set from every watched kind is in force.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.clone()
    }
}

/// Where a set goes: the store, Events for its errors, readiness, and the
/// last good set saved for a restart.
struct Sink {
    store: Arc<PolicyStore>,
    recorder: Recorder,
    loaded: watch::Sender<bool>,
    /// The last set applied (`stateDir`): a restarted agent that finds the
    /// API's set invalid starts with it instead of waiting for a fix.
    saved: PathBuf,
}

/// The groups of `groups` the API server serves; None when it could not
/// be asked.
async fn served_groups(client: &Client, groups: &[&'static str]) -> Option<Vec<&'static str>> {
    let mut served = Vec::new();
    for group in groups {
        match client
            .list_api_group_resources(&format!("{group}/{VERSION}"))
            .await
        {
            Ok(list) => {
                let kinds: HashSet<&str> = list.resources.iter().map(|r| r.kind.as_str()).collect();
                if kinds_of(group).iter().all(|k| kinds.contains(k)) {
                    served.push(*group);
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                warn!(group, "API discovery failed (retrying): {e}");
                return None;
            }
        }
    }
    Some(served)
}

async fn run(client: Client, sink: Sink, required: Vec<&'static str>, optional: Vec<&'static str>) {
    let groups: Vec<&'static str> = required.iter().chain(&optional).copied().collect();
    // A group once served stays watched: a discovery answer that briefly
    // lacks it (an API server whose CRD cache is not synced yet) must not
    // drop its DENY policies. Its watch retries until it is back.
    let mut ever_served: Vec<&'static str> = Vec::new();
    loop {
        let Some(mut served) = served_groups(&client, &groups).await else {
            tokio::time::sleep(DISCOVERY_RETRY).await;
            continue;
        };
        for g in &ever_served {
            if !served.contains(g) {
                warn!(
                    group = g,
                    "policy group no longer discovered; still watching it"
                );
                served.push(g);
            }
        }
        served.sort();
        ever_served.clone_from(&served);
        let missing: Vec<_> = required.iter().filter(|g| !served.contains(g)).collect();
        if !missing.is_empty() {
            error!(
                ?missing,
                "policy CRDs not served: install them (deploy/kubernetes) or set kubernetes.policies: auto; no policy set is loaded until then"
            );
            tokio::time::sleep(REDISCOVER).await;
            continue;
        }
        let absent: Vec<_> = optional.iter().filter(|g| !served.contains(g)).collect();
        info!(groups = ?served, not_served = ?absent, "watching policy objects (groups not served are looked up again every minute)");
        watch_groups(&client, &sink, &served, &groups).await;
    }
}

type Item = (usize, Result<watcher::Event<DynamicObject>, watcher::Error>);

/// Watches the kinds of `served` until the served groups change.
async fn watch_groups(
    client: &Client,
    sink: &Sink,
    served: &[&'static str],
    groups: &[&'static str],
) {
    let kinds: Vec<(&str, &str)> = served
        .iter()
        .flat_map(|g| kinds_of(g).iter().map(|k| (*g, *k)))
        .collect();
    let streams: Vec<BoxStream<'static, Item>> = kinds
        .iter()
        .enumerate()
        .map(|(i, (group, kind))| {
            let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, VERSION, kind));
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |e| (i, e))
                .boxed()
        })
        .collect();
    let mut events = futures_util::stream::select_all(streams);
    let mut objects: BTreeMap<(usize, String, String), Object> = BTreeMap::new();
    let mut listing: HashMap<usize, BTreeMap<(usize, String, String), Object>> = HashMap::new();
    let mut synced: HashSet<usize> = HashSet::new();
    let mut reported: HashSet<(String, String)> = HashSet::new();
    let mut rediscover = tokio::time::interval(REDISCOVER);
    rediscover.reset();
    if kinds.is_empty() {
        // Nothing to watch: an empty set, until a group is served.
        apply(sink, &objects, &mut reported);
        loop {
            rediscover.tick().await;
            if let Some(mut now) = served_groups(client, groups).await
                && {
                    now.sort();
                    now != served
                }
            {
                return;
            }
        }
    }
    loop {
        tokio::select! {
            item = events.next() => {
                let Some((i, event)) = item else { return };
                let (group, kind) = kinds[i];
                let changed = match event {
                    Err(e) => {
                        warn!(group, kind, "policy watch failed (retrying): {e}");
                        false
                    }
                    Ok(watcher::Event::Init) => {
                        listing.insert(i, BTreeMap::new());
                        false
                    }
                    Ok(watcher::Event::InitApply(o)) => {
                        let o = object(group, kind, o);
                        listing.entry(i).or_default().insert(key(i, &o), o);
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        // A relist is authoritative: what it left out is gone.
                        objects.retain(|k, _| k.0 != i);
                        objects.extend(listing.remove(&i).unwrap_or_default());
                        synced.insert(i);
                        true
                    }
                    Ok(watcher::Event::Apply(o)) => {
                        let o = object(group, kind, o);
                        objects.insert(key(i, &o), o);
                        true
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        let o = object(group, kind, o);
                        objects.remove(&key(i, &o));
                        true
                    }
                };
                if changed && synced.len() == kinds.len() {
                    apply(sink, &objects, &mut reported);
                }
            }
            _ = rediscover.tick() => {
                if let Some(mut now) = served_groups(client, groups).await
                    && {
                        now.sort();
                        now.iter().any(|g| !served.contains(g))
                    }
                {
                    info!(before = ?served, now = ?now, "served policy groups changed");
                    return;
                }
            }
        }
    }
}

fn key(i: usize, o: &Object) -> (usize, String, String) {
    (
        i,
        o.reference.namespace.clone().unwrap_or_default(),
        o.reference.name.clone().unwrap_or_default(),
    )
}

fn object(group: &str, kind: &str, o: DynamicObject) -> Object {
    let name = o.metadata.name.clone().unwrap_or_default();
    let namespace = o.metadata.namespace.clone().unwrap_or_default();
    let api_version = format!("{group}/{VERSION}");
    let spec = o.data.get("spec").cloned().unwrap_or(json!({}));
    let document = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    });
    Object {
        path: PathBuf::from(format!("{kind} {namespace}/{name} ({api_version})")),
        text: serde_json::to_string_pretty(&document).unwrap_or_default(),
        reference: ObjectReference {
            api_version: Some(api_version),
            kind: Some(kind.to_owned()),
            name: Some(name),
            namespace: Some(namespace),
            uid: o.metadata.uid,
            resource_version: o.metadata.resource_version,
            ..Default::default()
        },
    }
}

/// Applies the objects as one set; on errors, reports each on its object
/// (once per object and message; posted by a task of its own, so a slow
/// API server never holds up the watches).
fn apply(
    sink: &Sink,
    objects: &BTreeMap<(usize, String, String), Object>,
    reported: &mut HashSet<(String, String)>,
) {
    let texts: super::Texts = objects
        .values()
        .map(|o| (o.path.clone(), o.text.clone()))
        .collect();
    let errors = match sink.store.replace(texts.clone()) {
        Ok(()) => {
            reported.clear();
            sink.loaded.send_replace(true);
            save(&sink.saved, &texts);
            return;
        }
        Err(e) => object_errors(&e),
    };
    if !*sink.loaded.borrow() {
        restore(sink);
    }
    for (path, note) in errors {
        let Some(o) = objects.values().find(|o| o.path == path) else {
            continue;
        };
        let uid = o
            .reference
            .uid
            .clone()
            .unwrap_or_else(|| path.display().to_string());
        if !reported.insert((uid, note.clone())) {
            continue;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidPolicy".into(),
            note: Some(truncate(format!(
                "rejected by nodemesh: {note}; the policy set in force stays until this is fixed"
            ))),
            action: "Validate".into(),
            secondary: None,
        };
        let (recorder, reference, object) =
            (sink.recorder.clone(), o.reference.clone(), o.path.clone());
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(object = %object.display(), "posting the Event failed: {e}");
            }
        });
    }
}

fn save(path: &std::path::Path, texts: &super::Texts) {
    let doc: Vec<(String, &str)> = texts
        .iter()
        .map(|(p, t)| (p.display().to_string(), t.as_str()))
        .collect();
    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
    if let Err(e) = crate::files::write_atomically(path, &bytes) {
        warn!(file = %path.display(), "saving the policy set in force: {e}");
    }
}

/// At start-up with an invalid set in the API: the set a previous agent
/// last applied, if it saved one (else readiness keeps waiting, and no
/// pod is enrolled without its policies).
fn restore(sink: &Sink) {
    let Ok(text) = crate::files::read_text(&sink.saved, crate::files::MAX_WORKLOADS_BYTES) else {
        error!(
            "the policy set in the API is invalid and no earlier set was saved: waiting for a fix (see the Events above)"
        );
        return;
    };
    let texts: super::Texts = match serde_json::from_str::<Vec<(String, String)>>(&text) {
        Ok(doc) => doc
            .into_iter()
            .map(|(p, t)| (PathBuf::from(p), t))
            .collect(),
        Err(e) => {
            warn!(file = %sink.saved.display(), "the saved policy set is unreadable: {e}");
            return;
        }
    };
    if sink.store.replace(texts).is_ok() {
        warn!(
            file = %sink.saved.display(),
            "the policy set in the API is invalid: starting with the last good set a previous agent applied"
        );
        sink.loaded.send_replace(true);
    }
}

/// Each error with the pseudo path of the object it is in, the field and
/// the message (the line and column point into the agent's rendering, so
/// they are left out).
fn object_errors(e: &LoadError) -> Vec<(PathBuf, String)> {
    match e {
        LoadError::Invalid(errors) => errors
            .iter()
            .map(|e| {
                // One object is one document: its index says nothing.
                let field = e.field.strip_prefix("document 0: ").unwrap_or(&e.field);
                (e.file.clone(), format!("{field}: {}", e.message))
            })
            .collect(),
        LoadError::Yaml(YamlError::Parse { path, message }) => {
            vec![(path.clone(), message.clone())]
        }
        LoadError::Yaml(YamlError::Invalid {
            path,
            field,
            message,
        }) => vec![(path.clone(), format!("{field}: {message}"))],
        LoadError::Yaml(YamlError::File(_)) | LoadError::Dir { .. } => Vec::new(),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_NOTE {
        let mut end = MAX_NOTE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyMetrics;

    fn dynamic(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).expect("a DynamicObject")
    }

    fn policy(name: &str, ports: &[&str]) -> DynamicObject {
        dynamic(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}], "annotations": {"a": "b"}},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ports}}]}]},
            "status": {"validationMessages": []},
        }))
    }

    #[test]
    fn objects_compile_as_documents_and_errors_name_the_object_and_field() {
        let store = PolicyStore::new("istio-system", PolicyMetrics::default());
        let good = object(
            ISTIO_GROUP,
            "AuthorizationPolicy",
            policy("deny-8080", &["8080"]),
        );
        assert_eq!(
            good.path,
            PathBuf::from("AuthorizationPolicy shop/deny-8080 (security.istio.io/v1)")
        );
        assert_eq!(good.reference.uid.as_deref(), Some("u-1"));
        // Status and the rest of metadata are not the policy's: dropped.
        assert!(!good.text.contains("status") && !good.text.contains("managedFields"));
        store
            .replace(vec![(good.path.clone(), good.text.clone())])
            .expect("a valid set");
        assert_eq!(store.names(), ["shop/deny-8080"]);

        let bad = object(NODEMESH_GROUP, "AuthorizationPolicy", policy("bad", &["0"]));
        let err = store
            .replace(vec![
                (good.path.clone(), good.text.clone()),
                (bad.path.clone(), bad.text.clone()),
            ])
            .expect_err("port 0 is invalid");
        let errors = object_errors(&err);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].0,
            PathBuf::from("AuthorizationPolicy shop/bad (security.nodemesh.dev/v1)")
        );
        assert!(
            errors[0]
                .1
                .starts_with("spec.rules[0].to[0].operation.ports[0]: "),
            "{}",
            errors[0].1
        );
        // All or nothing: the valid set stays.
        assert_eq!(store.names(), ["shop/deny-8080"]);
        assert_eq!(store.generation(), 1);
    }

    /// The policy source against the scripted FAKE API server
    /// (`state::kube::fake_apiserver`): discovery, lists, watches and the
    /// Events posted, through the real kube-rs client.
    mod api {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use serde_json::Value;
        use tokio::sync::Notify;

        use super::*;
        use crate::state::kube::fake_apiserver::{FakeApiServer, Recorded, WatchScript};

        const WAIT: Duration = Duration::from_secs(20);
        const AP: &str = "/apis/security.istio.io/v1/authorizationpolicies";
        const PA: &str = "/apis/security.istio.io/v1/peerauthentications";
        const SE: &str = "/apis/networking.istio.io/v1/serviceentries";
        const DR: &str = "/apis/networking.istio.io/v1/destinationrules";
        const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

        /// Istio's CRDs served (the networking group if asked), with these
        /// AuthorizationPolicies and no PeerAuthentication.
        fn istio(fake: &FakeApiServer, networking: bool, policies: Vec<Value>) {
            fake.serve_group(
                "security.istio.io/v1",
                &[
                    ("AuthorizationPolicy", "authorizationpolicies"),
                    ("PeerAuthentication", "peerauthentications"),
                ],
            );
            fake.list(AP, "", "", "AuthorizationPolicyList", policies);
            fake.list(PA, "", "", "PeerAuthenticationList", vec![]);
            if networking {
                fake.serve_group(
                    "networking.istio.io/v1",
                    &[
                        ("ServiceEntry", "serviceentries"),
                        ("DestinationRule", "destinationrules"),
                        ("VirtualService", "virtualservices"),
                    ],
                );
            }
        }

        fn service_entry(name: &str, port: u32, rv: &str) -> Value {
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                             "resourceVersion": rv},
                "spec": {"hosts": [format!("{name}.example.com")], "location": "MESH_EXTERNAL",
                         "resolution": "DNS",
                         "ports": [{"number": port, "name": "https", "protocol": "TLS"}]},
            })
        }

        fn destination_rule() -> Value {
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "pim", "namespace": "shop", "uid": "uid-dr",
                             "resourceVersion": "11"},
                "spec": {"host": "pim.example.com", "trafficPolicy": {"connectionPool":
                         {"tcp": {"connectTimeout": "250ms", "maxConnections": 5}}}},
            })
        }

        fn saved_file() -> PathBuf {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            std::env::temp_dir().join(format!(
                "nodemesh-kube-policies-{}-{n}.json",
                std::process::id()
            ))
        }

        fn start(
            fake: &FakeApiServer,
            required: Vec<&'static str>,
            optional: Vec<&'static str>,
        ) -> (KubePolicySource, Arc<PolicyStore>, PathBuf) {
            let store = Arc::new(PolicyStore::new("istio-system", PolicyMetrics::default()));
            let saved = saved_file();
            let source = KubePolicySource::start(
                fake.client(),
                store.clone(),
                required,
                optional,
                "node-a",
                saved.clone(),
            );
            (source, store, saved)
        }

        async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
            let deadline = tokio::time::Instant::now() + WAIT;
            while !f() {
                assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn loaded(source: &KubePolicySource) {
            let mut loaded = source.loaded();
            tokio::time::timeout(WAIT, loaded.wait_for(|l| *l))
                .await
                .expect("the set loaded in time")
                .expect("the source runs");
        }

        fn posted_events(fake: &FakeApiServer) -> Vec<Value> {
            fake.requests()
                .iter()
                .filter(|r: &&Recorded| r.method == "POST" && r.path == EVENTS)
                .map(|r| serde_json::from_str(&r.body).expect("an Event"))
                .collect()
        }

        #[tokio::test]
        async fn service_entries_and_destination_rules_from_the_api_are_in_the_registry() {
            let fake = FakeApiServer::start().await;
            istio(&fake, true, vec![]);
            fake.list(
                SE,
                "",
                "",
                "ServiceEntryList",
                vec![service_entry("pim", 443, "10")],
            );
            fake.list(DR, "", "", "DestinationRuleList", vec![destination_rule()]);
            let (source, store, saved) = start(
                &fake,
                vec![],
                vec![ISTIO_GROUP, NODEMESH_GROUP, NETWORKING_GROUP],
            );
            loaded(&source).await;
            let registry = store.registry();
            let pim = registry.by_name("pim.example.com", 443).expect("pim");
            assert_eq!(pim.entry.name, "shop/pim");
            let policy = registry.connect_policy("pim.example.com", 443);
            assert_eq!(policy.rule.as_deref(), Some("shop/pim"));
            assert_eq!(policy.connect_timeout, Some(Duration::from_millis(250)));
            assert_eq!(policy.max_connections, Some(5));
            // Listed and watched like the security kinds; ours not served.
            for path in [SE, DR, AP, PA] {
                wait_until(&format!("a watch of {path}"), || {
                    fake.requests()
                        .iter()
                        .any(|r| r.path == path && r.is_watch())
                })
                .await;
            }
            assert!(
                fake.requests()
                    .iter()
                    .any(|r| r.path == "/apis/security.nodemesh.dev/v1")
            );
            // The set saved for a restart holds them too.
            let text = std::fs::read_to_string(&saved).expect("saved set");
            assert!(text.contains("ServiceEntry shop/pim (networking.istio.io/v1)"));
            drop(source);
            let _ = std::fs::remove_file(saved);
        }

        #[tokio::test]
        async fn an_invalid_service_entry_gets_an_event_naming_the_field_and_the_set_stays() {
            let fake = FakeApiServer::start().await;
            istio(&fake, true, vec![]);
            fake.list(
                SE,
                "",
                "",
                "ServiceEntryList",
                vec![service_entry("pim", 443, "10")],
            );
            fake.list(DR, "", "", "DestinationRuleList", vec![]);
            let (bad, fixed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
            // The watch ends after the bad object; the next one fixes it.
            fake.watch(
                SE,
                "",
                "",
                WatchScript {
                    wait: Some(bad.clone()),
                    events: vec![
                        json!({"type": "ADDED", "object": service_entry("notify", 70000, "12")}),
                    ],
                    end: true,
                },
            );
            fake.watch(
                SE,
                "",
                "",
                WatchScript {
                    wait: Some(fixed.clone()),
                    events: vec![
                        json!({"type": "MODIFIED", "object": service_entry("notify", 8443, "13")}),
                    ],
                    end: false,
                },
            );
            let (source, store, saved) = start(&fake, vec![ISTIO_GROUP], vec![NETWORKING_GROUP]);
            loaded(&source).await;
            assert_eq!(store.generation(), 1);
            bad.notify_one();
            wait_until("the Event", || !posted_events(&fake).is_empty()).await;
            let events = posted_events(&fake);
            let event = &events[0];
            assert_eq!(event["type"], "Warning", "{event}");
            assert_eq!(event["reason"], "InvalidPolicy");
            assert_eq!(event["regarding"]["kind"], "ServiceEntry");
            assert_eq!(event["regarding"]["name"], "notify");
            assert_eq!(event["regarding"]["apiVersion"], "networking.istio.io/v1");
            assert_eq!(event["regarding"]["uid"], "uid-notify");
            let note = event["note"].as_str().unwrap_or_default();
            assert!(note.contains("spec.ports[0].number: "), "{note}");
            // All or nothing: the last good set stays.
            assert_eq!(store.generation(), 1);
            assert!(store.registry().by_name("pim.example.com", 443).is_some());
            assert_eq!(store.registry().entries().len(), 1);
            fixed.notify_one();
            wait_until("the fixed set", || store.generation() == 2).await;
            let registry = store.registry();
            assert!(registry.by_name("notify.example.com", 8443).is_some());
            assert!(registry.by_name("pim.example.com", 443).is_some());
            assert_eq!(posted_events(&fake).len(), 1, "one Event per error");
            drop(source);
            let _ = std::fs::remove_file(saved);
        }

        #[tokio::test]
        async fn without_the_networking_group_the_set_still_loads() {
            let fake = FakeApiServer::start().await;
            let policy = json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny-8080", "namespace": "shop", "resourceVersion": "3"},
                "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]},
            });
            istio(&fake, false, vec![policy]);
            let (source, store, saved) = start(&fake, vec![ISTIO_GROUP], vec![NETWORKING_GROUP]);
            loaded(&source).await;
            assert_eq!(store.names(), ["shop/deny-8080"]);
            assert!(store.registry().is_empty());
            let requests = fake.requests();
            assert!(
                requests
                    .iter()
                    .any(|r| r.path == "/apis/networking.istio.io/v1"),
                "networking.istio.io was not looked up"
            );
            assert!(
                !requests
                    .iter()
                    .any(|r| r.path.starts_with("/apis/networking.istio.io/v1/")),
                "a group not served was watched: {requests:?}"
            );
            drop(source);
            let _ = std::fs::remove_file(saved);
        }
    }

    #[test]
    fn event_notes_stay_within_a_kilobyte() {
        let long = "é".repeat(800);
        let t = truncate(long);
        assert!(t.len() <= MAX_NOTE && t.is_char_boundary(t.len()));
    }
}
