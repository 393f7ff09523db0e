//! A real Prometheus (Debian's `/usr/bin/prometheus`) on loopback in the
//! virtual cluster's external host, scraping every agent's admin server
//! each second. Killed on drop.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::{Cluster, http};

pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
pub const PROMTOOL_BIN: &str = "/usr/bin/promtool";
const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus {
    child: Child,
    netns: PathBuf,
    addr: SocketAddr,
    pub dir: PathBuf,
}

/// One series of a query result: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    pub fn start(cluster: &Cluster) -> Result<Self> {
        if !Path::new(PROMETHEUS_BIN).is_file() {
            bail!(
                "{PROMETHEUS_BIN} is missing: `cargo xtask setup` installs Debian's prometheus package"
            );
        }
        let dir = cluster.state_dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let targets: Vec<String> = (0..cluster.agents.len())
            .map(|k| format!("\"{}\"", cluster.stats_address(k)))
            .collect();
        let config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  - job_name: nodemesh-agent\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = cluster
            .external_program(
                Path::new(PROMETHEUS_BIN),
                &[
                    &format!("--config.file={}", config_file.display()),
                    &format!("--storage.tsdb.path={}", dir.join("data").display()),
                    &format!("--web.listen-address={LISTEN}"),
                ],
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut p = Self {
            child,
            netns: cluster.external_netns(),
            addr: LISTEN.parse()?,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", p.log());
            }
            if p.get("/-/ready").is_ok_and(|r| r.status == 200) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s:\n{}", p.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<http::Response> {
        http::get(&self.netns, self.addr, path, None)
    }

    /// An instant query's vector result.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let r = self.get(&format!(
            "/api/v1/query?query={}",
            http::encode_query(promql)
        ))?;
        let v: Value = serde_json::from_str(&r.body)
            .with_context(|| format!("{promql}: HTTP {} {}", r.status, r.body))?;
        if v["status"] != "success" {
            bail!("{promql}: {v}");
        }
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("{promql}: not a vector: {v}"))?;
        result
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("{promql}: bad sample {s}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// Polls `promql` (a scrape a second) until `check` holds for its
    /// result; fails with the last result after `timeout`.
    pub fn wait_until(
        &self,
        promql: &str,
        timeout: Duration,
        check: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if check(&result) {
                return Ok(result);
            }
            if Instant::now() > deadline {
                bail!("after {timeout:?}, {promql} returned {result:#?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on a text exposition: Ok, or its complaints.
pub fn promtool_check_metrics(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(PROMTOOL_BIN)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {PROMTOOL_BIN} (cargo xtask setup installs it)"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
