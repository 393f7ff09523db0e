//! AuthorizationPolicy and PeerAuthentication objects from the Kubernetes
//! API, applied as one set through the same checks as the policy
//! directory: all or nothing, the last good set stays in force. An invalid
//! object is logged and counted by the store and reported as a Kubernetes
//! Event on the object itself, naming the field (`kubectl describe`
//! shows it to whoever applied it).
//!
//! Watched: the kinds of every group asked for that the API server serves
//! (Istio's `security.istio.io` and the same schema as
//! `security.nodemesh.dev`), found by discovery and looked up again every
//! minute, so CRDs installed after the agent are picked up.
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
const VERSION: &str = "v1";
const KINDS: [&str; 2] = ["AuthorizationPolicy", "PeerAuthentication"];
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
    /// Watches `groups` (each watched when served). With `required`, a
    /// group that is not served keeps the agent waiting (logged); without,
    /// no served group means an empty set. `node` names the reporter of
    /// Events.
    pub fn start(
        client: Client,
        store: Arc<PolicyStore>,
        groups: Vec<&'static str>,
        required: bool,
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
        let task = tokio::spawn(run(client, sink, groups, required));
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
                if KINDS.iter().all(|k| kinds.contains(k)) {
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

async fn run(client: Client, sink: Sink, groups: Vec<&'static str>, required: bool) {
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
        let missing: Vec<_> = groups.iter().filter(|g| !served.contains(g)).collect();
        if required && !missing.is_empty() {
            error!(
                ?missing,
                "policy CRDs not served: install them (deploy/kubernetes) or set kubernetes.policies: auto; no policy set is loaded until then"
            );
            tokio::time::sleep(REDISCOVER).await;
            continue;
        }
        info!(groups = ?served, "watching policy objects");
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
    let kinds: Vec<(&str, &str)> = served.iter().flat_map(|g| KINDS.map(|k| (*g, k))).collect();
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

    #[test]
    fn event_notes_stay_within_a_kilobyte() {
        let long = "é".repeat(800);
        let t = truncate(long);
        assert!(t.len() <= MAX_NOTE && t.is_char_boundary(t.len()));
    }
}
