//! The paths dataset a run produces: hive-partitioned Parquet parts under `OUT/data/task=<task>/`
//! (zstd, one row per sample), and `OUT/_manifest.json` (run config, model fingerprint, code
//! version, counts, the committed parts) plus `OUT/_SUCCESS` at the root, outside `data/`, so
//! `pl.scan_parquet("OUT/data/**/*.parquet", hive_partitioning=True)` and
//! `pd.read_parquet("OUT/data")` read only data.
//!
//! Commit protocol (nothing committed is ever lost, nothing half-written is ever read): a part is
//! written under `OUT/_staging/`, fsync'd, renamed into `data/` (atomic), the directory fsync'd,
//! then the manifest is rewritten the same way (temp file, fsync, rename). A crash between the
//! rename and the manifest update leaves a complete part the manifest does not list yet; the
//! next open adopts it. Staging leftovers are deleted on open.
#![warn(missing_docs)]

mod integrity;
pub use integrity::{file_sha256, verify, Checked, VerifyReport, CONTENT_KEY};

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, ListBuilder, StringBuilder, UInt16Builder, UInt32Builder, UInt64Builder,
    UInt8Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type, UInt64Type, UInt8Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
/// The path type rows hold (re-exported so readers of rows need not name `drllm-path`).
pub use drllm_path::LayerPath;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

/// Version of the manifest and column layout; a newer one on disk is refused. 2: checksums
/// (each part's SHA-256 in the manifest, a content checksum in each part's footer, the
/// manifest's own); parts of format 1 are read unverified.
pub const FORMAT_VERSION: u32 = 2;

/// Errors of reading or writing a dataset; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A filesystem operation failed (disk full, permissions, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A Parquet file could not be written or read.
    #[error("{path}: {msg}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// The manifest is unreadable or from a newer format.
    #[error("{path}: {msg}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Another process (a coordinator) holds OUT.
    #[error("{path}: the output directory is in use by {holder}; wait for it to finish, stop it, or use another output directory")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as it wrote itself into the lock file (pid, host, start time).
        holder: String,
    },
    /// A committed part the manifest does not list cannot belong to this run.
    #[error("{path}: a part the manifest does not list, {why}; move it out of the output directory to resume")]
    StrayPart {
        /// The part.
        path: PathBuf,
        /// Why it is not adopted.
        why: String,
    },
    /// A committed part differs from what was committed (a flipped bit, a truncated or edited
    /// file): named and refused, never read or searched around.
    #[error("{path}: damaged part: {what}; nothing was read from it. Restore the file from a copy of the dataset, or move it out of the output directory to search its samples again")]
    Damaged {
        /// The part.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// OUT holds a run made with another configuration or model.
    #[error("{path} was made by a different run: {what}; use another output directory, or --force to continue it under the new configuration")]
    ConfigMismatch {
        /// The manifest file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
}

type Result<T> = std::result::Result<T, DatasetError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One sample's search outcome: a row of the dataset (columns documented in docs/dataset.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathRecord {
    /// Sample id (unique within its task).
    pub sample_id: String,
    /// Task name (also the hive partition).
    pub task: String,
    /// Split.
    pub split: String,
    /// Question text as in the source data.
    pub question: String,
    /// Reference answer.
    pub answer: String,
    /// The prompt exactly as the model saw it (template and chat template applied).
    pub prompt: String,
    /// Model name.
    pub model: String,
    /// Blocks of the model (length of every path).
    pub num_layers: u16,
    /// Whether the default path answers correctly.
    pub default_correct: bool,
    /// Whether a good path was found.
    pub found: bool,
    /// Whether the default path was wrong and a found path is right.
    pub improved: bool,
    /// Best path (stored as its count per block: 0 skip, 1 execute, 2 repeat; with its cost
    /// and executed layers as the `best_cost` and `best_layers` columns); `None` if none found.
    pub best_path: Option<LayerPath>,
    /// Every good path found, best first.
    pub good_paths: Vec<LayerPath>,
    /// Simulations run.
    pub simulations: u32,
    /// Distinct path evaluations.
    pub evaluations: u32,
    /// Search wall time.
    pub search_ms: u64,
    /// Worker that searched the sample.
    pub worker: String,
    /// The sample's search seed.
    pub seed: u64,
    /// The model's response along the best path (up to the decision point), if found.
    pub best_response: Option<String>,
}

impl PathRecord {
    /// Block applications of the best path (the `best_cost` column).
    pub fn best_cost(&self) -> Option<u32> {
        self.best_path.as_ref().map(|p| p.cost() as u32)
    }

