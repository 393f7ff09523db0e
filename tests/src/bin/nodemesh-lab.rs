//! `nodemesh-lab`: the virtual cluster's tool. `demo` and `bench` run on
//! the host; the other commands are what pods run.
use std::{net::SocketAddr, os::unix::process::CommandExt as _, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use nodemesh_lab::{apiserver, bench, bench_client, demo, thirdparty, workload};

#[derive(Parser)]
#[command(name = "nodemesh-lab", about = "nodemesh virtual cluster")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A 2-node cluster running an online store, with a live summary.
    Demo {
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Meshed vs direct TCP on the virtual cluster; prints ratios, writes JSON.
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Where to write the JSON results.
        #[arg(long, default_value = "target/bench/latest.json")]
        out: PathBuf,
        /// Only the abuse phase (agent memory), printed as JSON.
        #[arg(long)]
        abuse_only: bool,
        /// Only the agent's memory with a large cluster in the API, as JSON.
        #[arg(long)]
        api_memory_only: bool,
        /// Only the cross-node suite without sockmap (direct, captured,
        /// meshed): the quick loop for work on HBONE.
        #[arg(long)]
        cross_node_only: bool,
        /// Only the agent's TLS in memory (handshakes, bulk), as JSON.
        #[arg(long)]
        tls_only: bool,
        /// Only egress to third parties under REGISTRY_ONLY (L4, the app's
        /// own TLS, TLS originated by the agent; the registry's and the SNI
        /// peek's costs in memory), as a table and JSON.
        #[arg(long)]
        egress_only: bool,
        /// More agent config as YAML lines, e.g. `workerThreads: 1`, to
        /// measure a setting.
        #[arg(long, default_value = "")]
        agent_config: String,
    },
    /// Join a cgroup and a network namespace, then exec the command.
    PodExec {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        netns: PathBuf,
        /// A file the command sees as /etc/resolv.conf (bind-mounted in a
        /// mount namespace of its own, as `ip netns exec` does).
        #[arg(long)]
        resolv_conf: Option<PathBuf>,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// The test server (see `workload`).
    Serve {
        #[arg(long)]
        port: u16,
        /// Serve in TLS with this certificate chain (PEM) ...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ... and this key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Test clients; each prints one JSON result line.
    Client {
        #[command(subcommand)]
        what: ClientCmd,
    },
    /// Load generators for the benchmark.
    BenchClient {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Capture frames in this netns; report ports seen and any canary.
    Capture {
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value = "")]
        canary: String,
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
    },
    /// Speak to an agent's HBONE port as a bad or hostile peer would.
    HboneProbe {
        #[arg(long)]
        to: String,
        #[arg(long)]
        mode: String,
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        #[arg(long)]
        ca_key: Option<PathBuf>,
        /// The CONNECT authority for the HTTP/2 modes.
        #[arg(long, default_value = "10.244.1.10:8080")]
        authority: String,
    },
    /// A FAKE of the Kubernetes API server, its state the files of
    /// DIR/objects; writes DIR/kubeconfig once it listens. Runs until killed.
    Apiserver {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        listen: SocketAddr,
        /// A policy group to serve (AuthorizationPolicy, PeerAuthentication;
        /// for networking.istio.io: ServiceEntry, DestinationRule).
        #[arg(long)]
        group: Vec<String>,
    },
    /// A third-party API outside the cluster (see `thirdparty`): HTTPS
    /// (or plaintext) with HTTP/1.1 and HTTP/2; faults read from
    /// FAULT_FILE at each new connection. Runs until killed.
    ThirdParty {
        /// Repeatable (an IPv4 and an IPv6 address).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// The instance's name, in every answer.
        #[arg(long)]
        name: String,
        /// Where its certificates are (`ThirdPartyCa::issue_server_certs`).
        #[arg(long, required_unless_present = "plaintext")]
        cert_dir: Option<PathBuf>,
        /// good, wrong-name, expired or unknown-ca.
        #[arg(long, default_value = "good")]
        cert: thirdparty::CertKind,
        #[arg(long)]
        plaintext: bool,
        /// Refuse clients without a certificate from CERT_DIR/client-ca.pem.
        #[arg(long)]
        require_client_cert: bool,
        /// none, delay:MS, reset or close; no file means none.
        #[arg(long)]
        fault_file: Option<PathBuf>,
    },
    /// A demo shop service: serves, and calls its dependencies.
    Shop {
        #[arg(long)]
        port: u16,
        /// Dependencies as `name=ip:port`.
        #[arg(long)]
        call: Vec<String>,
        /// Calls per second to each dependency.
        #[arg(long, default_value_t = 4.0)]
        rate: f64,
    },
}

#[derive(Subcommand)]
enum ClientCmd {
    Probe {
        #[arg(long)]
        to: String,
    },
    Send {
        #[arg(long)]
        to: String,
        #[arg(long)]
        bytes: u64,
        /// Pause between 64 KiB chunks (a long, slow transfer).
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
    },
    /// Sends a text many times (for captures that look for it).
    Canary {
        #[arg(long)]
        to: String,
        #[arg(long)]
        text: String,
        #[arg(long, default_value_t = 1000)]
        repeat: usize,
    },
    Fetch {
        #[arg(long)]
        to: String,
        #[arg(long)]
        bytes: u64,
    },
    Concurrent {
        #[arg(long)]
        to: String,
        #[arg(long)]
        n: usize,
    },
    Many {
        #[arg(long)]
        to: String,
        #[arg(long)]
        n: usize,
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Opens many connections and holds them idle.
    Hold {
        #[arg(long)]
        to: String,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        secs: f64,
    },
}

/// Where a load generator connects (`bench_client::Target`).
#[derive(clap::Args)]
struct BenchTarget {
    /// `ip:port`, or `name:port` (resolved with the pod's resolv.conf).
    #[arg(long)]
    to: String,
    /// Speak TLS, trusting this CA (PEM) for the server's certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The name to send and verify (default: the name in `--to`).
    #[arg(long, requires = "tls_ca")]
    sni: Option<String>,
}

impl BenchTarget {
    async fn resolve(&self) -> Result<bench_client::Target> {
        bench_client::Target::new(&self.to, self.tls_ca.as_deref(), self.sni.as_deref()).await
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    Stream {
        #[command(flatten)]
        to: BenchTarget,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        streams: usize,
    },
    Rr {
        #[command(flatten)]
        to: BenchTarget,
        #[arg(long)]
        secs: f64,
    },
    Crr {
        #[command(flatten)]
        to: BenchTarget,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Both of rustls' providers are built in (nodemesh_agent::tls::provider
    // takes from each), so rustls picks no process default by itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Cmd::PodExec {
            cgroup,
            netns,
            resolv_conf,
            command,
        } => pod_exec(cgroup, netns, resolv_conf, command),
        Cmd::Demo { duration } => demo::run(duration),
        Cmd::Bench {
            secs,
            out,
            abuse_only,
            api_memory_only,
            cross_node_only,
            tls_only,
            egress_only,
            agent_config,
        } => {
            let parts = [
                (abuse_only, bench::Part::Abuse),
                (api_memory_only, bench::Part::ApiMemory),
                (cross_node_only, bench::Part::CrossNode),
                (tls_only, bench::Part::Tls),
                (egress_only, bench::Part::Egress),
            ];
            let mut chosen = parts.iter().filter(|(on, _)| *on).map(|(_, p)| *p);
            let part = match (chosen.next(), chosen.next()) {
                (None, _) => bench::Part::All,
                (Some(p), None) => p,
                _ => anyhow::bail!(
                    "bench: choose at most one of --abuse-only, --api-memory-only, --cross-node-only, --tls-only, --egress-only"
                ),
            };
            bench::run(secs, &out, part, &agent_config)
        }
        Cmd::Serve {
            port,
            tls_cert,
            tls_key,
        } => {
            raise_fd_limit();
            let tls = match tls_cert.as_deref().zip(tls_key.as_deref()) {
                Some((cert, key)) => Some(workload::tls_acceptor(cert, key)?),
                None => None,
            };
            runtime()?.block_on(workload::serve_with(port, tls))
        }
        Cmd::Client { what } => {
            raise_fd_limit();
            let rt = runtime()?;
            let v = rt.block_on(async {
                Ok::<_, anyhow::Error>(match what {
                    ClientCmd::Probe { to } => workload::probe(workload::parse_addr(&to)?).await,
                    ClientCmd::Send { to, bytes, pace_ms } => {
                        workload::send(workload::parse_addr(&to)?, bytes, pace_ms).await?
                    }
                    ClientCmd::Canary { to, text, repeat } => {
                        workload::canary(workload::parse_addr(&to)?, &text, repeat).await?
                    }
                    ClientCmd::Fetch { to, bytes } => {
                        workload::fetch(workload::parse_addr(&to)?, bytes).await?
                    }
                    ClientCmd::Concurrent { to, n } => {
                        workload::concurrent(workload::parse_addr(&to)?, n).await
                    }
                    ClientCmd::Many { to, n, parallel } => {
                        workload::many(workload::parse_addr(&to)?, n, parallel).await
                    }
                    ClientCmd::Hold { to, n, secs } => {
                        workload::hold(workload::parse_addr(&to)?, n, secs).await
                    }
                })
            })?;
            println!("{v}");
            Ok(())
        }
        Cmd::BenchClient { what } => {
            raise_fd_limit();
            let rt = runtime()?;
            let v = rt.block_on(async {
                match what {
                    BenchCmd::Stream { to, secs, streams } => {
                        bench_client::stream(&to.resolve().await?, secs, streams).await
                    }
                    BenchCmd::Rr { to, secs } => bench_client::rr(&to.resolve().await?, secs).await,
                    BenchCmd::Crr { to, secs, parallel } => {
                        bench_client::crr(&to.resolve().await?, secs, parallel).await
                    }
                }
            })?;
            println!("{v}");
            Ok(())
        }
        Cmd::Capture {
            secs,
            canary,
            ports,
        } => {
            println!("{}", nodemesh_lab::capture::run(secs, &canary, &ports)?);
            Ok(())
        }
        Cmd::HboneProbe {
            to,
            mode,
            ca_cert,
            ca_key,
            authority,
        } => {
            let ca = ca_cert.as_deref().zip(ca_key.as_deref());
            let v = runtime()?.block_on(nodemesh_lab::hbone_probe::run(
                workload::parse_addr(&to)?,
                &mode,
                ca,
                &authority,
            ))?;
            println!("{v}");
            Ok(())
        }
        Cmd::Apiserver { dir, listen, group } => {
            runtime()?.block_on(apiserver::serve(&dir, listen, &group))
        }
        Cmd::ThirdParty {
            listen,
            name,
            cert_dir,
            cert,
            plaintext,
            require_client_cert,
            fault_file,
        } => {
            raise_fd_limit();
            runtime()?.block_on(thirdparty::serve(thirdparty::ServerOptions {
                listen,
                name,
                cert_dir,
                cert,
                plaintext,
                require_client_cert,
                fault_file,
            }))
        }
        Cmd::Shop { port, call, rate } => {
            raise_fd_limit();
            runtime()?.block_on(demo::shop(port, call, rate))
        }
    }
}

/// Joins the cgroup first: `setns` does not move cgroups, and a process must
/// be in the pod's cgroup before it creates sockets for the hooks to see them.
fn pod_exec(
    cgroup: Option<PathBuf>,
    netns: PathBuf,
    resolv_conf: Option<PathBuf>,
    command: Vec<String>,
) -> Result<()> {
    if let Some(cg) = cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    let ns = std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {}", netns.display()))?;
    drop(ns);
    if let Some(file) = resolv_conf {
        use nix::mount::{MsFlags, mount};
        // Single-threaded still, as unshare(CLONE_NEWNS) requires.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
        // Private, so the bind mount below stays in this namespace.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?;
        mount(
            Some(&file),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} on /etc/resolv.conf", file.display()))?;
    }
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    Err(err).with_context(|| format!("exec {}", command[0]))
}
