//! Developer and CI tasks: `cargo xtask setup|build|test|demo|bench`.
//!
//! Every command first makes the eBPF toolchain available (idempotent and
//! cached): nightly rust-src, and bpf-linker built against rustc's own
//! libLLVM (so the two use the same LLVM), installed under
//! `$XDG_CACHE_HOME/nodemesh/tools`. `setup` and `test` also install the
//! Debian packages the tests use (`prometheus`: server and promtool).
#![forbid(unsafe_code)]

use std::{
    env,
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};

mod image;
mod manifests;
mod modcycles;

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Each fuzz target's run in `test` (the seeds also run as unit tests).
const FUZZ_SECONDS: u32 = 20;
const LLVM_MAJOR: &str = "22";

#[derive(Parser)]
#[command(about = "nodemesh developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build needs (idempotent, cached).
    Setup,
    /// Build the agent and the lab in release mode.
    Build,
    /// Every check: fmt, clippy, unit tests and the root end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A 2-node virtual cluster running an online store, with a live summary.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Import cycles between the modules of a crate's src/ (part of `test`).
    Cycles {
        #[arg(default_value = "agent/src")]
        dir: PathBuf,
    },
    /// Render the Kubernetes manifests and validate them offline (part of `test`).
    Manifests,
    /// Benchmarks on the virtual cluster: meshed vs direct TCP.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The agent's OCI image, from scratch and offline (buildah), checked:
    /// target/image/nodemesh-agent.oci.tar (as root).
    Image,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    let path = setup()?;
    // Debian packages only where they are needed: the root tests, the demo
    // (its third parties' DNS server) and the bench.
    if matches!(
        cli.command,
        Cmd::Setup | Cmd::Test { .. } | Cmd::Demo { .. } | Cmd::Bench { .. }
    ) {
        install_debian_packages()?;
    }
    match cli.command {
        Cmd::Setup => manifests::tools().map(drop),
        Cmd::Cycles { dir } => {
            let found = modcycles::cycles(&root.join(dir))?;
            for c in &found {
                println!("{c}");
            }
            if found.is_empty() {
                Ok(())
            } else {
                bail!("{} import cycles", found.len())
            }
        }
        Cmd::Build => build(&root, &path),
        Cmd::Manifests => manifests::check(&root),
        Cmd::Test { args } => test(&root, &path, &args),
        Cmd::Demo { args } => run_lab(&root, &path, "demo", &args),
        Cmd::Bench { args } => run_lab(&root, &path, "bench", &args),
        Cmd::Image => image::image(&root, &path),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .ok_or_else(|| anyhow!("xtask has no parent directory"))?
        .to_path_buf())
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("nodemesh"));
    }
    let home = env::var_os("HOME").ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME set"))?;
    Ok(PathBuf::from(home).join(".cache").join("nodemesh"))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Makes the eBPF toolchain available; returns the PATH to build with.