    /// The best path as the executed layer indices in order (the `best_layers` column).
    pub fn best_layers(&self) -> Option<Vec<u16>> {
        self.best_path
            .as_ref()
            .map(|p| p.layer_list().iter().map(|&l| l as u16).collect())
    }

    /// Checks the row against the model's depth: `num_layers` equal to it, every path of that
    /// many blocks, and a best path whenever the row says one was found. (Counts are valid by
    /// construction of [`LayerPath`].)
    pub fn validate(&self, num_layers: usize) -> std::result::Result<(), String> {
        if self.num_layers as usize != num_layers {
            return Err(format!(
                "num_layers {} but the model has {num_layers}",
                self.num_layers
            ));
        }
        let check = |what: &str, p: &LayerPath| {
            if p.num_layers() != num_layers {
                return Err(format!(
                    "{what} has {} counts, expected {num_layers}",
                    p.num_layers()
                ));
            }
            Ok(())
        };
        for p in &self.good_paths {
            check("a good path", p)?;
        }
        match &self.best_path {
            Some(p) => check("best_path", p),
            None if self.found || self.improved => {
                Err("found or improved is true but best_path is null".into())
            }
            None => Ok(()),
        }
    }
}

/// The Arrow schema of a part file. `task` is not stored in the files: it is the hive partition
/// (`data/task=<task>/`), which readers turn into a column (a column stored in the file as well
/// would clash with it in pyarrow).
pub fn schema() -> Schema {
    let list = |name: &str, item: DataType, nullable: bool| {
        Field::new(
            name,
            DataType::List(Arc::new(Field::new("item", item, true))),
            nullable,
        )
    };
    Schema::new(vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("question", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("num_layers", DataType::UInt16, false),
        Field::new("default_correct", DataType::Boolean, false),
        Field::new("found", DataType::Boolean, false),
        Field::new("improved", DataType::Boolean, false),
        list("best_path", DataType::UInt8, true),
        Field::new("best_cost", DataType::UInt32, true),
        list("best_layers", DataType::UInt16, true),
        Field::new(
            "good_paths",
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::List(Arc::new(Field::new("item", DataType::UInt8, true))),
                true,
            ))),
            false,
        ),
        Field::new("simulations", DataType::UInt32, false),
        Field::new("evaluations", DataType::UInt32, false),
        Field::new("search_ms", DataType::UInt64, false),
        Field::new("worker", DataType::Utf8, false),
        Field::new("seed", DataType::UInt64, false),
        Field::new("best_response", DataType::Utf8, true),
    ])
}

/// Rows as one Arrow record batch of [`schema`].
pub fn to_batch(rows: &[PathRecord]) -> std::result::Result<RecordBatch, String> {
    let strings = |f: &dyn Fn(&PathRecord) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::new();
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let bools = |f: &dyn Fn(&PathRecord) -> bool| -> ArrayRef {
        let mut b = BooleanBuilder::new();
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let mut num_layers = UInt16Builder::new();
    let mut best_path = ListBuilder::new(UInt8Builder::new());
    let mut best_cost = UInt32Builder::new();
    let mut best_layers = ListBuilder::new(UInt16Builder::new());
    let mut good = ListBuilder::new(ListBuilder::new(UInt8Builder::new()));
    let (mut sims, mut evals) = (UInt32Builder::new(), UInt32Builder::new());
    let (mut ms, mut seed) = (UInt64Builder::new(), UInt64Builder::new());
    for r in rows {
        num_layers.append_value(r.num_layers);
        match &r.best_path {
            Some(p) => {
                best_path.values().append_slice(p.counts());
                best_path.append(true);
            }
            None => best_path.append(false),
        }
        best_cost.append_option(r.best_cost());
        match r.best_layers() {
            Some(l) => {
                best_layers.values().append_slice(&l);
                best_layers.append(true);
            }
            None => best_layers.append(false),
        }
        for p in &r.good_paths {
            good.values().values().append_slice(p.counts());
            good.values().append(true);
        }
        good.append(true);
        sims.append_value(r.simulations);
        evals.append_value(r.evaluations);
        ms.append_value(r.search_ms);
        seed.append_value(r.seed);
    }
    let schema = Arc::new(schema());
    // The builders' default item fields already match the schema ("item", nullable).
    let cols: Vec<ArrayRef> = vec![
        strings(&|r| Some(&r.sample_id)),
        strings(&|r| Some(&r.split)),
        strings(&|r| Some(&r.question)),
        strings(&|r| Some(&r.answer)),
        strings(&|r| Some(&r.prompt)),
        strings(&|r| Some(&r.model)),
        Arc::new(num_layers.finish()),
        bools(&|r| r.default_correct),
        bools(&|r| r.found),
        bools(&|r| r.improved),
        Arc::new(best_path.finish()),
        Arc::new(best_cost.finish()),
        Arc::new(best_layers.finish()),
        Arc::new(good.finish()),
        Arc::new(sims.finish()),
        Arc::new(evals.finish()),
        Arc::new(ms.finish()),
        strings(&|r| Some(&r.worker)),
        Arc::new(seed.finish()),
        strings(&|r| r.best_response.as_deref()),
    ];
    RecordBatch::try_new(schema, cols).map_err(|e| e.to_string())
}

/// A committed part file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartInfo {
    /// Path relative to OUT.
    pub path: String,
    /// Task (partition).
    pub task: String,
    /// Rows in the file.
    pub rows: usize,
    /// SHA-256 of the file's bytes when it was committed (absent for parts of format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A sample that could not be searched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedSample {
    /// Task.
    pub task: String,
    /// Sample id.
    pub sample_id: String,
    /// Why.
    pub error: String,
}

