//! Third-party APIs: hosts outside the cluster that meshed pods call, for
//! the egress tests and benches (issue 12).
//!
//! - A test PKI of its own (rcgen), not the mesh's: a CA the tests hand to
//!   the agent (a DestinationRule's `caCertificates`), another CA the agent
//!   is never told about, a client certificate for `tls.mode: MUTUAL`, and
//!   per server one certificate of each [`CertKind`].
//! - A server (`nodemesh-lab third-party`): TLS with ALPN `h2` and
//!   `http/1.1` (or plaintext, HTTP/1.1 or h2c), answering with JSON that
//!   names the instance, the authority, the path, the HTTP version and
//!   whether a client certificate came; `/bytes/N` and `POST /echo` for
//!   benches. A [`Fault`] is read from a file at each accepted connection,
//!   so a test flips it without a restart.
//! - The cluster's side: each server gets an address of its own on the
//!   external host `ext` (10.240.0.201..=220, fd00:240::201..=220), and can
//!   be stopped (connections refused) and started again; any address can
//!   be blackholed at every node.
use std::{
    convert::Infallible,
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{Cluster, sys};

// ---------------------------------------------------------------------------
// Certificates

/// Which certificate a third party presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// For its hostnames, signed by the test CA.
    Good,
    /// A valid chain from the test CA, for another name.
    WrongName,
    /// For its hostnames, signed by the test CA, `not_after` in the past.
    Expired,
    /// For its hostnames, signed by a CA the agent is not told about.
    UnknownCa,
}

impl CertKind {
    pub const ALL: [CertKind; 4] = [
        CertKind::Good,
        CertKind::WrongName,
        CertKind::Expired,
        CertKind::UnknownCa,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CertKind::Good => "good",
            CertKind::WrongName => "wrong-name",
            CertKind::Expired => "expired",
            CertKind::UnknownCa => "unknown-ca",
        }
    }
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CertKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        CertKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown certificate {s:?} (good, wrong-name, expired, unknown-ca)")
            })
    }
}

/// The name a `wrong-name` certificate is for (no third party's).
pub const WRONG_NAME: &str = "wrong-name.example.net";

/// In a server's certificate directory: the CA whose client certificates it
/// accepts.
const CLIENT_CA_FILE: &str = "client-ca.pem";

/// The third parties' own PKI (PEM files), separate from the mesh CA.
#[derive(Debug, Clone)]
pub struct ThirdPartyCa {
    pub dir: PathBuf,
    /// What the tests give the agent (`caCertificates`) and curl (`--cacert`).
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The CA behind `unknown-ca` certificates: never given to the agent.
    pub other_ca_cert: PathBuf,
    pub other_ca_key: PathBuf,
    /// A client certificate signed by `ca_cert` (DestinationRule `MUTUAL`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl ThirdPartyCa {
    fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            other_ca_cert: dir.join("other-ca.pem"),
            other_ca_key: dir.join("other-ca.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    /// The PKI in `dir`, created on first use.
    pub fn create_or_load(dir: &Path) -> Result<Self> {
        let ca = Self::at(dir);
        if ca.client_key.is_file() {
            return Ok(ca);
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_ca(&ca.ca_cert, &ca.ca_key, "nodemesh-lab third-party CA")?;
        write_ca(
            &ca.other_ca_cert,
            &ca.other_ca_key,
            "nodemesh-lab unknown CA",
        )?;
        let client = leaf_params(
            vec!["client.nodemesh-lab.test".into()],
            "nodemesh-lab client",
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        // Last: its key marks the PKI complete.
        issue(&client, &ca.issuer(false)?, &ca.client_cert, &ca.client_key)?;
        Ok(ca)
    }

    /// Writes one certificate and key of each kind for `hosts` into `dir`
    /// (`<kind>.pem`, `<kind>.key`), and the CA its server accepts client
    /// certificates from.
    pub fn issue_server_certs(&self, dir: &Path, hosts: &[String]) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ca, other) = (self.issuer(false)?, self.issuer(true)?);
        let cn = hosts.first().map_or("third party", String::as_str);
        for kind in CertKind::ALL {
            let names = match kind {
                CertKind::WrongName => vec![WRONG_NAME.to_owned()],
                _ => hosts.to_vec(),
            };
            let mut params = leaf_params(names, cn, ExtendedKeyUsagePurpose::ServerAuth)?;
            if kind == CertKind::Expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2020, 1, 2);
            }
            let issuer = match kind {
                CertKind::UnknownCa => &other,
                _ => &ca,
            };
            let (cert, key) = server_cert_files(dir, kind);
            issue(&params, issuer, &cert, &key)?;
        }
        fs::copy(&self.ca_cert, dir.join(CLIENT_CA_FILE))
            .with_context(|| format!("copying the CA into {}", dir.display()))?;
        Ok(())
    }

    fn issuer(&self, other: bool) -> Result<Issuer<'static, KeyPair>> {
        let (cert, key) = match other {
            false => (&self.ca_cert, &self.ca_key),
            true => (&self.other_ca_cert, &self.other_ca_key),
        };
        let key = KeyPair::from_pem(&read(key)?).with_context(|| format!("{}", key.display()))?;
        Issuer::from_ca_cert_pem(&read(cert)?, key).with_context(|| format!("{}", cert.display()))
    }
}

