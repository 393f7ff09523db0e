//! Putting the binary and the conflist entry in place on the node.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{PLUGIN_TYPE, insert, primary_config, remove};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The binary in bin_dir was missing or different, and was replaced.
    pub binary_copied: bool,
    /// The config file written, when the entry was added or changed.
    pub config: Option<PathBuf>,
    /// The primary config after the call (None: the network plugin has not
    /// written one yet; call again when the dir changes).
    pub primary: Option<PathBuf>,
}

/// Copies `binary` to `bin_dir/nodemesh-cni` and adds `entry` to the primary
/// config in `conf_dir`. Idempotent: unchanged files are not rewritten.
///
/// Both writes go to a temp file in the same dir and are renamed into place,
/// so a runtime never reads half a file and a running plugin binary is never
/// overwritten (that fails with ETXTBSY). A single-plugin `.conf` primary is
/// rewritten as `<stem>.conflist` and the `.conf` removed, as istio-cni does:
/// runtimes only chain plugins from a conflist.
pub fn ensure_installed(
    conf_dir: &Path,
    bin_dir: &Path,
    binary: &Path,
    entry: &Value,
) -> io::Result<Installed> {
    let binary_copied = install_binary(bin_dir, binary)?;
    let Some(primary) = primary_config(conf_dir)? else {
        return Ok(Installed {
            binary_copied,
            config: None,
            primary: None,
        });
    };
    let text = fs::read_to_string(&primary).map_err(|e| with_path(e, "read", &primary))?;
    let is_conflist = primary.extension().is_some_and(|e| e == "conflist");
    let target = if is_conflist {
        primary.clone()
    } else {
        primary.with_extension("conflist")
    };
    let edited = insert(&text, entry).map_err(|msg| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cannot add {PLUGIN_TYPE} to the CNI config {}: {msg}",
                primary.display()
            ),
        )
    })?;
    let Some(edited) = edited else {
        return Ok(Installed {
            binary_copied,
            config: None,
            primary: Some(primary),
        });
    };
    let permissions = fs::metadata(&primary)?.permissions();
    write_atomically(&target, edited.as_bytes(), permissions)?;
    if target != primary {
        // After the rename: there is never a moment without a config.
        fs::remove_file(&primary).map_err(|e| with_path(e, "remove", &primary))?;
    }
    Ok(Installed {
        binary_copied,
        config: Some(target.clone()),
        primary: Some(target),
    })
}

/// Takes the plugin's entry out of the primary config (atomically, its
/// permissions kept) and removes the binary; the config edited, if any.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut edited = None;
    if let Some(primary) = primary_config(conf_dir)? {
        let text = fs::read_to_string(&primary).map_err(|e| with_path(e, "read", &primary))?;
        if let Some(without) = remove(&text, PLUGIN_TYPE) {
            let permissions = fs::metadata(&primary)?.permissions();
            write_atomically(&primary, without.as_bytes(), permissions)?;
            edited = Some(primary);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(with_path(e, "remove", &binary)),
        _ => Ok(edited),
    }
}

/// Returns whether the binary was (re)placed.
fn install_binary(bin_dir: &Path, binary: &Path) -> io::Result<bool> {
    let wanted = fs::read(binary).map_err(|e| with_path(e, "read", binary))?;
    let installed = bin_dir.join(PLUGIN_TYPE);
    match fs::read(&installed) {
        Ok(current) if current == wanted => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "read", &installed)),
    }
    write_atomically(&installed, &wanted, Permissions::from_mode(0o755))?;
    Ok(true)
}

/// Writes `bytes` to a hidden temp file next to `path` (the runtimes skip
/// hidden and non-config names), then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8], permissions: Permissions) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        // set_permissions, not the create mode: the umask must not apply.
        file.set_permissions(permissions)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(|e| with_path(e, "write", path))
}

fn with_path(e: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {action} {}: {e}", path.display()))
}
