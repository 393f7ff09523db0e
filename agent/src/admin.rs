//! The admin server: `/metrics`, `/healthz/ready`, `/healthz/live` and a
//! read-only `/config_dump`. Every endpoint is GET-only and changes
//! nothing; no response carries keys or tokens.
use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::{config::Config, metrics::MetricsRegistry, proxy::ProxyInputs, readiness::Readiness};

const OPENMETRICS: &str = "application/openmetrics-text;charset=utf-8;version=1.0.0";
const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds the `/config_dump` document on each request.
pub type ConfigDump = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct Admin {
    metrics: Arc<MetricsRegistry>,
    readiness: Readiness,
    config_dump: OnceLock<ConfigDump>,
    address: std::net::SocketAddr,
}

impl Admin {
    /// Where it listens.
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Set once the state it shows exists; until then `/config_dump` is 503.
    pub fn set_config_dump(&self, dump: ConfigDump) {
        let _ = self.config_dump.set(dump);
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "read-only: GET only\n".into(),
            );
        }
        match request.uri().path() {
            "/metrics" | "/stats/prometheus" => self.metrics(request),
            "/healthz/live" => reply(StatusCode::OK, TEXT, "live\n".into()),
            "/healthz/ready" => {
                let waiting = self.readiness.waiting_for();
                if waiting.is_empty() {
                    reply(StatusCode::OK, TEXT, "ready\n".into())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        format!("not ready: waiting for {}\n", waiting.join(", ")),
                    )
                }
            }
            "/config_dump" => match self.config_dump.get() {
                Some(dump) => match serde_json::to_string_pretty(&dump()) {
                    Ok(json) => reply(StatusCode::OK, "application/json", json),
                    Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
                },
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "starting: no state yet\n".into(),
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "endpoints: /metrics /healthz/ready /healthz/live /config_dump\n".into(),
            ),
        }
    }

    /// OpenMetrics for clients that ask for it (Prometheus does), the
    /// classic text format otherwise (what `promtool check metrics` reads).
    fn metrics(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let openmetrics = request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        match self.metrics.encode() {
            Ok(body) if openmetrics => reply(StatusCode::OK, OPENMETRICS, body),
            Ok(body) => reply(StatusCode::OK, PROMETHEUS_TEXT, prometheus_text(&body)),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("encoding metrics: {e}\n"),
            ),
        }
    }
}

/// The classic text format (0.0.4) of an OpenMetrics exposition: a counter
/// family is named by its `_total` samples there, and `# UNIT` / `# EOF`
/// do not exist.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds `address` and serves there until the process ends.
pub async fn start(
    address: std::net::SocketAddr,
    metrics: Arc<MetricsRegistry>,
    readiness: Readiness,
) -> anyhow::Result<Arc<Admin>> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("admin server on {address} (adminAddress)"))?;
    let address = listener.local_addr()?;
    let admin = Arc::new(Admin {
        metrics,
        readiness,
        config_dump: OnceLock::new(),
        address,
    });
    tokio::spawn(serve(admin.clone(), listener));
    tracing::info!(%address, "admin server listening");
    Ok(admin)
}

/// The effective config, the local workloads, the policies in force and the
/// certificates' subjects and expiry: state, never key material.
pub fn config_dump(config: Config, inputs: Arc<ProxyInputs>) -> ConfigDump {
    Box::new(move || {
        let workloads = &inputs.workloads;
        let mut local: Vec<serde_json::Value> = workloads
            .local_pods()
            .iter()
            .map(|p| {
                serde_json::json!({
                    "pod": p.key().to_string(),
                    "identity": inputs.identity_of(p).to_string(),
                    "ips": p.ips,
                    "labels": p.labels,
                })
            })
            .collect();
        local.sort_by(|a, b| a["pod"].as_str().cmp(&b["pod"].as_str()));
        let mut certificates: Vec<serde_json::Value> = inputs
            .tls
            .certs()
            .expiries()
            .into_iter()
            .map(|(identity, left)| {
                serde_json::json!({
                    "identity": identity.to_string(),
                    "expiresInSeconds": left.as_secs(),
                })
            })
            .collect();
        certificates.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        serde_json::json!({
            "config": config,
            "node": workloads.node(),
            "localWorkloads": local,
            "workloadState": {
                "generation": workloads.generation(),
                "pods": workloads.pods().len(),
                "services": workloads.services().len(),
            },
            "enrolledNetns": inputs.datapath.enrolled_cookies().len(),
            "policies": {
                "generation": inputs.policies.generation(),
                "authorization": inputs.policies.names(),
                "peer_authentication": inputs.policies.peer_authentication_names(),
            },
            "certificates": certificates,
            "endpoints": inputs.balancer.dump(),
        })
    })
}

/// Serves HTTP/1.1 on `listener` until the process ends.
async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!("admin accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = admin.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_by_their_samples() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total{x=\"y\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"y\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
