//! A FAKE of the Kubernetes API server, for tests only: HTTPS on loopback
//! (a self-signed rcgen certificate for 127.0.0.1), serving scripted list
//! and watch responses (and fixed documents: discovery) so the real kube-rs
//! client can be driven through its config loading, TLS, bearer token,
//! requests and relists.
//!
//! It does not evaluate selectors, resource versions or anything else of
//! the real server's semantics: responses are keyed by the request's path
//! and selectors exactly as a test registered them (so the test also pins
//! what the client asks for), and every request is recorded.
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify};

/// A request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub accept: String,
    pub authorization: String,
    /// The request's body (an Event the client posts), as sent.
    pub body: String,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

/// What one watch request gets: after `wait` (if any) is notified, the
/// `events` lines; then the stream ends if `end`, else stays open.
#[derive(Default)]
pub struct WatchScript {
    pub wait: Option<Arc<Notify>>,
    pub events: Vec<Value>,
    pub end: bool,
}

/// The responses of one collection (path and selectors).
#[derive(Default)]
struct Collection {
    /// One item list per list request; the last one repeats.
    lists: VecDeque<(String, Vec<Value>)>,
    /// One script per watch request; once used up, watches stay open and
    /// silent.
    watches: VecDeque<WatchScript>,
}

#[derive(Default)]
struct Script {
    collections: HashMap<String, Collection>,
    /// Fixed answers to GETs of a path (discovery documents).
    documents: HashMap<String, Value>,
    requests: Vec<Recorded>,
}

/// The fake server; runs until dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// The server's self-signed certificate, PEM (a kubeconfig's CA).
    pub ca_pem: String,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A collection's key: its path and selectors, as sent.
fn collection_key(path: &str, fields: &str, labels: &str) -> String {
    format!("{path} fieldSelector={fields:?} labelSelector={labels:?}")
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .expect("self-signed certificate");
        let ca_pem = certified.cert.pem();
        let key =
            rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let script = Arc::new(Mutex::new(Script::default()));
        let served = script.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, script) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let script = script.clone();
                        async move { Ok::<_, Infallible>(respond(&script, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_pem,
            script,
            task,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Script) -> T) -> T {
        f(&mut self.script.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds a list response (`kind` is the list's kind, e.g. `PodList`).
    pub fn list(&self, path: &str, fields: &str, labels: &str, kind: &str, items: Vec<Value>) {
        self.with(|s| {
            s.collections
                .entry(collection_key(path, fields, labels))
                .or_default()
                .lists
                .push_back((kind.to_owned(), items))
        });
    }

    /// Adds a watch response.
    pub fn watch(&self, path: &str, fields: &str, labels: &str, script: WatchScript) {
        self.with(|s| {
            s.collections
                .entry(collection_key(path, fields, labels))
                .or_default()
                .watches
                .push_back(script)
        });
    }

    /// Answers every GET of `path` with `document` (e.g. discovery's
    /// APIResourceList of a group version).
    pub fn document(&self, path: &str, document: Value) {
        self.with(|s| s.documents.insert(path.to_owned(), document));
    }

    /// Serves discovery of `group_version` with these namespaced kinds
    /// (`(kind, plural)`), as for installed CRDs. A group version not
    /// served gets 404, as from a real server.
    pub fn serve_group(&self, group_version: &str, kinds: &[(&str, &str)]) {
        let resources: Vec<Value> = kinds
            .iter()
            .map(|(kind, plural)| {
                json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": true,
                       "kind": kind, "verbs": ["get", "list", "watch"]})
            })
            .collect();
        self.document(
            &format!("/apis/{group_version}"),
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": group_version, "resources": resources}),
        );
    }

    /// A client of this server: its CA, a bearer token.
    pub fn client(&self) -> kube::Client {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        let url = format!("https://{}", self.addr).parse().expect("URL");
        let mut config = kube::Config::new(url);
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("the CA");
        config.root_cert = Some(vec![ca.to_vec()]);
        config.auth_info.token = Some("fake-token".to_owned().into());
        kube::Client::try_from(config).expect("client")
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|s| s.requests.clone())
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn json_body(status: u16, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}

async fn respond(script: &Mutex<Script>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .filter(|(k, _)| !k.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    let (accept, authorization) = (header("accept"), header("authorization"));
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let recorded = Recorded {
        method,
        path,
        query,
        accept,
        authorization,
        body,
    };
    let get = |k: &str| recorded.query.get(k).cloned().unwrap_or_default();
    let key = collection_key(&recorded.path, &get("fieldSelector"), &get("labelSelector"));
    let watch = recorded.is_watch();
    let metadata_only = recorded.accept.contains("as=PartialObjectMetadata");
    let mut script = script.lock().unwrap_or_else(PoisonError::into_inner);
    let document = match recorded.method.as_str() {
        "GET" if !watch => script.documents.get(&recorded.path).cloned(),
        _ => None,
    };
    script.requests.push(recorded);
    if let Some(document) = document {
        return json_body(200, &document);
    }
    let Some(collection) = script.collections.get_mut(&key) else {
        return json_body(
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("the fake has nothing for {key}"), "reason": "NotFound", "code": 404}),
        );
    };
    if !watch {
        let (kind, items) = match collection.lists.len() {
            0 => (String::new(), Vec::new()),
            1 => collection.lists[0].clone(),
            _ => collection.lists.pop_front().unwrap_or_default(),
        };
        let (kind, items) = match metadata_only {
            true => (
                "PartialObjectMetadataList".to_owned(),
                items.iter().map(partial_metadata).collect(),
            ),
            false => (kind, items),
        };
        let api_version = match metadata_only {
            true => "meta.k8s.io/v1",
            false => items
                .first()
                .and_then(|i| i["apiVersion"].as_str())
                .unwrap_or("v1"),
        };
        return json_body(
            200,
            &json!({"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": "1000"}, "items": items}),
        );
    }
    let WatchScript { wait, events, end } = collection.watches.pop_front().unwrap_or_default();
    let lines = stream::iter(events.into_iter().map(move |e| {
        let e = match metadata_only {
            true => json!({"type": e["type"], "object": partial_metadata(&e["object"])}),
            false => e,
        };
        Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{e}\n"))))
    }));
    let waited = stream::once(async move {
        if let Some(wait) = wait {
            wait.notified().await;
        }
    })
    .filter_map(|()| async { None });
    let tail = match end {
        true => stream::empty().boxed(),
        false => stream::pending().boxed(),
    };
    let body = StreamBody::new(waited.chain(lines).chain(tail));
    let mut response = Response::new(BodyExt::boxed_unsync(body));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}

/// An object as a metadata-only request returns it.
fn partial_metadata(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}
