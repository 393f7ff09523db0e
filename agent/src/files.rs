//! Reading configuration files without trusting them. A file is opened
//! non-blocking (a FIFO at the path never blocks the reader), must be a
//! regular file once open (a device or a FIFO is refused, whatever a symlink
//! pointed at), and is read through a bounded reader (a file that grows
//! while read never fills memory).
use std::{
    fs::File,
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Size limits, by kind of file (README: "Limits").
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// The workloads file lists every pod of the cluster (~300 bytes each).
pub const MAX_WORKLOADS_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: is a {kind}, not a regular file; refused")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: more than the {limit}-byte limit; refused")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: reading: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// The bytes of the regular file at `path`, at most `limit` of them.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| FileError::Open {
            path: path.to_owned(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| FileError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(meta.file_type()),
        });
    }
    read_bounded(file, path, limit)
}

fn read_bounded(file: File, path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temp file renamed over it (creating
/// the directory), so a reader never sees half of it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// [`read`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    String::from_utf8(read(path, limit)?).map_err(|e| FileError::NotUtf8 {
        path: path.to_owned(),
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_oversized_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("nm-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read(&fifo, 10).unwrap_err().to_string();
        assert!(err.contains("is a FIFO"), "{err}");
        let link = dir.join("zero");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let err = read(&link, 10).unwrap_err().to_string();
        assert!(err.contains("is a character device"), "{err}");
        let big = dir.join("big");
        std::fs::write(&big, [b'a'; 11]).unwrap();
        let err = read(&big, 10).unwrap_err().to_string();
        assert!(err.contains("more than the 10-byte limit"), "{err}");
        assert_eq!(read(&big, 11).unwrap().len(), 11);
        std::fs::write(&big, [0xff, b'a']).unwrap();
        assert!(
            read_text(&big, 10)
                .unwrap_err()
                .to_string()
                .contains("offset 0")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
