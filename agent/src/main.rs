use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nodemesh_agent::{app, config::Config, ebpf, state::Workloads};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "nodemesh-agent", version, about = "nodemesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the kernel programs, enrol local pods and proxy their traffic.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check the config and workloads files; exit non-zero on any error.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the entry counts of the pinned maps (JSON).
    Maps {
        #[arg(long)]
        config: PathBuf,
    },
    /// Detach the programs and remove every pin under bpffsDir.
    Uninstall {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a new mesh root CA (certificate and key, PEM).
    CreateCa {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("NODEMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads)
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(app::run(config))
        }
        Command::Validate { config: path } => {
            let config = Config::load(&path)?;
            let w = Workloads::load(&config.workloads_file)?;
            nodemesh_agent::identity::FileCa::load(&config.ca_cert_file, &config.ca_key_file)?;
            nodemesh_agent::identity::store::read_bundle(config.trust_bundle_file())?;
            println!(
                "ok: {} and {}: {} pods, {} local to {}",
                path.display(),
                config.workloads_file.display(),
                w.pods().len(),
                w.local_pods().count(),
                w.node
            );
            Ok(())
        }
        Command::Maps { config } => {
            let config = Config::load(&config)?;
            let sizes = ebpf::pinned_map_sizes(&config.bpffs_dir)?;
            let obj: serde_json::Map<String, serde_json::Value> = sizes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect();
            println!("{}", serde_json::Value::Object(obj));
            Ok(())
        }
        Command::CreateCa {
            trust_domain,
            cert,
            key,
        } => {
            let (cert_pem, key_pem) = nodemesh_agent::identity::ca::new_root(&trust_domain)?;
            std::fs::write(&cert, cert_pem)
                .with_context(|| format!("writing {}", cert.display()))?;
            write_private(&key, &key_pem)?;
            println!(
                "created the root CA of {trust_domain}: {} (key {})",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::Uninstall { config } => {
            let config = Config::load(&config)?;
            ebpf::uninstall(&config.bpffs_dir)?;
            Ok(())
        }
    }
}

/// Writes a key readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
