//! Where a policy document went wrong, or was accepted with a warning: the
//! errors name the file, line, column and field path; the context that
//! collects them while one file's documents are compiled.
use std::{
    fmt,
    path::{Path, PathBuf},
};

use super::model::S;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.field,
            self.message
        )
    }
}

impl std::error::Error for PolicyError {}

/// Something accepted but not enforced as written (L7 fields at L4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    pub policy: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.policy, self.field, self.message)
    }
}

pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
    pub(super) errors: Vec<PolicyError>,
    pub(super) warnings: Vec<PolicyWarning>,
    /// `namespace/name` of the document being compiled.
    pub(super) policy: String,
}

impl Ctx<'_> {
    pub(super) fn error(&mut self, at: &S, field: impl Into<String>, message: impl Into<String>) {
        self.error_at(
            at.referenced.line(),
            at.referenced.column(),
            &field.into(),
            message,
        );
    }

    pub(super) fn error_at(
        &mut self,
        line: u64,
        column: u64,
        field: &str,
        message: impl Into<String>,
    ) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub(super) fn warn(&mut self, field: impl Into<String>, message: &str) {
        self.warnings.push(PolicyWarning {
            policy: self.policy.clone(),
            field: field.into(),
            message: message.into(),
        });
    }

    pub(super) fn list<T>(
        &mut self,
        values: &Option<Vec<S>>,
        path: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let values = values.as_ref()?;
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            match parse(&v.value) {
                Ok(t) => out.push(t),
                Err(m) => self.error(v, format!("{path}[{i}]"), m),
            }
        }
        Some(out)
    }
}