fn server_cert_files(dir: &Path, kind: CertKind) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{kind}.pem")),
        dir.join(format!("{kind}.key")),
    )
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write_ca(cert: &Path, key: &Path, common_name: &str) -> Result<()> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pair = KeyPair::generate().context("CA key")?;
    let signed = params.self_signed(&pair).context("self-signing the CA")?;
    write_pem(cert, &signed.pem())?;
    write_pem(key, &pair.serialize_pem())
}

fn leaf_params(
    names: Vec<String>,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(names.clone()).with_context(|| format!("names {names:?}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn issue(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    cert: &Path,
    key: &Path,
) -> Result<()> {
    let pair = KeyPair::generate().context("certificate key")?;
    let signed = params
        .signed_by(&pair, issuer)
        .with_context(|| format!("signing {}", cert.display()))?;
    write_pem(cert, &signed.pem())?;
    write_pem(key, &pair.serialize_pem())
}

fn write_pem(path: &Path, pem: &str) -> Result<()> {
    fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------
// Faults

/// What a third party does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Sleeps this long before each response.
    Delay(Duration),
    /// Accepts, then closes with RST (SO_LINGER 0).
    Reset,
    /// Accepts, then closes cleanly (FIN).
    Close,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => f.write_str("none"),
            Fault::Delay(d) => write!(f, "delay:{}", d.as_millis()),
            Fault::Reset => f.write_str("reset"),
            Fault::Close => f.write_str("close"),
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "none" => Ok(Fault::None),
            "reset" => Ok(Fault::Reset),
            "close" => Ok(Fault::Close),
            other => other
                .strip_prefix("delay:")
                .and_then(|ms| ms.parse().ok())
                .map(|ms| Fault::Delay(Duration::from_millis(ms)))
                .ok_or_else(|| format!("unknown fault {other:?} (none, delay:MS, reset, close)")),
        }
    }
}

/// The fault in force: the file's content, `none` while there is no file.
pub fn read_fault(path: &Path) -> Result<Fault> {
    match fs::read_to_string(path) {
        Ok(text) => text
            .parse()
            .map_err(|e: String| anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Fault::None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaced by rename, so the server never reads half a file.
pub fn write_fault(path: &Path, fault: Fault) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, fault.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------------------
// The server

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: Vec<SocketAddr>,
    /// The instance's name, in every JSON answer (`pim-1`).
    pub name: String,
    /// Where `issue_server_certs` wrote its certificates.
    pub cert_dir: Option<PathBuf>,
    pub cert: CertKind,
    pub plaintext: bool,
    /// Refuse clients without a certificate from `client-ca.pem`.
    pub require_client_cert: bool,
    pub fault_file: Option<PathBuf>,
}

/// What the JSON answers report about the connection.
#[derive(Debug, Clone, Default)]
struct ConnInfo {
    tls: bool,
    sni: Option<String>,
    alpn: Option<String>,
    client_cert: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves until killed; prints one JSON line once it listens, then one per
/// accepted connection (`{"accepted": PEER, "fault": ...}`).
pub async fn serve(opts: ServerOptions) -> Result<()> {
    let tls = match opts.plaintext {
        true => None,
        false => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(
            &opts,
        )?))),
    };
    let mut listeners = Vec::new();
    for addr in &opts.listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        listeners.push(l);
    }
    println!(
        "{}",
        json!({"listening": opts.listen, "name": opts.name, "tls": !opts.plaintext})
    );
    let opts = Arc::new(opts);
    let mut loops = tokio::task::JoinSet::new();
    for l in listeners {
        loops.spawn(accept_loop(l, tls.clone(), opts.clone()));
    }
    while let Some(ended) = loops.join_next().await {
        ended.context("an accept loop panicked")?;
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    opts: Arc<ServerOptions>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let fault = match &opts.fault_file {
            Some(f) => read_fault(f),
            None => Ok(Fault::None),
        };
        let fault = match fault {
            Ok(f) => f,
            Err(e) => {
                // Visible, and the connection fails: a typo never looks like `none`.
                eprintln!("{e:#}");
                continue;
            }
        };
        println!("{}", json!({"accepted": peer, "fault": fault.to_string()}));
        tokio::spawn(connection(tcp, fault, tls.clone(), opts.clone()));
    }
}

