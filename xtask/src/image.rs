//! `cargo xtask image`: the agent's OCI image, built offline and from
//! scratch (no base image, no registry, no container engine), then checked.
//!
//! The image holds the two release binaries (debug info stripped, symbols
//! kept), exactly the shared libraries `ldd` lists for them (at the paths it
//! lists), an empty `/tmp` and `/var/run/nodemesh`; nothing else (the agent
//! runs as root; the Kubernetes client takes its CA from the service
//! account). Debian's `buildah` assembles it in a throwaway vfs store under
//! `target/image/` and writes `target/image/nodemesh-agent.oci.tar`, tagged
//! `ghcr.io/nodemesh/nodemesh-agent:<agent version>`. Timestamps are the
//! HEAD commit's (or `SOURCE_DATE_EPOCH`), so the same binaries give the
//! same image digest.
//!
//! The check reads the archive as a runtime would: the index's manifest for
//! the tag, its config (entrypoint, labels, platform), then `umoci unpack`
//! (which verifies every blob's digest) and runs both binaries from the
//! unpacked root filesystem in a chroot, so a library left out fails it.
//! Needs root (buildah without user namespaces, chroot).
use std::{
    collections::BTreeSet,
    env,
    ffi::OsString,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use super::{cargo, install_debian, output, run};

/// Debian packages the image is built (`buildah`) and checked (`umoci`)
/// with, and the files used from each.
pub const DEBIAN_PACKAGES: [(&str, &[&str]); 2] = [
    ("buildah", &["/usr/bin/buildah"]),
    ("umoci", &["/usr/bin/umoci"]),
];

const REPOSITORY: &str = "ghcr.io/nodemesh/nodemesh-agent";
const BINARIES: [&str; 2] = ["nodemesh-agent", "nodemesh-cni"];
const BIN_DIR: &str = "usr/local/bin";
const ENTRYPOINT: &str = "/usr/local/bin/nodemesh-agent";
/// The agent's default `stateDir` (a hostPath in a cluster).
const STATE_DIR: &str = "var/run/nodemesh";
const VERSION_LABEL: &str = "org.opencontainers.image.version";

/// Builds the release binaries, the image, and checks it.
pub fn image(root: &Path, path: &OsString) -> Result<()> {
    let started = Instant::now();
    for (package, files) in DEBIAN_PACKAGES {
        install_debian(package, files)?;
    }
    if output(Command::new("id").arg("-u"))? != "0" {
        bail!("`cargo xtask image` needs root (buildah without user namespaces, chroot)");
    }
    run(cargo(root, path).args([
        "build",
        "--release",
        "-p",
        "nodemesh-agent",
        "-p",
        "nodemesh-cni",
    ]))?;
    let built = Instant::now();
    let image = build(root)?;
    let checked = check(root, &image)?;
    let size = fs::metadata(&image.archive)?.len();
    println!(
        "image {}: {} ({}, {} unpacked), built and checked in {:.1} s ({:.1} s with cargo build)",
        image.tag,
        image
            .archive
            .strip_prefix(root)
            .unwrap_or(&image.archive)
            .display(),
        mib(size),
        mib(checked.rootfs_bytes),
        built.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Image {
    archive: PathBuf,
    tag: String,
    version: String,
    /// Every file of the root filesystem, relative to `/`.
    files: BTreeSet<String>,
}

struct Checked {
    rootfs_bytes: u64,
}

/// Directories removed when dropped, also after a failure, so a rerun
/// starts clean.
struct Scratch(Vec<PathBuf>);

impl Scratch {
    fn new(dirs: Vec<PathBuf>) -> Result<Self> {
        let scratch = Scratch(dirs);
        for d in &scratch.0 {
            remove(d)?;
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for d in &self.0 {
            if let Err(e) = remove(d) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// As root, buildah's commit (containers/image) always writes a blob info
/// cache into `/var/lib/containers/cache` (no flag moves it). What it
/// creates there is removed when this is dropped; a cache that was already
/// there (a container engine on the machine) is left alone.
struct BlobInfoCache(Option<PathBuf>);

impl BlobInfoCache {
    fn record() -> Self {
        let created = ["/var/lib/containers", "/var/lib/containers/cache"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| !d.exists());
        BlobInfoCache(created)
    }
}

impl Drop for BlobInfoCache {
    fn drop(&mut self) {
        if let Some(d) = &self.0
            && let Err(e) = remove(d)
        {
            eprintln!("warning: {e:#}");
        }
    }
}

fn remove(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn build(root: &Path) -> Result<Image> {
    let dir = root.join("target/image");
    let rootfs = dir.join("rootfs");
    let storage = dir.join("storage");
    let runroot = dir.join("run");
    let tmp = dir.join("tmp");
    let _scratch = Scratch::new(vec![
        rootfs.clone(),
        storage.clone(),
        runroot.clone(),
        tmp.clone(),
    ])?;
    let version = agent_version(root)?;
    let tag = format!("{REPOSITORY}:{version}");

    // The root filesystem, staged.
    let mut files = BTreeSet::new();
    let mut libraries = BTreeSet::new();
    fs::create_dir_all(rootfs.join(BIN_DIR))?;
    for bin in BINARIES {
        let built = root.join("target/release").join(bin);
        libraries.extend(linked_libraries(&built)?);
        let staged = format!("{BIN_DIR}/{bin}");
        // Debug info is most of the release binary's size (profile.release
        // has debug = 1); the symbols stay, for backtraces and profilers.
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(rootfs.join(&staged))
            .arg(&built))?;
        files.insert(staged);
    }
    for lib in &libraries {
        let relative = lib
            .strip_prefix("/")
            .with_context(|| format!("ldd listed a relative path: {}", lib.display()))?;
        let to = rootfs.join(relative);
        fs::create_dir_all(to.parent().context("library without a directory")?)?;
        // The file itself (ldd may list a symlink), at the path ldd lists.
        fs::copy(lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        files.insert(relative.display().to_string());
    }
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::create_dir_all(rootfs.join(STATE_DIR))?;

    let archive = dir.join("nodemesh-agent.oci.tar");
    remove_file(&archive)?;
    let _cache = BlobInfoCache::record();
    let buildah = || {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&storage)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs"])
            .env("TMPDIR", &tmp);
        cmd
    };
    let container =
        output(buildah().args(["from", "--quiet", "--name", "nodemesh-image", "scratch"]))?;
    let mut source = rootfs.clone().into_os_string();
    source.push("/");
    run(buildah()
        .args(["copy", "--quiet", "--chown", "0:0", &container])
        .arg(&source)
        .arg("/"))?;
    run(buildah().args([
        "config",
        "--entrypoint",
        &format!("[\"{ENTRYPOINT}\"]"),
        "--env",
        "PATH=/usr/local/bin",
        "--workingdir",
        "/",
        "--label",
        &format!("{VERSION_LABEL}={version}"),
        "--label",
        "org.opencontainers.image.title=nodemesh-agent",
        "--label",
        "org.opencontainers.image.description=nodemesh node agent and CNI plugin",
        "--label",
        "org.opencontainers.image.licenses=Apache-2.0",
        &container,
    ]))?;
    let mut destination = OsString::from("oci-archive:");
    destination.push(&archive);
    destination.push(format!(":{tag}"));
    // --rm: the working container goes with the commit.
    run(buildah()
        .args([
            "commit",
            "--quiet",
            "--rm",
            "--format",
            "oci",
            "--disable-compression=false",
            "--omit-history",
            "--identity-label=false",
            "--timestamp",
            &source_date_epoch(root).to_string(),
            &container,
        ])
        .arg(&destination)
        .stdout(Stdio::null()))?;
    Ok(Image {
        archive,
        tag,
        version,
        files,
    })
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// `cargo pkgid` ends in `#nodemesh-agent@0.1.0` (or `#0.1.0`).
fn agent_version(root: &Path) -> Result<String> {
    let id = output(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root)
            .args(["pkgid", "-p", "nodemesh-agent"]),
    )?;
    let version = id
        .rsplit(['@', '#'])
        .next()
        .filter(|v| !v.is_empty() && !v.contains('/'))
        .ok_or_else(|| anyhow!("no version in `cargo pkgid` output {id:?}"))?;
    Ok(version.to_owned())
}

/// The image's timestamps: `SOURCE_DATE_EPOCH`, else the HEAD commit's time.
fn source_date_epoch(root: &Path) -> u64 {
    env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| {
            output(
                Command::new("git")
                    .current_dir(root)
                    .args(["log", "-1", "--format=%ct"]),
            )
            .ok()
        })
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The absolute paths `ldd` lists for a binary (the vDSO has none).
fn linked_libraries(binary: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("could not start ldd {}", binary.display()))?;
    let text = String::from_utf8(out.stdout)?;
    if !out.status.success() {
        if text.contains("not a dynamic executable") {
            return Ok(BTreeSet::new());
        }
        bail!(
            "ldd {}: {}\n{}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

fn parse_ldd(text: &str) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // `name => /path (0x…)`, `/path (0x…)`, `linux-vdso.so.1 (0x…)`
        let target = line.split_once(" => ").map_or(line, |(_, t)| t);
        if target.starts_with("not found") {
            bail!("a library is missing: {line}");
        }
        let path = target.split(" (").next().unwrap_or(target).trim();
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Reads the archive as a runtime would and runs both binaries from it.
fn check(root: &Path, image: &Image) -> Result<Checked> {
    let dir = root.join("target/image/check");
    let _scratch = Scratch::new(vec![dir.clone()])?;
    let layout = dir.join("layout");
    fs::create_dir(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&image.archive)
        .arg("-C")
        .arg(&layout))?;

    // index.json -> the tag's manifest -> its config.
    let index = read_json(&layout.join("index.json"))?;
    let manifests = index.get("manifests").and_then(Json::array).unwrap_or(&[]);
    let tagged: Vec<&Json> = manifests
        .iter()
        .filter(|m| {
            m.get("annotations")
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .and_then(Json::str)
                == Some(image.tag.as_str())
        })
        .collect();
    let [manifest] = tagged[..] else {
        bail!(
            "index.json has {} manifests tagged {}",
            tagged.len(),
            image.tag
        );
    };
    let manifest = read_json(&blob(&layout, manifest)?)?;
    let config_ref = manifest.get("config").context("manifest without config")?;
    ensure!(
        config_ref.get("mediaType").and_then(Json::str)
            == Some("application/vnd.oci.image.config.v1+json"),
        "config media type {:?}",
        config_ref.get("mediaType")
    );
    let config = read_json(&blob(&layout, config_ref)?)?;
    let platform = (
        config.get("os").and_then(Json::str),
        config.get("architecture").and_then(Json::str),
    );
    ensure!(
        platform == (Some("linux"), Some(go_arch())),
        "image platform {platform:?}, expected linux/{}",
        go_arch()
    );
    let settings = config
        .get("config")
        .context("image config without config")?;
    let entrypoint: Vec<&str> = settings
        .get("Entrypoint")
        .and_then(Json::array)
        .unwrap_or(&[])
        .iter()
        .filter_map(Json::str)
        .collect();
    ensure!(
        entrypoint == [ENTRYPOINT],
        "entrypoint {entrypoint:?}, expected [{ENTRYPOINT:?}]"
    );
    let labels = settings.get("Labels");
    let label_version = labels
        .and_then(|l| l.get(VERSION_LABEL))
        .and_then(Json::str);
    ensure!(
        label_version == Some(image.version.as_str()),
        "label {VERSION_LABEL}={label_version:?}, expected {}",
        image.version
    );
    eprintln!(
        "+ image config: {}/{}, entrypoint {entrypoint:?}, {VERSION_LABEL}={}",
        platform.0.unwrap_or_default(),
        platform.1.unwrap_or_default(),
        image.version
    );

    // umoci checks every blob against its digest while unpacking.
    let bundle = dir.join("bundle");
    let mut reference = layout.into_os_string();
    reference.push(format!(":{}", image.tag));
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(&reference)
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    let (found, rootfs_bytes) = rootfs_files(&rootfs)?;
    ensure!(
        found == image.files,
        "the image's files differ from those staged: {:?} more, {:?} fewer",
        found.difference(&image.files).collect::<Vec<_>>(),
        image.files.difference(&found).collect::<Vec<_>>()
    );
    let tmp_mode = fs::metadata(rootfs.join("tmp"))?.permissions().mode() & 0o7777;
    ensure!(
        tmp_mode == 0o1777,
        "/tmp has mode {tmp_mode:o}, expected 1777"
    );
    ensure!(
        rootfs.join(STATE_DIR).is_dir(),
        "/{STATE_DIR} is not a directory"
    );

    // Both binaries run from the image's own files (a missing library
    // fails here), with the image's environment only.
    let chroot = find_program("chroot")?;
    let in_image = |bin: &str| {
        let mut cmd = Command::new(&chroot);
        cmd.arg(&rootfs)
            .arg(format!("/{BIN_DIR}/{bin}"))
            .env_clear()
            .env("PATH", "/usr/local/bin")
            .stdin(Stdio::null());
        cmd
    };
    let agent = output(in_image("nodemesh-agent").arg("--version"))?;
    let expected = format!("nodemesh-agent {}", image.version);
    ensure!(
        agent == expected,
        "`nodemesh-agent --version` in the image printed {agent:?}, expected {expected:?}"
    );
    eprintln!("+ chroot rootfs /{BIN_DIR}/nodemesh-agent --version: {agent}");
    let cni = output(in_image("nodemesh-cni").env("CNI_COMMAND", "VERSION"))?;
    let answer = Json::parse(&cni).with_context(|| format!("CNI VERSION printed {cni:?}"))?;
    let supported: Vec<&str> = answer
        .get("supportedVersions")
        .and_then(Json::array)
        .unwrap_or(&[])
        .iter()
        .filter_map(Json::str)
        .collect();
    let current = answer.get("cniVersion").and_then(Json::str);
    ensure!(
        !supported.is_empty() && current.is_some_and(|c| supported.contains(&c)),
        "CNI VERSION printed {cni}, expected cniVersion among supportedVersions"
    );
    eprintln!("+ CNI_COMMAND=VERSION chroot rootfs /{BIN_DIR}/nodemesh-cni: {cni}");
    Ok(Checked { rootfs_bytes })
}

/// A descriptor's blob in an OCI layout.
fn blob(layout: &Path, descriptor: &Json) -> Result<PathBuf> {
    let digest = descriptor
        .get("digest")
        .and_then(Json::str)
        .context("descriptor without digest")?;
    let (algorithm, hex) = digest
        .split_once(':')
        .filter(|(a, h)| !a.contains(['/', '.']) && !h.contains(['/', '.']))
        .with_context(|| format!("bad digest {digest:?}"))?;
    Ok(layout.join("blobs").join(algorithm).join(hex))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Json::parse(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every non-directory under `rootfs` (relative) and their total size.
fn rootfs_files(rootfs: &Path) -> Result<(BTreeSet<String>, u64)> {
    fn walk(base: &Path, dir: &Path, files: &mut BTreeSet<String>, bytes: &mut u64) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(base, &entry.path(), files, bytes)?;
            } else {
                *bytes += meta.len();
                files.insert(entry.path().strip_prefix(base)?.display().to_string());
            }
        }
        Ok(())
    }
    let mut files = BTreeSet::new();
    let mut bytes = 0;
    walk(rootfs, rootfs, &mut files, &mut bytes)?;
    Ok((files, bytes))
}

fn find_program(name: &str) -> Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} not found on PATH"))
}

/// The OCI (Go) name of this machine's architecture.
fn go_arch() -> &'static str {
    match env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Just enough JSON to read OCI index, manifest and config files and the CNI
/// plugin's answer (the xtask has no JSON dependency).
#[derive(Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// Kept as written.
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Json> {
        let mut p = Parser {
            chars: text.chars().collect(),
            at: 0,
        };
        let value = p.value()?;
        p.space();
        ensure!(p.at == p.chars.len(), "trailing characters at {}", p.at);
        Ok(value)
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn space(&mut self) {
        while self
            .chars
            .get(self.at)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn next(&mut self) -> Result<char> {
        let c = *self
            .chars
            .get(self.at)
            .ok_or_else(|| anyhow!("unexpected end"))?;
        self.at += 1;
        Ok(c)
    }

    fn expect(&mut self, c: char) -> Result<()> {
        self.space();
        let found = self.next()?;
        ensure!(
            found == c,
            "expected {c:?} at {}, found {found:?}",
            self.at - 1
        );
        Ok(())
    }

    fn peek(&mut self) -> Option<char> {
        self.space();
        self.chars.get(self.at).copied()
    }

    fn value(&mut self) -> Result<Json> {
        match self.peek().ok_or_else(|| anyhow!("unexpected end"))? {
            '{' => {
                self.at += 1;
                let mut members = Vec::new();
                if self.peek() == Some('}') {
                    self.at += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.expect('"')?;
                    let key = self.string()?;
                    self.expect(':')?;
                    members.push((key, self.value()?));
                    match self.peek() {
                        Some(',') => self.at += 1,
                        _ => break,
                    }
                }
                self.expect('}')?;
                Ok(Json::Object(members))
            }
            '[' => {
                self.at += 1;
                let mut items = Vec::new();
                if self.peek() == Some(']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    match self.peek() {
                        Some(',') => self.at += 1,
                        _ => break,
                    }
                }
                self.expect(']')?;
                Ok(Json::Array(items))
            }
            '"' => {
                self.at += 1;
                Ok(Json::String(self.string()?))
            }
            _ => {
                let start = self.at;
                while self
                    .chars
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || "+-.".contains(*c))
                {
                    self.at += 1;
                }
                let word: String = self.chars[start..self.at].iter().collect();
                match word.as_str() {
                    "null" => Ok(Json::Null),
                    "true" => Ok(Json::Bool(true)),
                    "false" => Ok(Json::Bool(false)),
                    n if n.parse::<f64>().is_ok() => Ok(Json::Number(word)),
                    _ => bail!("unexpected {word:?} at {start}"),
                }
            }
        }
    }

    /// The rest of a string whose opening quote was read.
    fn string(&mut self) -> Result<String> {
        let mut s = String::new();
        loop {
            match self.next()? {
                '"' => return Ok(s),
                '\\' => match self.next()? {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'r' => s.push('\r'),
                    'b' => s.push('\u{8}'),
                    'f' => s.push('\u{c}'),
                    'u' => {
                        let mut unit = self.hex4()?;
                        if (0xD800..0xDC00).contains(&unit) {
                            ensure!(
                                self.next()? == '\\' && self.next()? == 'u',
                                "lone surrogate"
                            );
                            let low = self.hex4()?;
                            unit = 0x10000 + ((unit - 0xD800) << 10) + (low.wrapping_sub(0xDC00));
                        }
                        s.push(char::from_u32(unit).context("bad \\u escape")?);
                    }
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let mut n = 0;
        for _ in 0..4 {
            n = n * 16 + self.next()?.to_digit(16).context("bad \\u escape")?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let libs: Vec<_> = parse_ldd(text).unwrap().into_iter().collect();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn json() {
        let v = Json::parse(
            r#" {"a": [1, -2.5e3, true, false, null], "b": {"c": "x\"\\\u00e9\ud83d\ude00"}, "d": []} "#,
        )
        .unwrap();
        assert_eq!(v.get("a").and_then(Json::array).map(<[_]>::len), Some(5));
        assert_eq!(
            v.get("b").and_then(|b| b.get("c")).and_then(Json::str),
            Some("x\"\\é😀")
        );
        assert_eq!(v.get("d"), Some(&Json::Array(vec![])));
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "\"x", "nul", "{} x"] {
            assert!(Json::parse(bad).is_err(), "{bad:?}");
        }
    }
}
