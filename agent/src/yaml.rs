//! Strict YAML reading with errors that name the file, line and column.
//!
//! serde-saphyr (not the archived serde_yaml): every error, duplicate keys
//! included, carries a line, a column and a snippet of the input. Its
//! budget bounds what one file may cost; the limits are the README's.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::files::{self, FileError};

/// Documents per policy file (serde-saphyr's default is 1,024).
pub const MAX_DOCUMENTS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// How much parsing a file of `max_bytes` may cost: enough for any file of
/// that size written by hand or generated, never unbounded.
fn options(max_bytes: u64) -> serde_saphyr::Options {
    let scale = (max_bytes / files::MAX_CONFIG_BYTES).max(1) as usize;
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_events = 1_000_000 * scale;
    budget.max_nodes = 400_000 * scale;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

fn parse_error(path: &Path, e: serde_saphyr::Error) -> YamlError {
    let mut message = e
        .to_string()
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    if message.contains("budget breached") {
        message += &format!(
            " (a file may hold at most {MAX_DOCUMENTS} documents, and nodes and events in proportion to its size limit; split it)"
        );
    }
    YamlError::Parse {
        path: path.to_owned(),
        message,
    }
}

/// Reads a file that may hold several documents (`---`).
pub fn read_documents<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, YamlError> {
    let text = files::read_text(path, files::MAX_CONFIG_BYTES)?;
    parse_documents(path, &text)
}

pub fn parse_documents<T: DeserializeOwned>(path: &Path, text: &str) -> Result<Vec<T>, YamlError> {
    serde_saphyr::from_multiple_with_options(text, options(files::MAX_CONFIG_BYTES))
        .map_err(|e| parse_error(path, e))
}

/// Reads a one-document file of at most [`files::MAX_CONFIG_BYTES`].
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, YamlError> {
    let text = files::read_text(path, files::MAX_CONFIG_BYTES)?;
    parse_str(path, &text)
}

pub fn parse_str<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, YamlError> {
    parse_sized(path, text, files::MAX_CONFIG_BYTES)
}

/// One document from `text`, with the budget of a file of `max_bytes`.
pub fn parse_sized<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    max_bytes: u64,
) -> Result<T, YamlError> {
    serde_saphyr::from_str_with_options(text, options(max_bytes)).map_err(|e| parse_error(path, e))
}
