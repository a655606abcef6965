//! One weight-source abstraction over memory-mapped safetensors (single or sharded) and GGUF, so
//! model code asks for tensors by their Hugging Face names and never branches on the file format.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{dequantize, GgmlType, GgufFile};

/// A source of named tensors (Hugging Face names, e.g. `model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource: Send + Sync {
    /// Human-readable description for error messages (the file or directory).
    fn describe(&self) -> String;
    /// Whether the tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// Loads a tensor converted to `kind` on `device`.
    fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor>;

    /// Loads a tensor and checks its shape.
    fn load_shaped(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let t = self.load(name, kind, device)?;
        if t.size() != shape {
            return Err(Error::ShapeMismatch {
                source_name: self.describe(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                got: t.size(),
            });
        }
        Ok(t)
    }
}

fn missing(src: &dyn WeightSource, name: &str) -> Error {
    Error::MissingTensor {
        source_name: src.describe(),
        tensor: name.to_string(),
    }
}

fn bytes_to_tensor(bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_data_size(bytes, shape, kind)?)
}

// ---------------------------------------------------------------------------------------------
// safetensors

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// name -> (dtype, shape, absolute byte range)
    tensors: HashMap<String, (safetensors::Dtype, Vec<i64>, std::ops::Range<usize>)>,
}

