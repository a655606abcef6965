//! A model's identity across machines and restarts: a BLAKE3 hash of every byte of its files
//! (config, tokenizer, weights), so that a worker whose weights differ in one tensor is refused,
//! cached by (path, size, modification time, inode) so that a restart does not read gigabytes
//! again. Datasets and router packages written before drllm hashed whole files record the older
//! fingerprint (name, size, first and last MiB): [`ModelFingerprint::matches`] accepts it.
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Prefix of current fingerprints (`b3:` and 32 hex digits: 128 bits of BLAKE3).
pub const PREFIX: &str = "b3:";

/// Both fingerprints of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFingerprint {
    /// BLAKE3 over every file's name, size and bytes.
    pub current: String,
    /// SHA-256 over every file's name, size, first and last MiB (drllm before whole-file hashing).
    pub legacy: String,
}

impl ModelFingerprint {
    /// Whether a fingerprint a dataset, package or peer recorded names this model: the current
    /// one, or the legacy one for records made before whole-file hashing.
    pub fn matches(&self, recorded: &str) -> bool {
        recorded == self.current || (!recorded.starts_with(PREFIX) && recorded == self.legacy)
    }
}

/// The hashed files of a model: the GGUF file, or a directory's config, tokenizer and
/// safetensors shards, in name order.
pub(crate) fn files_of(dir_or_file: &Path, is_dir: bool) -> Result<Vec<PathBuf>> {
    if !is_dir {
        return Ok(vec![dir_or_file.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir_or_file)
        .map_err(|e| Error::io(dir_or_file, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n == "config.json" || n == "tokenizer.json" || n.ends_with(".safetensors")
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The current fingerprint of `files`, each file's hash read from `cache` when its path, size,
/// modification time and inode are unchanged (the cache file is rewritten when it learned
/// something; a cache that cannot be read or written is only a slower start).
pub(crate) fn current(files: &[PathBuf], cache: Option<&Path>) -> Result<String> {
    let mut known = cache.map(load_cache).unwrap_or_default();
    let mut learned = false;
    let mut h = blake3::Hasher::new();
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        let key = cache_key(f, &meta);
        let file_hash = match known.get(&key) {
            Some(x) => x.clone(),
            None => {
                let started = std::time::Instant::now();
                let mut fh = blake3::Hasher::new();
                let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
                fh.update_reader(&mut file).map_err(|e| Error::io(f, e))?;
                let x = fh.finalize().to_hex().to_string();
                tracing::debug!(file = %f.display(), bytes = meta.len(), secs = started.elapsed().as_secs_f64(), "hashed a model file");
                known.insert(key, x.clone());
                learned = true;
                x
            }
        };
        let name = f
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name);
        h.update(&meta.len().to_le_bytes());
        h.update(file_hash.as_bytes());
    }
    if learned {
        if let Some(c) = cache {
            if let Err(e) = save_cache(c, &known) {
                tracing::debug!(cache = %c.display(), error = %e, "fingerprint cache not written");
            }
        }
    }
    Ok(format!("{PREFIX}{}", &h.finalize().to_hex()[..32]))
}

/// What identifies a file's bytes without reading them: canonical path, size, modification
/// time (ns) and inode. Any rewrite changes the modification time; a copy changes the inode.
fn cache_key(f: &Path, meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = f.canonicalize().unwrap_or_else(|_| f.to_path_buf());
    format!(
        "{}|{}|{}.{}|{}",
        path.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    )
}

fn load_cache(path: &Path) -> BTreeMap<String, String> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Written to a temporary file beside the cache and renamed: processes starting together (a
/// coordinator and its workers) never read a half-written cache.
fn save_cache(path: &Path, known: &BTreeMap<String, String>) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(known).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

/// The fingerprint drllm recorded before whole-file hashing: SHA-256 over each file's name,
/// size, first and last MiB (12 bytes, hex).
pub(crate) fn legacy(files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    const MIB: u64 = 1 << 20;
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let size = file.metadata().map_err(|e| Error::io(f, e))?.len();
        h.update(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update(size.to_le_bytes());
        let mut buf = vec![];
        (&mut file)
            .take(MIB)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(f, e))?;
        if size > 2 * MIB {
            file.seek(SeekFrom::End(-(MIB as i64)))
                .map_err(|e| Error::io(f, e))?;
            file.take(MIB)
                .read_to_end(&mut buf)
                .map_err(|e| Error::io(f, e))?;
        }
        h.update(&buf);
    }
    Ok(h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One changed byte in the middle of a file (outside the first and last MiB the legacy
    /// fingerprint reads) changes the current fingerprint; the cache is used while the file is
    /// unchanged and not after it is rewritten; legacy records still match.
    #[test]
    fn every_byte_counts_and_the_cache_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        let mut bytes: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&f, &bytes).unwrap();
        let cache = dir.path().join("cache/fingerprints.json");
        let files = vec![f.clone()];
        let a = current(&files, Some(&cache)).unwrap();
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 32, "{a}");
        assert!(cache.is_file());
        let old = legacy(&files).unwrap();
        // Same bytes, cached: same answer (the cache holds one entry for the file).
        assert_eq!(current(&files, Some(&cache)).unwrap(), a);
        assert_eq!(load_cache(&cache).len(), 1);
        // Scale one byte in the middle, as an edited norm tensor would.
        bytes[(5 << 20) / 2] ^= 0x40;
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&f, &bytes).unwrap();
        let b = current(&files, Some(&cache)).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            b,
            current(&files, None).unwrap(),
            "the cache agrees with a fresh hash"
        );
        assert_eq!(
            legacy(&files).unwrap(),
            old,
            "the legacy fingerprint misses the change"
        );
        let fp = ModelFingerprint {
            current: b.clone(),
            legacy: old.clone(),
        };
        assert!(fp.matches(&b) && fp.matches(&old) && !fp.matches(&a));
        // A garbage cache file is ignored.
        std::fs::write(&cache, b"{not json").unwrap();
        assert_eq!(current(&files, Some(&cache)).unwrap(), b);
    }
}
