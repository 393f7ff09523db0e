use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nodemesh_agent::{app, config::Config, ebpf, state::WorkloadsFile};
use tracing_subscriber::EnvFilter;

/// jemalloc (tuned in .cargo/config.toml) gives memory back after a burst;
/// glibc's malloc kept it. Bench, 5 rounds of floods into one agent: glibc
/// 12.6 MB idle, 65 MB peak, 63 MB 10 s after; jemalloc 12.1, 38, 17.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Check files offline; exit non-zero on any error: the agent config
    /// (and the workloads, CA and trust bundle files it names), and/or a
    /// directory of policy documents.
    Validate {
        #[arg(long)]
        config: Option<PathBuf>,
        /// A policy directory (AuthorizationPolicy, PeerAuthentication).
        policy_dir: Option<PathBuf>,
        /// Namespace whose policies apply mesh-wide.
        #[arg(long, default_value = nodemesh_agent::policy::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
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
    // Both of rustls' providers are built in (nodemesh_agent::tls::provider
    // takes from each), so rustls picks no process default by itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let result = runtime.block_on(app::run(config));
            // Never wait on a blocking task (a reader) at exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Validate {
            config,
            policy_dir,
            root_namespace,
        } => {
            if config.is_none() && policy_dir.is_none() {
                anyhow::bail!("nothing to validate: give --config FILE and/or a policy directory");
            }
            if let Some(path) = config {
                let config = Config::load(&path)?;
                let source = match (&config.workloads_file, &config.kubernetes) {
                    (Some(file), _) => {
                        let w = WorkloadsFile::read(file)?;
                        for warning in &w.warnings {
                            eprintln!("warning: {warning}");
                        }
                        format!(
                            "{}: {} pods, {} local to {}",
                            file.display(),
                            w.pods.len(),
                            w.local_pods().count(),
                            w.node
                        )
                    }
                    (None, Some(kube)) => format!(
                        "workloads from the Kubernetes API for node {}",
                        kube.node_name
                    ),
                    (None, None) => unreachable!("Config::load requires a source"),
                };
                let ca = nodemesh_agent::identity::FileCa::load(
                    &config.ca_cert_file,
                    &config.ca_key_file,
                    config.cert_lifetime(),
                )?;
                let roots = nodemesh_agent::tls::read_bundle(config.trust_bundle_file())?;
                if !roots.iter().any(|r| r.as_ref() == ca.root().as_ref()) {
                    eprintln!(
                        "warning: {}: the trust bundle does not hold the CA certificate {}: peers will refuse this agent's certificates",
                        config.trust_bundle_file().display(),
                        config.ca_cert_file.display()
                    );
                }
                println!("ok: {} and {source}", path.display());
            }
            if let Some(dir) = policy_dir {
                let loaded = nodemesh_agent::policy::load_dir(&dir, &root_namespace)?;
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "ok: {}: {} authorization policies, {} peer authentications, {} service entries, {} destination rules in {} files",
                    dir.display(),
                    loaded.authorization.len(),
                    loaded.peer_authentication.len(),
                    loaded.registry.entries().len(),
                    loaded.registry.rules().len(),
                    loaded.files.len()
                );
            }
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
            // The plugin first: left in the conflist without an agent, it
            // would keep every new pod on the node from starting.
            if let Some(install) = config.cni.as_ref().and_then(|c| c.install.as_ref()) {
                nodemesh_agent::cni::install::uninstall(install)?;
            }
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
