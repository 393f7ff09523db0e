//! The lab's third parties themselves, without the mesh: real TLS servers on
//! the external host, checked with curl (a real client, OpenSSL's
//! verification) from the external host, a node and a pod out of the mesh.
//! What the egress tests build on: certificates that verify or fail for
//! their own reason, client certificates, and each fault as specified.
//! Root; fails, never skips, when the cluster cannot be built.
use std::{path::Path, process::Command, time::Duration};

use nodemesh_lab::{
    Cluster, ClusterSpec, PodSpec,
    cluster::wait_for,
    thirdparty::{CertKind, Fault, ThirdParty, ThirdPartySpec},
};
use serde_json::Value;

const PIM: &str = "pim.example.com";

/// One node, one pod out of the mesh: the agent plays no part here.
fn cluster() -> Cluster {
    let mut spec = ClusterSpec {
        nodes: 1,
        pods: vec![PodSpec::new("outsider", 0).unenrolled()],
        services: vec![],
        agent: Default::default(),
    };
    spec.agent.workloads_file = true;
    Cluster::start(spec).expect("building the virtual cluster (needs root)")
}

fn start(c: &Cluster, spec: ThirdPartySpec) -> ThirdParty {
    c.start_third_party(&spec)
        .unwrap_or_else(|e| panic!("starting third party {}: {e:#}", spec.name))
}

/// Where curl runs.
#[derive(Clone, Copy, Debug)]
enum At {
    /// The external host (the third parties' own).
    Ext,
    /// Node 0's netns, where its agent connects from.
    Node,
    /// A pod out of the mesh on node 0 (its packets forwarded by the node).
    Pod,
}

#[derive(Debug)]
struct Curl {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `-w` for `Curl::times`: curl's own clock, so timing checks hold on a
/// loaded machine (process start-up is not in it).
const TIMES: [&str; 2] = [
    "-w",
    "\n%{time_pretransfer} %{time_starttransfer} %{time_total}",
];

impl Curl {
    /// The server's JSON answer (one line).
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "curl failed: {self:?}");
        let first = self.stdout.lines().next().unwrap_or_default();
        serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// With `TIMES`: how long the server took to answer once the request
    /// could go (connected, TLS done), and the whole transfer.
    fn times(&self) -> (Duration, Duration) {
        let last = self.stdout.lines().last().unwrap_or_default();
        let t: Vec<f64> = last
            .split(' ')
            .map(|t| t.parse().unwrap_or_else(|_| panic!("no times in {self:?}")))
            .collect();
        assert_eq!(t.len(), 3, "{self:?}");
        let secs = Duration::from_secs_f64;
        (secs((t[1] - t[0]).max(0.0)), secs(t[2]))
    }
}

fn curl(c: &Cluster, at: At, args: &[&str]) -> Curl {
    let mut cmd = match at {
        At::Ext => c.external_program(Path::new("curl"), args),
        At::Node => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &c.ns_node(0), "curl"])
                .args(args);
            cmd
        }
        At::Pod => c.pod_program("outsider", "curl", args),
    };
    let out = cmd
        .output()
        .expect("running curl (`cargo xtask setup` installs it)");
    let curl = Curl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !curl.stderr.contains("exec curl"),
        "curl is missing (`cargo xtask setup` installs it): {curl:?}"
    );
    curl
}

/// `https://pim.example.com:PORT/PATH` resolved to the third party's
/// address in the family asked for, verified against the test CA.
fn https(c: &Cluster, at: At, tp: &ThirdParty, v6: bool, path: &str, extra: &[&str]) -> Curl {
    let ca = c.third_party_ca().unwrap();
    let ip = match v6 {
        false => tp.ip4.to_string(),
        true => format!("[{}]", tp.ip6),
    };
    let resolve = format!("{PIM}:{}:{ip}", tp.port());
    let url = format!("https://{PIM}:{}{path}", tp.port());
    let cacert = ca.ca_cert.display().to_string();
    let mut args = vec!["-sS", "--max-time", "10", "--cacert", &cacert];
    args.extend(["--resolve", &resolve]);
    args.extend(extra);
    args.push(&url);
    curl(c, at, &args)
}