/// Memory-mapped safetensors files (a single `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`).
pub struct SafetensorsWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens the safetensors weights of a Hugging Face model directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::config(
                        index_path.display().to_string(),
                        "weight_map",
                        "missing or not an object",
                    )
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::bad_file(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ));
            }
            vec![single]
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map of a weights file (see GgufFile::open).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::bad_file(&path, format!("invalid safetensors header: {e}")))?;
            let base = 8 + header_len;
            let mut tensors = HashMap::new();
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let shape = info.shape.iter().map(|&d| d as i64).collect();
                tensors.insert(name.clone(), (info.dtype, shape, base + s..base + e));
                index.insert(name, shards.len());
            }
            shards.push(Shard {
                path,
                mmap,
                tensors,
            });
        }
        Ok(SafetensorsWeights {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let shard = &self.shards[*self.index.get(name).ok_or_else(|| missing(self, name))?];
        let (dtype, shape, range) = &shard.tensors[name];
        let src_kind = match dtype {
            safetensors::Dtype::F32 => Kind::Float,
            safetensors::Dtype::F16 => Kind::Half,
            safetensors::Dtype::BF16 => Kind::BFloat16,
            safetensors::Dtype::F64 => Kind::Double,
            other => {
                return Err(Error::bad_file(
                    &shard.path,
                    format!("tensor {name} has dtype {other:?}; expected F32, F16, BF16 or F64"),
                ))
            }
        };
        let t = bytes_to_tensor(&shard.mmap[range.clone()], shape, src_kind)?;
        Ok(t.f_to_kind(kind)?.f_to_device(device)?)
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// Tensors of a GGUF file under their Hugging Face names, dequantized on load. For LLaMA-arch
/// files, llama.cpp's convert script permuted the rows of q/k projections (interleaved rotary
/// halves); that permutation is undone here so a single RoPE implementation serves both formats.
pub struct GgufWeights {
    file: std::sync::Arc<GgufFile>,
    /// Heads for q and kv heads for k, when the rows must be un-permuted (LLaMA only).
    unpermute: Option<(i64, i64)>,
    /// Four norms per block under llama.cpp's names for them (Gemma 3).
    sandwich_norms: bool,
    /// llama.cpp stored the norm weights of a `1 + w` family with the 1 added: it is taken off
    /// again (in f32, as transformers does), so both formats give the model `w`.
    norms_one_added: bool,
}

impl GgufWeights {
    /// Wraps a parsed GGUF file of a model of `family`: `unpermute` = (n_heads, n_kv_heads) for
    /// LLaMA-architecture files.
    pub fn new(
        file: std::sync::Arc<GgufFile>,
        family: &crate::config::Family,
        unpermute: Option<(i64, i64)>,
    ) -> Self {
        GgufWeights {
            file,
            unpermute,
            sandwich_norms: family.sandwich_norms,
            norms_one_added: family.norm_one_plus,
        }
    }

    /// Maps a Hugging Face tensor name to its llama.cpp name (`sandwich_norms`: a Gemma 3
    /// block's four norms).
    pub fn gguf_name(hf: &str, sandwich_norms: bool) -> Option<String> {
        match hf {
            "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
            "model.norm.weight" => return Some("output_norm.weight".into()),
            "lm_head.weight" => return Some("output.weight".into()),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (idx, tail) = rest.split_once('.')?;
        idx.parse::<usize>().ok()?;
        let (module, suffix) = tail.rsplit_once('.')?;
        let g = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" if sandwich_norms => "post_attention_norm",
            "pre_feedforward_layernorm" if sandwich_norms => "ffn_norm",
            "post_feedforward_layernorm" if sandwich_norms => "post_ffw_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{idx}.{g}.{suffix}"))
    }
}

/// Undoes llama.cpp's `permute(w, n_head)` on the rows (dim 0) of a q/k weight or bias.
fn unpermute_rows(t: &Tensor, n_head: i64) -> Result<Tensor> {
    let size = t.size();
    let rows = size[0];
    let rest: Vec<i64> = size[1..].to_vec();
    let mut shape = vec![n_head, rows / n_head / 2, 2];
    shape.extend(&rest);
    Ok(t.f_reshape(shape.as_slice())?
        .f_transpose(1, 2)?
        .f_reshape(size.as_slice())?)
}

impl WeightSource for GgufWeights {
    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name, self.sandwich_norms)
            .is_some_and(|g| self.file.tensors.contains_key(&g))
    }
    fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let gname =
            Self::gguf_name(name, self.sandwich_norms).ok_or_else(|| missing(self, name))?;
        let info = self
            .file
            .tensors
            .get(&gname)
            .ok_or_else(|| missing(self, name))?;
        let bytes = self.file.tensor_bytes(info);
        let shape = info.shape();
        let t = match info.ty {
            GgmlType::F32 => bytes_to_tensor(bytes, &shape, Kind::Float)?,
            GgmlType::F16 => bytes_to_tensor(bytes, &shape, Kind::Half)?,
            GgmlType::BF16 => bytes_to_tensor(bytes, &shape, Kind::BFloat16)?,
            ty => Tensor::f_from_slice(&dequantize(ty, bytes))?.f_reshape(shape.as_slice())?,
        };
        let t = match self.unpermute {
            Some((n_head, _))
                if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") =>
            {
                unpermute_rows(&t, n_head)?
            }
            Some((_, n_kv))
                if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") =>
            {
                unpermute_rows(&t, n_kv)?
            }
            _ if self.norms_one_added && gname.ends_with("norm.weight") => {
                t.f_to_kind(Kind::Float)? - 1.0
            }
            _ => t,
        };
        Ok(t.f_to_kind(kind)?.f_to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_to_gguf_names() {
        assert_eq!(
            GgufWeights::gguf_name("model.layers.12.self_attn.k_proj.bias", false).unwrap(),
            "blk.12.attn_k.bias"
        );
        assert_eq!(
            GgufWeights::gguf_name("model.layers.0.mlp.down_proj.weight", false).unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(
            GgufWeights::gguf_name("model.embed_tokens.weight", false).unwrap(),
            "token_embd.weight"
        );
        assert!(GgufWeights::gguf_name("model.layers.x.mlp.down_proj.weight", false).is_none());
        assert!(GgufWeights::gguf_name("model.layers.1.foo.weight", false).is_none());
        // A Gemma 3 block's four norms, and the same HF name in a LLaMA block.
        let n = |hf: &str, sandwich| GgufWeights::gguf_name(hf, sandwich).unwrap();
        let post = "model.layers.3.post_attention_layernorm.weight";
        assert_eq!(n(post, false), "blk.3.ffn_norm.weight");
        assert_eq!(n(post, true), "blk.3.post_attention_norm.weight");
        assert_eq!(
            n("model.layers.3.pre_feedforward_layernorm.weight", true),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(
            n("model.layers.3.post_feedforward_layernorm.weight", true),
            "blk.3.post_ffw_norm.weight"
        );
        assert!(
            GgufWeights::gguf_name("model.layers.3.pre_feedforward_layernorm.weight", false)
                .is_none()
        );
    }

    /// llama.cpp's permutation (convert_hf_to_gguf.py) followed by ours is the identity.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (n_head, head_dim, cols) = (3i64, 8i64, 5i64);
        let w = Tensor::arange(n_head * head_dim * cols, (Kind::Float, Device::Cpu))
            .reshape([n_head * head_dim, cols]);
        // permute: reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2).reshape(shape)
        let permuted = w
            .reshape([n_head, 2, head_dim / 2, cols])
            .transpose(1, 2)
            .reshape([n_head * head_dim, cols]);
        let back = unpermute_rows(&permuted, n_head).unwrap();
        assert!(back.equal(&w));
    }
}
