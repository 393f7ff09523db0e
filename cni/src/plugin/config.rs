//! The network config on stdin: the conflist entry plus what the runtime adds.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use super::error::{
    CniError, DECODE_FAILURE, FALLBACK_VERSION, INCOMPATIBLE_VERSION, INVALID_NETWORK_CONFIG,
};
use crate::protocol::DEFAULT_SOCKET_PATH;

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

/// Unknown fields are ignored: runtimes add `runtimeConfig`, `args` and more.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default = "default_socket_path")]
    pub socket_path: String,
    #[serde(default = "default_exclude_namespaces")]
    pub exclude_namespaces: Vec<String>,
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

fn default_socket_path() -> String {
    DEFAULT_SOCKET_PATH.to_string()
}

fn default_exclude_namespaces() -> Vec<String> {
    vec!["kube-system".to_string()]
}

fn default_timeout_seconds() -> u64 {
    10
}

impl NetConf {
    /// Parses and validates stdin. Errors carry the config's cniVersion when it got that far.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                DECODE_FAILURE,
                "the network configuration on stdin is not valid JSON",
            )
            .details(e)
        })?;
        let version = value
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(FALLBACK_VERSION)
            .to_string();
        let with_version = |mut e: CniError| {
            e.cni_version = version.clone();
            e
        };
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            with_version(
                CniError::new(
                    INVALID_NETWORK_CONFIG,
                    "the nodemesh-cni entry of the network configuration is invalid",
                )
                .details(e),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(with_version(
                CniError::new(
                    INCOMPATIBLE_VERSION,
                    format!(
                        "nodemesh-cni does not support cniVersion {:?}; set the conflist's \
                         cniVersion to one of {}",
                        conf.cni_version,
                        SUPPORTED_VERSIONS.join(", ")
                    ),
                )
                .details("cniVersion"),
            ));
        }
        if !(1..=120).contains(&conf.timeout_seconds) {
            return Err(conf.error(
                INVALID_NETWORK_CONFIG,
                format!(
                    "timeoutSeconds is {}; it must be between 1 and 120",
                    conf.timeout_seconds
                ),
            ));
        }
        if conf.prev_result.as_ref().is_some_and(|p| !p.is_object()) {
            return Err(conf.error(INVALID_NETWORK_CONFIG, "prevResult is not a JSON object"));
        }
        Ok(conf)
    }

    /// An error reported in this config's cniVersion.
    pub fn error(&self, code: u32, msg: impl Into<String>) -> CniError {
        let mut e = CniError::new(code, msg);
        e.cni_version = self.cni_version.clone();
        e
    }

    /// CHECK arrived with CNI 0.4.0; the 0.3.x specs do not define it.
    pub fn allows_check(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }

    /// The previous plugin's result, required for ADD and CHECK in a chain.
    pub fn require_prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            self.error(
                INVALID_NETWORK_CONFIG,
                "nodemesh-cni is a chained plugin: it needs a previous plugin's result \
                 (prevResult); list it after the network plugin in the conflist",
            )
        })
    }

    /// The result this plugin prints: prevResult in the config's cniVersion.
    pub fn result(&self, prev_result: &Value) -> Value {
        let mut result = prev_result.clone();
        if let Some(object) = result.as_object_mut() {
            object.insert("cniVersion".into(), Value::from(self.cni_version.clone()));
        }
        result
    }
}

/// The pod's addresses in prevResult: `ips[].address` is CIDR notation in
/// every version we support (0.3.x/0.4.0 add `version`, 1.x drops it).
pub fn result_ips(conf: &NetConf, prev_result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = prev_result.get("ips") else {
        return Ok(Vec::new());
    };
    let Some(ips) = ips.as_array() else {
        return Err(conf.error(INVALID_NETWORK_CONFIG, "prevResult.ips is not a list"));
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let address = ip.get("address").and_then(Value::as_str).unwrap_or("");
            let host = address.split_once('/').map_or(address, |(host, _)| host);
            host.parse().map_err(|_| {
                conf.error(
                    INVALID_NETWORK_CONFIG,
                    format!(
                        "prevResult.ips[{i}].address is {address:?}, not an address like \
                         10.0.0.5/24"
                    ),
                )
            })
        })
        .collect()
}
