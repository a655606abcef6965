//! The crash-safe store: the output directory's lock, staged parts committed by atomic
//! renames, adoption of parts a crash left unlisted.
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::*;

/// An output directory open for committing.
pub struct Dataset {
    out: PathBuf,
    manifest: Manifest,
    committed: HashSet<(String, String)>,
    run_tag: String,
    /// The exclusive lock on `out`, released on drop (or when the process dies).
    _lock: File,
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes `bytes` to `path` atomically (temp file beside it, fsync, rename, fsync directory).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Takes the exclusive lock on `out` (an OS file lock on `out/_lock`, held until the returned
/// file is dropped or the process exits, so a killed run leaves no stale lock) and writes who
/// holds it into the file.
pub(crate) fn lock_out(out: &Path) -> Result<File> {
    let path = out.join("_lock");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "another process".into());
            return Err(DatasetError::Locked { path, holder });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "?".into());
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    f.set_len(0).map_err(io(&path))?;
    writeln!(
        f,
        "pid {} on host {host} (since unix time {since})",
        std::process::id()
    )
    .map_err(io(&path))?;
    Ok(f)
}

/// Refuses a committed part the manifest missed unless it is this run's: written with this
/// run's configuration (`manifest.config`, already the new one under --force) and model, and holding no sample twice or already committed.
pub(crate) fn check_stray(
    path: &Path,
    ids: &[(String, String)],
    committed: &HashSet<(String, String)>,
    manifest: &Manifest,
) -> Result<()> {
    let config = &manifest.config;
    let stray = |why: String| DatasetError::StrayPart {
        path: path.to_path_buf(),
        why,
    };
    let f = File::open(path).map_err(io(path))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| DatasetError::Parquet {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let kv = b.metadata().file_metadata().key_value_metadata();
    let meta = |key: &str| -> Option<String> {
        kv?.iter()
            .find(|e| e.key == key)
            .and_then(|e| e.value.clone())
    };
    let fp =
        meta("drllm.model_fingerprint").ok_or_else(|| stray("without drllm metadata".into()))?;
    if fp != manifest.model_fingerprint {
        return Err(stray(format!(
            "searched with model fingerprint {fp}, this run has {}",
            manifest.model_fingerprint
        )));
    }
    let theirs: serde_json::Value = meta("drllm.config")
        .and_then(|c| serde_json::from_str(&c).ok())
        .ok_or_else(|| stray("without a readable drllm.config".into()))?;
    if &theirs != config {
        return Err(stray(format!(
            "searched with another configuration ({})",
            config_diff(&theirs, config).join(", ")
        )));
    }
    let mut seen = HashSet::new();
    for id in ids {
        if committed.contains(id) || !seen.insert(id) {
            return Err(stray(format!(
                "holding sample {} ({}) that is already committed",
                id.1, id.0
            )));
        }
    }
    Ok(())
}

impl Dataset {
    /// Opens `out` for a run of `config` on the model `model_fingerprint`: creates it, or resumes
    /// it (committed samples are reported by [`Dataset::is_committed`]; complete parts the
    /// manifest missed are adopted; staging leftovers removed). A different config or model is
    /// refused unless `force`.
    pub fn open(
        out: &Path,
        model_fingerprint: &str,
        config: serde_json::Value,
        force: bool,
    ) -> Result<Dataset> {
        Self::open_with_aliases(out, model_fingerprint, &[], config, force)
    }

    /// [`Dataset::open`] for a model that older runs may have recorded under other fingerprints
    /// (`aliases`: the weaker fingerprint drllm used before it hashed whole files). A run
    /// resumed under an alias keeps recording it, so its parts agree.
    pub fn open_with_aliases(
        out: &Path,
        model_fingerprint: &str,
        aliases: &[String],
        config: serde_json::Value,
        force: bool,
    ) -> Result<Dataset> {
        let data = out.join("data");
        let staging = out.join("_staging");
        fs::create_dir_all(&data).map_err(io(&data))?;
        let lock = lock_out(out)?;
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        fs::create_dir_all(&staging).map_err(io(&staging))?;
        let mpath = out.join("_manifest.json");
        let mut manifest = if mpath.exists() {
            read_manifest(out)?
        } else {
            Manifest {
                format_version: FORMAT_VERSION,
                code_version: env!("CARGO_PKG_VERSION").to_string(),
                model_fingerprint: model_fingerprint.to_string(),
                config: config.clone(),
                previous_configs: vec![],
                parts: vec![],
                rows: 0,
                failed: vec![],
                complete: false,
                checksum: None,
            }
        };
        let same_model = manifest.model_fingerprint == model_fingerprint
            || aliases.contains(&manifest.model_fingerprint);
        let mut what = vec![];
        if !same_model {
            what.push(format!(
                "model fingerprint {} (now {model_fingerprint})",
                manifest.model_fingerprint
            ));
        }
        if manifest.config != config {
            what.push(format!(
                "config differs in {}",
                config_diff(&manifest.config, &config).join(", ")
            ));
        }
        if !what.is_empty() {
            if !force || !same_model {
                // A different model is never mixed into one dataset, even with --force.
                return Err(DatasetError::ConfigMismatch {
                    path: mpath,
                    what: what.join("; "),
                });
            }
            let old = std::mem::replace(&mut manifest.config, config);
            manifest.previous_configs.push(old);
        }
        // Every committed part is checked (bytes and values) before the run goes on: a damaged
        // one stops the resume by name instead of being searched around.
        let mut committed = HashSet::new();
        for p in &manifest.parts {
            let (part, _) = integrity::check_listed(out, p)?;
            committed.extend(part.rows.into_iter().map(|r| (r.task, r.sample_id)));
        }
        // Complete parts renamed in just before a crash, not yet in the manifest: adopt them.
        let listed: HashSet<String> = manifest.parts.iter().map(|p| p.path.clone()).collect();
        for dir in fs::read_dir(&data).map_err(io(&data))? {
            let dir = dir.map_err(io(&data))?.path();
            let Some(task) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("task="))
                .map(str::to_string)
            else {
                continue;
            };
            for f in fs::read_dir(&dir).map_err(io(&dir))? {
                let f = f.map_err(io(&dir))?.path();
                let rel = f
                    .strip_prefix(out)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .into_owned();
                if listed.contains(&rel) || f.extension().is_none_or(|e| e != "parquet") {
                    continue;
                }
                // Its own content checksum vouches for it (the manifest has no record of it).
                let (part, _) = integrity::check_part(&f, &task, None, None)?;
                let ids: Vec<(String, String)> = part
                    .rows
                    .into_iter()
                    .map(|r| (r.task, r.sample_id))
                    .collect();
                check_stray(&f, &ids, &committed, &manifest)?;
                tracing::info!(part = %rel, rows = ids.len(), "adopting a committed part the manifest missed");
                manifest.rows += ids.len();
                manifest.parts.push(PartInfo {
                    path: rel,
                    task: task.clone(),
                    rows: ids.len(),
                    sha256: Some(integrity::file_sha256(&f)?),
                });
                committed.extend(ids);
            }
        }
        manifest.complete = false;
        let _ = fs::remove_file(out.join("_SUCCESS"));
        let run_tag = format!(
            "{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ ((std::process::id() as u64) << 32)
        );
        let mut ds = Dataset {
            out: out.to_path_buf(),
            manifest,
            committed,
            run_tag,
            _lock: lock,
        };
        ds.write_manifest()?;
        Ok(ds)
    }

    /// The manifest as it stands.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether `(task, sample_id)` is committed.
    pub fn is_committed(&self, task: &str, sample_id: &str) -> bool {
        self.committed
            .contains(&(task.to_string(), sample_id.to_string()))
    }

    fn write_manifest(&mut self) -> Result<()> {
        let path = self.out.join("_manifest.json");
        self.manifest.format_version = FORMAT_VERSION;
        self.manifest.checksum = Some(integrity::manifest_sha256(&self.manifest));
        let text =
            serde_json::to_vec_pretty(&self.manifest).map_err(|e| DatasetError::Manifest {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        write_atomic(&path, &text)?;
        self.write_card()
    }

    /// Rewrites the dataset card `OUT/README.md` (unless the user put their own there).
    fn write_card(&self) -> Result<()> {
        let path = self.out.join("README.md");
        if let Ok(old) = fs::read_to_string(&path) {
            if !old.contains(CARD_MARKER) {
                tracing::warn!(path = %path.display(), "not rewriting a README.md drllm did not write (the dataset card)");
                return Ok(());
            }
        }
        write_atomic(&path, dataset_card(&self.manifest).as_bytes())
    }

    /// Commits `rows` (all of `task`, none committed before) as one part. On error nothing of
    /// it is visible and everything committed before stays.
    pub fn commit(&mut self, task: &str, rows: &[PathRecord]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = self.manifest.parts.len();
        let name = format!("part-{n:05}-{}.parquet", self.run_tag);
        let staged = self.out.join("_staging").join(&name);
        let perr = |msg: String| DatasetError::Parquet {
            path: staged.clone(),
            msg,
        };
        if let Some(r) = rows.iter().find(|r| r.task != task) {
            return Err(perr(format!(
                "row {} of task {} in a part of task {task}",
                r.sample_id, r.task
            )));
        }
        // A sample is committed once: a second row for it (a duplicate id in the task data, a
        // late result) is refused, never written beside the first.
        let mut ids = HashSet::new();
        for r in rows {
            if self.is_committed(task, &r.sample_id) || !ids.insert(r.sample_id.as_str()) {
                return Err(perr(format!(
                    "sample {} of task {task} is already committed: a sample id occurs once per task",
                    r.sample_id
                )));
            }
        }
        let batch = to_batch(rows).map_err(|e| perr(e.to_string()))?;
        let meta = [
            self.manifest.config.to_string(),
            self.manifest.model_fingerprint.clone(),
            FORMAT_VERSION.to_string(),
        ];
        let content =
            integrity::content_sha256(rows, &meta.iter().cloned().map(Some).collect::<Vec<_>>());
        let mut kv: Vec<KeyValue> = integrity::META_KEYS
            .iter()
            .zip(meta)
            .map(|(k, v)| KeyValue::new(k.to_string(), v))
            .collect();
        kv.push(KeyValue::new(CONTENT_KEY.into(), content));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_key_value_metadata(Some(kv))
            .build();
        let file = File::create(&staged).map_err(io(&staged))?;
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(|e| perr(e.to_string()))?;
        w.write(&batch).map_err(|e| perr(e.to_string()))?;
        let file = w.into_inner().map_err(|e| perr(e.to_string()))?;
        file.sync_all().map_err(io(&staged))?;
        drop(file);
        // Read back before it is committed: what lands in `data/` is what was meant.
        integrity::check_part(&staged, task, None, Some(rows.len()))?;
        let sha256 = Some(integrity::file_sha256(&staged)?);
        let dir = self.out.join("data").join(format!("task={task}"));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let dest = dir.join(&name);
        fs::rename(&staged, &dest).map_err(io(&dest))?;
        sync_dir(&dir)?;
        self.manifest.parts.push(PartInfo {
            path: format!("data/task={task}/{name}"),
            task: task.to_string(),
            rows: rows.len(),
            sha256,
        });
        self.manifest.rows += rows.len();
        for r in rows {
            self.committed.insert((r.task.clone(), r.sample_id.clone()));
        }
        self.write_manifest()
    }

    /// Records a sample given up (kept in the manifest; no row).
    pub fn record_failure(&mut self, failed: FailedSample) -> Result<()> {
        self.manifest.failed.push(failed);
        self.write_manifest()
    }

    /// Marks the run complete: manifest flag and `OUT/_SUCCESS`.
    pub fn finish(&mut self) -> Result<()> {
        self.manifest.complete = true;
        self.write_manifest()?;
        let ok = self.out.join("_SUCCESS");
        File::create(&ok)
            .and_then(|f| f.sync_all())
            .map_err(io(&ok))?;
        let _ = fs::remove_dir(self.out.join("_staging"));
        Ok(())
    }
}
