//! The feature pass: the frozen model runs each example's prompt along its gold path once, and
//! the hidden state entering every block is mean-pooled over windows. Under teacher forcing these
//! inputs do not depend on the routers, so they are computed once, cached on disk, and every
//! epoch (and every later run with other hyper-parameters) trains on the cache alone.

use std::path::PathBuf;

use drllm_path::LayerPath;
use drllm_router::pool_windows;
use drllm_runtime::{LoadedModel, PathBatch};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::examples::Example;
use crate::trainer::TrainError;

/// Router inputs and labels of a set of examples.
#[derive(Debug)]
pub struct Features {
    /// `[L, N, W, H]` pooled hidden states entering each block, block-major (a batch of examples
    /// is then one matrix per block without a copy); f32 or bf16, CPU.
    pub x: Tensor,
    /// `[N, L]` gold counts (int64).
    pub labels: Tensor,
    /// `[N, L, 3]` soft targets (f32, each block's row sums to 1) that the loss uses instead of
    /// `labels` when present (`drllm-train --targets search`); metrics still read `labels`.
    pub targets: Option<Tensor>,
}

impl Features {
    /// Examples held.
    pub fn len(&self) -> usize {
        self.x.size()[1] as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `idx`.
    pub fn select(&self, idx: &[usize]) -> Features {
        let i = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
        Features {
            x: self.x.index_select(1, &i),
            labels: self.labels.index_select(0, &i),
            targets: self.targets.as_ref().map(|t| t.index_select(0, &i)),
        }
    }
}

/// Where extracted features are kept between runs.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    /// Directory of `<key>.safetensors` files.
    pub dir: PathBuf,
}

impl FeatureCache {
    /// The cache key: model fingerprint, window count and every example (id, prompt, path).
    pub fn key(fingerprint: &str, windows: usize, examples: &[Example]) -> String {
        let mut h = Sha256::new();
        h.update(b"drllm-features-v2\0");
        h.update(fingerprint.as_bytes());
        h.update((windows as u64).to_le_bytes());
        for e in examples {
            for part in [
                e.task.as_bytes(),
                e.sample_id.as_bytes(),
                e.prompt.as_bytes(),
                &e.path,
            ] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            h.update([e.add_special as u8]);
        }
        h.finalize()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The file of `key`.
    pub fn file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// Cached features of `key`, if present and readable (a damaged file is ignored and
    /// recomputed).
    pub fn get(
        &self,
        key: &str,
        n: usize,
        num_layers: usize,
        windows: usize,
        hidden: usize,
    ) -> Option<Features> {
        let path = self.file(key);
        if !path.is_file() {
            return None;
        }
        let named = match Tensor::read_safetensors(&path) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable feature cache; recomputing");
                return None;
            }
        };
        let mut x = None;
        let mut labels = None;
        for (name, t) in named {
            match name.as_str() {
                "features" => x = Some(t),
                "labels" => labels = Some(t),
                _ => {}
            }
        }
        let (x, labels) = (x?, labels?);
        let s = x.size();
        let ok = s.len() == 4
            && s[0] as usize == num_layers
            && s[1] as usize == n
            && s[2] as usize == windows
            && s[3] as usize == hidden
            && labels.size() == [n as i64, num_layers as i64];
        if !ok {
            tracing::warn!(path = %path.display(), "feature cache of another shape; recomputing");
            return None;
        }
        Some(Features {
            x: x.to_kind(Kind::Float),
            labels: labels.to_kind(Kind::Int64),
            targets: None,
        })
    }

    /// Stores features under `key` (written to a temporary file, then renamed).
    pub fn put(&self, key: &str, f: &Features) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let path = self.file(key);
        let tmp = self.dir.join(format!(".{key}.tmp-{}", std::process::id()));
        Tensor::write_safetensors(&[("features", &f.x), ("labels", &f.labels)], &tmp).map_err(
            |e| TrainError::Io {
                path: tmp.clone(),
                msg: e.to_string(),
            },
        )?;
        std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))
    }
}

/// Pools the router inputs of every example (`batch_size` prompts per forward pass, grouped by
/// length). `on_batch(done)` reports progress. Callers cache the result with [`FeatureCache`].
pub fn extract_features(
    lm: &LoadedModel,
    examples: &[Example],
    windows: usize,
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Features, TrainError> {
    let n_layers = lm.model.num_layers();
    let hidden = lm.model.cfg.hidden_size;
    let ctx = lm.model.cfg.max_position_embeddings as usize;
    let mut ids = Vec::with_capacity(examples.len());
    for e in examples {
        let t = lm
            .tokenizer
            .encode(&e.prompt, e.add_special)
            .map_err(|err| TrainError::Example {
                sample_id: e.sample_id.clone(),
                msg: format!("cannot tokenize the prompt: {err}"),
            })?;
        if t.is_empty() || t.len() > ctx {
            return Err(TrainError::Example {
                sample_id: e.sample_id.clone(),
                msg: format!("prompt of {} tokens (the model takes 1..={ctx})", t.len()),
            });
        }
        ids.push(t);
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut x = Tensor::zeros(
        [
            n_layers as i64,
            examples.len() as i64,
            windows as i64,
            hidden,
        ],
        (Kind::Float, Device::Cpu),
    );
    let _g = tch::no_grad_guard();
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        let paths: Vec<LayerPath> = chunk
            .iter()
            .map(|&i| LayerPath::from_counts(examples[i].path.clone()))
            .collect::<Result<_, _>>()?;
        let mut batch = PathBatch::new(&lm.model, &paths)?;
        let inputs = batch.prefill_block_inputs(&prompts)?;
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let pooled: Vec<Tensor> = inputs
            .iter()
            .map(|h| pool_windows(h, &lens, windows))
            .collect();
        // [L, B, W, H] into the columns of this chunk.
        let stacked = Tensor::stack(&pooled, 0).to_device(Device::Cpu);
        let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let _ = x.index_copy_(1, &idx, &stacked);
        done += chunk.len();
        on_batch(done);
    }
    let finite = x
        .isfinite()
        .transpose(0, 1)
        .flatten(1, -1)
        .all_dim(1, false);
    let finite: Vec<bool> = Vec::try_from(&finite).unwrap_or_default();
    if let Some(i) = finite.iter().position(|&f| !f) {
        return Err(TrainError::Example {
            sample_id: examples[i].sample_id.clone(),
            msg: "its hidden states hold NaN or infinite values (try --dtype f32)".into(),
        });
    }
    let labels: Vec<i64> = examples
        .iter()
        .flat_map(|e| e.path.iter().map(|&c| c as i64))
        .collect();
    let labels = Tensor::from_slice(&labels).view([examples.len() as i64, n_layers as i64]);
    Ok(Features {
        x,
        labels,
        targets: None,
    })
}

/// The default feature cache: `$DRLLM_CACHE/features` (see `drllm_runtime::cache_dir`).
pub fn default_cache_dir() -> PathBuf {
    drllm_runtime::loader::cache_dir().join("features")
}
