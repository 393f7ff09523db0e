//! The command line as users and CI pipelines call it.
use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodemesh-agent"))
        .args(args)
        .output()
        .expect("running nodemesh-agent")
}

#[test]
fn create_ca_then_validate_the_examples_and_reject_bad_files_with_their_location() {
    let dir = std::env::temp_dir().join(format!("nodemesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let out = agent(&[
        "create-ca",
        "--cert",
        &format!("{d}/ca.pem"),
        "--key",
        &format!("{d}/ca.key"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(dir.join("ca.pem"), dir.join("bundle.pem")).unwrap();

    // The documented example, with its CA paths pointed here.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    let example = std::fs::read_to_string(format!("{examples}/agent.yaml")).unwrap();
    std::fs::write(
        dir.join("agent.yaml"),
        example.replace("/etc/nodemesh/ca/", &format!("{d}/")),
    )
    .unwrap();
    std::fs::copy(
        format!("{examples}/workloads.yaml"),
        dir.join("workloads.yaml"),
    )
    .unwrap();
    let config = format!("{d}/agent.yaml");
    let out = agent(&["validate", "--config", &config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(
        dir.join("workloads.yaml"),
        "node: n0\npods:\n  - name: a\n    namespace: shop\n    ips: [10.0.0.1]\n    node: n1\n    nodeName: n1\n",
    )
    .unwrap();
    let out = agent(&["validate", "--config", &config]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(dir.join("ca.key"), "not a key").unwrap();
    std::fs::copy(
        format!("{examples}/workloads.yaml"),
        dir.join("workloads.yaml"),
    )
    .unwrap();
    let bad_key = agent(&["validate", "--config", &config]);
    let bad_key_err = String::from_utf8_lossy(&bad_key.stderr).into_owned();
    // A real key, but not the CA certificate's: every peer would refuse the
    // certificates it signs.
    let other = agent(&[
        "create-ca",
        "--cert",
        &format!("{d}/other.pem"),
        "--key",
        &format!("{d}/ca.key"),
    ]);
    assert!(other.status.success());
    let wrong_key = agent(&["validate", "--config", &config]);
    let wrong_key_err = String::from_utf8_lossy(&wrong_key.stderr).into_owned();
    // A bundle that holds only another root: valid, with a warning.
    let out_ca = agent(&[
        "create-ca",
        "--cert",
        &format!("{d}/ca.pem"),
        "--key",
        &format!("{d}/ca.key"),
    ]);
    assert!(out_ca.status.success());
    std::fs::copy(dir.join("other.pem"), dir.join("bundle.pem")).unwrap();
    let foreign = agent(&["validate", "--config", &config]);
    let foreign_err = String::from_utf8_lossy(&foreign.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!wrong_key.status.success());
    assert!(
        wrong_key_err.contains("ca.key: this key is not the key of the CA certificate"),
        "{wrong_key_err}"
    );
    assert!(foreign.status.success(), "{foreign_err}");
    assert!(
        foreign_err.contains("the trust bundle does not hold the CA certificate"),
        "{foreign_err}"
    );
    assert!(!out.status.success());
    assert!(stderr.contains("workloads.yaml"), "{stderr}");
    assert!(stderr.contains("line 7 column 5"), "{stderr}");
    assert!(stderr.contains("unknown field `nodeName`"), "{stderr}");
    assert!(!bad_key.status.success());
    assert!(
        bad_key_err.contains("ca.key") && bad_key_err.contains("private key"),
        "{bad_key_err}"
    );
}

#[test]
fn validate_a_policy_directory() {
    let dir = std::env::temp_dir().join(format!("nodemesh-cli-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("allow.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n",
    )
    .unwrap();
    let out = agent(&["validate", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: shop/a:") && stderr.contains("methods"),
        "{stderr}"
    );
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec:\n  rules:\n  - to: [{operation: {ports: [\"0\"]}}]\n",
    )
    .unwrap();
    let out = agent(&["validate", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.yaml:6:") && stderr.contains("ports[0]"),
        "{stderr}"
    );
}
