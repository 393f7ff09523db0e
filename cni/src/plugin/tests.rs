use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::stat::fstat;
use serde_json::{Value, json};

use super::*;
use crate::protocol::{encode_response, recv_request};

const NETNS: &str = "/proc/self/ns/net";
const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9f;\
                        K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=uid-1";

/// What the bridge plugin prints for a 0.4.0 conflist.
fn bridge_040_result() -> Value {
    json!({
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
            {"name": "veth1a2b3c4d", "mac": "5e:1f:2a:3b:4c:5d"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/cni-1234"}
        ],
        "ips": [
            {"version": "4", "interface": 2, "address": "10.244.1.7/24", "gateway": "10.244.1.1"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {}
    })
}

/// What the ptp plugin prints for a dual-stack 1.0.0 conflist.
fn ptp_100_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth3f2a91c0", "mac": "d2:7c:41:0e:9a:13"},
            {"name": "eth0", "mac": "6a:41:c2:8d:11:02", "sandbox": "/var/run/netns/cni-5678"}
        ],
        "ips": [
            {"interface": 1, "address": "10.1.2.3/32", "gateway": "10.1.2.1"},
            {"interface": 1, "address": "fd00:10:1::3/128", "gateway": "fd00:10:1::1"}
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dns": {
            "nameservers": ["10.96.0.10"],
            "domain": "cluster.local",
            "search": ["shop.svc.cluster.local", "svc.cluster.local"]
        }
    })
}

/// A unique directory per test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nmcni-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("cni.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

enum Answer {
    Outcome(Outcome, &'static str),
    /// Reads the request, then never answers (until the plugin hangs up).
    Silent,
}

/// A received request, and the (dev, ino) of the fd it carried.
type Seen = (Request, Option<(u64, u64)>);

/// A fake of the node agent's CNI socket: one connection per answer, each
/// read with the real `recv_request`. Joining returns what it received.
fn fake_agent(socket: &Path, answers: Vec<Answer>) -> JoinHandle<Vec<Seen>> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for answer in answers {
            let (mut stream, _) = listener.accept().unwrap();
            let (request, fd) = recv_request(stream.as_fd()).unwrap();
            let fd = fd.map(|fd| {
                let st = fstat(&fd).unwrap();
                (st.st_dev, st.st_ino)
            });
            seen.push((request, fd));
            match answer {
                Answer::Outcome(outcome, message) => {
                    let response = Response {
                        outcome,
                        message: message.into(),
                    };
                    let _ = std::io::Write::write_all(&mut stream, &encode_response(&response));
                }
                Answer::Silent => {
                    let _ = stream.read(&mut [0u8; 16]);
                }
            }
        }
        seen
    })
}

fn env(command: &str, args: &str) -> Env {
    Env {
        command: command.into(),
        container_id: "ctr-1".into(),
        netns: NETNS.into(),
        ifname: "eth0".into(),
        args: args.into(),
        path: "/opt/cni/bin".into(),
    }
}

/// The network config the runtime passes: our conflist entry plus name,
/// cniVersion, prevResult and runtime additions.
fn conf(version: &str, prev_result: Option<Value>, socket: &Path, extra: Value) -> Vec<u8> {
    let mut conf = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "nodemesh-cni",
        "socketPath": socket,
        "runtimeConfig": {"portMappings": []},
    });
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev;
    }
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    serde_json::to_vec(&conf).unwrap()
}

fn run_cmd(env: &Env, stdin: &[u8]) -> (Result<(), CniError>, Vec<u8>) {
    let mut out = Vec::new();
    let result = run(env, stdin, &mut out);
    (result, out)
}

fn netns_id() -> (u64, u64) {
    let st = fstat(File::open(NETNS).unwrap()).unwrap();
    (st.st_dev, st.st_ino)
}

#[test]
fn add_enrolled_prints_prev_result_and_sends_the_netns() {
    let dir = TempDir::new();
    let agent = fake_agent(&dir.socket(), vec![Answer::Outcome(Outcome::Enrolled, "")]);
    let stdin = conf("1.0.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    let (result, out) = run_cmd(&env("ADD", POD_ARGS), &stdin);
    result.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        ptp_100_result()
    );

    let seen = agent.join().unwrap();
    let (request, fd) = &seen[0];
    assert_eq!(*fd, Some(netns_id()));
    assert_eq!(request.command, Command::Add);
    assert_eq!(
        (request.pod_namespace.as_str(), request.pod_name.as_str()),
        ("shop", "cart-7d9f")
    );
    assert_eq!(request.pod_uid.as_deref(), Some("uid-1"));
    assert_eq!(request.container_id, "sandbox-1");
    assert_eq!(request.netns, NETNS);
    let want: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "fd00:10:1::3".parse().unwrap()];
    assert_eq!(request.ips, want);
    assert_eq!(request.timeout_ms, 10_000);
}

