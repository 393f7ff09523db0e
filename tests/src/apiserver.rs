//! A FAKE of the Kubernetes API server, for the lab: this machine cannot
//! run a real one, so this is the closest honest substitute. It serves
//! what the agent reads (pods, services, endpointslices, namespaces, nodes
//! and the kinds of the groups asked for: AuthorizationPolicy and
//! PeerAuthentication, or for `networking.istio.io` ServiceEntry and
//! DestinationRule) over HTTPS with a bearer
//! token, with the real server's list, watch, selector, resourceVersion,
//! bookmark, `410 Gone` and metadata-only semantics as far as the agent
//! uses them, and stores the Events it posts.
//!
//! Its directory (`nodemesh-lab apiserver --dir DIR`):
//! - `objects/*.json`: the state, one object a file, as `kubectl apply`
//!   would send it, written atomically by the lab ([`ApiObjects`]) and
//!   rescanned every 50 ms; writes through the API are refused, except
//!   Events;
//! - `events/<namespace>.<name>.json`: the Events posted (and patched);
//! - `requests.log`: every request, `METHOD path?query`, query decoded;
//! - `kubeconfig`: written once the server listens (CA, server, token);
//! - `compact`: touching it drops the watch history (watches resuming
//!   from before get `410 Gone`, as after an etcd compaction).
//!
//! Not a real server: no admission, no schemas, no pagination, no
//! resourceVersions kept across restarts.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc},
    task::JoinHandle,
};

/// How often `DIR/objects` is rescanned.
const SCAN_EVERY: Duration = Duration::from_millis(50);
/// Between BOOKMARK events, for watches that allow them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// A watch without `timeoutSeconds` (the real server picks 30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Changes a watch may fall behind before it is ended (it re-watches).
const CHANNEL: usize = 4096;
const MAX_BODY: usize = 4 << 20;

/// A resource the fake knows. Events are created and patched through
/// the API (kept in `DIR/events`), never listed or watched.
#[derive(Debug, Clone)]
struct Resource {
    group: String,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_name: &'static str,
}

impl Resource {
    fn api_version(&self) -> String {
        match self.group.as_str() {
            "" => "v1".to_owned(),
            g => format!("{g}/v1"),
        }
    }

    /// Whether its objects are the files of `DIR/objects`.
    fn stored(&self) -> bool {
        self.kind != "Event"
    }
}

fn resources(groups: &[String]) -> Vec<Resource> {
    let built_in = [
        ("", "pods", "Pod", true, "po"),
        ("", "services", "Service", true, "svc"),
        ("", "namespaces", "Namespace", false, "ns"),
        ("", "nodes", "Node", false, "no"),
        ("", "events", "Event", true, "ev"),
        (
            "discovery.k8s.io",
            "endpointslices",
            "EndpointSlice",
            true,
            "",
        ),
        ("events.k8s.io", "events", "Event", true, "ev"),
    ];
    let policies = groups.iter().flat_map(|g| {
        let kinds = match g.as_str() {
            "networking.istio.io" => [
                ("serviceentries", "ServiceEntry", "se"),
                ("destinationrules", "DestinationRule", "dr"),
            ],
            _ => [
                ("authorizationpolicies", "AuthorizationPolicy", "ap"),
                ("peerauthentications", "PeerAuthentication", "pa"),
            ],
        };
        kinds.map(|(plural, kind, short_name)| (g.as_str(), plural, kind, true, short_name))
    });
    built_in
        .into_iter()
        .chain(policies)
        .map(|(group, plural, kind, namespaced, short_name)| Resource {
            group: group.to_owned(),
            plural,
            kind,
            namespaced,
            short_name,
        })
        .collect()
}

/// An object's identity: its resource (index), namespace ("" when
/// cluster-scoped) and name.
type Key = (usize, String, String);

/// One change, as the watch history keeps it: the object after (None once
/// deleted) and before (with this change's resourceVersion: what a DELETED
/// event carries, as the real server sends it).
struct Change {
    rv: u64,
    resource: usize,
    object: Option<Arc<Value>>,
    before: Option<Arc<Value>>,
}

struct State {
    rv: u64,
    /// Watches from before this version get `410 Gone` (history dropped).
    oldest: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: Vec<Arc<Change>>,
}

struct Shared {
    dir: PathBuf,
    token: String,
    resources: Vec<Resource>,
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    log: Mutex<fs::File>,
    /// Serialises Events' read-modify-write.
    events: Mutex<()>,
    addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running FAKE API server; stops accepting and scanning when
/// dropped (open connections end with the runtime).
pub struct ApiServer {
    /// Where it listens (the bound port when asked for port 0).
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `nodemesh-lab apiserver`: serves until the process is killed.
pub async fn serve(dir: &Path, listen: SocketAddr, groups: &[String]) -> Result<()> {
    let server = ApiServer::start(dir, listen, groups).await?;
    eprintln!(
        "FAKE Kubernetes API server on https://{} (kubeconfig {})",
        server.addr,
        server.kubeconfig.display()
    );
    std::future::pending::<()>().await;
    Ok(())
}

impl ApiServer {
    /// Binds, loads `DIR/objects`, then writes `DIR/kubeconfig` (so a
    /// client that sees it can connect at once) and serves on the current
    /// tokio runtime.
    pub async fn start(dir: &Path, listen: SocketAddr, groups: &[String]) -> Result<Self> {
        let kubeconfig = dir.join("kubeconfig");
        for sub in ["objects", "events"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        // A stale kubeconfig would tell waiting clients to go ahead.
        match fs::remove_file(&kubeconfig) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", kubeconfig.display()));
            }
            _ => {}
        }
        let log_path = dir.join("requests.log");
        fs::write(&log_path, "").with_context(|| format!("creating {}", log_path.display()))?;
        let log = fs::OpenOptions::new().append(true).open(&log_path)?;

        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        // What clients dial: the listen address, or loopback for a wildcard.
        let addr = match bound.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, bound.port()).into(),
            IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, bound.port()).into(),
            _ => bound,
        };
        let mut names = vec![
            addr.ip().to_string(),
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ];
        names.dedup();
        let certified =
            rcgen::generate_simple_self_signed(names).context("self-signed certificate")?;
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .context("TLS server configuration")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let (changes, _) = broadcast::channel(CHANNEL);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            token: random_hex(16)?,
            resources: resources(groups),
            state: Mutex::new(State {
                rv: 1,
                oldest: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
            }),
            changes,
            log: Mutex::new(log),
            events: Mutex::new(()),
            addr,
        });
        let mut scanner = Scanner::default();
        scanner.scan(&shared)?;
        write_atomically(
            &kubeconfig,
            kubeconfig_yaml(addr, &certified.cert.pem(), &shared.token).as_bytes(),
        )?;

        let served = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (acceptor, shared) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let scan = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCAN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error = String::new();
            loop {
                tick.tick().await;
                let shared = shared.clone();
                let Ok((s, result)) = tokio::task::spawn_blocking(move || {
                    let result = scanner.scan(&shared);
                    (scanner, result)
                })
                .await
                else {
                    return;
                };
                scanner = s;
                // Once per distinct error, not every 50 ms.
                let error = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
                if !error.is_empty() && error != last_error {
                    eprintln!("FAKE API server: scanning objects: {error}");
                }
                last_error = error;
            }
        });
        Ok(Self {
            addr,
            kubeconfig,
            tasks: vec![accept, scan],
        })
    }
}

