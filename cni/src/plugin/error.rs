//! The CNI error result.

use std::fmt;

use serde::Serialize;

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const INVALID_ENV: u32 = 4;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_NETWORK_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
/// CNI 1.1 STATUS: "The plugin is not available".
pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
pub const GENERIC: u32 = 999;

/// The version errors are reported in when the config's is unknown.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// A CNI error, printed to stdout as the spec's error result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    /// The config's cniVersion (the runtime parses the error in that version).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: FALLBACK_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The error result as the spec's JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a CniError always serialises")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
