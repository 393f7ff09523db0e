//! DNS capture on the virtual cluster: an enrolled pod's queries (UDP and
//! TCP port 53, IPv4, IPv6 and v4-mapped, connected and unconnected
//! sockets) are answered through its node's agent, which records the
//! addresses with their TTL; an unenrolled pod's are not; with the agent
//! down they fail at once, and they work again once it restarts. Real
//! clients: glibc's `getent`, `dig`, curl, and Python's sockets for the
//! unconnected sends. Root tests: they fail (never skip) without root.
use std::{
    process::Output,
    time::{Duration, Instant},
};

use nodemesh_lab::{
    Cluster, ClusterSpec, PodSpec,
    cluster::{EXTERNAL_V4, wait_for},
    dns::DNS_TTL,
    http,
};
use serde_json::Value;

const CLIENT: &str = "client";
const OUTSIDER: &str = "outsider";

/// The lab DNS server's names.
const RECORDS: &[(&str, &str)] = &[
    ("pim.example.com", "10.240.0.201"),
    ("pim.example.com", "fd00:240::201"),
    ("www.pim.example.com", "pim.example.com"),
    ("notify.example.com", "10.240.0.202"),
    ("tcp.example.com", "10.240.0.204"),
    ("six.example.com", "fd00:240::206"),
    ("unconnected.example.com", "10.240.0.207"),
    ("mapped.example.com", "10.240.0.208"),
    ("shop-api.example.com", "10.240.0.200"),
    ("outsider.example.com", "10.240.0.209"),
];

/// One node: an enrolled client and an unenrolled pod; the lab's DNS
/// server running.
fn cluster(extra: &str) -> Cluster {
    let mut spec = ClusterSpec {
        nodes: 1,
        pods: vec![
            PodSpec::new(CLIENT, 0),
            PodSpec::new(OUTSIDER, 0).unenrolled(),
        ],
        services: vec![],
        agent: Default::default(),
    };
    spec.agent.extra = extra.into();
    let mut c = Cluster::start(spec).expect("building the virtual cluster (needs root)");
    c.start_dns(RECORDS).expect("starting the lab's DNS server");
    c
}

/// Runs `program` in `pod`; its output and how long it took.
fn run(c: &Cluster, pod: &str, program: &str, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = c
        .pod_program(pod, program, args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (out, started.elapsed())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `program` printed, which must have succeeded.
fn ok(c: &Cluster, pod: &str, program: &str, args: &[&str]) -> String {
    let (out, _) = run(c, pod, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} in {pod}: {}\n{}{}",
        out.status,
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn dig(c: &Cluster, pod: &str, args: &[&str]) -> String {
    let mut all = vec!["+short", "+tries=1", "+time=3"];
    all.extend(args);
    ok(c, pod, "dig", &all)
}

/// One A query for `name` to `server`:53 from an unconnected UDP socket
/// (sendto / recvfrom), as musl and some runtimes send; prints the reply's
/// source and the answer's last address. Optional third argument: the
/// timeout in seconds (5).
const UNCONNECTED_QUERY: &str = r#"
import json, socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]) if len(sys.argv) > 3 else 5)
labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
s.sendto(struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1), (server, 53))
data, source = s.recvfrom(4096)
print(json.dumps({"from": source[0], "port": source[1], "id": struct.unpack(">H", data[:2])[0], "a": socket.inet_ntoa(data[-4:])}))
"#;

