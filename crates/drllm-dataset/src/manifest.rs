//! The manifest (`_manifest.json`): the run's config, fingerprint and committed parts; config
//! differences between a run and the dataset it resumes.
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::*;

/// Version of the manifest and column layout; a newer one on disk is refused. 2: checksums
/// (each part's SHA-256 in the manifest, a content checksum in each part's footer, the
/// manifest's own); parts of format 1 are read unverified.
pub const FORMAT_VERSION: u32 = 2;

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
