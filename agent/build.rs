//! Builds the eBPF programs (crate `nodemesh-ebpf`) for the bpf target with
//! aya-build; the object is embedded into the agent with `include_bytes`.
//! Needs nightly with rust-src and `bpf-linker` on PATH: `cargo xtask setup`
//! installs both, and every `cargo xtask` command puts them on PATH.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for machines without the
//! toolchain, e.g. to run the in-process tests): the embedded object is then
//! an empty stub, as in aya's own integration tests, and an agent built so
//! fails at start-up when it loads the programs.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("nodemesh"), []).context("writing the eBPF stub")?;
        println!("cargo:warning=AYA_BUILD_SKIP: the eBPF object is an empty stub");
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "nodemesh-ebpf")
        .ok_or_else(|| anyhow!("package nodemesh-ebpf not in the workspace"))?;
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !on_path {
        return Err(anyhow!(
            "bpf-linker is not on PATH. Build through `cargo xtask ...`, which installs it \
             (cargo xtask setup) and puts it on PATH"
        ));
    }
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("manifest without a parent"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