fn unconnected_query(c: &Cluster, pod: &str, server: &str, name: &str) -> Value {
    let out = ok(c, pod, "python3", &["-c", UNCONNECTED_QUERY, server, name]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
}

fn config_dump(c: &Cluster) -> Value {
    let r = c.admin_get(0, "/config_dump", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

/// A metric's value from the agent, summed over the series whose line
/// holds every one of `labels`.
fn metric(c: &Cluster, name: &str, labels: &[&str]) -> f64 {
    let r = http::get(&c.node_netns(0), c.stats_address(0), "/metrics", None).unwrap();
    r.body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && labels.iter().all(|w| l.contains(w))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn ebpf_event(c: &Cluster, event: &str) -> f64 {
    metric(
        c,
        "nodemesh_ebpf_events_total",
        &[&format!("event=\"{event}\"")],
    )
}

/// The records `/config_dump` shows for `pod` (`namespace/name`).
fn records_of(c: &Cluster, pod: &str) -> Vec<Value> {
    config_dump(c)["dns"]["records"][pod]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn recorded(records: &[Value], name: &str, address: &str) -> Option<u64> {
    records
        .iter()
        .find(|r| r["name"] == name && r["address"] == address)
        .and_then(|r| r["validForSeconds"].as_u64())
}

#[test]
fn an_enrolled_pods_dns_goes_through_the_agent_and_is_recorded_with_its_ttl() {
    let mut c = cluster("");
    c.spawn_external(&["serve", "--port", "8080"]).unwrap();
    let dump = config_dump(&c);
    assert_eq!(dump["dns"]["capture"], true, "{}", dump["dns"]);
    assert_eq!(
        dump["dns"]["upstreams"],
        serde_json::json!(["10.240.0.200:53"])
    );

    // glibc (connected UDP), A and AAAA, and through a CNAME.
    let hosts = ok(&c, CLIENT, "getent", &["ahosts", "pim.example.com"]);
    assert!(
        hosts.contains("10.240.0.201") && hosts.contains("fd00:240::201"),
        "{hosts}"
    );
    let hosts = ok(&c, CLIENT, "getent", &["ahosts", "www.pim.example.com"]);
    assert!(hosts.contains("10.240.0.201"), "{hosts}");
    // dig: UDP, TCP, an IPv6 resolver.
    assert_eq!(
        dig(&c, CLIENT, &["notify.example.com"]).trim(),
        "10.240.0.202"
    );
    assert_eq!(
        dig(&c, CLIENT, &["+tcp", "tcp.example.com"]).trim(),
        "10.240.0.204"
    );
    let six = dig(&c, CLIENT, &["@fd00:240::200", "AAAA", "six.example.com"]);
    assert_eq!(six.trim(), "fd00:240::206");
    // Unconnected sockets (sendmsg), IPv4 and v4-mapped on a dual-stack
    // socket: the reply comes from the resolver as far as the app sees.
    let r = unconnected_query(
        &c,
        CLIENT,
        &EXTERNAL_V4.to_string(),
        "unconnected.example.com",
    );
    assert_eq!(r["from"], EXTERNAL_V4.to_string(), "{r}");
    assert_eq!(r["port"], 53, "{r}");
    assert_eq!(r["a"], "10.240.0.207", "{r}");
    let mapped = format!("::ffff:{EXTERNAL_V4}");
    let r = unconnected_query(&c, CLIENT, &mapped, "mapped.example.com");
    assert_eq!(r["from"], mapped.as_str(), "{r}");
    assert_eq!(r["port"], 53, "{r}");
    assert_eq!(r["a"], "10.240.0.208", "{r}");
    // curl's own lookup; its connection then goes through the agent to
    // the address resolved (the lab's server is not HTTP: curl's verdict
    // does not matter).
    run(
        &c,
        CLIENT,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "http://shop-api.example.com:8080/",
        ],
    );
    let e = c.log_entries(0, |e| e["orig_dst"] == "10.240.0.200:8080");
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["src_workload"], "shop/client");

    // Recorded under the pod, by the name asked, for the TTL the server
    // gave (plus the 30 s grace), less the seconds since.
    let records = records_of(&c, "shop/client");
    let within_ttl = |name: &str, address: &str| {
        let left = recorded(&records, name, address)
            .unwrap_or_else(|| panic!("{name} -> {address} not recorded: {records:?}"));
        let ttl = u64::from(DNS_TTL) + 30;
        assert!(
            (ttl - 20..=ttl).contains(&left),
            "{name}: {left} s left of {ttl}"
        );
    };
    within_ttl("pim.example.com", "10.240.0.201");
    within_ttl("pim.example.com", "fd00:240::201");
    within_ttl("www.pim.example.com", "10.240.0.201");
    within_ttl("notify.example.com", "10.240.0.202");
    within_ttl("tcp.example.com", "10.240.0.204");
    within_ttl("six.example.com", "fd00:240::206");
    within_ttl("unconnected.example.com", "10.240.0.207");
    within_ttl("mapped.example.com", "10.240.0.208");
    within_ttl("shop-api.example.com", "10.240.0.200");

    let udp = metric(
        &c,
        "nodemesh_dns_queries_total",
        &[r#"protocol="udp""#, r#"result="answered""#],
    );
    let tcp = metric(
        &c,
        "nodemesh_dns_queries_total",
        &[r#"protocol="tcp""#, r#"result="answered""#],
    );
    assert!(udp >= 10.0 && tcp >= 1.0, "udp {udp}, tcp {tcp}");
    assert_eq!(metric(&c, "nodemesh_dns_queries_total", &["servfail"]), 0.0);
    assert!(metric(&c, "nodemesh_dns_answers_recorded_total", &[]) >= 9.0);
    assert!(metric(&c, "nodemesh_dns_records", &[]) >= 10.0);
    // Per connect or unconnected send (glibc asks A and AAAA on one
    // connected socket), and per reply read with its source.
    let (redirected, reversed) = (
        ebpf_event(&c, "dns_redirected"),
        ebpf_event(&c, "dns_reversed"),
    );
    assert!(
        redirected >= 7.0 && reversed >= 7.0,
        "{redirected} {reversed}"
    );
    assert_eq!(ebpf_event(&c, "dns_orig_full"), 0.0);

    // The unenrolled pod resolves straight from the server: the agent sees
    // none of it.
    let redirected = ebpf_event(&c, "dns_redirected");
    let answered = metric(&c, "nodemesh_dns_queries_total", &[]);
    assert_eq!(
        dig(&c, OUTSIDER, &["outsider.example.com"]).trim(),
        "10.240.0.209"
    );
    let hosts = ok(&c, OUTSIDER, "getent", &["ahosts", "outsider.example.com"]);
    assert!(hosts.contains("10.240.0.209"), "{hosts}");
    assert_eq!(ebpf_event(&c, "dns_redirected"), redirected);
    assert_eq!(metric(&c, "nodemesh_dns_queries_total", &[]), answered);
    let outsider_ip = c.pod(OUTSIDER).ip4.to_string();
    assert!(
        c.dns_log()
            .lines()
            .any(|l| l.contains("outsider.example.com") && l.contains(&outsider_ip)),
        "{}",
        c.dns_log()
    );
    let dump = config_dump(&c);
    assert!(
        dump["dns"]["records"].get("shop/outsider").is_none(),
        "{}",
        dump["dns"]
    );
    assert!(
        !records_of(&c, "shop/client")
            .iter()
            .any(|r| r["name"] == "outsider.example.com"),
    );

    // Each socket's record goes with the socket: the map is back to empty.
    wait_for("NM_DNS_ORIG empty", Duration::from_secs(5), || {
        c.map_sizes(0).unwrap()["NM_DNS_ORIG"] == 0
    });

    // A pod that leaves the mesh takes its records with it, and its DNS
    // is its own again.
    c.set_enrolled(0, &|p| p.spec.name != CLIENT).unwrap();
    wait_for(
        "the client's records forgotten",
        Duration::from_secs(10),
        || {
            config_dump(&c)["dns"]["records"]
                .get("shop/client")
                .is_none()
        },
    );
    assert_eq!(metric(&c, "nodemesh_dns_records", &[]), 0.0);
    let answered = metric(&c, "nodemesh_dns_queries_total", &[]);
    assert_eq!(
        dig(&c, CLIENT, &["notify.example.com"]).trim(),
        "10.240.0.202"
    );
    assert_eq!(metric(&c, "nodemesh_dns_queries_total", &[]), answered);
}

#[test]
fn with_the_agent_down_an_enrolled_pods_dns_fails_at_once_and_returns_with_the_agent() {
    let mut c = cluster("");
    ok(&c, CLIENT, "getent", &["ahosts", "pim.example.com"]);
    c.kill_agent(0).unwrap();

    // Nothing listens where the kernel sends the queries: refused, not a
    // timeout (glibc's would be 5 s per try), and never around the mesh.
    let (out, getent) = run(&c, CLIENT, "getent", &["ahosts", "notify.example.com"]);
    assert!(
        !out.status.success(),
        "resolved with the agent down: {}",
        stdout(&out)
    );
    assert!(
        getent < Duration::from_secs(1),
        "getent took {getent:?} to fail"
    );
    let (out, udp) = run(
        &c,
        CLIENT,
        "dig",
        &["+tries=1", "+time=5", "notify.example.com"],
    );
    assert!(!stdout(&out).contains("10.240.0.202"), "{}", stdout(&out));
    assert!(
        udp < Duration::from_secs(1),
        "dig took {udp:?} to fail: {}",
        stdout(&out)
    );
    let (out, tcp) = run(
        &c,
        CLIENT,
        "dig",
        &["+tcp", "+tries=1", "+time=5", "tcp.example.com"],
    );
    assert!(!stdout(&out).contains("10.240.0.204"), "{}", stdout(&out));
    assert!(
        tcp < Duration::from_secs(1),
        "dig +tcp took {tcp:?} to fail"
    );
    // An unconnected socket is told nothing (the kernel reports ICMP
    // errors to connected sockets only): no answer, within its own timeout.
    let server = EXTERNAL_V4.to_string();
    let (out, unconnected) = run(
        &c,
        CLIENT,
        "python3",
        &[
            "-c",
            UNCONNECTED_QUERY,
            &server,
            "unconnected.example.com",
            "2",
        ],
    );
    assert!(
        !out.status.success(),
        "answered with the agent down: {}",
        stdout(&out)
    );
    eprintln!(
        "agent down, an enrolled pod's DNS fails: getent in {} ms, dig (UDP) {} ms, dig +tcp {} ms; an unconnected UDP socket gets no answer (its own {} ms timeout)",
        getent.as_millis(),
        udp.as_millis(),
        tcp.as_millis(),
        unconnected.as_millis()
    );
    // The server never heard from the enrolled pod meanwhile.
    let client_ip = c.pod(CLIENT).ip4.to_string();
    assert!(
        !c.dns_log()
            .lines()
            .any(
                |l| (l.contains("notify.example.com") || l.contains("unconnected.example.com"))
                    && l.contains(&client_ip)
            ),
        "{}",
        c.dns_log()
    );
    // Not the unenrolled pod's business.
    ok(&c, OUTSIDER, "getent", &["ahosts", "outsider.example.com"]);

    // From the restart to the first answer in the pod; three times.
    let mut gaps = Vec::new();
    for round in 0..3 {
        if round > 0 {
            c.kill_agent(0).unwrap();
            let (out, _) = run(&c, CLIENT, "getent", &["ahosts", "notify.example.com"]);
            assert!(!out.status.success(), "resolved with the agent down");
        }
        let started = Instant::now();
        c.spawn_agent(0).unwrap();
        loop {
            let (out, _) = run(&c, CLIENT, "getent", &["ahosts", "notify.example.com"]);
            if out.status.success() {
                assert!(stdout(&out).contains("10.240.0.202"), "{}", stdout(&out));
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no answer 30 s after the restart"
            );
        }
        gaps.push(started.elapsed().as_millis());
    }
    eprintln!(
        "DNS gap: agent process started -> first answer in an enrolled pod (getent retried at once): {gaps:?} ms"
    );
    assert_eq!(
        dig(&c, CLIENT, &["+tcp", "tcp.example.com"]).trim(),
        "10.240.0.204"
    );
    let records = records_of(&c, "shop/client");
    assert!(
        recorded(&records, "notify.example.com", "10.240.0.202").is_some(),
        "{records:?}"
    );
}

#[test]
fn with_capture_off_pods_resolve_on_their_own() {
    let c = cluster("dns:\n  capture: false\n  upstreams: [\"10.240.0.200:53\"]\n");
    assert_eq!(
        dig(&c, CLIENT, &["notify.example.com"]).trim(),
        "10.240.0.202"
    );
    // TCP to port 53 is then an ordinary outbound connection.
    assert_eq!(
        dig(&c, CLIENT, &["+tcp", "tcp.example.com"]).trim(),
        "10.240.0.204"
    );
    let hosts = ok(&c, CLIENT, "getent", &["ahosts", "pim.example.com"]);
    assert!(hosts.contains("10.240.0.201"), "{hosts}");
    assert_eq!(ebpf_event(&c, "dns_redirected"), 0.0);
    assert_eq!(metric(&c, "nodemesh_dns_queries_total", &[]), 0.0);
    let dump = config_dump(&c);
    assert_eq!(dump["dns"]["capture"], false);
    assert_eq!(
        dump["dns"]["records"],
        serde_json::json!({}),
        "{}",
        dump["dns"]
    );
    let tcp = c.log_entries(0, |e| e["orig_dst"] == "10.240.0.200:53");
    assert_eq!(tcp.len(), 1, "{tcp:?}");
    assert_eq!(tcp[0]["result"], "ok", "{tcp:?}");
}
