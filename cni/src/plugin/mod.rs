//! The CNI plugin: VERSION, ADD, DEL, CHECK, STATUS and GC.
//!
//! It runs chained after the cluster's network plugin. On ADD it hands the
//! pod's netns to the node agent and returns only once the agent answered,
//! so no container of the pod starts before it is in the mesh. If the agent
//! is unreachable, ADD fails and the runtime retries: a pod never starts
//! outside the mesh.

mod agent;
mod config;
mod env;
mod error;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use serde_json::Value;

pub use config::{LATEST_VERSION, NetConf, SUPPORTED_VERSIONS};
pub use env::{Env, Pod};

/// What a fuzz target feeds the plugin's parsers (stdin config, the
/// previous result's addresses, CNI_ARGS, the agent's request): none may
/// panic, whatever the bytes.
pub fn fuzz_input(data: &[u8]) -> Option<Vec<std::net::IpAddr>> {
    let _ = Pod::from_args(&String::from_utf8_lossy(data), "c");
    let _ = serde_json::from_slice::<crate::protocol::Request>(data);
    let conf = NetConf::parse(data).ok()?;
    let prev = conf.prev_result.as_ref()?;
    config::result_ips(&conf, prev).ok()
}
pub use error::*;

use crate::protocol::{Command, Outcome, PROTOCOL_VERSION, Request, Response};
use agent::AskError;

/// Runs the CNI command in `env` with the network config in `stdin`,
/// writing the result (if the command has one) to `stdout`.
pub fn run(env: &Env, stdin: &[u8], stdout: &mut dyn Write) -> Result<(), CniError> {
    match env.command.as_str() {
        "VERSION" => version(stdout),
        "ADD" => add(env, &NetConf::parse(stdin)?, stdout),
        "DEL" => {
            del(env, stdin);
            Ok(())
        }
        "CHECK" => check(env, &NetConf::parse(stdin)?),
        "STATUS" => status(&NetConf::parse(stdin)?),
        // Nothing to collect: the agent forgets pods it sees deleted in the API.
        "GC" => Ok(()),
        "" => Err(CniError::new(
            INVALID_ENV,
            "CNI_COMMAND is not set: nodemesh-cni is a CNI plugin, run by the container \
             runtime (try --version)",
        )),
        other => Err(CniError::new(
            INVALID_ENV,
            format!(
                "unknown CNI_COMMAND {other:?}; expected ADD, DEL, CHECK, STATUS, GC or VERSION"
            ),
        )),
    }
}

fn version(stdout: &mut dyn Write) -> Result<(), CniError> {
    let versions = SUPPORTED_VERSIONS.map(|v| format!("{v:?}")).join(",");
    let line =
        format!("{{\"cniVersion\":\"{LATEST_VERSION}\",\"supportedVersions\":[{versions}]}}");
    write_out(stdout, line.as_bytes())
}

fn add(env: &Env, conf: &NetConf, stdout: &mut dyn Write) -> Result<(), CniError> {
    let prev_result = conf.require_prev_result()?;
    let Some(pod) = meshable_pod(env, conf) else {
        return print_result(conf, prev_result, stdout);
    };
    if env.netns.is_empty() {
        return Err(conf.error(
            INVALID_ENV,
            "CNI_NETNS is not set; the runtime must pass the pod's network namespace on ADD",
        ));
    }
    let ips = config::result_ips(conf, prev_result)?;
    let netns = open(
        env.netns.as_str(),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        conf.error(
            GENERIC,
            format!(
                "cannot open the pod's network namespace {:?} (CNI_NETNS)",
                env.netns
            ),
        )
        .details(e)
    })?;
    let request = request(Command::Add, env, conf, Some(&pod), ips);
    let response = ask(conf, &request, Some(&netns))?;
    match response.outcome {
        Outcome::Enrolled | Outcome::NotMeshed => print_result(conf, prev_result, stdout),
        Outcome::Error => Err(conf.error(
            TRY_AGAIN_LATER,
            format!(
                "the nodemesh agent refused to enrol pod {}/{}: {}",
                pod.namespace, pod.name, response.message
            ),
        )),
        other => Err(unexpected(conf, "ADD", other, &response)),
    }
}