fn http(c: &Cluster, at: At, tp: &ThirdParty, path: &str, extra: &[&str]) -> Curl {
    let url = format!("http://{}{path}", tp.addr4());
    let mut args = vec!["-sS", "--max-time", "10"];
    args.extend(extra);
    args.push(&url);
    curl(c, at, &args)
}

#[test]
fn good_certificate_verifies_over_http1_http2_both_families_and_serves_benches() {
    let c = cluster();
    let pim = start(&c, ThirdPartySpec::new("pim-1", &[PIM]));
    assert_eq!(pim.ip4.to_string(), "10.240.0.201");
    assert_eq!(pim.ip6.to_string(), "fd00:240::201");

    let h1 = https(&c, At::Ext, &pim, false, "/v1/products", &["--http1.1"]).json();
    assert_eq!(h1["server"], "pim-1");
    assert_eq!(h1["host"], PIM);
    assert_eq!(h1["path"], "/v1/products");
    assert_eq!(h1["version"], "HTTP/1.1");
    assert_eq!(h1["alpn"], "http/1.1");
    assert_eq!(h1["sni"], PIM);
    assert_eq!(h1["tls"], true);
    assert_eq!(h1["client_cert"], false);

    let h2 = https(&c, At::Ext, &pim, false, "/v2", &["--http2"]).json();
    assert_eq!(h2["version"], "HTTP/2.0");
    assert_eq!(h2["alpn"], "h2");
    assert_eq!(h2["host"], PIM);

    // Reachable from where the mesh's traffic leaves: nodes and pods, v4 and v6.
    for at in [At::Node, At::Pod] {
        for v6 in [false, true] {
            let v = https(&c, at, &pim, v6, "/", &["--http2"]).json();
            assert_eq!(v["server"], "pim-1", "{at:?} v6={v6}");
        }
    }

    // A second instance of the same API: its own address, its own name.
    let pim2 = start(&c, ThirdPartySpec::new("pim-2", &[PIM]));
    assert_eq!(pim2.ip4.to_string(), "10.240.0.202");
    assert_eq!(
        https(&c, At::Node, &pim2, false, "/", &[]).json()["server"],
        "pim-2"
    );

    // A client certificate is reported when one is presented.
    let ca = c.third_party_ca().unwrap();
    let (cert, key) = (ca.client_cert.display(), ca.client_key.display());
    let (cert, key) = (cert.to_string(), key.to_string());
    let with_cert = https(
        &c,
        At::Ext,
        &pim,
        false,
        "/",
        &["--cert", &cert, "--key", &key],
    );
    assert_eq!(with_cert.json()["client_cert"], true);

    for version in ["--http1.1", "--http2"] {
        let bytes = https(&c, At::Node, &pim, false, "/bytes/1000000", &[version]);
        assert_eq!(
            (bytes.code, bytes.stdout.len()),
            (0, 1_000_000),
            "{version}"
        );
        assert!(bytes.stdout.bytes().all(|b| b == b'x'));
        let echo = https(
            &c,
            At::Node,
            &pim,
            false,
            "/echo",
            &[version, "--data-binary", "bytes intact"],
        );
        assert_eq!(
            (echo.code, echo.stdout.as_str()),
            (0, "bytes intact"),
            "{version}"
        );
    }

    // Plaintext, for the benches' comparison: HTTP/1.1 and h2c.
    let plain = start(
        &c,
        ThirdPartySpec::new("pim-plain", &[PIM])
            .port(80)
            .plaintext(),
    );
    let v = http(&c, At::Pod, &plain, "/p", &["--http1.1"]).json();
    assert_eq!(
        (&v["version"], &v["tls"]),
        (&"HTTP/1.1".into(), &false.into())
    );
    let v = http(&c, At::Pod, &plain, "/p", &["--http2-prior-knowledge"]).json();
    assert_eq!(v["version"], "HTTP/2.0");
    assert!(pim.connections() >= 9, "{}", pim.connections());
}

