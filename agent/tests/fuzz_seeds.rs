//! The fuzz targets' seed corpora, run as regular tests: every seed must go
//! through without a panic, and the known ones must get their verdicts.
use std::net::IpAddr;

use http::{Method, Uri};
use nodemesh_agent::{
    policy::{self, fuzz_policy_file},
    proxy::{
        inbound::{connect_target, forwarded_for, fuzz_connect_request},
        sni::{self, Hello},
    },
    state::file::fuzz_workloads_file,
};

#[test]
fn connect_request_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/connect_request");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        fuzz_connect_request(&data);
        n += 1;
    }
    assert!(n >= 5, "seed corpus missing ({n} files)");

    let local: IpAddr = [10, 244, 1, 10].into();
    let check = |m: &str, u: &str| {
        connect_target(
            &Method::from_bytes(m.as_bytes()).unwrap(),
            &u.parse::<Uri>().unwrap(),
            local,
            &[15001, 15006, 15008, 15000, 15020, 15021],
        )
    };
    assert_eq!(check("CONNECT", "10.244.1.10:8080").unwrap().port(), 8080);
    assert!(check("CONNECT", "[::ffff:10.244.1.10]:8080").is_ok());
    for (m, u, why) in [
        ("GET", "10.244.1.10:8080", "is not CONNECT"),
        ("CONNECT", "10.244.1.11:8080", "is not this pod"),
        ("CONNECT", "example.com:80", "is not ip:port"),
        ("CONNECT", "/path", "has no authority"),
        ("CONNECT", "10.244.1.10:0", "port 0"),
        // HBONE inside HBONE, or any other way back into the agent.
        ("CONNECT", "10.244.1.10:15008", "would re-enter the agent"),
        ("CONNECT", "10.244.1.10:15006", "would re-enter the agent"),
        ("CONNECT", "10.244.1.10:15020", "would re-enter the agent"),
    ] {
        let err = check(m, u).unwrap_err().to_string();
        assert!(err.contains(why), "{m} {u}: {err}");
    }
    assert_eq!(
        forwarded_for("for=\"10.0.0.1:5\""),
        Some("10.0.0.1:5".into())
    );
    assert_eq!(forwarded_for("proto=http"), None);
}

#[test]
fn policy_file_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/policy_file");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        fuzz_policy_file(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 8, "seed corpus missing ({n} files)");
    // The networking seeds reach the registry's compiler: the valid ones
    // load whole, the invalid one fails on each of its fields.
    let load = |name: &str| {
        let path = std::path::PathBuf::from(format!("{dir}/{name}"));
        let text = std::fs::read_to_string(&path).unwrap();
        policy::compile_texts(&vec![(path, text)], policy::DEFAULT_ROOT_NAMESPACE)
    };
    let entries = load("service_entries").unwrap().registry;
    assert_eq!(entries.entries().len(), 3);
    assert!(entries.by_name("api.notify.example.com", 443).is_some());
    let rules = load("destination_rules").unwrap();
    assert_eq!(
        rules
            .registry
            .connect_policy("orders.shop.svc.cluster.local", 80)
            .max_connections,
        Some(7)
    );
    // Fields the agent does not honour load with a warning naming them.
    assert!(
        rules
            .warnings
            .iter()
            .any(|w| w.to_string().contains("loadBalancer")),
        "{:?}",
        rules.warnings
    );
    let err = load("networking_invalid").unwrap_err().to_string();
    for field in [
        "spec.hosts[0]",
        "spec.ports[0].number",
        "spec.ports[1].protocol",
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "spec.action",
        "document 2: apiVersion",
    ] {
        assert!(err.contains(field), "{field} not in:\n{err}");
    }
}

#[test]
fn workloads_file_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/workloads_file");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        fuzz_workloads_file(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 5, "seed corpus missing ({n} files)");
}

#[test]
fn cni_input_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/cni_input");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let _ = nodemesh_cni::plugin::fuzz_input(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 5, "seed corpus missing ({n} files)");
    let seed = |name: &str| std::fs::read(format!("{dir}/{name}")).unwrap();
    let ips = nodemesh_cni::plugin::fuzz_input(&seed("ptp-1.0.0.json")).unwrap();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert_eq!(
        nodemesh_cni::plugin::fuzz_input(&seed("bridge-0.4.0.json")),
        Some(vec![[10, 1, 2, 3].into()])
    );
    // An address that is not one: the plugin reports it, never panics.
    assert_eq!(nodemesh_cni::plugin::fuzz_input(&seed("bad-ip.json")), None);
}