/// Best effort: the agent also removes pods it sees deleted in the API, DEL
/// only makes that sooner. A failing DEL would block the pod's teardown
/// (the runtime retries it), so nothing here fails and nothing is printed.
fn del(env: &Env, stdin: &[u8]) {
    let Ok(conf) = NetConf::parse(stdin) else {
        return;
    };
    let Some(pod) = meshable_pod(env, &conf) else {
        return;
    };
    let ips = conf
        .prev_result
        .as_ref()
        .and_then(|prev| config::result_ips(&conf, prev).ok())
        .unwrap_or_default();
    let _ = ask(
        &conf,
        &request(Command::Del, env, &conf, Some(&pod), ips),
        None,
    );
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if !conf.allows_check() {
        return Err(conf.error(
            INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later; the config says {}",
                conf.cni_version
            ),
        ));
    }
    let prev_result = conf.require_prev_result()?;
    let Some(pod) = meshable_pod(env, conf) else {
        return Ok(());
    };
    let ips = config::result_ips(conf, prev_result)?;
    let response = ask(
        conf,
        &request(Command::Check, env, conf, Some(&pod), ips),
        None,
    )?;
    match response.outcome {
        Outcome::Enrolled | Outcome::NotMeshed => Ok(()),
        Outcome::Error => Err(conf.error(
            TRY_AGAIN_LATER,
            format!(
                "the nodemesh agent reports pod {}/{} is not in the mesh as it should be: {}",
                pod.namespace, pod.name, response.message
            ),
        )),
        other => Err(unexpected(conf, "CHECK", other, &response)),
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let not_available = |details: String| {
        conf.error(PLUGIN_NOT_AVAILABLE, "The plugin is not available")
            .details(details)
    };
    let request = request(Command::Status, &Env::default(), conf, None, Vec::new());
    match ask(conf, &request, None) {
        Ok(Response {
            outcome: Outcome::Ready,
            ..
        }) => Ok(()),
        Ok(response) => Err(not_available(format!(
            "the nodemesh agent is not ready ({:?}): {}",
            response.outcome, response.message
        ))),
        Err(e) if e.details.is_empty() => Err(not_available(e.msg)),
        Err(e) => Err(not_available(format!("{} ({})", e.msg, e.details))),
    }
}

/// The pod when the mesh should see it: a Kubernetes pod (CNI_ARGS names
/// it) outside the excluded namespaces.
fn meshable_pod(env: &Env, conf: &NetConf) -> Option<Pod> {
    Pod::from_args(&env.args, &env.container_id)
        .filter(|pod| !conf.exclude_namespaces.contains(&pod.namespace))
}

fn request(
    command: Command,
    env: &Env,
    conf: &NetConf,
    pod: Option<&Pod>,
    ips: Vec<IpAddr>,
) -> Request {
    Request {
        version: PROTOCOL_VERSION,
        command,
        container_id: pod.map_or_else(|| env.container_id.clone(), |p| p.container_id.clone()),
        pod_namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
        pod_name: pod.map(|p| p.name.clone()).unwrap_or_default(),
        pod_uid: pod.and_then(|p| p.uid.clone()),
        netns: env.netns.clone(),
        ips,
        timeout_ms: conf.timeout_seconds * 1000,
    }
}

fn ask(
    conf: &NetConf,
    request: &Request,
    netns: Option<&std::os::fd::OwnedFd>,
) -> Result<Response, CniError> {
    let timeout = Duration::from_secs(conf.timeout_seconds);
    let path = &conf.socket_path;
    agent::ask(path, request, netns.map(|fd| fd.as_fd()), timeout).map_err(|e| {
        let (msg, details) = match e {
            AskError::NotRunning(e) => (
                format!(
                    "the nodemesh agent is not running on this node (no answer on {path}): \
                     the pod waits until it is, so it never starts outside the mesh"
                ),
                e.to_string(),
            ),
            AskError::TimedOut => (
                format!(
                    "the nodemesh agent did not answer within {}s on {path}: the pod waits \
                     and the runtime retries, so it never starts outside the mesh",
                    conf.timeout_seconds
                ),
                String::new(),
            ),
            AskError::Failed(e) => (
                format!(
                    "talking to the nodemesh agent on {path} failed; the runtime retries, \
                     so the pod never starts outside the mesh"
                ),
                e.to_string(),
            ),
        };
        conf.error(TRY_AGAIN_LATER, msg).details(details)
    })
}

fn unexpected(conf: &NetConf, command: &str, outcome: Outcome, response: &Response) -> CniError {
    conf.error(
        TRY_AGAIN_LATER,
        format!(
            "the nodemesh agent answered {command} with {outcome:?} ({}); are the agent and \
             nodemesh-cni from the same release?",
            response.message
        ),
    )
}

fn print_result(
    conf: &NetConf,
    prev_result: &Value,
    stdout: &mut dyn Write,
) -> Result<(), CniError> {
    let mut out = serde_json::to_vec(&conf.result(prev_result)).expect("a Value always serialises");
    out.push(b'\n');
    write_out(stdout, &out)
}

fn write_out(stdout: &mut dyn Write, bytes: &[u8]) -> Result<(), CniError> {
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| CniError::new(GENERIC, "cannot write the result to stdout").details(e))
}
