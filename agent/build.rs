//! Builds the eBPF programs (crate `nodemesh-ebpf`) for the bpf target with
//! aya-build; the object is embedded into the agent with `include_bytes`.
//! Needs nightly with rust-src and `bpf-linker` on PATH: `cargo xtask setup`
//! installs both, and every `cargo xtask` command puts them on PATH.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "nodemesh-ebpf")
        .ok_or_else(|| anyhow!("package nodemesh-ebpf not in the workspace"))?;
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
            .unwrap_or(false);
        if !on_path {
            return Err(anyhow!(
                "bpf-linker is not on PATH. Build through `cargo xtask ...`, which installs it \
                 (cargo xtask setup) and puts it on PATH"
            ));
        }
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
