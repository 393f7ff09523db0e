//! The fuzz targets' seed corpora, run as regular tests: every seed must go
//! through without a panic, and the known ones must get their verdicts.
use std::net::IpAddr;

use http::{Method, Uri};
use nodemesh_agent::{
    policy::fuzz_policy_file,
    proxy::inbound::{connect_target, forwarded_for, fuzz_connect_request},
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
    assert!(n >= 5, "seed corpus missing ({n} files)");
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