fn kubeconfig_yaml(addr: SocketAddr, ca_pem: &str, token: &str) -> String {
    format!(
        r#"# FAKE Kubernetes API server of the nodemesh lab (nodemesh-lab apiserver).
apiVersion: v1
kind: Config
clusters:
- name: nodemesh-lab
  cluster:
    server: "https://{addr}"
    certificate-authority-data: "{ca}"
users:
- name: nodemesh-agent
  user:
    token: "{token}"
contexts:
- name: nodemesh-lab
  context:
    cluster: nodemesh-lab
    user: nodemesh-agent
current-context: nodemesh-lab
"#,
        ca = base64(ca_pem.as_bytes())
    )
}

// ---------------------------------------------------------------- state

/// A file's (mtime, size, inode): re-read only when it changes.
type Stamp = (i64, i64, u64, u64);

#[derive(Default)]
struct Scanner {
    /// Each file seen, with the object it held (None: not a valid object).
    files: HashMap<PathBuf, (Stamp, Option<Key>)>,
}

impl Scanner {
    fn scan(&mut self, shared: &Shared) -> Result<()> {
        let dir = shared.dir.join("objects");
        let mut seen = BTreeMap::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // Temporary files of atomic writes start with a dot.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let Ok(m) = fs::metadata(&path) else { continue };
            seen.insert(path, (m.mtime(), m.mtime_nsec(), m.size(), m.ino()));
        }
        // Files read outside the lock.
        let mut read = Vec::new();
        for (path, stamp) in &seen {
            if self.files.get(path).is_some_and(|(s, _)| s == stamp) {
                continue;
            }
            let object = fs::read_to_string(path)
                .map_err(anyhow::Error::from)
                .and_then(|text| parse_object(&text, &shared.resources));
            if let Err(e) = &object {
                eprintln!("FAKE API server: ignoring {}: {e:#}", path.display());
            }
            read.push((path.clone(), *stamp, object.ok()));
        }
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        let compact = shared.dir.join("compact");
        let compact = compact.exists().then_some(compact);
        if read.is_empty() && removed.is_empty() && compact.is_none() {
            return Ok(());
        }
        let mut state = lock(&shared.state);
        for path in removed {
            if let Some((_, Some(key))) = self.files.remove(&path) {
                state.delete(shared, &key);
            }
        }
        for (path, stamp, object) in read {
            let old = self.files.get(&path).and_then(|(_, k)| k.clone());
            let key = match object {
                Some((key, object)) => {
                    if let Some(old) = old.as_ref().filter(|o| **o != key) {
                        state.delete(shared, old);
                    }
                    state.upsert(shared, key.clone(), object);
                    Some(key)
                }
                // A bad file leaves the object it held as it was.
                None => old,
            };
            self.files.insert(path, (stamp, key));
        }
        if let Some(compact) = compact {
            state.oldest = state.rv;
            state.history.clear();
            fs::remove_file(&compact).with_context(|| format!("removing {}", compact.display()))?;
        }
        Ok(())
    }
}

/// An object from a file, with its key.
fn parse_object(text: &str, resources: &[Resource]) -> Result<(Key, Value)> {
    let object: Value = serde_json::from_str(text).context("not JSON")?;
    let api_version = object["apiVersion"].as_str().context("no apiVersion")?;
    let kind = object["kind"].as_str().context("no kind")?;
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .context("no metadata.name")?;
    let index = resources
        .iter()
        .position(|r| r.stored() && r.kind == kind && r.api_version() == api_version)
        .with_context(|| format!("{kind} of {api_version} is not served"))?;
    let namespace = match resources[index].namespaced {
        true => object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        false => String::new(),
    };
    Ok(((index, namespace, name.to_owned()), object))
}

impl State {
    fn record(&mut self, shared: &Shared, change: Change) {
        let change = Arc::new(change);
        self.history.push(change.clone());
        // Sent under the lock: a new watch's history and its live events
        // neither overlap nor leave a gap. No receivers is not an error.
        let _ = shared.changes.send(change);
    }

    /// Sets what the server sets, and records a change if there is one.
    fn upsert(&mut self, shared: &Shared, key: Key, mut object: Value) {
        let resource = &shared.resources[key.0];
        let before = self.objects.get(&key).cloned();
        let prev = |field: &str| {
            before
                .as_ref()
                .map(|b| b["metadata"][field].clone())
                .filter(|v| !v.is_null())
        };
        let meta = &mut object["metadata"];
        match resource.namespaced {
            true => meta["namespace"] = json!(key.1),
            false => {
                if let Some(m) = meta.as_object_mut() {
                    m.remove("namespace");
                }
            }
        }
        if meta["uid"].as_str().is_none_or(str::is_empty) {
            meta["uid"] = prev("uid")
                .unwrap_or_else(|| json!(uid_for(&resource.group, resource.kind, &key.1, &key.2)));
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] =
                prev("creationTimestamp").unwrap_or_else(|| json!(now_rfc3339()));
        }
        let generation = match &before {
            Some(b) => {
                b["metadata"]["generation"].as_u64().unwrap_or(1)
                    + u64::from(b["spec"] != object["spec"])
            }
            None => 1,
        };
        object["metadata"]["generation"] = json!(generation);
        if before
            .as_ref()
            .is_some_and(|b| unversioned(b) == unversioned(&object))
        {
            return;
        }
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = Arc::new(object);
        self.objects.insert(key.clone(), object.clone());
        let before = before.map(|b| at_version(&b, rv));
        self.record(
            shared,
            Change {
                rv,
                resource: key.0,
                object: Some(object),
                before,
            },
        );
    }

    fn delete(&mut self, shared: &Shared, key: &Key) {
        let Some(before) = self.objects.remove(key) else {
            return;
        };
        self.rv += 1;
        let rv = self.rv;
        let before = Some(at_version(&before, rv));
        self.record(
            shared,
            Change {
                rv,
                resource: key.0,
                object: None,
                before,
            },
        );
    }
}

fn unversioned(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(m) = object["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    object
}

fn at_version(object: &Value, rv: u64) -> Arc<Value> {
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    Arc::new(object)
}

// ---------------------------------------------------------------- HTTP

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}

fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code.as_u16()})
}

fn failure(code: StatusCode, reason: &str, message: impl AsRef<str>) -> Response<Body> {
    json_response(code, &status_object(code, reason, message.as_ref()))
}

fn not_found(message: impl AsRef<str>) -> Response<Body> {
    failure(StatusCode::NOT_FOUND, "NotFound", message)
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(decoded_pairs).unwrap_or_default();
    let method = req.method().clone();
    {
        let mut line = format!("{method} {path}");
        if !query.is_empty() {
            let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            line = format!("{line}?{}", q.join("&"));
        }
        let _ = writeln!(lock(&shared.log), "{line}");
    }
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if header(hyper::header::AUTHORIZATION) != format!("Bearer {}", shared.token) {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let accept = header(hyper::header::ACCEPT);
    let content_type = header(hyper::header::CONTENT_TYPE);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let body = match method {
        Method::POST | Method::PATCH => {
            match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("reading the body: {e}"),
                    );
                }
            }
        }
        _ => Bytes::new(),
    };
    let get = method == Method::GET;
    match segments.as_slice() {
        ["version"] if get => json_response(StatusCode::OK, &version()),
        ["api"] if get => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs":
                    [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]}),
        ),
        ["apis"] if get => json_response(StatusCode::OK, &group_list(&shared.resources)),
        ["api", "v1"] if get => resource_list(&shared.resources, ""),
        ["apis", group, "v1"] if get => resource_list(&shared.resources, group),
        ["api", "v1", "namespaces", ns, "events"]
        | ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]
            if method == Method::POST =>
        {
            let api_version = if segments[0] == "api" {
                "v1"
            } else {
                "events.k8s.io/v1"
            };
            create_event(&shared, ns, api_version, &body)
        }
        ["api", "v1", "namespaces", ns, "events", name]
        | [
            "apis",
            "events.k8s.io",
            "v1",
            "namespaces",
            ns,
            "events",
            name,
        ] if method == Method::PATCH => patch_event(&shared, ns, name, &content_type, &body),
        ["api", "v1", rest @ ..] => resource_request(&shared, "", rest, &method, &query, &accept),
        ["apis", group, "v1", rest @ ..] => {
            resource_request(&shared, group, rest, &method, &query, &accept)
        }
        _ => not_found("the server could not find the requested resource"),
    }
}

fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-nodemesh-lab-fake",
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
           "goVersion": "", "compiler": "rustc", "platform": "linux/amd64"})
}

fn group_list(resources: &[Resource]) -> Value {
    let mut groups: Vec<&str> = resources
        .iter()
        .map(|r| r.group.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    let groups: Vec<Value> = groups
        .iter()
        .map(|g| {
            let v = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [v.clone()], "preferredVersion": v})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(resources: &[Resource], group: &str) -> Response<Body> {
    let list: Vec<Value> = resources
        .iter()
        .filter(|r| r.group == group)
        .map(|r| {
            let verbs: &[&str] = match r.stored() {
                true => &[
                    "get", "list", "watch", "create", "update", "patch", "delete",
                ],
                false => &["create", "patch"],
            };
            let short_names: &[&str] = match r.short_name {
                "" => &[],
                s => &[s],
            };
            json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                   "kind": r.kind, "verbs": verbs, "shortNames": short_names})
        })
        .collect();
    if list.is_empty() {
        return not_found(format!(
            "the server could not find the requested resource (group {group})"
        ));
    }
    let group_version = if group.is_empty() {
        "v1".to_owned()
    } else {
        format!("{group}/v1")
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list}),
    )
}

fn resource_request(
    shared: &Arc<Shared>,
    group: &str,
    rest: &[&str],
    method: &Method,
    query: &[(String, String)],
    accept: &str,
) -> Response<Body> {
    let (namespace, plural, name) = match *rest {
        [plural] => (None, plural, None),
        ["namespaces", ns, plural] => (Some(ns), plural, None),
        ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name)),
        [plural, name] => (None, plural, Some(name)),
        _ => return not_found("the server could not find the requested resource"),
    };
    let Some(index) = shared
        .resources
        .iter()
        .position(|r| r.group == group && r.plural == plural)
    else {
        return not_found("the server could not find the requested resource");
    };
    let resource = &shared.resources[index];
    if namespace.is_some() && !resource.namespaced {
        return not_found("the server could not find the requested resource");
    }
    if *method != Method::GET || !resource.stored() {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the FAKE API server's objects are the files of DIR/objects; only Events are written through the API",
        );
    }
    let param = |k: &str| {
        query
            .iter()
            .rev()
            .find(|(q, _)| q == k)
            .map(|(_, v)| v.as_str())
    };
    let filter = match Filter::new(
        index,
        resource,
        namespace,
        param("fieldSelector").unwrap_or(""),
        param("labelSelector").unwrap_or(""),
        accept.contains("as=PartialObjectMetadata"),
    ) {
        Ok(f) => f,
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    if let Some(name) = name {
        let key = (index, namespace.unwrap_or("").to_owned(), name.to_owned());
        let found = lock(&shared.state).objects.get(&key).cloned();
        return match found {
            Some(o) => json_response(StatusCode::OK, &filter.render(&o)),
            None => not_found(format!("{} \"{name}\" not found", resource.plural)),
        };
    }
    if matches!(param("watch"), Some("true" | "1")) {
        return watch(shared, filter, param);
    }
    // `limit` and `continue` are ignored: everything in one page, without
    // a continue token (allowed: a server may return fewer pages).
    let state = lock(&shared.state);
    let items: Vec<Value> = filter.current(&state).map(|o| filter.render(o)).collect();
    let (kind, api_version) = match filter.metadata_only {
        true => (
            "PartialObjectMetadataList".to_owned(),
            "meta.k8s.io/v1".to_owned(),
        ),
        false => (format!("{}List", resource.kind), resource.api_version()),
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
    )
}

fn watch<'q>(
    shared: &Arc<Shared>,
    filter: Filter,
    param: impl Fn(&str) -> Option<&'q str>,
) -> Response<Body> {
    let initial_events = param("sendInitialEvents") == Some("true");
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let timeout = param("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let from = match param("resourceVersion").filter(|v| !v.is_empty() && *v != "0") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("invalid resourceVersion {v:?}"),
                );
            }
        },
    };
    let (lines, changes, last) = {
        let state = lock(&shared.state);
        let mut changes = Some(shared.changes.subscribe());
        let lines: Vec<Bytes> = match from {
            Some(from) if !initial_events => {
                if from < state.oldest {
                    // What the real server sends: an ERROR event, then the end.
                    changes = None;
                    let gone =
                        status_object(StatusCode::GONE, "Expired", "too old resource version");
                    vec![line("ERROR", &gone)]
                } else {
                    let events = state.history.iter().filter(|c| c.rv > from);
                    events
                        .filter_map(|c| filter.event(c))
                        .map(|(kind, o)| line(kind, &o))
                        .collect()
                }
            }
            // No version (or sendInitialEvents): the current objects as
            // ADDED, as the real server starts such a watch.
            _ => {
                let mut lines: Vec<Bytes> = filter
                    .current(&state)
                    .map(|o| line("ADDED", &filter.render(o)))
                    .collect();
                if initial_events && bookmarks {
                    lines.push(line("BOOKMARK", &filter.bookmark(state.rv, true)));
                }
                lines
            }
        };
        (lines, changes, state.rv)
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_watch(
        filter, lines, changes, last, bookmarks, timeout, tx,
    ));
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    let mut response = Response::new(body.boxed_unsync());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}

/// One line of a watch's response.
fn line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

