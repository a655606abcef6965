//! The router package: a directory with `routers.safetensors` (PyTorch-style per-block tensor
//! names, see [`Routers::named_tensors`]) and `manifest.json` (what model it belongs to, how its
//! inputs are pooled, how it was trained and how it scored). Written to a temporary directory
//! and renamed into place, so a half-written package is never presented as one.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::router::{RouterShape, Routers, CLASSES};

/// Version of the package layout; a newer one is refused.
pub const FORMAT_VERSION: u32 = 1;
const KIND: &str = "drllm-routers";
const TENSORS: &str = "routers.safetensors";
/// Router hidden units of the paper's code (its `RouterBlock` default).
pub const DR_LLM_ROUTER_HIDDEN: usize = 128;
/// Windows of the paper's code (`num_windows`).
pub const DR_LLM_WINDOWS: usize = 8;
/// The per-epoch training metrics as CSV, beside the manifest (for spreadsheets and plotting).
pub const METRICS_CSV: &str = "metrics.csv";
const MANIFEST: &str = "manifest.json";

/// Why a package cannot be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The manifest is unreadable, of another kind, or from a newer format.
    #[error("{path}: {msg}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tensor file is unreadable or does not hold the routers the manifest describes.
    #[error("{path}: {msg}")]
    Tensors {
        /// The tensor file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The package does not fit the model or settings it is used with.
    #[error("router package {path}: {msg}")]
    Mismatch {
        /// The package directory.
        path: PathBuf,
        /// What differs.
        msg: String,
    },
}

type Result<T> = std::result::Result<T, PackageError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Metrics of one training epoch (validation metrics are teacher-forced on held-out prompts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number (1-based).
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Macro-F1 over the classes present in the validation labels.
    pub val_macro_f1: f64,
    /// F1 per class (skip, execute, repeat).
    pub val_f1: [f64; 3],
    /// Recall per class (skip, execute, repeat).
    pub val_recall: [f64; 3],
    /// Mean block applications per validation prompt of the routers' choices.
    pub val_avg_cost: f64,
    /// Mean block applications per validation prompt of the gold paths.
    pub val_gold_cost: f64,
    /// Routed validation: accuracy of the held-out prompts answered along the paths these
    /// routers choose (not teacher-forced), when measured.
    #[serde(default)]
    pub val_routed_accuracy: Option<f64>,
    /// Routed validation: mean block applications per held-out prompt, when measured.
    #[serde(default)]
    pub val_routed_cost: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch in seconds.
    pub secs: f64,
}

/// How the prompts the routers were trained on were rendered: routers read the hidden states of
/// these very tokens, so they are used on prompts rendered the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptSpec {
    /// Reward mode of the search (`cloze`, `lenient`, ...): it decides the prompt's form.
    pub reward: String,
    /// Prompt style (`base` or `instruct`).
    pub style: String,
    /// The template each answer family's prompts were rendered with (absent in packages of
    /// older versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<TemplateSpec>,
}

/// A prompt template as a package records it: enough to tell whether another renders alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSpec {
    /// Answer family (`multiple_choice`, `math`, `gsm8k`).
    pub family: String,
    /// Built-in name or file path.
    pub name: String,
    /// Minijinja source.
    pub source: String,
}

/// What a package is and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageManifest {
    /// Layout version.
    pub format_version: u32,
    /// Always `drllm-routers`.
    pub kind: String,
    /// drllm version that wrote it.
    pub code_version: String,
    /// Fingerprint of the model the routers were trained on (see `ModelSource::fingerprint`).
    pub model_fingerprint: String,
    /// Name of that model.
    pub model_name: String,
    /// Router sizes.
    pub shape: RouterShape,
    /// Pooling windows per prompt.
    pub windows: usize,
    /// Training labels per class (skip, execute, repeat).
    pub label_counts: [u64; 3],
    /// The training configuration (flags).
    pub training: serde_json::Value,
    /// Where the examples came from and how many were used.
    pub data: serde_json::Value,
    /// Metrics per epoch.
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights are in the package.
    pub best_epoch: usize,
    /// How the training prompts were rendered (absent in packages of older versions).
    #[serde(default)]
    pub prompts: Option<PromptSpec>,
    /// SHA-256 of `routers.safetensors` as written (hex), checked on every load: weights edited
    /// or damaged after training are refused (absent in packages of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
}