#[test]
fn bad_certificates_are_each_rejected_with_their_own_error() {
    let c = cluster();
    let mut pim = start(&c, ThirdPartySpec::new("pim-1", &[PIM]));
    let ip = pim.ip4;
    let expected = [
        (
            CertKind::WrongName,
            "no alternative certificate subject name matches",
        ),
        (CertKind::Expired, "certificate has expired"),
        (
            CertKind::UnknownCa,
            "unable to get local issuer certificate",
        ),
    ];
    for (kind, error) in expected {
        // The same host, restarted with another certificate.
        pim.stop().unwrap();
        pim.spec.cert = kind;
        pim.start().unwrap();
        assert_eq!(pim.ip4, ip);
        for version in ["--http1.1", "--http2"] {
            let r = https(&c, At::Node, &pim, false, "/", &[version]);
            assert_eq!(r.code, 60, "{kind} {version}: {r:?}");
            assert!(r.stderr.contains(error), "{kind} {version}: {r:?}");
        }
        // Not by chance: skipping verification, the server answers.
        let insecure = https(&c, At::Node, &pim, false, "/", &["--insecure"]);
        assert_eq!(insecure.json()["server"], "pim-1", "{kind}");
    }
}

#[test]
fn required_client_certificate_refuses_a_client_without_one() {
    let c = cluster();
    let mtls = start(
        &c,
        ThirdPartySpec::new("notify-1", &[PIM]).require_client_cert(),
    );
    // How curl reports it depends on timing (TLS 1.3 ends the handshake
    // before the server's verdict); the server's log says why, always.
    for version in ["--http1.1", "--http2"] {
        let without = https(&c, At::Node, &mtls, false, "/", &[version]);
        assert_ne!(without.code, 0, "{without:?}");
        assert_eq!(without.stdout, "", "{without:?}");
    }
    wait_for("the server's verdicts", Duration::from_secs(3), || {
        mtls.output().matches("peer sent no certificates").count() == 2
    });

    let ca = c.third_party_ca().unwrap();
    let (cert, key) = (
        ca.client_cert.display().to_string(),
        ca.client_key.display().to_string(),
    );
    for version in ["--http1.1", "--http2"] {
        let with = https(
            &c,
            At::Node,
            &mtls,
            false,
            "/",
            &[version, "--cert", &cert, "--key", &key],
        );
        assert_eq!(with.json()["client_cert"], true, "{version}");
    }

    // A certificate of another CA is no better than none.
    let (other, other_key) = (
        ca.other_ca_cert.display().to_string(),
        ca.other_ca_key.display().to_string(),
    );
    let wrong = https(
        &c,
        At::Node,
        &mtls,
        false,
        "/",
        &["--cert", &other, "--key", &other_key],
    );
    assert_ne!(wrong.code, 0, "{wrong:?}");
    assert_eq!(wrong.stdout, "", "{wrong:?}");
    wait_for("the server's verdict", Duration::from_secs(3), || {
        mtls.output().contains("invalid peer certificate")
    });
}