/// `OUT/_manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// drllm version that wrote it.
    pub code_version: String,
    /// Fingerprint of the model searched.
    pub model_fingerprint: String,
    /// Run configuration (task list, search and model flags, seed).
    pub config: serde_json::Value,
    /// Configurations the run had before a `--force` change, oldest first.
    #[serde(default)]
    pub previous_configs: Vec<serde_json::Value>,
    /// Committed parts, in commit order.
    pub parts: Vec<PartInfo>,
    /// Rows committed (sum over parts).
    pub rows: usize,
    /// Samples given up, with their errors.
    pub failed: Vec<FailedSample>,
    /// Whether the run finished (then `_SUCCESS` exists too).
    pub complete: bool,
    /// SHA-256 of this manifest's compact JSON with this field empty (absent in format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// An output directory open for committing.
pub struct Dataset {
    out: PathBuf,
    manifest: Manifest,
    committed: HashSet<(String, String)>,
    run_tag: String,
    /// The exclusive lock on `out`, released on drop (or when the process dies).
    _lock: File,
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes `bytes` to `path` atomically (temp file beside it, fsync, rename, fsync directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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
fn lock_out(out: &Path) -> Result<File> {
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

/// The fields in which two configurations differ, as `a.b: old (now new)`.
pub fn config_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    let (va, vb) = (x.get(k), y.get(k));
                    match (va, vb) {
                        (Some(va), Some(vb)) => walk(&p, va, vb, out),
                        (Some(va), None) => out.push(format!("{p}: {va} (now absent)")),
                        (None, Some(vb)) => out.push(format!("{p}: absent (now {vb})")),
                        (None, None) => {}
                    }
                }
            }
            _ if a != b => out.push(format!(
                "{}: {a} (now {b})",
                if prefix.is_empty() { "(root)" } else { prefix }
            )),
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", old, new, &mut out);
    out
}

/// Refuses a committed part the manifest missed unless it is this run's: written with this
/// run's configuration (`manifest.config`, already the new one under --force) and model, and holding no sample twice or already committed.
fn check_stray(
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

/// Reads every committed row of the dataset in `out` (parts listed in its manifest, in commit
/// order), e.g. for training or for comparing runs. Every part is checked against its checksums
/// first: a damaged one is refused by name ([`DatasetError::Damaged`]); parts written before
/// checksums are read unverified, with a warning.
pub fn read_rows(out: &Path) -> Result<Vec<PathRecord>> {
    let m = read_manifest(out)?;
    let mut rows = vec![];
    let mut unverified = 0;
    for p in &m.parts {
        let (part, checked) = integrity::check_listed(out, p)?;
        unverified += (checked == Checked::Unverified) as usize;
        rows.extend(part.rows);
    }
    if unverified > 0 {
        tracing::warn!(
            dataset = %out.display(),
            parts = unverified,
            "parts written before checksums (format 1) were read unverified"
        );
    }
    Ok(rows)
}

/// The manifest of the dataset at `out` (`OUT/_manifest.json`), checked against its own
/// checksum (manifests of format 1 have none).
pub fn read_manifest(out: &Path) -> Result<Manifest> {
    let mpath = out.join("_manifest.json");
    let text = fs::read_to_string(&mpath).map_err(io(&mpath))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| DatasetError::Manifest {
        path: mpath.clone(),
        msg: format!("not a drllm manifest: {e}"),
    })?;
    if m.format_version > FORMAT_VERSION {
        return Err(DatasetError::Manifest {
            path: mpath,
            msg: format!(
                "format version {} is newer than this drllm's {FORMAT_VERSION}",
                m.format_version
            ),
        });
    }
    if let Some(want) = &m.checksum {
        let got = integrity::manifest_sha256(&m);
        if &got != want {
            return Err(DatasetError::Manifest {
                path: mpath,
                msg: format!(
                    "its content hashes to {got}, its checksum says {want}: the file was damaged or edited after drllm wrote it"
                ),
            });
        }
    } else if m.format_version >= 2 {
        return Err(DatasetError::Manifest {
            path: mpath,
            msg: "no checksum, which manifests of format 2 carry: the file was damaged or edited"
                .into(),
        });
    }
    Ok(m)
}

