//! Strict YAML reading with errors that name the file, line and column.
//!
//! serde-saphyr (not the archived serde_yaml): every error, duplicate keys
//! included, carries a line, a column and a snippet of the input.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: file is {size} bytes, more than the {MAX_FILE_BYTES}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Reads a file that may hold several documents (`---`).
pub fn read_documents<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, YamlError> {
    let text = read_text(path)?;
    serde_saphyr::from_multiple(&text).map_err(|e| YamlError::Parse {
        path: path.to_owned(),
        message: e
            .to_string()
            .replace(", set DuplicateKeyPolicy in Options if acceptable", ""),
    })
}

pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, YamlError> {
    let text = read_text(path)?;
    parse_str(path, &text)
}

/// The file as UTF-8, refused above the size limit.
fn read_text(path: &Path) -> Result<String, YamlError> {
    let meta = std::fs::metadata(path).map_err(|source| YamlError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(YamlError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| YamlError::Read {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| YamlError::Parse {
        path: path.to_owned(),
        message: format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

pub fn parse_str<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str(text).map_err(|e| YamlError::Parse {
        path: path.to_owned(),
        message: e
            .to_string()
            .replace(", set DuplicateKeyPolicy in Options if acceptable", ""),
    })
}
