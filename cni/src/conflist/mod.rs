//! Installing the plugin into the node's primary CNI config.
//!
//! Container runtimes (containerd, CRI-O via libcni) use the first config
//! file in the CNI config dir. Chaining means appending our entry to that
//! file's `plugins`, after the cluster's network plugin, so we see its result.

mod install;
mod ordered;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub use install::{Installed, ensure_installed, uninstall};
use ordered::Json;

/// The plugin's type (and binary name) in a conflist.
pub const PLUGIN_TYPE: &str = "nodemesh-cni";

const CONFIG_EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// The file libcni/containerd use: the lexicographically first regular file
/// ending in .conflist, .conf or .json. Hidden files (temp files, ours
/// included) are skipped. A missing dir is no config yet, not an error.
pub fn primary_config(conf_dir: &Path) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut candidates = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let extension = path.extension().unwrap_or_default().to_string_lossy();
        if name.starts_with('.') || !CONFIG_EXTENSIONS.contains(&extension.as_ref()) {
            continue;
        }
        // Follows symlinks, as the runtimes do; a dangling link is skipped.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            candidates.push(path);
        }
    }
    candidates.sort();
    Ok(candidates.into_iter().next())
}

/// Adds `entry` to a config's plugin chain. Returns None when it is already
/// there unchanged. A `.conflist` (has "plugins") gets `entry` appended, or
/// an entry of the same "type" replaced in place. A single-plugin `.conf` is
/// turned into a conflist the way libcni's ConfListFromConf reads it:
/// `{cniVersion, name, plugins: [the conf as-is, entry]}`. Other fields and
/// their order are kept.
pub fn insert(text: &str, entry: &Value) -> Result<Option<String>, String> {
    let entry_type = entry
        .get("type")
        .and_then(Value::as_str)
        .ok_or("the entry to insert has no \"type\"")?;
    let mut config: Json =
        serde_json::from_str(text).map_err(|e| format!("the CNI config is not valid JSON: {e}"))?;
    let Json::Object(fields) = &mut config else {
        return Err("the CNI config is not a JSON object".into());
    };
    let new_entry = Json::from_value(entry);
    match fields.iter_mut().find(|(k, _)| k == "plugins") {
        Some((_, Json::Array(plugins))) => {
            let existing = plugins
                .iter_mut()
                .find(|p| p.get("type").and_then(Json::as_str) == Some(entry_type));
            match existing {
                Some(plugin) if plugin.same_as(entry) => return Ok(None),
                Some(plugin) => *plugin = new_entry,
                None => plugins.push(new_entry),
            }
        }
        Some(_) => return Err("the CNI config's \"plugins\" is not a list".into()),
        None => {
            if config.get("type").is_none() {
                return Err(
                    "the CNI config has neither \"plugins\" (a conflist) nor \"type\" \
                            (a single plugin)"
                        .into(),
                );
            }
            let field = |key: &str| config.get(key).cloned().unwrap_or(Json::Null);
            config = Json::Object(vec![
                ("cniVersion".into(), field("cniVersion")),
                ("name".into(), field("name")),
                (
                    "plugins".into(),
                    Json::Array(vec![config.clone(), new_entry]),
                ),
            ]);
        }
    }
    pretty(&config).map(Some)
}

/// Removes every plugin of `plugin_type` from a conflist (for uninstall).
/// None when there is nothing to remove or the text is not a conflist.
pub fn remove(text: &str, plugin_type: &str) -> Option<String> {
    let mut config: Json = serde_json::from_str(text).ok()?;
    let Json::Object(fields) = &mut config else {
        return None;
    };
    let (_, Json::Array(plugins)) = fields.iter_mut().find(|(k, _)| k == "plugins")? else {
        return None;
    };
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Json::as_str) != Some(plugin_type));
    if plugins.len() == before {
        return None;
    }
    pretty(&config).ok()
}

/// The conflist entry for this plugin.
pub fn default_entry(socket_path: &str, exclude: &[String]) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "name": PLUGIN_TYPE,
        "socketPath": socket_path,
        "excludeNamespaces": exclude,
    })
}

fn pretty(config: &Json) -> Result<String, String> {
    let mut text = serde_json::to_string_pretty(config).map_err(|e| e.to_string())?;
    text.push('\n');
    Ok(text)
}
