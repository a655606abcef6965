//! Resolving what the user typed after `--model` (a directory, a `.gguf` file, `embedded`, or a
//! Hugging Face repo id in the local cache) and loading model + tokenizer from it.
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use tch::{Device, Kind};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufWeights, SafetensorsWeights};

/// File name of the embedded default model inside the cache directory.
pub const EMBEDDED_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

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

fn hf_cache_dirs() -> Vec<PathBuf> {
    let mut v = vec![];
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        v.push(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("HF_HOME") {
        v.push(PathBuf::from(d).join("hub"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        v.push(PathBuf::from(h).join(".cache/huggingface/hub"));
    }
    v
}

impl ModelSource {
    /// The model's configuration, read without loading weights.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::HfDir(dir) => ModelConfig::from_hf_json(&dir.join("config.json")),
            ModelSource::Gguf(path) => ModelConfig::from_gguf(&GgufFile::open(path)?),
        }
    }

    /// A short name: the directory or file name without extension.
    pub fn name(&self) -> String {
        let p = match self {
            ModelSource::HfDir(d) => d.as_path(),
            ModelSource::Gguf(f) => f.as_path(),
        };
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    }

    /// Identifies the model's files across machines without reading all of them: SHA-256 over
    /// each file's name, size, first and last MiB (config, tokenizer and weights; GGUF headers
    /// hold the metadata and tensor table). Coordinator and workers compare it before any work.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek, SeekFrom};
        let files: Vec<PathBuf> = match self {
            ModelSource::Gguf(f) => vec![f.clone()],
            ModelSource::HfDir(d) => {
                let mut v: Vec<PathBuf> = std::fs::read_dir(d)
                    .map_err(|e| Error::io(d, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        n == "config.json" || n == "tokenizer.json" || n.ends_with(".safetensors")
                    })
                    .collect();
                v.sort();
                v
            }
        };
        let mut h = Sha256::new();
        const MIB: u64 = 1 << 20;
        for f in &files {
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

    /// Resolves a `--model` argument.
    pub fn resolve(spec: &str) -> Result<Self> {
        Self::resolve_in(spec, &hf_cache_dirs())
    }

    /// Resolves a `--model` argument, looking up repo ids in the given Hugging Face hub caches.
    pub fn resolve_in(spec: &str, hf_caches: &[PathBuf]) -> Result<Self> {
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
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelSource::HfDir(path.to_path_buf()));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelSource::Gguf(one.clone())),
                [] => Err(err(
                    "directory has neither config.json (Hugging Face layout) nor a .gguf file"
                        .into(),
                )),
                _ => Err(err(format!(
                    "directory holds {} .gguf files; name one",
                    ggufs.len()
                ))),
            };
        }
        // A repo id such as "HuggingFaceTB/SmolLM2-135M-Instruct": look in the local HF cache.
        if let Some((org, name)) = spec.split_once('/') {
            if !org.is_empty() && !name.is_empty() && !name.contains('/') {
                for cache in hf_caches {
                    let repo = cache.join(format!("models--{org}--{name}"));
                    let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) else {
                        continue;
                    };
                    let snap = repo.join("snapshots").join(rev.trim());
                    if snap.join("config.json").is_file() {
                        return Ok(ModelSource::HfDir(snap));
                    }
                }
                return Err(err(format!(
                    "no such file or directory, and not in the local Hugging Face cache (looked in {}); download it first, we load offline",
                    hf_caches.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Err(err("no such file or directory (expected a model directory, a .gguf file, `embedded`, or a cached repo id)".into()))
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
                let unpermute = cfg
                    .arch
                    .family()
                    .gguf_permuted_qk
                    .then_some((cfg.num_heads, cfg.num_kv_heads));
                let ws = GgufWeights::new(file.clone(), unpermute);
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

    #[test]
    fn resolves_repo_ids_from_the_hub_cache_offline() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache
            .path()
            .join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let caches = [
            PathBuf::from("/nonexistent-cache"),
            cache.path().to_path_buf(),
        ];
        let got = ModelSource::resolve_in("HuggingFaceTB/SmolLM2-135M-Instruct", &caches).unwrap();
        assert_eq!(got, ModelSource::HfDir(snap));
        let msg = ModelSource::resolve_in("HuggingFaceTB/Other", &caches)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("not in the local Hugging Face cache")
                && msg.contains("/nonexistent-cache"),
            "{msg}"
        );
    }

    #[test]
    fn resolves_directories_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let msg = ModelSource::resolve_in(dir.path().to_str().unwrap(), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("neither config.json"), "{msg}");
        std::fs::write(dir.path().join("a.gguf"), b"").unwrap();
        let got = ModelSource::resolve_in(dir.path().to_str().unwrap(), &[]).unwrap();
        assert_eq!(got, ModelSource::Gguf(dir.path().join("a.gguf")));
        std::fs::write(dir.path().join("b.gguf"), b"").unwrap();
        let msg = ModelSource::resolve_in(dir.path().to_str().unwrap(), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("2 .gguf files"), "{msg}");
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let got = ModelSource::resolve_in(dir.path().to_str().unwrap(), &[]).unwrap();
        assert_eq!(got, ModelSource::HfDir(dir.path().to_path_buf()));
    }
}