fn setup() -> Result<OsString> {
    // rust-src for `-Z build-std=core` on the bpf target.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "a nightly toolchain is needed for the eBPF build (rustup toolchain install nightly)",
    )?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let libllvm = fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{LLVM_MAJOR}.")))
        })
        .ok_or_else(|| {
            anyhow!(
                "nightly's libLLVM.so.{LLVM_MAJOR}.* not found in {}: bpf-linker {BPF_LINKER_VERSION} \
                 needs rustc's LLVM to be {LLVM_MAJOR}",
                sysroot.display()
            )
        })?;
    let llvm_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad libLLVM name"))?
        .to_owned();
    // Keyed by the exact libLLVM build, so a new nightly rebuilds the linker.
    let tools = cache_dir()?.join("tools");
    let install_root = tools.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{llvm_name}"));
    let linker = install_root.join("bin/bpf-linker");
    // Reinstall when missing or unable to run (e.g. its libLLVM moved).
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        let prefix = tools.join(format!("llvm-prefix-{llvm_name}"));
        let lib = prefix.join("lib");
        fs::create_dir_all(&lib)?;
        for link in [
            "libLLVM.so".to_owned(),
            format!("libLLVM-{LLVM_MAJOR}.so"),
            llvm_name.clone(),
        ] {
            let path = lib.join(&link);
            let _ = fs::remove_file(&path);
            std::os::unix::fs::symlink(&libllvm, &path)?;
        }
        eprintln!(
            "building bpf-linker {BPF_LINKER_VERSION} against {} (once, ~75 s)",
            libllvm.display()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .arg("--force")
            .arg("--root")
            .arg(&install_root)
            .env("LLVM_PREFIX", &prefix)
            .current_dir(&tools))?;
    }
    let fuzz_root = tools.join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let fuzz_works = Command::new(fuzz_root.join("bin/cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz_works {
        eprintln!("building cargo-fuzz {CARGO_FUZZ_VERSION} (once)");
        run(Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .arg("--root")
            .arg(&fuzz_root)
            .current_dir(&tools))?;
    }
    let mut paths = vec![install_root.join("bin"), fuzz_root.join("bin")];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    Ok(env::join_paths(paths)?)
}

/// Debian packages the root tests, the demo and the bench use, with the
/// files they need from each: the metrics test's Prometheus, the CNI test's
/// reference plugins, the DNS server and clients of the DNS and egress
/// tests and the demo's third parties.
const DEBIAN_PACKAGES: [(&str, &[&str]); 9] = [
    // The manifests check's venv, the import-cycle tool and the CNI test's
    // unprivileged client.
    ("python3-minimal", &["/usr/bin/python3"]),
    ("prometheus", &["/usr/bin/prometheus", "/usr/bin/promtool"]),
    (
        "containernetworking-plugins",
        &["/usr/lib/cni/bridge", "/usr/lib/cni/host-local"],
    ),
    // The bench's standard-tool runs across nodes, and profiling the agents
    // (`perf record -p`; docs/architecture.md, "Cross-node HBONE").
    ("iperf3", &["/usr/bin/iperf3"]),
    ("sockperf", &["/usr/bin/sockperf"]),
    ("linux-perf", &["/usr/bin/perf"]),
    // The DNS test: the lab's DNS server (dnsmasq's binary only, without
    // the package that runs it as the host's service) and the pods' real
    // clients (`dig`, curl's name lookup; `getent` is libc's).
    ("dnsmasq-base", &["/usr/sbin/dnsmasq"]),
    ("bind9-dnsutils", &["/usr/bin/dig"]),
    ("curl", &["/usr/bin/curl"]),
];

/// The Debian packages whose files are missing. Only root can install
/// them; others get a note (the test that needs one then fails, saying
/// what is missing).
fn install_debian_packages() -> Result<()> {
    for (package, files) in DEBIAN_PACKAGES.into_iter().chain(image::DEBIAN_PACKAGES) {
        install_debian(package, files)?;
    }
    Ok(())
}

fn install_debian(package: &str, files: &[&str]) -> Result<()> {
    let present = || files.iter().all(|p| Path::new(p).is_file());
    if present() {
        return Ok(());
    }
    if output(Command::new("id").arg("-u"))? != "0" {
        eprintln!(
            "note: {} missing; as root, `cargo xtask setup` installs Debian's {package} package",
            files.join(" or ")
        );
        return Ok(());
    }
    let status = apt_install(package)?;
    match (present(), status.success()) {
        (true, true) => Ok(()),
        // A package's postinst may start a service, which fails where
        // there is no init system; the files are all the tests use.
        (true, false) => {
            eprintln!("note: apt-get install {package}: {status}, but its files are installed");
            Ok(())
        }
        (false, _) => bail!(
            "apt-get install {package} ({status}) left {} missing",
            files.join(" or ")
        ),
    }
}