impl PackageManifest {
    /// A manifest of the current format for routers of `shape` on a model.
    pub fn new(
        model_fingerprint: String,
        model_name: String,
        shape: RouterShape,
        windows: usize,
    ) -> Self {
        PackageManifest {
            format_version: FORMAT_VERSION,
            kind: KIND.into(),
            code_version: env!("CARGO_PKG_VERSION").into(),
            model_fingerprint,
            model_name,
            shape,
            windows,
            label_counts: [0; 3],
            training: serde_json::Value::Null,
            data: serde_json::Value::Null,
            epochs: vec![],
            best_epoch: 0,
            prompts: None,
            weights_sha256: None,
        }
    }
}

/// SHA-256 of a file (hex).
fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).map_err(io(path))?;
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the manifest's per-epoch metrics as CSV, one row per epoch (empty fields where a
/// metric was not measured) with `kept` marking the epoch whose weights are in the package.
fn write_metrics_csv(path: &Path, m: &PackageManifest) -> Result<()> {
    let err = |e: csv::Error| PackageError::Manifest {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let mut w = csv::Writer::from_path(path).map_err(err)?;
    let mut header = vec![
        "epoch".to_string(),
        "train_loss".into(),
        "val_macro_f1".into(),
    ];
    for what in ["val_f1", "val_recall"] {
        header.extend(CLASSES.iter().map(|c| format!("{what}_{c}")));
    }
    header.extend(
        [
            "val_avg_cost",
            "val_gold_cost",
            "val_routed_accuracy",
            "val_routed_cost",
            "lr",
            "secs",
            "kept",
        ]
        .map(String::from),
    );
    w.write_record(&header).map_err(err)?;
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for e in &m.epochs {
        let mut row = vec![
            e.epoch.to_string(),
            e.train_loss.to_string(),
            e.val_macro_f1.to_string(),
        ];
        row.extend(e.val_f1.iter().chain(&e.val_recall).map(f64::to_string));
        row.extend([
            e.val_avg_cost.to_string(),
            e.val_gold_cost.to_string(),
            opt(e.val_routed_accuracy),
            opt(e.val_routed_cost),
            e.lr.to_string(),
            e.secs.to_string(),
            (e.epoch == m.best_epoch).to_string(),
        ]);
        w.write_record(&row).map_err(err)?;
    }
    w.flush().map_err(|e| io(path)(e))?;
    Ok(())
}

/// Trained routers with their manifest.
#[derive(Debug)]
pub struct Package {
    /// What the routers are.
    pub manifest: PackageManifest,
    /// The weights.
    pub routers: Routers,
}

impl Package {
    /// Writes the package to `dir` (replacing a package already there; anything else there is
    /// refused). Nothing is visible at `dir` until both files are complete.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, tch::Kind::Float)
    }

    /// [`Package::save`] with the weights stored as `kind` (e.g. bf16 for a package shipped in a
    /// repository: half the size; loading converts back to f32).
    pub fn save_as(&self, dir: &Path, kind: tch::Kind) -> Result<()> {
        if dir.exists() && !dir.join(MANIFEST).is_file() {
            return Err(PackageError::Mismatch {
                path: dir.to_path_buf(),
                msg: "exists and is not a router package; choose another --out".into(),
            });
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        let name = dir
            .file_name()
            .map_or("routers".into(), |n| n.to_string_lossy().into_owned());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .map_err(io(&parent))?;
        let tensors = tmp.path().join(TENSORS);
        let named: Vec<(String, Tensor)> = self
            .routers
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(kind)))
            .collect();
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &tensors).map_err(|e| PackageError::Tensors {
            path: tensors.clone(),
            msg: e.to_string(),
        })?;
        let mpath = tmp.path().join(MANIFEST);
        let mut manifest = self.manifest.clone();
        manifest.weights_sha256 = Some(sha256_file(&tensors)?);
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| PackageError::Manifest {
            path: mpath.clone(),
            msg: e.to_string(),
        })?;
        fs::write(&mpath, text).map_err(io(&mpath))?;
        let csv_path = tmp.path().join(METRICS_CSV);
        write_metrics_csv(&csv_path, &self.manifest)?;
        for f in [&tensors, &mpath, &csv_path] {
            fs::File::open(f)
                .and_then(|f| f.sync_all())
                .map_err(io(f))?;
        }
        let staged = tmp.keep();
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let had_old = dir.exists();
        if had_old {
            fs::rename(dir, &old).map_err(io(dir))?;
        }
        if let Err(e) = fs::rename(&staged, dir) {
            if had_old {
                let _ = fs::rename(&old, dir);
            }
            let _ = fs::remove_dir_all(&staged);
            return Err(io(dir)(e));
        }
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        Ok(())
    }

    /// Identifies the routers in the package at `dir`: SHA-256 of its weights file (first 12
    /// bytes, hex, like the model's fingerprint), so evaluation outputs say which routers made
    /// them even after the package is retrained in place.
    pub fn fingerprint(dir: &Path) -> Result<String> {
        Ok(sha256_file(&dir.join(TENSORS))?[..24].to_string())
    }

    /// Writes the routers in the layout of the paper's code (parameterlab/dr-llm: its modified
    /// `LlamaModel`/`Qwen*Model` hold `routers.{i}` blocks of `linear1` (hidden -> 128), tanh-GELU
    /// and `linear2` (128 -> 3), 8 windows): tensors `model.routers.{i}.linear1.weight` etc. in
    /// f32, loadable with `load_state_dict(..., strict=False)`. That code hard-codes 128 hidden
    /// units and 8 windows, so other shapes are refused. Its windows differ from ours: it pools
    /// `T // 8` tokens per window and drops the last `T % 8` tokens (ours spread them over the
    /// windows), so logits agree exactly only when the prompt length is a multiple of 8.
    pub fn export_dr_llm(&self, dir: &Path, file: &Path) -> Result<()> {
        let s = self.manifest.shape;
        if s.router_hidden != DR_LLM_ROUTER_HIDDEN || self.manifest.windows != DR_LLM_WINDOWS {
            return Err(PackageError::Mismatch {
                path: dir.to_path_buf(),
                msg: format!(
                    "routers of {} hidden units over {} windows; the paper's code hard-codes \
                     {DR_LLM_ROUTER_HIDDEN} and {DR_LLM_WINDOWS} (train with --router-hidden \
                     {DR_LLM_ROUTER_HIDDEN} --windows {DR_LLM_WINDOWS} to export)",
                    s.router_hidden, self.manifest.windows
                ),
            });
        }
        let named: Vec<(String, Tensor)> = self
            .routers
            .named_tensors()
            .into_iter()
            .map(|(n, t)| {
                let n = n
                    .replace(".fc1.", ".linear1.")
                    .replace(".fc2.", ".linear2.");
                (format!("model.{n}"), t.to_kind(tch::Kind::Float))
            })
            .collect();
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, file).map_err(|e| PackageError::Tensors {
            path: file.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Reads a package, checking that its tensors are exactly the routers its manifest describes.
    pub fn load(dir: &Path) -> Result<Package> {
        let manifest = Self::read_manifest(dir)?;
        let tpath = dir.join(TENSORS);
        if !tpath.is_file() {
            return Err(PackageError::Tensors {
                path: tpath,
                msg: "missing (a router package holds routers.safetensors and manifest.json)"
                    .into(),
            });
        }
        let terr = |msg: String| PackageError::Tensors {
            path: tpath.clone(),
            msg,
        };
        if let Some(want) = &manifest.weights_sha256 {
            let got = sha256_file(&tpath)?;
            if &got != want {
                return Err(terr(format!(
                    "its SHA-256 is {got}, the manifest recorded {want} when the package was \
                     written: the weights were edited or damaged since (retrain, or restore the \
                     package from a copy)"
                )));
            }
        }
        let named = Tensor::read_safetensors(&tpath).map_err(|e| {
            terr(match truncation(&tpath) {
                Some(why) => format!("truncated: {why}"),
                None => format!("not a safetensors file: {e}"),
            })
        })?;
        let mut by_name: HashMap<String, Tensor> = named.into_iter().collect();
        let s = manifest.shape;
        let (h, d) = (s.hidden_size as i64, s.router_hidden as i64);
        let mut parts: [Vec<Tensor>; 4] = Default::default();
        for l in 0..s.num_layers {
            let want: [(String, Vec<i64>); 4] = [
                (format!("routers.{l}.fc1.weight"), vec![d, h]),
                (format!("routers.{l}.fc1.bias"), vec![d]),
                (format!("routers.{l}.fc2.weight"), vec![3, d]),
                (format!("routers.{l}.fc2.bias"), vec![3]),
            ];
            for (k, (name, shape)) in want.into_iter().enumerate() {
                let t = by_name.remove(&name).ok_or_else(|| {
                    terr(format!(
                        "tensor {name} is missing (the manifest describes {} routers of {h} -> {d} -> 3)",
                        s.num_layers
                    ))
                })?;
                if t.size() != shape {
                    return Err(terr(format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        t.size()
                    )));
                }
                let t = t.to_kind(tch::Kind::Float);
                if t.isfinite().logical_not().any().int64_value(&[]) != 0 {
                    return Err(terr(format!("tensor {name} holds NaN or infinite values")));
                }
                parts[k].push(if k % 2 == 0 { t.tr() } else { t });
            }
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(terr(format!(
                "unexpected tensor {extra} ({} tensors beyond the {} routers of the manifest)",
                by_name.len(),
                s.num_layers
            )));
        }
        let [w1, b1, w2, b2] = parts.map(|v| Tensor::stack(&v, 0));
        Ok(Package {
            manifest,
            routers: Routers {
                shape: s,
                w1,
                b1,
                w2,
                b2,
            },
        })
    }

    /// Reads and checks only the manifest.
    pub fn read_manifest(dir: &Path) -> Result<PackageManifest> {
        let mpath = dir.join(MANIFEST);
        if !dir.is_dir() {
            return Err(PackageError::Manifest {
                path: dir.to_path_buf(),
                msg: "no such router package directory".into(),
            });
        }
        let text = fs::read_to_string(&mpath).map_err(io(&mpath))?;
        let merr = |msg: String| PackageError::Manifest {
            path: mpath.clone(),
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| merr(format!("not JSON: {e}")))?;
        if v.get("kind").and_then(|k| k.as_str()) != Some(KIND) {
            return Err(merr(format!(
                "not a router package manifest (kind is not {KIND:?})"
            )));
        }
        let version = v
            .get("format_version")
            .and_then(|k| k.as_u64())
            .unwrap_or(0);
        if version > FORMAT_VERSION as u64 {
            return Err(merr(format!(
                "format version {version} is newer than this drllm reads ({FORMAT_VERSION}); upgrade drllm"
            )));
        }
        let m: PackageManifest =
            serde_json::from_value(v).map_err(|e| merr(format!("malformed manifest: {e}")))?;
        if m.shape.num_layers == 0
            || m.shape.hidden_size == 0
            || m.shape.router_hidden == 0
            || m.windows == 0
        {
            return Err(merr("router sizes and windows must be positive".into()));
        }
        Ok(m)
    }

    /// Checks that the package fits a model (fingerprint, blocks, hidden size).
    pub fn check_model(
        &self,
        dir: &Path,
        fingerprints: &[&str],
        num_layers: usize,
        hidden_size: usize,
    ) -> Result<()> {
        let m = &self.manifest;
        let mis = |msg: String| PackageError::Mismatch {
            path: dir.to_path_buf(),
            msg,
        };
        let fingerprint = fingerprints.first().copied().unwrap_or_default();
        if !fingerprints.contains(&m.model_fingerprint.as_str()) {
            return Err(mis(format!(
                "trained for model {} (fingerprint {}), not this model (fingerprint {fingerprint})",
                m.model_name, m.model_fingerprint
            )));
        }
        if m.shape.num_layers != num_layers || m.shape.hidden_size != hidden_size {
            return Err(mis(format!(
                "routers for {} blocks of width {}, the model has {num_layers} of width {hidden_size}",
                m.shape.num_layers, m.shape.hidden_size
            )));
        }
        Ok(())
    }
}

