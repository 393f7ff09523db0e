//! The command line as users and CI pipelines call it.
use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodemesh-agent"))
        .args(args)
        .output()
        .expect("running nodemesh-agent")
}

#[test]
fn validate_accepts_the_examples_and_rejects_bad_files_with_their_location() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    let out = agent(&["validate", "--config", &format!("{examples}/agent.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = std::env::temp_dir().join(format!("nodemesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("agent.yaml"),
        "workloadsFile: workloads.yaml\ncgroupPath: /sys/fs/cgroup\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        "node: n0\npods:\n  - name: a\n    namespace: shop\n    ips: [10.0.0.1]\n    node: n1\n    nodeName: n1\n",
    )
    .unwrap();
    let out = agent(&[
        "validate",
        "--config",
        dir.join("agent.yaml").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(stderr.contains("workloads.yaml"), "{stderr}");
    assert!(stderr.contains("line 7 column 5"), "{stderr}");
    assert!(stderr.contains("unknown field `nodeName`"), "{stderr}");
}