/// `apt-get install` of one package (as root), after an index update if the
/// first try fails (a fresh machine's index is stale or empty).
fn apt_install(package: &str) -> Result<std::process::ExitStatus> {
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("+ {cmd:?}");
        cmd.status()
            .with_context(|| format!("could not start {cmd:?}"))
    };
    let status = install()?;
    if status.success() {
        return Ok(status);
    }
    run(Command::new("apt-get").arg("update"))?;
    install()
}

fn cargo(root: &Path, path: &OsString) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root).env("PATH", path);
    cmd
}

fn build(root: &Path, path: &OsString) -> Result<()> {
    // The lab is not a default member (its tests need root): named here.
    run(cargo(root, path).args([
        "build",
        "--release",
        "--bins",
        "-p",
        "nodemesh-agent",
        "-p",
        "nodemesh-cni",
        "-p",
        "nodemesh-lab",
    ]))
}

fn test(root: &Path, path: &OsString, args: &[String]) -> Result<()> {
    run(cargo(root, path).args(["fmt", "--all", "--check"]))?;
    let cycles = modcycles::cycles(&root.join("agent/src"))?;
    if !cycles.is_empty() {
        bail!(
            "the agent's modules import each other in cycles:\n  {}",
            cycles.join("\n  ")
        );
    }
    eprintln!("+ no import cycles between the agent's modules");
    manifests::check(root)?;
    // In the release profile, as everything after it: the build scripts
    // (the eBPF programs, aws-lc's and ring's C) run once for all (CI time).
    run(cargo(root, path).args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build(root, path)?;
    image::image(root, path)?;
    fuzz(root, path)?;
    // Root tests share kernel state (cgroups, bpffs, netns): one at a time.
    let mut cmd = cargo(root, path);
    // Every suite runs even after a failure, so one run shows them all.
    cmd.args(["test", "--release", "--workspace", "--no-fail-fast"])
        .args(args)
        .args(["--", "--test-threads=1"]);
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    // One closing line for the whole run (cargo ends on a doc-test summary).
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// Runs every fuzz target (each `[[bin]]` of agent/fuzz/Cargo.toml, as
/// `cargo fuzz list` names them; seeds in agent/fuzz/corpus/<target>) for a
/// bounded time (nightly, libFuzzer); a panic, an input slower than 10 s or
/// one that takes 2 GiB fails the run and leaves its input under
/// agent/fuzz/artifacts. Without AddressSanitizer:
/// the fuzzed parsers are safe Rust (`unsafe` is denied outside `common`
/// and the eBPF crate), so it would find nothing more, and it cost ~2 min
/// of every CI run to build (6m22 vs 4m50 measured). The eBPF object is not
/// needed: a stub is built in.
fn fuzz(root: &Path, path: &OsString) -> Result<()> {
    let dir = root.join("agent/fuzz");
    // rustup's cargo, for `+nightly`.
    let nightly = || {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&dir)
            .env("PATH", path)
            .env("AYA_BUILD_SKIP", "1")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .arg("+nightly");
        cmd
    };
    let targets = output(nightly().args(["fuzz", "list"]))?;
    for target in targets.lines().map(str::trim).filter(|t| !t.is_empty()) {
        // New inputs go to a scratch corpus; the seeds are only read.
        let scratch = dir.join("target/corpus").join(target);
        fs::create_dir_all(&scratch)?;
        run(nightly()
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&scratch)
            .arg(format!("corpus/{target}"))
            .args([
                "--",
                &format!("-max_total_time={FUZZ_SECONDS}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
            ]))?;
    }
    Ok(())
}

/// `test result: ok. 10 passed; 0 failed; ...` -> (10, 0).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        match words.as_slice() {
            [.., n, "passed"] => passed = n.parse().ok(),
            [n, "failed"] => failed = n.parse().ok(),
            _ => {}
        }
    }
    Some((passed?, failed?))
}

fn run_lab(root: &Path, path: &OsString, what: &str, args: &[String]) -> Result<()> {
    build(root, path)?;
    run(cargo(root, path)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "nodemesh-lab",
            "--bin",
            "nodemesh-lab",
            "--",
            what,
        ])
        .args(args))
}