/// The client_hello seeds and what `sni::parse` makes of each: real
/// ClientHellos from rustls (written by `write_client_hello_seeds`), a few
/// cut or altered ones, and other protocols' first bytes.
fn client_hello_verdicts() -> Vec<(&'static str, Hello)> {
    let sni = |n: &str| Hello::Sni(n.to_owned());
    vec![
        // The agent's own provider: X25519MLKEM768 first, a 1.2 kB key share.
        ("tls13_post_quantum", sni("pim.example.com")),
        // ring's: X25519, TLS 1.3 and 1.2; the name's case is not kept.
        ("tls13_x25519", sni("api.notify.example.com")),
        ("tls12_only", sni("legacy.example.com")),
        ("alpn_h2", sni("grpc.example.com")),
        ("no_sni", Hello::NoSni),
        // An IP address is never sent as SNI.
        ("ip_address", Hello::NoSni),
        // A server_name entry of another type than host_name (0).
        ("name_type_1", Hello::NoSni),
        ("name_not_utf8", Hello::NotTls),
        ("truncated", Hello::Partial),
        ("handshake_past_record", Hello::NotTls),
        ("http_get", Hello::NotTls),
        ("http2_preface", Hello::NotTls),
        ("ssh_banner", Hello::NotTls),
        ("postgres_ssl_request", Hello::NotTls),
        ("tls_alert", Hello::NotTls),
        ("sslv2_hello", Hello::NotTls),
    ]
}

const CLIENT_HELLO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/client_hello");

#[test]
fn client_hello_seeds() {
    let mut n = 0;
    for entry in std::fs::read_dir(CLIENT_HELLO_DIR).unwrap() {
        sni::fuzz_client_hello(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    let verdicts = client_hello_verdicts();
    assert!(n >= verdicts.len(), "seed corpus missing ({n} files)");
    for (name, verdict) in verdicts {
        let data = std::fs::read(format!("{CLIENT_HELLO_DIR}/{name}")).unwrap();
        assert_eq!(sni::parse(&data), verdict, "seed {name}");
    }
    let pq = std::fs::read(format!("{CLIENT_HELLO_DIR}/tls13_post_quantum")).unwrap();
    assert!(pq.len() > 1200, "no ML-KEM key share: {} bytes", pq.len());
}

/// A ClientHello as rustls sends it first.
fn client_hello(
    provider: rustls::crypto::CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
    name: &str,
    enable_sni: bool,
    alpn: &[&[u8]],
) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider.into())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.enable_sni = enable_sni;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(config.into(), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Writes the client_hello seeds (ClientHellos carry random bytes, so each
/// run changes them): `cargo test -p nodemesh-agent --test fuzz_seeds --
/// --ignored write_client_hello_seeds`.
#[test]
#[ignore = "rewrites the seed corpus"]
fn write_client_hello_seeds() {
    use rustls::{
        crypto::{aws_lc_rs, ring},
        version::{TLS12, TLS13},
    };
    let agent = || (*nodemesh_agent::tls::provider()).clone();
    let both: &[&'static rustls::SupportedProtocolVersion] = &[&TLS13, &TLS12];
    let x25519 = client_hello(
        ring::default_provider(),
        both,
        "API.Notify.Example.com",
        true,
        &[],
    );
    let name_at = |hello: &[u8], name: &[u8]| {
        hello
            .windows(name.len())
            .position(|w| w == name)
            .expect("the name in the hello")
    };
    let mut name_type_1 = x25519.clone();
    // host_name's type byte is just before the name's 2-byte length.
    name_type_1[name_at(&x25519, b"API.Notify") - 3] = 1;
    let mut name_not_utf8 = x25519.clone();
    name_not_utf8[name_at(&x25519, b"API.Notify")] = 0xff;
    let mut past_record = x25519.clone();
    past_record[6] = 0xff;
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "tls13_post_quantum",
            client_hello(agent(), &[&TLS13], "pim.example.com", true, &[]),
        ),
        ("tls13_x25519", x25519.clone()),
        (
            "tls12_only",
            client_hello(
                aws_lc_rs::default_provider(),
                &[&TLS12],
                "legacy.example.com",
                true,
                &[],
            ),
        ),
        (
            "alpn_h2",
            client_hello(
                aws_lc_rs::default_provider(),
                both,
                "grpc.example.com",
                true,
                &[b"h2", b"http/1.1"],
            ),
        ),
        (
            "no_sni",
            client_hello(agent(), &[&TLS13], "pim.example.com", false, &[]),
        ),
        (
            "ip_address",
            client_hello(agent(), &[&TLS13], "10.240.0.201", true, &[]),
        ),
        ("name_type_1", name_type_1),
        ("name_not_utf8", name_not_utf8),
        ("truncated", x25519[..100].to_vec()),
        ("handshake_past_record", past_record),
        (
            "http_get",
            b"GET /v1/products HTTP/1.1\r\nHost: pim.example.com\r\n\r\n".to_vec(),
        ),
        (
            "http2_preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        ("ssh_banner", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("postgres_ssl_request", vec![0, 0, 0, 8, 4, 210, 22, 47]),
        // A fatal handshake_failure alert.
        ("tls_alert", vec![21, 3, 3, 0, 2, 2, 40]),
        // SSLv2's record header, as very old clients start.
        (
            "sslv2_hello",
            vec![
                0x80, 0x1d, 1, 3, 1, 0, 3, 0, 0, 0, 16, 0, 0, 0x2f, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5,
                0xf6, 0x07, 0x18, 0x29, 0x3a, 0x4b, 0x5c, 0x6d, 0x7e, 0x8f, 0x90,
            ],
        ),
    ];
    std::fs::create_dir_all(CLIENT_HELLO_DIR).unwrap();
    for (name, data) in seeds {
        std::fs::write(format!("{CLIENT_HELLO_DIR}/{name}"), data).unwrap();
    }
}
