//! The agent's end of the plugin's unix socket: one request per
//! connection (JSON, the netns as SCM_RIGHTS), one answer.
use std::{
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::PermissionsExt},
    sync::Arc,
    time::Duration,
};

use nodemesh_cni::protocol::{self, Command, Outcome, Request, Response};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{CniMetrics, CniRecord, CniRequest};
use crate::{config::CniSettings, state::PodKey};

/// Requests answered at once; the runtime runs ADDs for a node's pods
/// concurrently, and each may wait for its pod.
const MAX_CONCURRENT: usize = 64;
/// How long a connected plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Listens on `settings.socketPath` (a stale socket of an earlier agent is
/// replaced) and passes each request to enrolment.
pub fn start(
    settings: &CniSettings,
    requests: mpsc::Sender<CniRequest>,
    metrics: CniMetrics,
) -> io::Result<JoinHandle<()>> {
    let path = &settings.socket_path;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // The runtime runs the plugin as root; nobody else may enrol pods.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "CNI server listening");
    let pod_wait = Duration::from_millis(settings.pod_wait_ms);
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("CNI server accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // The mode is set after bind; the peer's credentials close that
            // window: only root (the runtime) or the agent's own user may
            // enrol pods.
            let own = nix::unistd::geteuid().as_raw();
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == own => {}
                other => {
                    let who = other.map_or_else(|e| e.to_string(), |c| format!("uid {}", c.uid()));
                    warn!(
                        "CNI server: refusing a connection from {who} (only root may enrol pods)"
                    );
                    metrics.record("unknown", "error");
                    continue;
                }
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(
                    "CNI server: {MAX_CONCURRENT} requests in progress; refusing one (the runtime retries)"
                );
                metrics.record("unknown", "error");
                let busy = error(format!(
                    "the agent is busy ({MAX_CONCURRENT} requests in progress)"
                ));
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = stream.write_all(&protocol::encode_response(&busy)).await;
                });
                continue;
            };
            let (requests, metrics) = (requests.clone(), metrics.clone());
            tokio::spawn(async move {
                answer(stream, &requests, &metrics, pod_wait).await;
                drop(slot);
            });
        }
    }))
}

async fn answer(
    mut stream: UnixStream,
    requests: &mpsc::Sender<CniRequest>,
    metrics: &CniMetrics,
    pod_wait: Duration,
) {
    let (command, response) = match tokio::time::timeout(READ_TIMEOUT, receive(&stream)).await {
        Ok(Ok((request, netns))) => {
            let command = command_name(request.command);
            (command, handle(request, netns, requests, pod_wait).await)
        }
        Ok(Err(e)) => ("unknown", error(format!("bad request: {e}"))),
        Err(_) => ("unknown", error("no request within 5 s".into())),
    };
    metrics.record(command, outcome_name(response.outcome));
    if response.outcome == Outcome::Error {
        warn!(command, "CNI request refused: {}", response.message);
    }
    let _ = stream
        .write_all(&protocol::encode_response(&response))
        .await;
}

async fn receive(stream: &UnixStream) -> io::Result<(Request, Option<std::os::fd::OwnedFd>)> {
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            protocol::recv_request(stream.as_fd())
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

async fn handle(
    request: Request,
    netns: Option<std::os::fd::OwnedFd>,
    requests: &mpsc::Sender<CniRequest>,
    pod_wait: Duration,
) -> Response {
    if request.command == Command::Status {
        return Response {
            outcome: Outcome::Ready,
            message: String::new(),
        };
    }
    if request.pod_namespace.is_empty() || request.pod_name.is_empty() {
        return error("podNamespace and podName are required".into());
    }
    let pod = PodKey {
        namespace: request.pod_namespace.clone(),
        name: request.pod_name.clone(),
    };
    // Answer before the plugin gives up, so it reports our reason.
    let budget = Duration::from_millis(request.timeout_ms.max(2000) - 1000);
    let (reply, answer) = oneshot::channel();
    let sent = match request.command {
        Command::Add => {
            let Some(netns) = netns else {
                return error("ADD without a netns descriptor".into());
            };
            let record = CniRecord {
                namespace: request.pod_namespace,
                name: request.pod_name,
                uid: request.pod_uid,
                container_id: request.container_id,
                netns: request.netns.into(),
                ips: request.ips,
                cookie: 0,
                pod: None,
            };
            info!(pod = %pod, netns = %record.netns.display(), ips = ?record.ips, "CNI ADD");
            requests
                .send(CniRequest::Add {
                    record: Box::new(record),
                    netns: File::from(netns),
                    wait: pod_wait.min(budget.mul_f32(0.8)),
                    reply,
                })
                .await
        }
        Command::Del => {
            info!(pod = %pod, container = %request.container_id, "CNI DEL");
            requests
                .send(CniRequest::Del {
                    pod,
                    container_id: request.container_id,
                    reply,
                })
                .await
        }
        Command::Check => {
            requests
                .send(CniRequest::Check {
                    pod,
                    container_id: request.container_id,
                    reply,
                })
                .await
        }
        Command::Status => unreachable!("answered above"),
    };
    if sent.is_err() {
        return error("the agent is shutting down".into());
    }
    match tokio::time::timeout(budget, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => error("the agent is shutting down".into()),
        Err(_) => error(format!(
            "enrolment did not finish within {} ms",
            budget.as_millis()
        )),
    }
}

pub fn error(message: String) -> Response {
    Response {
        outcome: Outcome::Error,
        message,
    }
}

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Add => "add",
        Command::Del => "del",
        Command::Check => "check",
        Command::Status => "status",
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Enrolled => "enrolled",
        Outcome::NotMeshed => "not_meshed",
        Outcome::Removed => "removed",
        Outcome::Ready => "ready",
        Outcome::Error => "error",
    }
}
