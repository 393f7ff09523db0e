//! The lab's DNS server: Debian's dnsmasq on the external host `ext`
//! (10.240.0.200 and fd00:240::200, port 53), answering only the names a
//! test gives it (no upstream, no /etc/hosts), with a TTL of [`DNS_TTL`],
//! and logging every query it gets.
//!
//! Once it runs, the processes the lab starts in pods (`pod_command`,
//! `pod_program`) see a resolv.conf naming it, and every agent forwards
//! its pods' captured DNS to it (`dns.upstreams` in the lab's agent config,
//! [`AGENT_DNS_CONFIG`]).
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cluster::{Cluster, EXTERNAL_V4, EXTERNAL_V6};

/// The TTL of every answer of the lab's DNS server.
pub const DNS_TTL: u32 = 300;
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// The lab's DNS server, as pods address it.
pub fn dns_server() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(EXTERNAL_V4), 53)
}

/// The `dns` section of the lab's agent config (left out when a test's own
/// `extra` config has one).
pub const AGENT_DNS_CONFIG: &str = "dns:\n  upstreams: [\"10.240.0.200:53\"]\n";

impl Cluster {
    /// Starts the lab's DNS server with `records`: `(name, address)`, or
    /// `(alias, name)` for a CNAME (any value that is not an address).
    /// A name may be given several addresses, IPv4 and IPv6.
    pub fn start_dns(&mut self, records: &[(&str, &str)]) -> Result<()> {
        if !Path::new(DNSMASQ).is_file() {
            bail!("{DNSMASQ} missing: `cargo xtask setup` installs Debian's dnsmasq-base");
        }
        let log = self.dns_log_path();
        let _ = fs::remove_file(&log);
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            "--pid-file".into(),
            "--user=root".into(),
            "--port=53".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={EXTERNAL_V4}"),
            format!("--listen-address={EXTERNAL_V6}"),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
        ];
        for (name, value) in records {
            args.push(match value.parse::<IpAddr>() {
                Ok(ip) => format!("--host-record={name},{ip},{DNS_TTL}"),
                Err(_) => format!("--cname={name},{value},{DNS_TTL}"),
            });
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.external_program(Path::new(DNSMASQ), &args);
        let out = self.spawn_background(cmd, "dnsmasq")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.dns_log().contains("started, version") {
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq did not start in 10 s: {}{}",
                    fs::read_to_string(&out).unwrap_or_default(),
                    self.dns_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        fs::write(
            self.resolv_conf_path(),
            format!("nameserver {EXTERNAL_V4}\n"),
        )
        .context("writing the pods' resolv.conf")?;
        Ok(())
    }

    /// The lab DNS server's log: one `query[A] NAME from ADDRESS` line per
    /// query it got.
    pub fn dns_log(&self) -> String {
        fs::read_to_string(self.dns_log_path()).unwrap_or_default()
    }

    fn dns_log_path(&self) -> PathBuf {
        self.state_dir.join("dnsmasq.log")
    }

    fn resolv_conf_path(&self) -> PathBuf {
        self.state_dir.join("resolv.conf")
    }

    /// The resolv.conf pods' processes see, once the DNS server runs.
    pub fn pod_resolv_conf(&self) -> Option<PathBuf> {
        let p = self.resolv_conf_path();
        p.is_file().then_some(p)
    }
}