/// Why a safetensors file is shorter than its own header says, if it is: libtorch's reader
/// reports a cut file as a parse failure ("MetadataIncompleteBuffer"), which does not tell
/// the user the file is incomplete.
fn truncation(path: &Path) -> Option<String> {
    let bytes = fs::read(path).ok()?;
    let len = bytes.len() as u64;
    let Some(head) = bytes.get(..8) else {
        return Some(format!("{len} bytes, less than the 8-byte header length"));
    };
    let n = u64::from_le_bytes(head.try_into().ok()?);
    // Beyond the format's own limit on the header (100 MB): not a safetensors file at all.
    if n > 100_000_000 {
        return None;
    }
    let Some(meta) = bytes.get(8..(8u64.checked_add(n)?).try_into().ok()?) else {
        return Some(format!(
            "the header announces {n} bytes of metadata after its first 8, the file holds {len} bytes"
        ));
    };
    let v: serde_json::Value = serde_json::from_slice(meta).ok()?;
    let end = v
        .as_object()?
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    (8 + n + end > len).then(|| {
        format!(
            "the tensors end at byte {} but the file holds {len} bytes",
            8 + n + end
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package() -> Package {
        tch::manual_seed(1);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let shape = RouterShape {
            num_layers: 4,
            hidden_size: 6,
            router_hidden: 5,
        };
        let routers = Routers::new(&vs.root(), shape).snapshot();
        let mut manifest = PackageManifest::new("fp".into(), "tiny".into(), shape, 8);
        manifest.label_counts = [3, 10, 1];
        Package { manifest, routers }
    }

    #[test]
    fn round_trip_reproduces_logits_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = package();
        let out = dir.path().join("pkg");
        pkg.save(&out).unwrap();
        // Saving again replaces the package.
        pkg.save(&out).unwrap();
        let back = Package::load(&out).unwrap();
        assert_eq!(
            back.manifest.weights_sha256.as_deref(),
            Some(sha256_file(&out.join(TENSORS)).unwrap().as_str())
        );
        assert_eq!(
            PackageManifest {
                weights_sha256: None,
                ..back.manifest.clone()
            },
            pkg.manifest
        );
        let x = Tensor::randn([3, 4, 8, 6], (tch::Kind::Float, tch::Device::Cpu));
        assert!(back.routers.forward(&x).equal(&pkg.routers.forward(&x)));
        // Stored in bf16: logits within bf16 rounding.
        let half = dir.path().join("half");
        pkg.save_as(&half, tch::Kind::BFloat16).unwrap();
        let stored = Tensor::read_safetensors(half.join(TENSORS)).unwrap();
        assert!(stored.iter().all(|(_, t)| t.kind() == tch::Kind::BFloat16));
        let h = Package::load(&half).unwrap();
        let d = (h.routers.forward(&x) - pkg.routers.forward(&x))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 0.05, "{d}");
        // The fingerprint names the weights: the same routers saved twice agree, other weights
        // (here bf16) differ.
        let fp = Package::fingerprint(&out).unwrap();
        assert_eq!(fp.len(), 24);
        assert_eq!(fp, Package::fingerprint(&out).unwrap());
        assert_ne!(fp, Package::fingerprint(&half).unwrap());
        fs::remove_dir_all(&half).unwrap();
        back.check_model(&out, &["fp"], 4, 6).unwrap();
        back.check_model(&out, &["new", "fp"], 4, 6).unwrap();
        let e = back
            .check_model(&out, &["other"], 4, 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("trained for model tiny (fingerprint fp)"), "{e}");
        let e = back
            .check_model(&out, &["fp"], 5, 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 blocks of width 6"), "{e}");
        // Nothing but the package is left in the parent.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["pkg"]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Fuzz tier: a package whose routers.safetensors or manifest.json has bytes
        /// overwritten or is cut short loads or is refused, never panics.
        #[test]
        fn mutated_packages_never_panic(
            muts in proptest::collection::vec((0usize..1 << 16, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..128,
            manifest in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("pkg");
            package().save(&out).unwrap();
            let file = out.join(if manifest { MANIFEST } else { TENSORS });
            let mut bytes = fs::read(&file).unwrap();
            let n = bytes.len();
            for (i, b) in muts {
                bytes[i % n] = b;
            }
            bytes.truncate(n.saturating_sub(cut));
            fs::write(&file, &bytes).unwrap();
            let _ = Package::load(&out);
        }
    }

    /// A package as drllm wrote it before it recorded the weights' checksum.
    fn without_checksum(dir: &Path) {
        let p = dir.join(MANIFEST);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("weights_sha256");
        fs::write(&p, v.to_string()).unwrap();
    }

    /// Weights edited after training, finite and of the right shapes (what the structural checks
    /// cannot see), are refused by the checksum, naming both hashes.
    #[test]
    fn edited_weights_are_refused_by_their_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = package();
        let out = dir.path().join("pkg");
        pkg.save(&out).unwrap();
        let named = pkg.routers.named_tensors();
        let _ = named[0].1.get(0).get(0).fill_(0.5);
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, out.join(TENSORS)).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(
            e.contains("routers.safetensors")
                && e.contains("the manifest recorded")
                && e.contains("edited or damaged"),
            "{e}"
        );
        // A package from before checksums loads with what it has.
        without_checksum(&out);
        Package::load(&out).unwrap();
    }

    #[test]
    fn damaged_packages_are_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = package();
        let out = dir.path().join("pkg");
        pkg.save(&out).unwrap();
        // The structural checks, as a package without a checksum meets them.
        without_checksum(&out);
        let tensors = out.join(TENSORS);
        // A renamed tensor.
        let mut named = pkg.routers.named_tensors();
        named[5].0 = "routers.1.fc1.bias_renamed".into();
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &tensors).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(
            e.contains("routers.1.fc1.bias is missing") && e.contains("routers.safetensors"),
            "{e}"
        );
        // An extra tensor.
        let mut named = pkg.routers.named_tensors();
        named.push((
            "extra".into(),
            Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
        ));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &tensors).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("unexpected tensor extra"), "{e}");
        // Non-finite weights.
        let named = pkg.routers.named_tensors();
        let _ = named[2].1.get(0).get(0).fill_(f64::NAN);
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &tensors).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("routers.0.fc2.weight holds NaN"), "{e}");
        // Cut short, in the tensors and in the header.
        pkg.save(&out).unwrap();
        without_checksum(&out);
        let full = fs::read(&tensors).unwrap();
        for cut in [full.len() / 2, 20] {
            fs::write(&tensors, &full[..cut]).unwrap();
            let e = Package::load(&out).unwrap_err().to_string();
            assert!(
                e.contains("routers.safetensors: truncated") && e.contains(&cut.to_string()),
                "{e}"
            );
        }
        // Garbage, and missing.
        fs::write(&tensors, b"not safetensors").unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        fs::remove_file(&tensors).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("routers.safetensors: missing"), "{e}");
        // A newer format, another kind, no manifest, no directory.
        let mpath = out.join(MANIFEST);
        let mut v = serde_json::to_value(&pkg.manifest).unwrap();
        v["format_version"] = 99.into();
        fs::write(&mpath, v.to_string()).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("format version 99 is newer"), "{e}");
        v["kind"] = "something".into();
        fs::write(&mpath, v.to_string()).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("not a router package manifest"), "{e}");
        fs::remove_file(&mpath).unwrap();
        let e = Package::load(&out).unwrap_err().to_string();
        assert!(e.contains("manifest.json"), "{e}");
        let e = Package::load(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such router package directory"), "{e}");
        // A directory that is not a package is never overwritten.
        let other = dir.path().join("data");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("keep.txt"), b"x").unwrap();
        let e = pkg.save(&other).unwrap_err().to_string();
        assert!(e.contains("is not a router package"), "{e}");
        assert!(other.join("keep.txt").exists());
    }
}