/// Feeds one watch's response until its timeout, the client leaving, or
/// the client falling behind (it then re-watches from its last version).
async fn stream_watch(
    filter: Filter,
    lines: Vec<Bytes>,
    changes: Option<broadcast::Receiver<Arc<Change>>>,
    mut last: u64,
    bookmarks: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    for line in lines {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    let Some(mut changes) = changes else { return };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let start = tokio::time::Instant::now() + BOOKMARK_EVERY;
    let mut bookmark = tokio::time::interval_at(start, BOOKMARK_EVERY);
    loop {
        let change = tokio::select! {
            () = &mut deadline => return,
            () = tx.closed() => return,
            _ = bookmark.tick(), if bookmarks => {
                // Caught up first, so that the bookmark's version follows
                // every event this watch has sent.
                loop {
                    match changes.try_recv() {
                        Ok(c) => {
                            last = c.rv;
                            if let Some((kind, o)) = filter.event(&c)
                                && tx.send(line(kind, &o)).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(broadcast::error::TryRecvError::Empty) => break,
                        Err(_) => return,
                    }
                }
                if tx.send(line("BOOKMARK", &filter.bookmark(last, false))).await.is_err() {
                    return;
                }
                continue;
            }
            c = changes.recv() => match c {
                Ok(c) => c,
                // Lagged or closed: ending the stream makes the client re-watch.
                Err(_) => return,
            },
        };
        last = change.rv;
        if let Some((kind, o)) = filter.event(&change)
            && tx.send(line(kind, &o)).await.is_err()
        {
            return;
        }
    }
}

// ---------------------------------------------------------------- selectors

/// What one list or watch asks for.
struct Filter {
    resource: usize,
    kind: &'static str,
    api_version: String,
    namespace: Option<String>,
    fields: Vec<(Vec<String>, bool, String)>,
    labels: Vec<LabelTerm>,
    metadata_only: bool,
}

enum LabelTerm {
    Exists(String, bool),
    /// `key in (..)` (true) or `key notin (..)`; `=` and `!=` are the
    /// one-value forms. `notin` matches objects without the label.
    In(String, bool, Vec<String>),
}

impl Filter {
    fn new(
        resource: usize,
        r: &Resource,
        namespace: Option<&str>,
        fields: &str,
        labels: &str,
        metadata_only: bool,
    ) -> Result<Self, String> {
        Ok(Self {
            resource,
            kind: r.kind,
            api_version: r.api_version(),
            namespace: namespace.map(str::to_owned),
            fields: parse_fields(fields)?,
            labels: parse_labels(labels)?,
            metadata_only,
        })
    }

    /// Any dotted field path is accepted (the real server allows only a
    /// few per kind); a missing field is the empty string.
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let fields_match = self.fields.iter().all(|(path, equal, want)| {
            let v = path.iter().fold(object, |v, p| &v[p.as_str()]);
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                v => v.to_string(),
            };
            (v == *want) == *equal
        });
        let label = |k: &str| meta["labels"][k].as_str();
        fields_match
            && self.labels.iter().all(|term| match term {
                LabelTerm::Exists(k, exists) => label(k).is_some() == *exists,
                LabelTerm::In(k, is_in, values) => {
                    label(k).is_some_and(|v| values.iter().any(|w| w == v)) == *is_in
                }
            })
    }

    fn current<'s>(&'s self, state: &'s State) -> impl Iterator<Item = &'s Value> + 's {
        let from = (self.resource, String::new(), String::new());
        state
            .objects
            .range(from..)
            .take_while(|(k, _)| k.0 == self.resource)
            .map(|(_, o)| &**o)
            .filter(|o| self.matches(o))
    }

    /// The event a change is to this watch, as the real server decides:
    /// an object that stops matching is DELETED, one that starts, ADDED.
    fn event(&self, change: &Change) -> Option<(&'static str, Value)> {
        if change.resource != self.resource {
            return None;
        }
        let now = change.object.as_deref().filter(|o| self.matches(o));
        let before = change.before.as_deref().filter(|o| self.matches(o));
        match (now, before) {
            (Some(o), None) => Some(("ADDED", self.render(o))),
            (Some(o), Some(_)) => Some(("MODIFIED", self.render(o))),
            (None, Some(b)) => Some(("DELETED", self.render(b))),
            (None, None) => None,
        }
    }

    fn render(&self, object: &Value) -> Value {
        match self.metadata_only {
            true => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
            }
            false => object.clone(),
        }
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Value {
        let (kind, api_version) = match self.metadata_only {
            true => ("PartialObjectMetadata", "meta.k8s.io/v1".to_owned()),
            false => (self.kind, self.api_version.clone()),
        };
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"kind": kind, "apiVersion": api_version, "metadata": meta})
    }
}

/// `a.b=x,c!=y` (also `==`).
fn parse_fields(s: &str) -> Result<Vec<(Vec<String>, bool, String)>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, true, v)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        out.push((
            key.trim().split('.').map(str::to_owned).collect(),
            equal,
            value.trim().to_owned(),
        ));
    }
    Ok(out)
}