async fn connection(
    tcp: TcpStream,
    fault: Fault,
    tls: Option<tokio_rustls::TlsAcceptor>,
    opts: Arc<ServerOptions>,
) {
    let delay = match fault {
        Fault::Reset => return reset(tcp).await,
        Fault::Close => return close_cleanly(tcp).await,
        Fault::Delay(d) => d,
        Fault::None => Duration::ZERO,
    };
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = tls else {
        return serve_http(TokioIo::new(tcp), ConnInfo::default(), delay, opts).await;
    };
    let stream = match acceptor.accept(tcp).await {
        Ok(s) => s,
        Err(e) => return eprintln!("TLS handshake: {e}"),
    };
    let conn = stream.get_ref().1;
    let info = ConnInfo {
        tls: true,
        sni: conn.server_name().map(str::to_owned),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        client_cert: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
    };
    serve_http(TokioIo::new(stream), info, delay, opts).await
}

/// Waits (up to 1 s) for the client's first bytes, so it sees an
/// established connection reset, not a failed connect; then closes with RST.
async fn reset(tcp: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.readable()).await;
    // Linger 0: close() sends RST instead of FIN.
    if let Err(e) = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)) {
        eprintln!("SO_LINGER: {e}");
    }
}

/// FIN first, then drains what the client sent: closing with unread data
/// would make the kernel send RST instead.
async fn close_cleanly(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

async fn serve_http<I>(io: TokioIo<I>, info: ConnInfo, delay: Duration, opts: Arc<ServerOptions>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let alpn = info.alpn.clone();
    let info = Arc::new(info);
    let service = service_fn(move |req| {
        let (info, opts) = (info.clone(), opts.clone());
        async move { Ok::<_, Infallible>(respond(req, &info, delay, &opts).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // ALPN decides under TLS; in plaintext the HTTP/2 preface does (h2c).
    let builder = match alpn.as_deref() {
        Some("h2") => builder.http2_only(),
        Some(_) => builder.http1_only(),
        None => builder,
    };
    let _ = builder.serve_connection(io, service).await;
}

async fn respond(
    req: Request<Incoming>,
    info: &ConnInfo,
    delay: Duration,
    opts: &ServerOptions,
) -> Response<Body> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path().to_owned();
    match (req.method(), path.strip_prefix("/bytes/")) {
        (&Method::POST, _) if path == "/echo" => Response::new(req.into_body().boxed()),
        (&Method::GET, Some(n)) => match n.parse() {
            Ok(n) => bytes_response(n),
            Err(_) => text(StatusCode::BAD_REQUEST, "/bytes/N: N is a byte count\n"),
        },
        _ => describe(&req, info, opts),
    }
}

/// The JSON answer: which instance, for which authority and path, over
/// which HTTP version and TLS.
fn describe(req: &Request<Incoming>, info: &ConnInfo, opts: &ServerOptions) -> Response<Body> {
    // HTTP/2 carries the authority in the URI, HTTP/1.1 in Host.
    let host = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let body = json!({
        "server": opts.name,
        "host": host,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "version": format!("{:?}", req.version()),
        "tls": info.tls,
        "sni": info.sni,
        "alpn": info.alpn,
        "client_cert": info.client_cert,
    });
    let mut resp = text(StatusCode::OK, &format!("{body}\n"));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_owned()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

/// N bytes of `x`, streamed in 64 KiB chunks of one static buffer (no
/// allocation per response, for throughput benches).
fn bytes_response(n: u64) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    static FILL: [u8; CHUNK as usize] = [b'x'; CHUNK as usize];
    let chunks = (0..n.div_ceil(CHUNK)).map(move |i| {
        let len = (n - i * CHUNK).min(CHUNK) as usize;
        Ok(Frame::data(Bytes::from_static(&FILL[..len])))
    });
    let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed());
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
    resp
}

fn server_tls(opts: &ServerOptions) -> Result<rustls::ServerConfig> {
    let dir = opts
        .cert_dir
        .as_deref()
        .ok_or_else(|| anyhow!("TLS needs --cert-dir (or --plaintext)"))?;
    let (cert, key) = server_cert_files(dir, opts.cert);
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(&key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_verifier(dir, opts.require_client_cert, provider)? {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("TLS server configuration")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Client certificates are always asked for when the directory has a
/// client CA (so answers can say whether one came), required only with
/// `require`.
fn client_verifier(
    dir: &Path,
    require: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>> {
    let ca = dir.join(CLIENT_CA_FILE);
    if !ca.is_file() {
        if require {
            bail!("--require-client-cert: no {}", ca.display());
        }
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).with_context(|| format!("{}", ca.display()))? {
        roots
            .add(cert.with_context(|| format!("{}", ca.display()))?)
            .with_context(|| format!("{}", ca.display()))?;
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = match require {
        true => builder,
        false => builder.allow_unauthenticated(),
    };
    Ok(Some(
        builder.build().context("client certificate verifier")?,
    ))
}

// ---------------------------------------------------------------------------
// On the cluster

/// How many third-party hosts `ext` can carry: 10.240.0.201..=220.
const MAX_HOSTS: usize = 20;

/// A MAC on no interface: frames to it are flooded on the fabric and
/// dropped by every receiver, without an error to the sender.
const BLACKHOLE_MAC: &str = "02:00:00:00:de:ad";

/// A third party to start: one instance (of maybe several) of an API.
#[derive(Debug, Clone)]
pub struct ThirdPartySpec {
    /// The instance (`pim-1`): unique in the cluster, in its JSON answers.
    pub name: String,
    /// The names its certificates are for (`pim.example.com`,
    /// `*.pim.example.com`; IP addresses become IP SANs).
    pub hosts: Vec<String>,
    pub port: u16,
    pub cert: CertKind,
    pub plaintext: bool,
    pub require_client_cert: bool,
    /// Serve on this host's addresses (another port of the same host)
    /// instead of a new one.
    pub same_host_as: Option<(Ipv4Addr, Ipv6Addr)>,
}

impl ThirdPartySpec {
    /// TLS on 443 with a good certificate for `hosts`.
    pub fn new(name: &str, hosts: &[&str]) -> Self {
        Self {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            port: 443,
            cert: CertKind::Good,
            plaintext: false,
            require_client_cert: false,
            same_host_as: None,
        }
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn cert(mut self, cert: CertKind) -> Self {
        self.cert = cert;
        self
    }

    pub fn plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    pub fn require_client_cert(mut self) -> Self {
        self.require_client_cert = true;
        self
    }

    pub fn same_host_as(mut self, other: &ThirdParty) -> Self {
        self.same_host_as = Some((other.ip4, other.ip6));
        self
    }
}

/// How to run the lab binary on the external host (kept for restarts).
#[derive(Debug, Clone)]
struct Launcher {
    lab_bin: PathBuf,
    cgroup: PathBuf,
    netns: PathBuf,
}

/// A running (or stopped) third party. Its process runs in the run's
/// cgroup: killed when the handle drops, and by the cluster's cleanup in
/// any case; its addresses go with the external host's netns.
#[derive(Debug)]
pub struct ThirdParty {
    /// What it was started with; `start` uses it as it is then (e.g. stop,
    /// set `spec.cert`, start: the same host with another certificate).
    pub spec: ThirdPartySpec,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub cert_dir: PathBuf,
    pub fault_file: PathBuf,
    /// Its output: a line when it listens, one per accepted connection.
    pub out: PathBuf,
    launcher: Launcher,
    child: Option<Child>,
}

impl ThirdParty {
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    pub fn addr4(&self) -> SocketAddr {
        (self.ip4, self.spec.port).into()
    }

    pub fn addr6(&self) -> SocketAddr {
        (self.ip6, self.spec.port).into()
    }

    /// Takes effect at its next accepted connection.
    pub fn set_fault(&self, fault: Fault) -> Result<()> {
        write_fault(&self.fault_file, fault)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills it: connections to it are refused (nothing listens).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the third party")?;
            child.wait().context("waiting for the third party")?;
        }
        Ok(())
    }

    /// Starts it (again) and waits until it listens.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("third party {} is already running", self.spec.name);
        }
        let before = self.listening_lines();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)
            .with_context(|| format!("opening {}", self.out.display()))?;
        let child = self
            .command()
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the third party")?;
        self.child = Some(child);
        self.wait_listening(before)
    }

    /// Everything it printed (over every start): a line when it listens,
    /// one per accepted connection, and its errors (failed TLS handshakes
    /// with rustls' reason, e.g. a client without a required certificate).
    pub fn output(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Connections it accepted so far (over every start).
    pub fn connections(&self) -> usize {
        self.output_lines("\"accepted\"")
    }

    fn listening_lines(&self) -> usize {
        self.output_lines("\"listening\"")
    }

    fn output_lines(&self, key: &str) -> usize {
        self.output().lines().filter(|l| l.contains(key)).count()
    }

    fn wait_listening(&mut self, before: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.listening_lines() == before {
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if exited.is_some() || Instant::now() > deadline {
                let _ = self.stop();
                bail!(
                    "third party {} did not start ({}): {}",
                    self.spec.name,
                    exited.map_or("no line in 10 s".into(), |s| s.to_string()),
                    fs::read_to_string(&self.out).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn command(&self) -> Command {
        let l = &self.launcher;
        let mut cmd = Command::new(&l.lab_bin);
        cmd.arg("pod-exec")
            .arg("--cgroup")
            .arg(&l.cgroup)
            .arg("--netns")
            .arg(&l.netns)
            .arg("--")
            .arg(&l.lab_bin)
            .args(self.server_args());
        cmd
    }

    fn server_args(&self) -> Vec<String> {
        let s = &self.spec;
        let mut args = vec![
            "third-party".to_owned(),
            "--listen".into(),
            self.addr4().to_string(),
            "--listen".into(),
            self.addr6().to_string(),
            "--name".into(),
            s.name.clone(),
            "--cert-dir".into(),
            self.cert_dir.display().to_string(),
            "--cert".into(),
            s.cert.to_string(),
            "--fault-file".into(),
            self.fault_file.display().to_string(),
        ];
        if s.plaintext {
            args.push("--plaintext".into());
        }
        if s.require_client_cert {
            args.push("--require-client-cert".into());
        }
        args
    }
}

impl Drop for ThirdParty {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The n-th third-party host's addresses (n from 1): 10.240.0.2NN and
/// fd00:240::2NN, the same digits in both.
fn third_party_ips(n: usize) -> (Ipv4Addr, Ipv6Addr) {
    let last = 200 + n as u16;
    let v6 = u16::from_str_radix(&last.to_string(), 16).expect("decimal digits are hex digits");
    (
        Ipv4Addr::new(10, 240, 0, last as u8),
        Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, v6),
    )
}

impl Cluster {
    /// The third parties' PKI (created on first use), under the run's state.
    pub fn third_party_ca(&self) -> Result<ThirdPartyCa> {
        ThirdPartyCa::create_or_load(&self.state_dir.join("thirdparty"))
    }

    /// Starts a third party on the external host, on an address of its own
    /// (or `spec.same_host_as`'s), and waits until it listens.
    pub fn start_third_party(&self, spec: &ThirdPartySpec) -> Result<ThirdParty> {
        let ca = self.third_party_ca()?;
        let dir = ca.dir.join("servers").join(&spec.name);
        if dir.exists() {
            bail!("a third party named {} already exists", spec.name);
        }
        ca.issue_server_certs(&dir, &spec.hosts)?;
        let (ip4, ip6) = match spec.same_host_as {
            Some(ips) => ips,
            None => self.add_third_party_host()?,
        };
        let mut third_party = ThirdParty {
            spec: spec.clone(),
            ip4,
            ip6,
            fault_file: dir.join("fault"),
            out: dir.join("server.out"),
            cert_dir: dir,
            launcher: Launcher {
                lab_bin: self.lab_bin.clone(),
                cgroup: self.cgroup_dir.join("external"),
                netns: self.external_netns(),
            },
            child: None,
        };
        third_party.start()?;
        Ok(third_party)
    }

    /// A new address pair on `ext`. On the fabric's subnets, so nodes
    /// (and pods, through their node) reach it with no route added.
    fn add_third_party_host(&self) -> Result<(Ipv4Addr, Ipv6Addr)> {
        let n = self.third_party_hosts.fetch_add(1, Ordering::Relaxed) + 1;
        if n > MAX_HOSTS {
            bail!("at most {MAX_HOSTS} third-party hosts per cluster");
        }
        let (ip4, ip6) = third_party_ips(n);
        let ext = self.ns_ext();
        sys::ip_in(&ext, &["addr", "add", &format!("{ip4}/32"), "dev", "eth0"])?;
        sys::ip_in(
            &ext,
            &["addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"],
        )?;
        Ok((ip4, ip6))
    }

    /// Packets to `ip` from every node (so also from its pods and its
    /// agent) vanish: connects time out, nothing is refused. Done with a
    /// permanent neighbour entry to a MAC no one has, not a blackhole route:
    /// a blackhole route fails a local sender's (the agent's) connect at
    /// once with EINVAL, which is no timeout.
    pub fn blackhole(&self, ip: impl Into<IpAddr>) -> Result<()> {
        let ip = ip.into().to_string();
        for k in 0..self.spec.nodes {
            sys::ip_in(
                &self.ns_node(k),
                &[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    BLACKHOLE_MAC,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )
            .with_context(|| format!("blackholing {ip} at node {k}"))?;
        }
        Ok(())
    }

    /// Undoes `blackhole`: the nodes resolve `ip` again.
    pub fn unblackhole(&self, ip: impl Into<IpAddr>) -> Result<()> {
        let ip = ip.into().to_string();
        for k in 0..self.spec.nodes {
            sys::ip_in(&self.ns_node(k), &["neigh", "del", &ip, "dev", "eth0"])
                .with_context(|| format!("removing the blackhole of {ip} at node {k}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    #[test]
    fn faults_round_trip_and_typos_are_errors() {
        for f in [
            Fault::None,
            Fault::Delay(Duration::from_millis(250)),
            Fault::Reset,
            Fault::Close,
        ] {
            assert_eq!(f.to_string().parse::<Fault>(), Ok(f));
        }
        assert_eq!(" none\n".parse::<Fault>(), Ok(Fault::None));
        assert!("delay:soon".parse::<Fault>().is_err());
        assert!("rest".parse::<Fault>().is_err());
    }

    /// Each kind fails rustls' verification (the agent's) for its own reason.
    #[test]
    fn each_certificate_kind_verifies_or_fails_as_named() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("nodemesh-thirdparty-{}", std::process::id()));
        let ca = ThirdPartyCa::create_or_load(&dir).unwrap();
        let server = dir.join("servers/pim-1");
        ca.issue_server_certs(&server, &["pim.example.com".into()])
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&ca.ca_cert).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("pim.example.com").unwrap();
        let outcome = |kind| {
            let cert = CertificateDer::from_pem_file(server_cert_files(&server, kind).0).unwrap();
            let now = rustls_pki_types::UnixTime::now();
            match verifier.verify_server_cert(&cert, &[], &name, &[], now) {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("{e:?}"),
            }
        };
        assert_eq!(outcome(CertKind::Good), "ok");
        assert!(outcome(CertKind::WrongName).contains("NotValidForName"));
        assert!(outcome(CertKind::Expired).contains("Expired"));
        assert!(outcome(CertKind::UnknownCa).contains("UnknownIssuer"));
        // Loading again reuses the PKI (servers started later share it).
        let again = ThirdPartyCa::create_or_load(&dir).unwrap();
        assert_eq!(read(&again.ca_cert).unwrap(), read(&ca.ca_cert).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn third_party_addresses_read_the_same_in_both_families() {
        assert_eq!(
            third_party_ips(1),
            (
                "10.240.0.201".parse().unwrap(),
                "fd00:240::201".parse().unwrap()
            )
        );
        assert_eq!(
            third_party_ips(20).1,
            "fd00:240::220".parse::<Ipv6Addr>().unwrap()
        );
    }
}