#[test]
fn add_with_a_040_result_extracts_ips_and_sets_the_conf_version() {
    let dir = TempDir::new();
    let agent = fake_agent(&dir.socket(), vec![Answer::Outcome(Outcome::NotMeshed, "")]);
    let mut prev = bridge_040_result();
    prev.as_object_mut().unwrap().remove("cniVersion");
    let stdin = conf("0.4.0", Some(prev), &dir.socket(), json!({}));
    let (result, out) = run_cmd(&env("ADD", POD_ARGS), &stdin);
    result.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        bridge_040_result()
    );
    let seen = agent.join().unwrap();
    assert_eq!(seen[0].0.ips, vec!["10.244.1.7".parse::<IpAddr>().unwrap()]);
}

#[test]
fn add_refused_by_the_agent_is_try_again_later() {
    let dir = TempDir::new();
    let agent = fake_agent(
        &dir.socket(),
        vec![Answer::Outcome(
            Outcome::Error,
            "cannot attach the datapath",
        )],
    );
    let stdin = conf("1.1.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    let (result, out) = run_cmd(&env("ADD", POD_ARGS), &stdin);
    let err = result.unwrap_err();
    assert_eq!(err.code, TRY_AGAIN_LATER);
    assert_eq!(
        err.msg,
        "the nodemesh agent refused to enrol pod shop/cart-7d9f: cannot attach the datapath"
    );
    assert_eq!(err.cni_version, "1.1.0");
    assert!(out.is_empty());
    agent.join().unwrap();
}

#[test]
fn add_without_an_agent_is_try_again_later() {
    let dir = TempDir::new();
    let stdin = conf("1.0.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    let err = run_cmd(&env("ADD", POD_ARGS), &stdin).0.unwrap_err();
    assert_eq!(err.code, TRY_AGAIN_LATER);
    assert!(err.msg.contains("not running on this node"), "{err}");
    assert!(err.msg.contains(dir.socket().to_str().unwrap()), "{err}");
    // The error result the runtime reads.
    let printed: Value = serde_json::from_str(&err.to_json()).unwrap();
    assert_eq!(printed["cniVersion"], "1.0.0");
    assert_eq!(printed["code"], 11);
}

#[test]
fn add_times_out_when_the_agent_never_answers() {
    let dir = TempDir::new();
    let agent = fake_agent(&dir.socket(), vec![Answer::Silent]);
    let stdin = conf(
        "1.0.0",
        Some(ptp_100_result()),
        &dir.socket(),
        json!({"timeoutSeconds": 1}),
    );
    let start = Instant::now();
    let err = run_cmd(&env("ADD", POD_ARGS), &stdin).0.unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.code, TRY_AGAIN_LATER);
    assert!(err.msg.contains("did not answer within 1s"), "{err}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(agent.join().unwrap()[0].0.timeout_ms, 1000);
}

#[test]
fn add_passes_excluded_namespaces_through_without_asking() {
    // No agent listens: asking would fail.
    let dir = TempDir::new();
    let stdin = conf("1.0.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1";
    let (result, out) = run_cmd(&env("ADD", args), &stdin);
    result.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        ptp_100_result()
    );

    let stdin = conf(
        "1.0.0",
        Some(ptp_100_result()),
        &dir.socket(),
        json!({"excludeNamespaces": ["shop"]}),
    );
    run_cmd(&env("ADD", POD_ARGS), &stdin).0.unwrap();
}

#[test]
fn add_passes_non_pods_through_without_asking() {
    let dir = TempDir::new();
    let stdin = conf("1.0.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    let (result, out) = run_cmd(&env("ADD", "IgnoreUnknown=1"), &stdin);
    result.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap(),
        ptp_100_result()
    );
}

#[test]
fn add_without_prev_result_is_invalid_config() {
    let dir = TempDir::new();
    let stdin = conf("1.0.0", None, &dir.socket(), json!({}));
    let err = run_cmd(&env("ADD", POD_ARGS), &stdin).0.unwrap_err();
    assert_eq!(err.code, INVALID_NETWORK_CONFIG);
    assert!(err.msg.contains("chained plugin"), "{err}");
}

#[test]
fn bad_input_gets_the_spec_codes() {
    let dir = TempDir::new();
    let prev = Some(ptp_100_result());
    let cases = [
        (b"{not json".to_vec(), DECODE_FAILURE),
        (
            conf("0.2.0", prev.clone(), &dir.socket(), json!({})),
            INCOMPATIBLE_VERSION,
        ),
        (
            conf(
                "1.0.0",
                prev.clone(),
                &dir.socket(),
                json!({"timeoutSeconds": 0}),
            ),
            INVALID_NETWORK_CONFIG,
        ),
        (
            conf(
                "1.0.0",
                prev,
                &dir.socket(),
                json!({"excludeNamespaces": "a"}),
            ),
            INVALID_NETWORK_CONFIG,
        ),
    ];
    for (stdin, code) in cases {
        let err = run_cmd(&env("ADD", POD_ARGS), &stdin).0.unwrap_err();
        assert_eq!(err.code, code, "{err}");
    }
    assert_eq!(
        run_cmd(&env("FROB", ""), b"{}").0.unwrap_err().code,
        INVALID_ENV
    );
    assert_eq!(
        run_cmd(&env("", ""), b"{}").0.unwrap_err().code,
        INVALID_ENV
    );
}

#[test]
fn del_is_best_effort_and_prints_nothing() {
    let dir = TempDir::new();
    let mut del_env = env("DEL", POD_ARGS);
    del_env.netns = String::new();
    let stdin = conf("1.0.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    // No agent, and garbage input: still fine.
    assert_eq!(run_cmd(&del_env, &stdin), (Ok(()), vec![]));
    assert_eq!(run_cmd(&del_env, b"garbage"), (Ok(()), vec![]));

    let agent = fake_agent(&dir.socket(), vec![Answer::Outcome(Outcome::Error, "boom")]);
    assert_eq!(run_cmd(&del_env, &stdin), (Ok(()), vec![]));
    let seen = agent.join().unwrap();
    let (request, fd) = &seen[0];
    assert_eq!(
        (request.command, *fd, request.netns.as_str()),
        (Command::Del, None, "")
    );
    assert_eq!(request.pod_name, "cart-7d9f");
}

#[test]
fn check_asks_the_agent() {
    let dir = TempDir::new();
    let agent = fake_agent(
        &dir.socket(),
        vec![
            Answer::Outcome(Outcome::Enrolled, ""),
            Answer::Outcome(Outcome::Error, "redirect map entry missing"),
        ],
    );
    let stdin = conf("1.0.0", Some(ptp_100_result()), &dir.socket(), json!({}));
    assert_eq!(run_cmd(&env("CHECK", POD_ARGS), &stdin), (Ok(()), vec![]));
    let err = run_cmd(&env("CHECK", POD_ARGS), &stdin).0.unwrap_err();
    assert_eq!(err.code, TRY_AGAIN_LATER);
    assert!(err.msg.ends_with(": redirect map entry missing"), "{err}");
    let seen = agent.join().unwrap();
    assert!(
        seen.iter()
            .all(|(r, fd)| r.command == Command::Check && fd.is_none())
    );

    // Excluded pods need no agent; 0.3.x has no CHECK; CHECK needs prevResult.
    let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1";
    run_cmd(&env("CHECK", args), &stdin).0.unwrap();
    let old = conf("0.3.1", Some(bridge_040_result()), &dir.socket(), json!({}));
    let err = run_cmd(&env("CHECK", POD_ARGS), &old).0.unwrap_err();
    assert_eq!(err.code, INCOMPATIBLE_VERSION);
    let bare = conf("1.0.0", None, &dir.socket(), json!({}));
    let err = run_cmd(&env("CHECK", POD_ARGS), &bare).0.unwrap_err();
    assert_eq!(err.code, INVALID_NETWORK_CONFIG);
}

#[test]
fn status_reports_the_agent() {
    let dir = TempDir::new();
    let stdin = conf("1.1.0", None, &dir.socket(), json!({}));
    let err = run_cmd(&env("STATUS", ""), &stdin).0.unwrap_err();
    assert_eq!(
        (err.code, err.msg.as_str()),
        (PLUGIN_NOT_AVAILABLE, "The plugin is not available")
    );

    let agent = fake_agent(
        &dir.socket(),
        vec![
            Answer::Outcome(Outcome::Ready, ""),
            Answer::Outcome(Outcome::Error, "still loading eBPF programs"),
        ],
    );
    assert_eq!(run_cmd(&env("STATUS", ""), &stdin), (Ok(()), vec![]));
    let err = run_cmd(&env("STATUS", ""), &stdin).0.unwrap_err();
    assert_eq!(err.code, PLUGIN_NOT_AVAILABLE);
    assert!(err.details.contains("still loading eBPF programs"), "{err}");
    assert!(
        agent
            .join()
            .unwrap()
            .iter()
            .all(|(r, _)| r.command == Command::Status)
    );
}

#[test]
fn version_and_gc() {
    let (result, out) = run_cmd(&env("VERSION", ""), b"{\"cniVersion\":\"1.1.0\"}");
    result.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
    assert_eq!(run_cmd(&env("GC", ""), b"{}"), (Ok(()), vec![]));
}

#[test]
fn pod_identity_comes_from_cni_args() {
    let pod = Pod::from_args(POD_ARGS, "ctr-1").unwrap();
    assert_eq!(pod.container_id, "sandbox-1");
    assert_eq!(pod.uid.as_deref(), Some("uid-1"));
    let pod = Pod::from_args("K8S_POD_NAMESPACE=a;junk;K8S_POD_NAME=b", "ctr-1").unwrap();
    assert_eq!((pod.container_id.as_str(), pod.uid), ("ctr-1", None));
    assert_eq!(Pod::from_args("K8S_POD_NAME=b", "ctr-1"), None);
}