/// Rows of a record batch of [`schema`] (task from the partition).
fn from_batch(b: &RecordBatch, task: &str) -> std::result::Result<Vec<PathRecord>, String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .cloned()
            .ok_or_else(|| format!("no column {name:?}"))
    };
    let strs = |name: &str| -> std::result::Result<Vec<Option<String>>, String> {
        let c = col(name)?;
        let a = c
            .as_string_opt::<i32>()
            .ok_or_else(|| format!("column {name:?} is not a string column"))?;
        Ok((0..a.len())
            .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
            .collect())
    };
    let bools = |name: &str| -> std::result::Result<Vec<bool>, String> {
        let c = col(name)?;
        let a = c
            .as_boolean_opt()
            .ok_or_else(|| format!("column {name:?} is not boolean"))?;
        Ok((0..a.len()).map(|i| a.value(i)).collect())
    };
    macro_rules! prim {
        ($name:expr, $t:ty) => {{
            let c = col($name)?;
            let a = c
                .as_primitive_opt::<$t>()
                .ok_or_else(|| format!("column {:?} has the wrong type", $name))?;
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| a.value(i)))
                .collect::<Vec<_>>()
        }};
    }
    macro_rules! list {
        ($c:expr, $t:ty, $name:expr) => {{
            let l = $c
                .as_list_opt::<i32>()
                .ok_or_else(|| format!("column {:?} is not a list", $name))?;
            (0..l.len())
                .map(|i| {
                    if !l.is_valid(i) {
                        return Ok(None);
                    }
                    let v = l.value(i);
                    let p = v
                        .as_primitive_opt::<$t>()
                        .ok_or_else(|| format!("column {:?} has the wrong item type", $name))?;
                    Ok(Some(p.values().to_vec()))
                })
                .collect::<std::result::Result<Vec<_>, String>>()?
        }};
    }
    let n = b.num_rows();
    let (ids, splits, qs, answers, prompts, models, workers, responses) = (
        strs("sample_id")?,
        strs("split")?,
        strs("question")?,
        strs("answer")?,
        strs("prompt")?,
        strs("model")?,
        strs("worker")?,
        strs("best_response")?,
    );
    let (dc, found, improved) = (
        bools("default_correct")?,
        bools("found")?,
        bools("improved")?,
    );
    let layers_n = prim!("num_layers", UInt16Type);
    let cost = prim!("best_cost", UInt32Type);
    let (sims, evals) = (
        prim!("simulations", UInt32Type),
        prim!("evaluations", UInt32Type),
    );
    let (ms, seeds) = (prim!("search_ms", UInt64Type), prim!("seed", UInt64Type));
    let (best_col, layers_col) = (col("best_path")?, col("best_layers")?);
    let best = list!(best_col, UInt8Type, "best_path");
    let best_layers = list!(layers_col, UInt16Type, "best_layers");
    let good_col = col("good_paths")?;
    let good_outer = good_col
        .as_list_opt::<i32>()
        .ok_or("column \"good_paths\" is not a list")?;
    let mut good = Vec::with_capacity(n);
    for i in 0..n {
        let inner = good_outer.value(i);
        let paths = list!(inner, UInt8Type, "good_paths");
        good.push(paths.into_iter().flatten().collect::<Vec<_>>());
    }
    let req = |v: Option<String>, name: &str| v.ok_or_else(|| format!("null in column {name:?}"));
    let path = |counts: Vec<u8>, what: &str, i: usize| {
        LayerPath::from_counts(counts).map_err(|e| format!("row {i}: {what}: {e}"))
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let best_path = best[i]
            .clone()
            .map(|c| path(c, "best_path", i))
            .transpose()?;
        let good_paths = good[i]
            .iter()
            .map(|c| path(c.clone(), "a good path", i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let row = PathRecord {
            sample_id: req(ids[i].clone(), "sample_id")?,
            task: task.to_string(),
            split: req(splits[i].clone(), "split")?,
            question: req(qs[i].clone(), "question")?,
            answer: req(answers[i].clone(), "answer")?,
            prompt: req(prompts[i].clone(), "prompt")?,
            model: req(models[i].clone(), "model")?,
            num_layers: layers_n[i].ok_or("null num_layers")?,
            default_correct: dc[i],
            found: found[i],
            improved: improved[i],
            best_path,
            good_paths,
            simulations: sims[i].ok_or("null simulations")?,
            evaluations: evals[i].ok_or("null evaluations")?,
            search_ms: ms[i].ok_or("null search_ms")?,
            worker: req(workers[i].clone(), "worker")?,
            seed: seeds[i].ok_or("null seed")?,
            best_response: responses[i].clone(),
        };
        // The derived columns must agree with the stored path (a file edited or written by
        // another tool may not).
        if cost[i] != row.best_cost() || best_layers[i] != row.best_layers() {
            return Err(format!(
                "row {i} ({}): best_cost {:?} / best_layers do not match best_path (cost {:?})",
                row.sample_id,
                cost[i],
                row.best_cost()
            ));
        }
        row.validate(row.num_layers as usize)
            .map_err(|e| format!("row {i} ({}): {e}", row.sample_id))?;
        out.push(row);
    }
    Ok(out)
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
        let batch = to_batch(rows).map_err(perr)?;
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

/// Marks a README.md as the card drllm writes (and may rewrite).
const CARD_MARKER: &str = "<!-- dataset card written by drllm; rewritten at every commit -->";

/// The Hugging Face dataset card of a paths dataset: YAML `configs` with one config per task
/// (its parts as `data_files`, the run's split as the split name), so
/// `datasets.load_dataset(OUT, "arc_easy")` loads one task, then what the rows are. There is no
/// all-tasks config: `datasets` does not read the `task=` directory as a column, so its rows
/// could not be told apart.
pub fn dataset_card(m: &Manifest) -> String {
    let mut tasks: Vec<(&str, usize)> = vec![];
    for p in &m.parts {
        match tasks.iter_mut().find(|(t, _)| *t == p.task) {
            Some((_, n)) => *n += p.rows,
            None => tasks.push((&p.task, p.rows)),
        }
    }
    tasks.sort();
    // A split name must be a word for `datasets`; anything else is published as `train`.
    let split = m.config["split"]
        .as_str()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or("train");
    let model = m.config["model"].as_str().unwrap_or("?");
    let mut y = String::from("---\nconfigs:\n");
    for (t, _) in &tasks {
        y += &format!(
            "- config_name: {t}\n  data_files:\n  - split: {split}\n    path: data/task={t}/*.parquet\n"
        );
    }
    y += "tags:\n- drllm\n- layer-routing\n---\n";
    y += CARD_MARKER;
    y += &format!(
        "\n\n# Layer paths of {model}\n\n\
         Accuracy-preserving layer paths found by drllm's MCTS search, one row per sample \
         ({} rows{}). Model fingerprint `{}`, drllm {}, format version {}; the run's full \
         configuration is in `_manifest.json`.\n\n\
         | task (config) | rows |\n| --- | ---: |\n",
        m.rows,
        if m.complete {
            ", run complete"
        } else {
            ", run in progress"
        },
        m.model_fingerprint,
        m.code_version,
        m.format_version,
    );
    for (t, n) in &tasks {
        y += &format!("| {t} | {n} |\n");
    }
    y += "\nColumns (the task is the `task=` directory; the `split` column names the source split):\n\n";
    for (c, what) in CARD_COLUMNS {
        y += &format!("- `{c}`: {what}\n");
    }
    y += "\n```python\nimport datasets\nds = datasets.load_dataset(\"path/to/OUT\", \"TASK\")\n```\n";
    y
}

/// What each column holds, for the dataset card.
const CARD_COLUMNS: [(&str, &str); 20] = [
    ("sample_id", "the sample's id in its task"),
    ("split", "the source split searched"),
    ("question", "the question as in the source data"),
    ("answer", "the reference answer"),
    ("prompt", "the prompt exactly as the model saw it"),
    ("model", "the model searched"),
    ("num_layers", "blocks of the model (length of every path)"),
    (
        "default_correct",
        "whether the all-execute path answers correctly",
    ),
    ("found", "whether a good path was found"),
    (
        "improved",
        "whether the default path was wrong and a found path is right",
    ),
    (
        "best_path",
        "the best path: per block 0 skip, 1 execute, 2 repeat",
    ),
    ("best_cost", "block applications of the best path"),
    (
        "best_layers",
        "the best path as the executed block indices in order",
    ),
    ("good_paths", "every good path found, best first"),
    ("simulations", "MCTS simulations run"),
    ("evaluations", "distinct path evaluations"),
    ("search_ms", "search wall time in milliseconds"),
    ("worker", "the worker that searched the sample"),
    ("seed", "the sample's search seed"),
    ("best_response", "the model's response along the best path"),
];

/// Rows shaped like real search outcomes, for the tests and benchmarks of the crates that move
/// rows around (feature `fixtures`).
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures {
    use super::PathRecord;
    use drllm_path::LayerPath;

    /// A row like a real search outcome (the sample ids are ARC's): blocks 7 and 8 skipped.
    pub fn row(task: &str, id: &str, found: bool) -> PathRecord {
        let counts: Vec<u8> = (0..30).map(|l| u8::from(l != 7 && l != 8)).collect();
        let best = LayerPath::from_counts(counts).expect("counts 0 and 1");
        PathRecord {
            sample_id: id.into(),
            task: task.into(),
            split: "train".into(),
            question: "Which gas do plants take in? (A) oxygen (B) carbon dioxide".into(),
            answer: "B".into(),
            prompt: "<|im_start|>user\n...<|im_end|>\n".into(),
            model: "SmolLM2-135M-Instruct".into(),
            num_layers: 30,
            default_correct: true,
            found,
            improved: false,
            best_path: found.then(|| best.clone()),
            good_paths: if found {
                vec![best.clone(), LayerPath::all_ones(30)]
            } else {
                vec![]
            },
            simulations: 50,
            evaluations: 37,
            search_ms: 1234,
            worker: "w0".into(),
            seed: 14396215654857862097,
            best_response: found.then(|| "B".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures::row;

    fn cfg() -> serde_json::Value {
        serde_json::json!({"tasks": ["arc_easy"], "num_simulations": 50})
    }

    #[test]
    fn the_card_names_every_task_and_column_and_spares_a_users_readme() {
        let names: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        let card_names: Vec<&str> = CARD_COLUMNS.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            names, card_names,
            "the card documents the schema's columns in order"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let cfg = serde_json::json!({"split": "dev", "model": "SmolLM2"});
        let mut ds = Dataset::open(&out, "fp", cfg.clone(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        ds.commit(
            "gsm8k",
            &[row("gsm8k", "b", true), row("gsm8k", "c", false)],
        )
        .unwrap();
        let card = fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.starts_with("---\nconfigs:\n- config_name: arc_easy\n"),
            "{card}"
        );
        assert!(
            card.contains("  - split: dev\n    path: data/task=gsm8k/*.parquet\n"),
            "{card}"
        );
        assert!(
            card.contains("| gsm8k | 2 |") && card.contains("run in progress"),
            "{card}"
        );
        ds.finish().unwrap();
        assert!(fs::read_to_string(out.join("README.md"))
            .unwrap()
            .contains("run complete"));
        drop(ds);
        // A README the user wrote is left alone.
        fs::write(out.join("README.md"), "my notes").unwrap();
        let mut ds = Dataset::open(&out, "fp", cfg, false).unwrap();
        ds.commit("math", &[row("math", "d", true)]).unwrap();
        assert_eq!(
            fs::read_to_string(out.join("README.md")).unwrap(),
            "my notes"
        );
    }

    #[test]
    fn path_columns_derive_from_the_layer_paths() {
        let mut r = row("arc_easy", "a", false);
        let mut counts = vec![1u8; 30];
        counts[2] = 0;
        counts[5] = 2;
        r.best_path = Some(LayerPath::from_counts(counts.clone()).unwrap());
        r.found = true;
        assert_eq!(r.best_cost(), Some(30));
        let layers = r.best_layers().unwrap();
        assert_eq!(&layers[..6], &[0, 1, 3, 4, 5, 5]);
        assert_eq!(r.validate(30), Ok(()));
        let b = to_batch(std::slice::from_ref(&r)).unwrap();
        let back = from_batch(&b, "arc_easy").unwrap();
        assert_eq!(back, vec![r.clone()]);
        r.best_path = None;
        r.found = false;
        assert_eq!((r.best_cost(), r.best_layers()), (None, None));
    }

    #[test]
    fn rows_validate_against_the_model() {
        assert_eq!(row("arc_easy", "a", true).validate(30), Ok(()));
        assert_eq!(row("arc_easy", "a", false).validate(30), Ok(()));
        assert!(row("arc_easy", "a", true)
            .validate(28)
            .unwrap_err()
            .contains("num_layers"));
        let mut r = row("arc_easy", "a", true);
        r.best_path = Some(LayerPath::all_ones(29));
        assert!(r.validate(30).unwrap_err().contains("29 counts"));
        let mut r = row("arc_easy", "a", true);
        r.good_paths.push(LayerPath::all_ones(31));
        assert!(r.validate(30).unwrap_err().contains("a good path has 31"));
        let mut r = row("arc_easy", "a", true);
        r.best_path = None;
        assert!(r.validate(30).unwrap_err().contains("best_path is null"));
    }

    /// A part whose columns disagree (edited, or written by another tool) is refused on read,
    /// naming the file, the row and the column (read alone, as a part without checksums is;
    /// in a dataset its checksum refuses it first).
    #[test]
    fn inconsistent_path_columns_are_refused_on_read() {
        use arrow_array::UInt32Array;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp", cfg(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        ds.finish().unwrap();
        let part = out.join(&read_manifest(&out).unwrap().parts[0].path);
        let rewrite = |col: &str, values: ArrayRef| {
            let b = to_batch(&[row("arc_easy", "a", true)]).unwrap();
            let i = b.schema().index_of(col).unwrap();
            let mut cols = b.columns().to_vec();
            cols[i] = values;
            let b = RecordBatch::try_new(b.schema(), cols).unwrap();
            let mut w =
                ArrowWriter::try_new(File::create(&part).unwrap(), b.schema(), None).unwrap();
            w.write(&b).unwrap();
            w.close().unwrap();
            let e = read_rows(&out).unwrap_err().to_string();
            assert!(e.contains("damaged part") && e.contains("SHA-256"), "{e}");
            match integrity::check_part(&part, "arc_easy", None, None) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("read"),
            }
        };
        let e = rewrite("best_cost", Arc::new(UInt32Array::from(vec![30])));
        assert!(e.contains(part.to_str().unwrap()), "{e}");
        assert!(e.contains("row 0 (a): best_cost Some(30)"), "{e}");
        let mut counts = vec![1u8; 30];
        counts[4] = 3;
        let mut best = ListBuilder::new(UInt8Builder::new());
        best.values().append_slice(&counts);
        best.append(true);
        let e = rewrite("best_path", Arc::new(best.finish()));
        assert!(
            e.contains("row 0: best_path") && e.contains("count 3"),
            "{e}"
        );
    }

    #[test]
    fn commits_survive_reopen_and_missed_parts_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        ds.commit(
            "arc_easy",
            &[row("arc_easy", "a", true), row("arc_easy", "b", false)],
        )
        .unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "c", true)])
            .unwrap();
        // A part renamed in just before a crash, missing from the manifest.
        let before = fs::read(out.join("_manifest.json")).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "d", true)])
            .unwrap();
        fs::write(out.join("_manifest.json"), before).unwrap();
        // A staging leftover is never data.
        fs::write(out.join("_staging/part-99999-x.parquet"), b"half").unwrap();
        drop(ds);
        let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        for id in ["a", "b", "c", "d"] {
            assert!(ds.is_committed("arc_easy", id), "{id}");
        }
        assert!(!ds.is_committed("arc_easy", "e"));
        assert_eq!(ds.manifest().rows, 4);
        let back = read_rows(&out).unwrap();
        let ids: Vec<&str> = back.iter().map(|r| r.sample_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(back[0], row("arc_easy", "a", true));
        assert_eq!(back[1], row("arc_easy", "b", false));
        assert_eq!(ds.manifest().parts.len(), 3);
        assert!(!out.join("_staging/part-99999-x.parquet").exists());
        ds.record_failure(FailedSample {
            task: "arc_easy".into(),
            sample_id: "z".into(),
            error: "too long".into(),
        })
        .unwrap();
        ds.finish().unwrap();
        assert!(out.join("_SUCCESS").exists());
        let m: Manifest =
            serde_json::from_slice(&fs::read(out.join("_manifest.json")).unwrap()).unwrap();
        assert!(m.complete);
        assert_eq!(m.failed.len(), 1);
        // Only parquet parts under data/.
        for p in &m.parts {
            assert!(p.path.starts_with("data/task=arc_easy/part-"));
        }
    }

    #[test]
    fn other_configs_and_models_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let mut ds = Dataset::open(out, "fp1", cfg(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        drop(ds);
        let other = serde_json::json!({"tasks": ["arc_easy"], "num_simulations": 20});
        let e = Dataset::open(out, "fp1", other.clone(), false)
            .err()
            .unwrap();
        // The fields that differ are named, not both configs dumped.
        assert!(
            e.to_string()
                .contains("config differs in num_simulations: 50 (now 20)"),
            "{e}"
        );
        assert!(!e.to_string().contains("tasks"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        let e = Dataset::open(out, "fp2", cfg(), true).err().unwrap();
        assert!(e.to_string().contains("model fingerprint fp1"), "{e}");
        // --force continues under the new config, keeping every committed row.
        let ds = Dataset::open(out, "fp1", other, true).unwrap();
        assert!(ds.is_committed("arc_easy", "a"));
        assert_eq!(ds.manifest().previous_configs, [cfg()]);
        drop(ds);
        // A manifest from a newer drllm, or not a manifest at all.
        let mut m: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("_manifest.json")).unwrap()).unwrap();
        m["format_version"] = 99.into();
        fs::write(out.join("_manifest.json"), m.to_string()).unwrap();
        let e = Dataset::open(out, "fp1", cfg(), true).err().unwrap();
        assert!(e.to_string().contains("format version 99"), "{e}");
        fs::write(out.join("_manifest.json"), "{").unwrap();
        let e = Dataset::open(out, "fp1", cfg(), true).err().unwrap();
        assert!(
            e.to_string()
                .contains("_manifest.json: not a drllm manifest"),
            "{e}"
        );
    }

    #[test]
    fn one_run_at_a_time_holds_the_output_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        let e = Dataset::open(&out, "fp1", cfg(), false).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, DatasetError::Locked { .. }), "{msg}");
        assert!(
            msg.contains("_lock") && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Released with the run (and by the OS when a process dies).
        drop(ds);
        Dataset::open(&out, "fp1", cfg(), false).unwrap();
    }

    #[test]
    fn stray_parts_of_other_runs_or_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        drop(ds);
        let part = out.join(&read_manifest(&out).unwrap().parts[0].path);
        let task_dir = part.parent().unwrap().to_path_buf();
        // A copy of a committed part: its sample would be there twice.
        let copy = task_dir.join("part-00007-copy.parquet");
        fs::copy(&part, &copy).unwrap();
        let e = Dataset::open(&out, "fp1", cfg(), false).err().unwrap();
        assert!(
            matches!(e, DatasetError::StrayPart { .. })
                && e.to_string().contains("part-00007-copy.parquet")
                && e.to_string()
                    .contains("sample a (arc_easy) that is already committed"),
            "{e}"
        );
        fs::remove_file(&copy).unwrap();
        // A part of a run with another configuration.
        let other_out = dir.path().join("other");
        let other = serde_json::json!({"tasks": ["arc_easy"], "num_simulations": 20});
        let mut ds = Dataset::open(&other_out, "fp1", other, false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "q", true)])
            .unwrap();
        drop(ds);
        let theirs = other_out.join(&read_manifest(&other_out).unwrap().parts[0].path);
        fs::copy(&theirs, task_dir.join("part-00008-other.parquet")).unwrap();
        let e = Dataset::open(&out, "fp1", cfg(), false).err().unwrap();
        assert!(
            e.to_string().contains("part-00008-other.parquet")
                && e.to_string().contains("num_simulations: 20 (now 50)"),
            "{e}"
        );
        // Nothing was adopted or lost: once the stray part is gone the run resumes as it was.
        fs::remove_file(task_dir.join("part-00008-other.parquet")).unwrap();
        let ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        assert_eq!(ds.manifest().rows, 1);
        assert!(ds.is_committed("arc_easy", "a") && !ds.is_committed("arc_easy", "q"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(150))]
        /// Fuzz tier: a committed part or the manifest with bytes overwritten or cut short is
        /// an error (or, in the data pages, other values), never a panic, when read or resumed.
        #[test]
        fn mutated_parts_and_manifests_never_panic(
            muts in proptest::collection::vec((0usize..1 << 20, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..256,
            manifest in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("run");
            let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
            ds.commit("arc_easy", &[row("arc_easy", "a", true), row("arc_easy", "b", false)])
                .unwrap();
            drop(ds);
            let file = if manifest {
                out.join("_manifest.json")
            } else {
                out.join(&read_manifest(&out).unwrap().parts[0].path)
            };
            let mut bytes = fs::read(&file).unwrap();
            let n = bytes.len();
            for (i, b) in muts {
                bytes[i % n] = b;
            }
            bytes.truncate(n.saturating_sub(cut));
            fs::write(&file, &bytes).unwrap();
            let _ = read_rows(&out);
            let _ = Dataset::open(&out, "fp1", cfg(), false);
        }
    }

    #[test]
    fn an_unwritable_output_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let e = Dataset::open(&file.join("run"), "fp", cfg(), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("plain-file"), "{e}");
    }
}