#[test]
fn faults_flip_at_runtime_and_stopping_refuses() {
    let c = cluster();
    let mut pim = start(&c, ThirdPartySpec::new("pim-1", &[PIM]));
    let plain = start(
        &c,
        ThirdPartySpec::new("pim-plain", &[PIM])
            .port(8080)
            .same_host_as(&pim)
            .plaintext(),
    );
    assert_eq!(plain.ip4, pim.ip4);
    let fast = https(&c, At::Node, &pim, false, "/", &TIMES);
    assert_eq!(fast.json()["server"], "pim-1");
    assert!(fast.times().0 < Duration::from_millis(300), "{fast:?}");

    pim.set_fault(Fault::Delay(Duration::from_millis(800)))
        .unwrap();
    for version in ["--http1.1", "--http2"] {
        let slow = https(
            &c,
            At::Node,
            &pim,
            false,
            "/",
            &[&[version][..], &TIMES].concat(),
        );
        assert_eq!(slow.json()["server"], "pim-1");
        assert!(
            (800..2000).contains(&slow.times().0.as_millis()),
            "{version}: {slow:?}"
        );
    }

    pim.set_fault(Fault::Reset).unwrap();
    plain.set_fault(Fault::Reset).unwrap();
    // curl's exit code depends on where it was (a reset in its TLS
    // handshake counts as a failed connect, 7; sending, 55; receiving,
    // 56); `-v` shows the errno in every case.
    for r in [
        https(&c, At::Node, &pim, false, "/", &["-v"]),
        http(&c, At::Pod, &plain, "/", &["-v"]),
    ] {
        assert!(matches!(r.code, 7 | 35 | 55 | 56), "{r:?}");
        assert!(r.stderr.contains("Connection reset by peer"), "{r:?}");
    }

    pim.set_fault(Fault::Close).unwrap();
    plain.set_fault(Fault::Close).unwrap();
    let tls_closed = https(&c, At::Node, &pim, false, "/", &[]);
    assert_eq!(tls_closed.code, 35, "{tls_closed:?}");
    assert!(!tls_closed.stderr.contains("reset"), "{tls_closed:?}");
    let closed = http(&c, At::Pod, &plain, "/", &[]);
    assert_eq!(closed.code, 52, "{closed:?}");
    assert!(
        closed.stderr.contains("Empty reply from server"),
        "{closed:?}"
    );

    pim.set_fault(Fault::None).unwrap();
    assert_eq!(
        https(&c, At::Node, &pim, false, "/", &[]).json()["server"],
        "pim-1"
    );

    // Refusal: nothing listens. `-v` names the errno (curl's own message
    // is the same for every failed connect).
    pim.stop().unwrap();
    let refused = https(&c, At::Pod, &pim, false, "/", &["-v"]);
    assert_eq!(refused.code, 7, "{refused:?}");
    assert!(refused.stderr.contains("Connection refused"), "{refused:?}");
    pim.start().unwrap();
    assert_eq!(
        https(&c, At::Pod, &pim, false, "/", &[]).json()["server"],
        "pim-1"
    );
}

#[test]
fn blackhole_times_out_from_nodes_and_pods_until_removed() {
    let c = cluster();
    let pim = start(&c, ThirdPartySpec::new("pim-1", &[PIM]));
    c.blackhole(pim.ip4).unwrap();
    c.blackhole(pim.ip6).unwrap();
    let accepted = pim.connections();
    for (at, v6) in [
        (At::Node, false),
        (At::Node, true),
        (At::Pod, false),
        (At::Pod, true),
    ] {
        let args = [&["-v", "--connect-timeout", "1"][..], &TIMES].concat();
        let r = https(&c, at, &pim, v6, "/", &args);
        assert_eq!(r.code, 28, "{at:?} v6={v6}: {r:?}");
        assert!(
            (1000..1500).contains(&r.times().1.as_millis()),
            "{at:?} v6={v6}: {r:?}"
        );
        assert!(!r.stderr.contains("refused"), "{r:?}");
    }
    assert_eq!(pim.connections(), accepted, "a blackholed SYN got through");

    c.unblackhole(pim.ip4).unwrap();
    c.unblackhole(pim.ip6).unwrap();
    for (at, v6) in [(At::Node, false), (At::Pod, true)] {
        let r = https(&c, at, &pim, v6, "/", &["--connect-timeout", "2"]);
        assert_eq!(r.json()["server"], "pim-1", "{at:?} v6={v6}");
    }
}
