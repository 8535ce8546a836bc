//! Content-addressed adapter files: `<dir>/<blake3 hex>.gguf`.
//!
//! A file appears under its name only once all of it is written, synced and
//! its hash checked (written to a temporary name in the same directory, then
//! renamed), so a crash or a lying peer never leaves a partial or wrong file
//! where a reader would find it. Temporary files left by a crash are removed
//! when the store is opened.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;

use super::LedgerError;
use crate::engine::ModelId;

const TEMP_PREFIX: &str = ".partial-";

/// A directory of adapter files named by their BLAKE3 hash.
#[derive(Clone, Debug)]
pub struct AdapterStore {
    dir: PathBuf,
}

impl AdapterStore {
    /// Opens (creating if needed) the store in `dir`; removes temporary files
    /// a crashed write left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<AdapterStore, LedgerError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| LedgerError::io(&dir, e))?;
        for entry in fs::read_dir(&dir).map_err(|e| LedgerError::io(&dir, e))? {
            let entry = entry.map_err(|e| LedgerError::io(&dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(AdapterStore { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where adapter `id` lives (whether or not it is there).
    pub fn path_of(&self, id: ModelId) -> PathBuf {
        self.dir.join(format!("{}.gguf", id.to_hex()))
    }

    /// The file of adapter `id`, if the store holds it.
    pub fn get(&self, id: ModelId) -> Option<PathBuf> {
        let p = self.path_of(id);
        p.is_file().then_some(p)
    }

    /// Size of adapter `id`, if the store holds it.
    pub fn size(&self, id: ModelId) -> Option<u64> {
        fs::metadata(self.path_of(id))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Stores `bytes` under their hash; returns the id.
    pub fn put(&self, bytes: &[u8]) -> Result<ModelId, LedgerError> {
        let id = ModelId(*blake3::hash(bytes).as_bytes());
        if self.get(id).is_some() {
            return Ok(id);
        }
        let mut w = self.writer(id)?;
        w.write(bytes)?;
        w.finish()?;
        Ok(id)
    }

    /// Up to `len` bytes of adapter `id` from `offset` (fewer at the end).
    pub fn read_range(&self, id: ModelId, offset: u64, len: usize) -> Result<Vec<u8>, LedgerError> {
        let path = self.path_of(id);
        let mut f = File::open(&path).map_err(|e| LedgerError::io(&path, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| LedgerError::io(&path, e))?;
        let mut out = Vec::with_capacity(len);
        f.take(len as u64)
            .read_to_end(&mut out)
            .map_err(|e| LedgerError::io(&path, e))?;
        Ok(out)
    }

    /// A writer for adapter `id`: bytes go to a temporary file, and
    /// [`PartialAdapter::finish`] checks the hash before the file takes its
    /// name. Dropped unfinished, it leaves nothing behind.
    pub fn writer(&self, id: ModelId) -> Result<PartialAdapter, LedgerError> {
        let mut salt = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut salt);
        let salt: String = salt.iter().map(|b| format!("{b:02x}")).collect();
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{}-{salt}", &id.to_hex()[..16]));
        let file = File::create(&temp).map_err(|e| LedgerError::io(&temp, e))?;
        Ok(PartialAdapter {
            id,
            file: Some(file),
            temp,
            target: self.path_of(id),
            dir: self.dir.clone(),
            hasher: blake3::Hasher::new(),
            written: 0,
        })
    }
}

/// An adapter being written (see [`AdapterStore::writer`]).
#[derive(Debug)]
pub struct PartialAdapter {
    id: ModelId,
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
}

impl PartialAdapter {
    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), LedgerError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| LedgerError::Malformed("write after finish".into()))?;
        file.write_all(bytes)
            .map_err(|e| LedgerError::io(&self.temp, e))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks the hash of what was written against the id, syncs, and gives
    /// the file its name. On a mismatch the data is discarded
    /// ([`LedgerError::HashMismatch`]).
    pub fn finish(mut self) -> Result<PathBuf, LedgerError> {
        let found = ModelId(*self.hasher.finalize().as_bytes());
        if found != self.id {
            return Err(LedgerError::HashMismatch {
                expected: self.id,
                found,
            });
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| LedgerError::Malformed("finish twice".into()))?;
        file.sync_all()
            .map_err(|e| LedgerError::io(&self.temp, e))?;
        drop(file);
        fs::rename(&self.temp, &self.target).map_err(|e| LedgerError::io(&self.target, e))?;
        // The rename itself survives a crash once the directory is synced.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(self.target.clone())
    }
}

impl Drop for PartialAdapter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mesh-store-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn files_appear_whole_under_their_hash_or_not_at_all() {
        let dir = temp_dir("whole");
        let store = AdapterStore::open(&dir).unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let id = store.put(&bytes).unwrap();
        assert_eq!(id.0, *blake3::hash(&bytes).as_bytes());
        assert_eq!(store.size(id), Some(10_000));
        assert_eq!(store.read_range(id, 9_990, 100).unwrap(), &bytes[9_990..]);
        assert_eq!(store.read_range(id, 20_000, 10).unwrap(), Vec::<u8>::new());

        // Wrong bytes for an id: refused, nothing left behind.
        let other = ModelId([4; 32]);
        let mut w = store.writer(other).unwrap();
        w.write(b"not it").unwrap();
        assert!(matches!(w.finish(), Err(LedgerError::HashMismatch { .. })));
        assert_eq!(store.get(other), None);
        // An abandoned write leaves nothing either; a crash's leftovers go at open.
        let mut w = store.writer(other).unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        fs::write(dir.join(format!("{TEMP_PREFIX}crashed")), b"x").unwrap();
        let store = AdapterStore::open(&dir).unwrap();
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![format!("{}.gguf", id.to_hex())]);
        assert_eq!(store.get(id), Some(store.path_of(id)));
        let _ = fs::remove_dir_all(&dir);
    }
}