/// `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`.
fn parse_labels(s: &str) -> Result<Vec<LabelTerm>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut out = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let invalid = || format!("invalid label selector term {term:?}");
        out.push(if let Some(open) = term.find('(') {
            let inner = term[open + 1..].strip_suffix(')').ok_or_else(invalid)?;
            let values = inner
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            match term[..open].split_whitespace().collect::<Vec<_>>()[..] {
                [k, "in"] => LabelTerm::In(k.to_owned(), true, values),
                [k, "notin"] => LabelTerm::In(k.to_owned(), false, values),
                _ => return Err(invalid()),
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelTerm::In(k.trim().to_owned(), false, vec![v.trim().to_owned()])
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelTerm::In(k.trim().to_owned(), true, vec![v.trim().to_owned()])
        } else if let Some(k) = term.strip_prefix('!') {
            LabelTerm::Exists(k.trim().to_owned(), false)
        } else if term
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            LabelTerm::Exists(term.to_owned(), true)
        } else {
            return Err(invalid());
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- Events

fn event_path(shared: &Shared, ns: &str, name: &str) -> PathBuf {
    shared.dir.join("events").join(format!("{ns}.{name}.json"))
}

fn next_version(shared: &Shared) -> String {
    let mut state = lock(&shared.state);
    state.rv += 1;
    state.rv.to_string()
}

fn create_event(shared: &Shared, ns: &str, api_version: &str, body: &[u8]) -> Response<Body> {
    let mut event = serde_json::from_slice::<Value>(body).unwrap_or_default();
    if !event.is_object() || !(event["metadata"].is_object() || event["metadata"].is_null()) {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a JSON object",
        );
    }
    let name = match (
        event["metadata"]["name"].as_str(),
        event["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(prefix)) => format!("{prefix}{}", random_hex(3).unwrap_or_default()),
        _ => {
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            );
        }
    };
    let _serial = lock(&shared.events);
    let path = event_path(shared, ns, &name);
    if path.exists() {
        return failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("events \"{name}\" already exists"),
        );
    }
    if event["apiVersion"].is_null() {
        event["apiVersion"] = json!(api_version);
        event["kind"] = json!("Event");
    }
    let meta = &mut event["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(ns);
    meta["uid"] = json!(uid_for("events", "Event", ns, &name));
    meta["creationTimestamp"] = json!(now_rfc3339());
    meta["resourceVersion"] = json!(next_version(shared));
    store_event(&path, &event, StatusCode::CREATED)
}

fn patch_event(
    shared: &Shared,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    // A strategic merge patch of an Event is a merge patch (no lists with
    // merge keys are patched here).
    if !content_type.starts_with("application/merge-patch+json")
        && !content_type.starts_with("application/strategic-merge-patch+json")
    {
        return failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the FAKE API server takes merge patches only, not {content_type:?}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let _serial = lock(&shared.events);
    let path = event_path(shared, ns, name);
    let Some(mut event) = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return not_found(format!("events \"{name}\" not found"));
    };
    let (uid, created) = (
        event["metadata"]["uid"].clone(),
        event["metadata"]["creationTimestamp"].clone(),
    );
    merge_patch(&mut event, &patch);
    let meta = &mut event["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(ns);
    meta["uid"] = uid;
    meta["creationTimestamp"] = created;
    meta["resourceVersion"] = json!(next_version(shared));
    store_event(&path, &event, StatusCode::OK)
}

fn store_event(path: &Path, event: &Value, status: StatusCode) -> Response<Body> {
    match write_atomically(path, event.to_string().as_bytes()) {
        Ok(()) => json_response(status, event),
        Err(e) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("{e:#}"),
        ),
    }
}

/// JSON merge patch (RFC 7386).
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(target) = target else {
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

// ---------------------------------------------------------------- lab side

/// The lab's side of the FAKE API server: its files, used synchronously.
pub struct ApiObjects {
    pub dir: PathBuf,
}

impl ApiObjects {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The file an object lives in: `objects/<kind>.<namespace or _>.<name>.json`,
    /// with custom resources' kinds qualified by group
    /// (`AuthorizationPolicy.security.istio.io`: the same name can be in
    /// two groups).
    fn path_of(&self, object: &Value) -> Result<PathBuf> {
        let kind = object["kind"].as_str().context("no kind")?;
        let name = object["metadata"]["name"]
            .as_str()
            .context("no metadata.name")?;
        let ns = object["metadata"]["namespace"].as_str().unwrap_or("_");
        let kind = match object["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/'))
        {
            Some((group, _)) if !group.ends_with("k8s.io") => format!("{kind}.{group}"),
            _ => kind.to_owned(),
        };
        Ok(self
            .dir
            .join("objects")
            .join(format!("{kind}.{ns}.{name}.json")))
    }

    /// Creates or replaces an object, as `kubectl apply`; a uid the
    /// existing object has is kept.
    pub fn apply(&self, object: &Value) -> Result<()> {
        let path = self.path_of(object)?;
        let mut object = object.clone();
        if object["metadata"]["uid"].as_str().is_none_or(str::is_empty)
            && let Some(uid) = read_json(&path)
                .ok()
                .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
        {
            object["metadata"]["uid"] = json!(uid);
        }
        write_atomically(&path, serde_json::to_string_pretty(&object)?.as_bytes())
    }

    /// The files holding `kind` (`Kind`, or `Kind.group`) `namespace/name`
    /// (`namespace` "" for cluster-scoped objects).
    fn find(&self, kind: &str, namespace: &str, name: &str) -> Vec<(PathBuf, Value)> {
        let (kind, group) = kind.split_once('.').unwrap_or((kind, ""));
        let Ok(entries) = fs::read_dir(self.dir.join("objects")) else {
            return Vec::new();
        };
        let mut found: Vec<(PathBuf, Value)> = json_files(entries)
            .into_iter()
            .filter_map(|p| read_json(&p).ok().map(|o| (p, o)))
            .filter(|(_, o)| {
                let api_group = o["apiVersion"].as_str().and_then(|v| v.split_once('/'));
                o["kind"] == kind
                    && (group.is_empty() || Some(group) == api_group.map(|(g, _)| g))
                    && o["metadata"]["name"] == name
                    && o["metadata"]["namespace"].as_str().unwrap_or("") == namespace
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Removes an object (`kind` as for [`Self::get`]; a plain Kind
    /// removes that name in every group that has it).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let found = self.find(kind, namespace, name);
        if found.is_empty() {
            bail!(
                "no {kind} {namespace}/{name} in {}",
                self.dir.join("objects").display()
            );
        }
        for (path, _) in found {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// The object as applied (without what the server adds); `kind` is
    /// the Kind, or `Kind.group` where two groups have the kind;
    /// `namespace` is "" for cluster-scoped objects.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.find(kind, namespace, name)
            .into_iter()
            .next()
            .map(|(_, o)| o)
    }

    /// The Events posted, by file name (`<namespace>.<name>`).
    pub fn events(&self) -> Vec<Value> {
        let Ok(entries) = fs::read_dir(self.dir.join("events")) else {
            return Vec::new();
        };
        json_files(entries)
            .iter()
            .filter_map(|p| read_json(p).ok())
            .collect()
    }

    /// Every request so far, as `METHOD path?query`, the query decoded
    /// (`GET /api/v1/pods?fieldSelector=spec.nodeName=node-1&watch=true`).
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Drops the watch history before the current version (watches
    /// resuming from older versions get `410 Gone`); returns once done.
    pub fn compact(&self) -> Result<()> {
        let path = self.dir.join("compact");
        fs::write(&path, "").with_context(|| format!("creating {}", path.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while path.exists() {
            if Instant::now() > deadline {
                bail!(
                    "the API server did not compact (is it running on {}?)",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Waits for the server's kubeconfig (written once it listens).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.kubeconfig().exists() {
            if Instant::now() > deadline {
                bail!("no {} after {timeout:?}", self.kubeconfig().display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// The `*.json` files of a directory, sorted, without temporary files.
fn json_files(entries: fs::ReadDir) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            name.ends_with(".json") && !name.starts_with('.')
        })
        .collect();
    paths.sort();
    paths
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Write to a temporary file, then rename: readers see all or nothing.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("no file name")?;
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{serial}.tmp", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------- builders

fn labels_map(labels: &BTreeMap<String, String>) -> Value {
    Value::Object(labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

pub fn namespace(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels_map(labels)},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

pub fn node(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": labels_map(labels)},
           "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
}

#[allow(clippy::too_many_arguments)]
pub fn pod(
    name: &str,
    namespace: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    labels: &BTreeMap<String, String>,
    pod_ips: &[IpAddr],
    phase: &str,
) -> Value {
    let ready = if phase == "Running" { "True" } else { "False" };
    let mut status = json!({"phase": phase, "conditions": [{"type": "Ready", "status": ready}]});
    if let Some(first) = pod_ips.first() {
        status["podIP"] = json!(first.to_string());
        status["podIPs"] = pod_ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
    }
    let mut metadata = json!({"name": name, "namespace": namespace, "labels": labels_map(labels)});
    // Without one, the server derives it.
    if !uid.is_empty() {
        metadata["uid"] = json!(uid);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
           "spec": {"nodeName": node, "serviceAccountName": service_account,
                    "containers": [{"name": "app", "image": "lab"}]},
           "status": status})
}

/// A ClusterIP Service (headless without addresses); ports are
/// `(name, port, target port)`, TCP.
pub fn service(
    name: &str,
    namespace: &str,
    cluster_ips: &[IpAddr],
    ports: &[(String, u16, u16)],
    selector: &BTreeMap<String, String>,
) -> Value {
    let ips: Vec<String> = match cluster_ips {
        [] => vec!["None".to_owned()],
        ips => ips.iter().map(IpAddr::to_string).collect(),
    };
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let policy = if cluster_ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, port, target)| json!({"name": n, "port": port, "targetPort": target, "protocol": "TCP"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips, "ipFamilies": families,
                    "ipFamilyPolicy": policy, "ports": ports, "selector": labels_map(selector)},
           "status": {"loadBalancer": {}}})
}

/// The EndpointSlice of one family (`IPv4` or `IPv6`) of a Service, named
/// `<service>-<family>`; endpoints are `(address, pod, node, ready)`, those
/// of the other family left out; ports are `(name, port)`, TCP.
pub fn endpoint_slice(
    service: &str,
    namespace: &str,
    family: &str,
    endpoints: &[(IpAddr, String, String, bool)],
    ports: &[(String, u16)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .filter(|(ip, ..)| ip.is_ipv4() == (family == "IPv4"))
        .map(|(ip, pod, node, ready)| {
            json!({"addresses": [ip.to_string()],
                   "conditions": {"ready": ready, "serving": ready, "terminating": false},
                   "nodeName": node,
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-{}", family.to_ascii_lowercase()), "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": service,
                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
           "addressType": family, "endpoints": endpoints, "ports": ports})
}

// ---------------------------------------------------------------- helpers

/// A uid stable per object name (re-created objects get the same one).
fn uid_for(group: &str, kind: &str, namespace: &str, name: &str) -> String {
    let h = Sha256::digest(format!("{group}/{kind}/{namespace}/{name}"));
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-5{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut buf)
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(match i <= chunk.len() {
                true => char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]),
                false => '=',
            });
        }
    }
    out
}

/// `a=b&c=d%3De` as pairs, percent-decoded (`+` is a space).
fn decoded_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    //! The FAKE API server against the real kube-rs client, built from the
    //! kubeconfig it writes; no root needed.
    use ::kube::{
        Api, Client,
        api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams},
        config::{KubeConfigOptions, Kubeconfig},
        core::PartialObjectMeta,
        runtime::{
            events::{Event, EventType, Recorder, Reporter},
            watcher::{self, watcher},
        },
    };
    use futures_util::{Stream, StreamExt as _};
    use k8s_openapi::{
        api::{
            core::v1::{Namespace, Node, ObjectReference, Pod, Service},
            discovery::v1::EndpointSlice,
            events::v1::Event as K8sEvent,
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    /// A server on loopback with its own directory (removed after).
    struct Lab {
        api: ApiObjects,
        _server: ApiServer,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.api.dir);
        }
    }

    async fn lab(name: &str, groups: &[&str]) -> Lab {
        let dir =
            std::env::temp_dir().join(format!("nodemesh-apiserver-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        let server = ApiServer::start(&dir, "127.0.0.1:0".parse().unwrap(), &groups)
            .await
            .expect("server");
        let api = ApiObjects::new(dir);
        api.wait_ready(WAIT).expect("kubeconfig");
        Lab {
            api,
            _server: server,
        }
    }

    async fn client_from(kubeconfig: Kubeconfig) -> Client {
        let config =
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("config");
        Client::try_from(config).expect("client")
    }

    async fn client(api: &ApiObjects) -> Client {
        client_from(Kubeconfig::read_from(api.kubeconfig()).expect("kubeconfig")).await
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn a_pod(name: &str, ns: &str, node: &str, l: &[(&str, &str)]) -> Value {
        let ips = ["10.244.1.5".parse().unwrap()];
        pod(name, ns, "", node, "default", &labels(l), &ips, "Running")
    }

    /// Waits until the server has applied what the lab wrote.
    async fn until<F: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
        let deadline = Instant::now() + WAIT;
        while !f().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn next<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> T {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
    }

    fn names(pods: impl IntoIterator<Item = Pod>) -> Vec<String> {
        let mut n: Vec<String> = pods.into_iter().filter_map(|p| p.metadata.name).collect();
        n.sort();
        n
    }

    fn pod_name(e: &watcher::Event<Pod>) -> String {
        match e {
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
                format!("{e:?}")
                    .split('(')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
                    + " "
                    + p.metadata.name.as_deref().unwrap_or_default()
            }
            watcher::Event::Init => "Init".to_owned(),
            watcher::Event::InitDone => "InitDone".to_owned(),
        }
    }

    #[test]
    fn builders_have_the_real_shapes() {
        let ns: Namespace =
            serde_json::from_value(namespace("shop", &labels(&[("mesh", "on")]))).unwrap();
        assert_eq!(ns.metadata.labels.unwrap()["mesh"], "on");
        let n: Node = serde_json::from_value(node("node-1", &labels(&[("zone", "a")]))).unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("node-1"));

        let ips: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let p = pod(
            "web-1",
            "shop",
            "0b2c",
            "node-1",
            "web",
            &labels(&[("app", "web")]),
            &ips,
            "Running",
        );
        let p: Pod = serde_json::from_value(p).unwrap();
        let (spec, status) = (p.spec.unwrap(), p.status.unwrap());
        assert_eq!(p.metadata.uid.as_deref(), Some("0b2c"));
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.containers[0].name, "app");
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(status.pod_ips.unwrap()[1].ip, "fd00::5");
        let ready = &status.conditions.unwrap()[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        let pending: Pod = serde_json::from_value(pod(
            "p",
            "shop",
            "",
            "node-1",
            "default",
            &labels(&[]),
            &[],
            "Pending",
        ))
        .unwrap();
        assert_eq!(pending.status.unwrap().pod_ip, None);
        assert_eq!(pending.metadata.uid, None);

        let vips: Vec<IpAddr> = vec![
            "10.96.0.10".parse().unwrap(),
            "fd00:96::10".parse().unwrap(),
        ];
        let s = service(
            "web",
            "shop",
            &vips,
            &[("http".to_owned(), 80, 8080)],
            &labels(&[("app", "web")]),
        );
        let s: Service = serde_json::from_value(s).unwrap();
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.cluster_ips.unwrap().len(), 2);
        assert_eq!(spec.ip_families.unwrap(), ["IPv4", "IPv6"]);
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.port, port.protocol.as_deref()), (80, Some("TCP")));
        assert_eq!(port.target_port, Some(IntOrString::Int(8080)));
        assert_eq!(spec.selector.unwrap()["app"], "web");

        let endpoints = [
            (ips[0], "web-1".to_owned(), "node-1".to_owned(), true),
            (ips[1], "web-1".to_owned(), "node-1".to_owned(), true),
        ];
        let e = endpoint_slice(
            "web",
            "shop",
            "IPv6",
            &endpoints,
            &[("http".to_owned(), 8080)],
        );
        let e: EndpointSlice = serde_json::from_value(e).unwrap();
        assert_eq!(e.address_type, "IPv6");
        assert_eq!(
            e.metadata.labels.unwrap()["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(
            e.endpoints.len(),
            1,
            "the other family's address is left out"
        );
        let ep = &e.endpoints[0];
        assert_eq!(ep.addresses, ["fd00::5"]);
        assert_eq!(ep.node_name.as_deref(), Some("node-1"));
        assert_eq!(ep.conditions.as_ref().unwrap().ready, Some(true));
        let target = ep.target_ref.as_ref().unwrap();
        assert_eq!(
            (target.kind.as_deref(), target.name.as_deref()),
            (Some("Pod"), Some("web-1"))
        );
        assert_eq!(e.ports.unwrap()[0].port, Some(8080));
    }

    #[test]
    fn selectors_and_helpers() {
        let object = a_pod("a", "shop", "node-1", &[("app", "web"), ("tier", "front")]);
        let filter = |fields: &str, labels: &str| {
            let r = &resources(&[])[0];
            Filter::new(0, r, None, fields, labels, false)
                .unwrap()
                .matches(&object)
        };
        assert!(filter("spec.nodeName=node-1,metadata.namespace==shop", ""));
        assert!(!filter("spec.nodeName!=node-1", ""));
        assert!(filter(
            "metadata.name=a",
            "app in (web, db),tier,!canary,tier!=back"
        ));
        assert!(!filter("", "app notin (web)"));
        assert!(
            filter("", "canary notin (x),canary!=y"),
            "notin matches objects without the label"
        );
        assert!(!filter("", "app=db"));
        assert!(parse_labels("app in web").is_err());
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
        assert_eq!(
            decoded_pairs("fieldSelector=spec.nodeName%3Dnode-1+x%"),
            [(
                "fieldSelector".to_string(),
                "spec.nodeName=node-1 x%".to_string()
            )]
        );
        let mut target = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut target, &json!({"a": null, "b": {"c": 4}, "e": [1]}));
        assert_eq!(target, json!({"b": {"c": 4, "d": 3}, "e": [1]}));
        let uid = uid_for("", "Pod", "shop", "a");
        assert_eq!((uid.len(), &uid[14..15], &uid[19..20]), (36, "5", "8"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_and_gets_with_selectors() {
        let lab = lab("lists", &[]).await;
        let c = client(&lab.api).await;
        lab.api
            .apply(&a_pod("a", "default", "node-1", &[("app", "web")]))
            .unwrap();
        lab.api
            .apply(&a_pod("b", "default", "node-2", &[("app", "db")]))
            .unwrap();
        lab.api
            .apply(&a_pod("c", "other", "node-1", &[("app", "cache")]))
            .unwrap();
        // Not JSON: ignored, the rest is served.
        fs::write(lab.api.dir.join("objects/bad.json"), "{").unwrap();
        let pods = Api::<Pod>::all(c.clone());
        let list = |lp: ListParams| {
            let pods = pods.clone();
            async move { names(pods.list(&lp).await.expect("list")) }
        };
        until("three pods", || async {
            list(ListParams::default()).await.len() == 3
        })
        .await;

        let fields = |f: &str| ListParams::default().fields(f);
        let by_labels = |l: &str| ListParams::default().labels(l);
        assert_eq!(list(fields("spec.nodeName=node-1")).await, ["a", "c"]);
        assert_eq!(list(fields("spec.nodeName!=node-1")).await, ["b"]);
        assert_eq!(list(fields("metadata.namespace=other")).await, ["c"]);
        assert_eq!(list(by_labels("app in (web,db)")).await, ["a", "b"]);
        assert_eq!(list(by_labels("app!=web")).await, ["b", "c"]);
        assert!(list(by_labels("!app")).await.is_empty());
        let other = Api::<Pod>::namespaced(c.clone(), "other");
        assert_eq!(
            names(other.list(&ListParams::default()).await.unwrap()),
            ["c"]
        );
        let got = other.get("c").await.unwrap();
        let uid = got.metadata.uid.clone().unwrap();
        assert_eq!(uid, uid_for("", "Pod", "other", "c"));
        assert_eq!(got.metadata.generation, Some(1));
        assert!(got.metadata.creation_timestamp.is_some());
        match other.get("a").await {
            Err(::kube::Error::Api(s)) => assert_eq!(s.code, 404),
            r => panic!("expected 404, got {r:?}"),
        }
        let meta = pods
            .list_metadata(&fields("spec.nodeName=node-2"))
            .await
            .unwrap();
        assert_eq!(meta.items.len(), 1);
        assert_eq!(meta.items[0].metadata.labels.as_ref().unwrap()["app"], "db");

        // The same content again: no new version; a new spec: generation 2.
        let version = || async {
            pods.list(&ListParams::default())
                .await
                .unwrap()
                .metadata
                .resource_version
        };
        let before = version().await;
        lab.api
            .apply(&a_pod("a", "default", "node-1", &[("app", "web")]))
            .unwrap();
        tokio::time::sleep(SCAN_EVERY * 4).await;
        assert_eq!(version().await, before);
        lab.api
            .apply(&a_pod("a", "default", "node-3", &[("app", "web")]))
            .unwrap();
        until("generation 2", || async {
            let a = Api::<Pod>::namespaced(c.clone(), "default")
                .get("a")
                .await
                .unwrap();
            a.metadata.generation == Some(2)
        })
        .await;
        assert_ne!(version().await, before);
        assert!(lab.api.get("Pod", "default", "a").is_some());
        assert!(lab.api.get("Pod", "", "a").is_none());

        let requests = lab.api.requests();
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with("GET /api/v1/pods?fieldSelector=spec.nodeName=node-1")),
            "{requests:#?}"
        );
        assert!(
            requests
                .iter()
                .any(|r| r == "GET /api/v1/namespaces/other/pods/c"),
            "{requests:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchers_follow_changes() {
        let lab = lab("watch", &[]).await;
        let c = client(&lab.api).await;
        lab.api
            .apply(&a_pod("a", "default", "node-1", &[]))
            .unwrap();
        let pods = Api::<Pod>::all(c.clone());
        until("pod a", || async {
            pods.list(&ListParams::default()).await.unwrap().items.len() == 1
        })
        .await;

        let config = watcher::Config::default().fields("spec.nodeName=node-1");
        let mut local = watcher(pods.clone(), config).boxed();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(pod_name(&next(&mut local).await.unwrap()));
        }
        assert_eq!(seen, ["Init", "InitApply a", "InitDone"]);

        lab.api
            .apply(&a_pod("b", "default", "node-1", &[]))
            .unwrap();
        assert_eq!(pod_name(&next(&mut local).await.unwrap()), "Apply b");
        lab.api
            .apply(&a_pod("a", "default", "node-1", &[("app", "web")]))
            .unwrap();
        match next(&mut local).await.unwrap() {
            watcher::Event::Apply(p) => assert_eq!(p.metadata.labels.unwrap()["app"], "web"),
            e => panic!("expected Apply a, got {e:?}"),
        }
        // Moved off the node: no longer matches, so DELETED to this watch.
        lab.api
            .apply(&a_pod("a", "default", "node-2", &[]))
            .unwrap();
        assert_eq!(pod_name(&next(&mut local).await.unwrap()), "Delete a");
        lab.api.delete("Pod", "default", "b").unwrap();
        assert_eq!(pod_name(&next(&mut local).await.unwrap()), "Delete b");
        lab.api
            .apply(&a_pod("x", "default", "node-2", &[]))
            .unwrap();
        lab.api
            .apply(&a_pod("a", "default", "node-1", &[]))
            .unwrap();
        assert_eq!(
            pod_name(&next(&mut local).await.unwrap()),
            "Apply a",
            "x is not on node-1"
        );
        assert!(lab.api.delete("Pod", "default", "nope").is_err());

        // A streaming list (sendInitialEvents): the objects, then a bookmark.
        let streaming = watcher::Config::default().streaming_lists();
        let mut all = watcher(pods.clone(), streaming).boxed();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(pod_name(&next(&mut all).await.unwrap()));
        }
        assert_eq!(seen, ["Init", "InitApply a", "InitApply x", "InitDone"]);

        // Metadata only, on namespaces.
        lab.api
            .apply(&namespace("shop", &labels(&[("mesh", "on")])))
            .unwrap();
        let mut namespaces = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(c.clone()),
            watcher::Config::default(),
        )
        .boxed();
        assert!(matches!(
            next(&mut namespaces).await.unwrap(),
            watcher::Event::Init
        ));
        let mut listed = Vec::new();
        loop {
            match next(&mut namespaces).await.unwrap() {
                watcher::Event::InitApply(m) => listed.push(m),
                watcher::Event::InitDone => break,
                e => panic!("unexpected {e:?}"),
            }
        }
        // The lab may not have applied "shop" yet when the list was made.
        if listed.is_empty() {
            match next(&mut namespaces).await.unwrap() {
                watcher::Event::Apply(m) => listed.push(m),
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(listed[0].metadata.labels.as_ref().unwrap()["mesh"], "on");
        assert!(listed[0].metadata.uid.is_some());
        lab.api.apply(&namespace("new", &labels(&[]))).unwrap();
        match next(&mut namespaces).await.unwrap() {
            watcher::Event::Apply(m) => assert_eq!(m.metadata.name.as_deref(), Some("new")),
            e => panic!("unexpected {e:?}"),
        }
        let requests = lab.api.requests();
        assert!(
            requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName=node-1")
                && r.contains("watch=true")
                && r.contains("allowWatchBookmarks=true")),
            "{requests:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn istio_networking_group_serves_service_entries_and_destination_rules() {
        let lab = lab("networking", &["security.istio.io", "networking.istio.io"]).await;
        let c = client(&lab.api).await;
        let served = c
            .list_api_group_resources("networking.istio.io/v1")
            .await
            .unwrap();
        let kinds: Vec<&str> = served.resources.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["ServiceEntry", "DestinationRule"]);
        let entry = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                           "metadata": {"name": "pim", "namespace": "shop"},
                           "spec": {"hosts": ["pim.example.com"]}});
        lab.api.apply(&entry).unwrap();
        let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry");
        let entries = Api::<DynamicObject>::all_with(c.clone(), &ApiResource::from_gvk(&gvk));
        until("the ServiceEntry", || async {
            entries
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len()
                == 1
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discovery_and_custom_resources() {
        let lab = lab("discovery", &["security.istio.io"]).await;
        let c = client(&lab.api).await;
        let served = c
            .list_api_group_resources("security.istio.io/v1")
            .await
            .unwrap();
        assert_eq!(served.group_version, "security.istio.io/v1");
        let kinds: Vec<&str> = served.resources.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["AuthorizationPolicy", "PeerAuthentication"]);
        assert!(
            served
                .resources
                .iter()
                .all(|r| r.namespaced && r.verbs.contains(&"watch".to_owned()))
        );
        match c.list_api_group_resources("security.nodemesh.dev/v1").await {
            Err(::kube::Error::Api(s)) => assert_eq!(s.code, 404),
            r => panic!("expected 404, got {r:?}"),
        }
        let groups = c.list_api_groups().await.unwrap();
        assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));
        assert_eq!(c.apiserver_version().await.unwrap().minor, "33");

        let policy = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                            "metadata": {"name": "deny", "namespace": "shop"}, "spec": {"action": "DENY"}});
        lab.api.apply(&policy).unwrap();
        // Not served: ignored.
        let other = json!({"apiVersion": "security.nodemesh.dev/v1", "kind": "AuthorizationPolicy",
                           "metadata": {"name": "deny", "namespace": "shop"}, "spec": {}});
        lab.api.apply(&other).unwrap();
        let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
        let policies = Api::<DynamicObject>::all_with(c.clone(), &ApiResource::from_gvk(&gvk));
        until("the policy", || async {
            policies
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len()
                == 1
        })
        .await;
        let listed = policies.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items[0].data["spec"]["action"], "DENY");
        assert_eq!(
            lab.api
                .get("AuthorizationPolicy.security.istio.io", "shop", "deny")
                .unwrap()["spec"]["action"],
            "DENY"
        );
        assert!(
            lab.api
                .delete("AuthorizationPolicy.security.nodemesh.dev", "shop", "deny")
                .is_ok()
        );
        assert!(lab.api.get("AuthorizationPolicy", "shop", "deny").is_some());
        lab.api
            .delete("AuthorizationPolicy", "shop", "deny")
            .unwrap();
        until("no policy", || async {
            policies
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_created_then_patched() {
        let lab = lab("events", &[]).await;
        let c = client(&lab.api).await;
        let recorder = Recorder::new(
            c,
            Reporter {
                controller: "nodemesh-agent".into(),
                instance: Some("node-1".into()),
            },
        );
        let reference = ObjectReference {
            api_version: Some("security.istio.io/v1".into()),
            kind: Some("AuthorizationPolicy".into()),
            namespace: Some("shop".into()),
            name: Some("deny".into()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidPolicy".into(),
            note: Some("rejected by nodemesh".into()),
            action: "Validate".into(),
            secondary: None,
        };
        recorder.publish(&event, &reference).await.unwrap();
        recorder.publish(&event, &reference).await.unwrap();
        let events = lab.api.events();
        assert_eq!(events.len(), 1, "{events:#?}");
        let stored: K8sEvent = serde_json::from_value(events[0].clone()).unwrap();
        assert_eq!(stored.series.unwrap().count, 2);
        assert_eq!(stored.note.as_deref(), Some("rejected by nodemesh"));
        assert_eq!(stored.regarding.unwrap().name.as_deref(), Some("deny"));
        assert_eq!(stored.metadata.namespace.as_deref(), Some("shop"));
        assert!(stored.metadata.resource_version.is_some());
        let requests = lab.api.requests();
        assert!(
            requests.contains(&"POST /apis/events.k8s.io/v1/namespaces/shop/events".to_owned()),
            "{requests:#?}"
        );
        assert!(
            requests.iter().any(|r| r.starts_with("PATCH /apis/events.k8s.io/v1/namespaces/shop/events/deny.")),
            "{requests:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_makes_watches_relist() {
        let lab = lab("compact", &[]).await;
        let c = client(&lab.api).await;
        lab.api
            .apply(&a_pod("a", "default", "node-1", &[]))
            .unwrap();
        let pods = Api::<Pod>::all(c.clone());
        until("pod a", || async {
            pods.list(&ListParams::default()).await.unwrap().items.len() == 1
        })
        .await;
        // Watches of a second, so that it resumes soon after the compaction.
        let mut all = watcher(pods.clone(), watcher::Config::default().timeout(1)).boxed();
        for want in ["Init", "InitApply a", "InitDone"] {
            assert_eq!(pod_name(&next(&mut all).await.unwrap()), want);
        }
        // Other kinds move the version on past the watch's.
        lab.api.apply(&namespace("bump", &labels(&[]))).unwrap();
        let namespaces = Api::<Namespace>::all(c.clone());
        until("namespace bump", || async {
            namespaces
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len()
                == 1
        })
        .await;
        lab.api.compact().unwrap();

        // A watch from an old version: an ERROR event, 410 Expired.
        let mut old = pods
            .watch(&WatchParams::default(), "1")
            .await
            .unwrap()
            .boxed();
        match next(&mut old).await.unwrap() {
            WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
            e => panic!("expected 410, got {e:?}"),
        }
        assert!(
            tokio::time::timeout(WAIT, old.next())
                .await
                .unwrap()
                .is_none(),
            "the stream ends"
        );

        // The watcher resumes, gets 410, relists.
        match next(&mut all).await {
            Err(watcher::Error::WatchError(e)) => assert_eq!(e.code, 410),
            e => panic!("expected 410, got {e:?}"),
        }
        for want in ["Init", "InitApply a", "InitDone"] {
            assert_eq!(pod_name(&next(&mut all).await.unwrap()), want);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_token_is_refused() {
        let lab = lab("token", &[]).await;
        let text = fs::read_to_string(lab.api.kubeconfig()).unwrap();
        let token = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("token: "))
            .unwrap()
            .trim_matches('"');
        let wrong = Kubeconfig::from_yaml(&text.replace(token, "not-the-token")).unwrap();
        let c = client_from(wrong).await;
        match Api::<Pod>::all(c).list(&ListParams::default()).await {
            Err(::kube::Error::Api(s)) => {
                assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized"))
            }
            r => panic!("expected 401, got {r:?}"),
        }
        assert_eq!(lab.api.requests(), ["GET /api/v1/pods"]);
    }
}
