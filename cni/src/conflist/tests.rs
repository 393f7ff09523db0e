use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::*;

/// What the reference bridge + portmap setup writes (key order as shipped).
const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "cbr0",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.1.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}"#;

const BRIDGE_CONF: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "mynet",
  "type": "bridge",
  "bridge": "cni0",
  "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}"#;

fn entry() -> Value {
    default_entry("/var/run/nodemesh/cni.sock", &["kube-system".to_string()])
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn insert_appends_to_a_conflist_keeping_order() {
    let out = insert(BRIDGE_CONFLIST, &entry()).unwrap().unwrap();
    let v = parse(&out);
    let types: Vec<&str> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge", "portmap", "nodemesh-cni"]);
    assert_eq!(v["plugins"][2], entry());
    assert_eq!(
        v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        "10.244.1.0/24"
    );
    // Keys stay in file order ("type" before "bridge", not sorted).
    let bridge = out.find("\"type\": \"bridge\"").unwrap();
    assert!(bridge < out.find("\"bridge\": \"cni0\"").unwrap());
    assert!(out.find("\"cniVersion\"").unwrap() < out.find("\"name\"").unwrap());
    assert!(out.ends_with("}\n"));

    assert_eq!(
        insert(&out, &entry()),
        Ok(None),
        "a second insert changes nothing"
    );
}

#[test]
fn insert_replaces_a_different_entry_in_place() {
    let old = insert(BRIDGE_CONFLIST, &default_entry("/old.sock", &[]))
        .unwrap()
        .unwrap();
    let moved = old.replace("\"type\": \"portmap\"", "\"type\": \"tuning\"");
    let out = insert(&moved, &entry()).unwrap().unwrap();
    let v = parse(&out);
    assert_eq!(v["plugins"].as_array().unwrap().len(), 3);
    assert_eq!(v["plugins"][2], entry());
    assert_eq!(v["plugins"][1]["type"], "tuning");
}

#[test]
fn insert_converts_a_single_plugin_conf() {
    let out = insert(BRIDGE_CONF, &entry()).unwrap().unwrap();
    let v = parse(&out);
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["name"], "mynet");
    assert_eq!(v["plugins"][0], parse(BRIDGE_CONF));
    assert_eq!(v["plugins"][1], entry());
    assert_eq!(insert(&out, &entry()), Ok(None));
}

#[test]
fn insert_rejects_what_is_not_a_config() {
    assert!(
        insert("[]", &entry())
            .unwrap_err()
            .contains("not a JSON object")
    );
    assert!(
        insert("{", &entry())
            .unwrap_err()
            .contains("not valid JSON")
    );
    assert!(
        insert("{\"name\":\"x\"}", &entry())
            .unwrap_err()
            .contains("neither")
    );
    assert!(
        insert("{\"plugins\":{}}", &entry())
            .unwrap_err()
            .contains("not a list")
    );
    assert!(insert(BRIDGE_CONFLIST, &json!({})).is_err());
}

#[test]
fn remove_takes_the_entry_out() {
    let installed = insert(BRIDGE_CONFLIST, &entry()).unwrap().unwrap();
    let out = remove(&installed, PLUGIN_TYPE).unwrap();
    assert_eq!(parse(&out), parse(BRIDGE_CONFLIST));
    assert_eq!(remove(&out, PLUGIN_TYPE), None);
    assert_eq!(remove(BRIDGE_CONF, PLUGIN_TYPE), None);
}

/// A unique directory per test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nmconf-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["net.d", "bin", "src"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn primary_config_is_the_first_config_file() {
    let dir = TempDir::new();
    let net_d = dir.0.join("net.d");
    assert_eq!(primary_config(&dir.0.join("absent")).unwrap(), None);
    assert_eq!(primary_config(&net_d).unwrap(), None);
    fs::write(net_d.join("20-flannel.conflist"), BRIDGE_CONFLIST).unwrap();
    fs::write(net_d.join(".00-hidden.conflist"), "{}").unwrap();
    fs::write(net_d.join("00-notes.txt"), "").unwrap();
    fs::create_dir(net_d.join("05-dir.conf")).unwrap();
    fs::write(net_d.join("10-calico.conflist"), BRIDGE_CONFLIST).unwrap();
    assert_eq!(
        primary_config(&net_d).unwrap(),
        Some(net_d.join("10-calico.conflist"))
    );
}

#[test]
fn ensure_installed_is_idempotent() {
    let dir = TempDir::new();
    let (net_d, bin) = (dir.0.join("net.d"), dir.0.join("bin"));
    let binary = dir.0.join("src/nodemesh-cni");
    fs::write(&binary, b"\x7fELF v1").unwrap();

    // No primary config yet: the binary goes in, the caller retries later.
    let first = ensure_installed(&net_d, &bin, &binary, &entry()).unwrap();
    assert_eq!(
        (first.binary_copied, first.config, first.primary),
        (true, None, None)
    );
    let mode = fs::metadata(bin.join("nodemesh-cni"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    fs::write(net_d.join("20-other.conflist"), BRIDGE_CONFLIST).unwrap();
    let primary = net_d.join("10-cbr0.conflist");
    fs::write(&primary, BRIDGE_CONFLIST).unwrap();
    fs::set_permissions(&primary, fs::Permissions::from_mode(0o600)).unwrap();
    let second = ensure_installed(&net_d, &bin, &binary, &entry()).unwrap();
    assert!(!second.binary_copied);
    assert_eq!(second.config.as_ref(), Some(&primary));
    assert_eq!(second.primary.as_ref(), Some(&primary));
    let edited = parse(&fs::read_to_string(&primary).unwrap());
    assert_eq!(edited["plugins"][2], entry());
    let mode = fs::metadata(&primary).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config keeps its permissions");
    let other = fs::read_to_string(net_d.join("20-other.conflist")).unwrap();
    assert_eq!(other, BRIDGE_CONFLIST, "only the primary is edited");

    let third = ensure_installed(&net_d, &bin, &binary, &entry()).unwrap();
    assert_eq!((third.binary_copied, third.config), (false, None));
    assert_eq!(third.primary, Some(primary));

    fs::write(&binary, b"\x7fELF v2").unwrap();
    assert!(
        ensure_installed(&net_d, &bin, &binary, &entry())
            .unwrap()
            .binary_copied
    );
    assert_eq!(fs::read(bin.join("nodemesh-cni")).unwrap(), b"\x7fELF v2");
    let leftovers = fs::read_dir(&bin).unwrap().count() + fs::read_dir(&net_d).unwrap().count();
    assert_eq!(leftovers, 3, "no temp files are left behind");
}

#[test]
fn ensure_installed_converts_a_conf_primary() {
    let dir = TempDir::new();
    let (net_d, bin) = (dir.0.join("net.d"), dir.0.join("bin"));
    let binary = dir.0.join("src/nodemesh-cni");
    fs::write(&binary, b"bin").unwrap();
    fs::write(net_d.join("10-mynet.conf"), BRIDGE_CONF).unwrap();

    let done = ensure_installed(&net_d, &bin, &binary, &entry()).unwrap();
    let conflist = net_d.join("10-mynet.conflist");
    assert_eq!(done.config.as_ref(), Some(&conflist));
    assert!(!net_d.join("10-mynet.conf").exists());
    let v = parse(&fs::read_to_string(&conflist).unwrap());
    assert_eq!(v["plugins"][1], entry());

    let again = ensure_installed(&net_d, &bin, &binary, &entry()).unwrap();
    assert_eq!((again.config, again.primary), (None, Some(conflist)));
}

#[test]
fn ensure_installed_reports_a_broken_primary() {
    let dir = TempDir::new();
    let (net_d, bin) = (dir.0.join("net.d"), dir.0.join("bin"));
    let binary = dir.0.join("src/nodemesh-cni");
    fs::write(&binary, b"bin").unwrap();
    fs::write(net_d.join("10-broken.conflist"), "{").unwrap();
    let err = ensure_installed(&net_d, &bin, &binary, &entry()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("10-broken.conflist"), "{err}");
}
