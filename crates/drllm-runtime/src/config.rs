//! Model configuration: the fields of Hugging Face `config.json` we use (LlamaConfig,
//! Qwen2Config, Qwen3Config, GemmaConfig, Gemma3TextConfig), also built from GGUF metadata so both formats give one
//! struct.
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Decoder architectures we run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA 2/3/3.x, SmolLM: no biases unless `attention_bias`.
    Llama,
    /// Qwen2/2.5: q/k/v projections carry biases.
    Qwen2,
    /// Qwen3: RMS norms on q and k per head.
    Qwen3,
    /// Gemma (1): norms scale by 1 + w, embeddings by sqrt(hidden), GELU (tanh) MLP.
    Gemma,
    /// Gemma 3 (text): Gemma's traits, q/k norms, norms after attention and MLP too, local
    /// sliding-window blocks interleaved with global ones.
    Gemma3,
}

/// The MLP's gate activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// SiLU (LLaMA, Qwen).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, `gelu_new`; Gemma).
    GeluTanh,
    /// Exact (erf) GELU (`gelu`).
    Gelu,
}

impl Act {
    fn parse(source: &str, v: &str) -> Result<Self> {
        match v {
            "silu" | "swish" => Ok(Act::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Act::GeluTanh),
            "gelu" => Ok(Act::Gelu),
            other => Err(Error::Unsupported {
                source_name: source.to_string(),
                key: "hidden_act".into(),
                value: other.to_string(),
                supported: "silu, swish, gelu, gelu_pytorch_tanh, gelu_new".into(),
            }),
        }
    }
}

/// What sets a model family's block apart from the LLaMA block, in one place: adding a family
/// that differs in these ways is one more row of [`FAMILIES`].
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The architecture.
    pub arch: Arch,
    /// Its names in `config.json`'s `model_type` and GGUF's `general.architecture`.
    pub names: &'static [&'static str],
    /// q/k/v projections always carry biases (else only with `attention_bias`).
    pub qkv_bias: bool,
    /// An RMS norm on q and on k per head before RoPE.
    pub qk_norm: bool,
    /// llama.cpp stores q and k rows permuted for its RoPE layout (undone on load).
    pub gguf_permuted_qk: bool,
    /// GGUF files of this family are read (else only Hugging Face directories, refused with
    /// a message saying so).
    pub gguf: bool,
    /// RMS norm weights `w` scale as `1 + w`, applied in f32 before the cast back (Gemma).
    pub norm_one_plus: bool,
    /// Token embeddings are multiplied by sqrt(hidden_size), rounded to the model's dtype.
    pub embed_scale: bool,
    /// The MLP activation when `config.json` names none (and always for GGUF).
    pub act: Act,
    /// Whether the LM head is the embedding matrix when `config.json` does not say
    /// (transformers omits `tie_word_embeddings` when it equals the family's default).
    pub tied_embeddings: bool,
    /// Four norms per block: the attention's and the MLP's outputs are normed too before their
    /// residual adds, and the MLP's input norm is `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Local (sliding-window) blocks interleaved with global ones, each kind with its own RoPE
    /// base, and queries scaled by `query_pre_attn_scalar` (see [`LocalAttention`]).
    pub local_global: bool,
    /// The family underperforms without a BOS token, so cloze scoring adds it where other
    /// families' prompts get no special tokens: lm-evaluation-harness's `hf` backend encodes
    /// with the tokenizer's defaults, which prepend it for Gemma (and earlier versions forced it
    /// for every `gemma*` model type).
    pub needs_bos: bool,
}

/// Every family drllm runs, in the order of [`Arch`]'s variants.
pub const FAMILIES: [Family; 5] = [
    Family {
        arch: Arch::Llama,
        names: &["llama", "smollm", "mistral"],
        qkv_bias: false,
        qk_norm: false,
        gguf_permuted_qk: true,
        gguf: true,
        norm_one_plus: false,
        embed_scale: false,
        act: Act::Silu,
        tied_embeddings: false,
        sandwich_norms: false,
        local_global: false,
        needs_bos: false,
    },
    Family {
        arch: Arch::Qwen2,
        names: &["qwen2"],
        qkv_bias: true,
        qk_norm: false,
        gguf_permuted_qk: false,
        gguf: true,
        norm_one_plus: false,
        embed_scale: false,
        act: Act::Silu,
        tied_embeddings: false,
        sandwich_norms: false,
        local_global: false,
        needs_bos: false,
    },
    Family {
        arch: Arch::Qwen3,
        names: &["qwen3"],
        qkv_bias: false,
        qk_norm: true,
        gguf_permuted_qk: false,
        gguf: true,
        norm_one_plus: false,
        embed_scale: false,
        act: Act::Silu,
        tied_embeddings: false,
        sandwich_norms: false,
        local_global: false,
        needs_bos: false,
    },
    // llama.cpp's Gemma (1) files are not read yet.
    Family {
        arch: Arch::Gemma,
        names: &["gemma"],
        qkv_bias: false,
        qk_norm: false,
        gguf_permuted_qk: false,
        gguf: false,
        norm_one_plus: true,
        embed_scale: true,
        act: Act::GeluTanh,
        tied_embeddings: true,
        sandwich_norms: false,
        local_global: false,
        needs_bos: true,
    },
    Family {
        arch: Arch::Gemma3,
        names: &["gemma3_text", "gemma3"],
        qkv_bias: false,
        qk_norm: true,
        gguf_permuted_qk: false,
        gguf: true,
        norm_one_plus: true,
        embed_scale: true,
        act: Act::GeluTanh,
        tied_embeddings: true,
        sandwich_norms: true,
        local_global: true,
        needs_bos: true,
    },
];

impl Arch {
    /// The family named `v` in `source` (`gguf`: among those whose GGUF files are read).
    fn parse(source: &str, key: &str, v: &str, gguf: bool) -> Result<Self> {
        let readable = || FAMILIES.iter().filter(|f| f.gguf || !gguf);
        readable()
            .find(|f| f.names.contains(&v))
            .map(|f| f.arch)
            .ok_or_else(|| Error::Unsupported {
                source_name: source.to_string(),
                key: key.to_string(),
                value: v.to_string(),
                supported: readable()
                    .flat_map(|f| f.names.iter().copied())
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if gguf && FAMILIES.iter().any(|f| !f.gguf) {
                        " (GGUF files; also the Hugging Face directories of others)"
                    } else {
                        ""
                    },
            })
    }

    /// The family's block traits.
    pub fn family(self) -> &'static Family {
        // Rows are in variant order (checked by a test).
        &FAMILIES[self as usize]
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` with `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// LLaMA-3.1/3.2 frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor` (Gemma 3's global blocks from 4B up).
    Linear {
        /// The divisor.
        factor: f64,
    },
}

/// Local attention interleaved with global attention (Gemma 3): a local block's query sees the
/// keys fewer than `window` positions back (itself included), and its RoPE has its own base.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAttention {
    /// Sliding-window length in positions.
    pub window: i64,
    /// Which blocks are local, one entry per block (the others attend to every key).
    pub layers: Vec<bool>,
    /// RoPE base of the local blocks (the global ones use [`ModelConfig::rope_theta`]).
    pub rope_theta: f64,
}

/// The resolved configuration of a decoder model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Hidden size.
    pub hidden_size: i64,
    /// MLP inner size.
    pub intermediate_size: i64,
    /// Number of decoder blocks (L).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads (GQA).
    pub num_kv_heads: i64,
    /// Per-head dimension.
    pub head_dim: i64,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether the LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v (and o, for llama `attention_bias`) carry biases.
    pub attention_bias: bool,
    /// The MLP activation.
    pub act: Act,
    /// Context length.
    pub max_position_embeddings: i64,
    /// End-of-sequence ids from the config, if any.
    pub eos_token_ids: Vec<i64>,
    /// Beginning-of-sequence id from the config, if any.
    pub bos_token_id: Option<i64>,
    /// Local sliding-window blocks, for families that interleave them with global ones.
    pub local_attention: Option<LocalAttention>,
    /// The attention's query scale when it is not `head_dim^-0.5` (Gemma 3's
    /// `query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f64>,
}

#[derive(Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    type_: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    /// transformers >= 5 writes RoPE settings here (per layer type for Gemma 3).
    rope_parameters: Option<serde_json::Value>,
    rope_local_base_freq: Option<f64>,
    sliding_window: Option<i64>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
}

/// Token ids given as a number or a list of numbers.
pub(crate) fn ids_of(v: &serde_json::Value) -> Vec<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

fn parse_rope(source: &str, key: &str, r: &RawRope) -> Result<RopeScaling> {
    let ty = r
        .rope_type
        .as_deref()
        .or(r.type_.as_deref())
        .unwrap_or("default");
    match ty {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: r.factor.ok_or_else(|| {
                Error::config(
                    source,
                    format!("{key}.factor"),
                    "required for rope_type linear",
                )
            })?,
        }),
        "llama3" => {
            let need = |v: Option<f64>, k: &str| {
                v.ok_or_else(|| {
                    Error::config(
                        source,
                        format!("{key}.{k}"),
                        "required for rope_type llama3",
                    )
                })
            };
            Ok(RopeScaling::Llama3 {
                factor: need(r.factor, "factor")?,
                low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: need(
                    r.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            })
        }
        other => Err(Error::Unsupported {
            source_name: source.to_string(),
            key: format!("{key}.rope_type"),
            value: other.to_string(),
            supported: "default, linear, llama3".into(),
        }),
    }
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: RawConfig = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("invalid config JSON: {e}")))?;
        let src = path.display().to_string();
        let req = |v: Option<i64>, k: &str| {
            v.ok_or_else(|| Error::config(&src, k, "required key is missing"))
        };
        let model_type = raw
            .model_type
            .as_deref()
            .ok_or_else(|| Error::config(&src, "model_type", "required key is missing"))?;
        let arch = Arch::parse(&src, "model_type", model_type, false)?;
        let family = arch.family();
        let hidden_size = req(raw.hidden_size, "hidden_size")?;
        let num_heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let num_layers = raw
            .num_hidden_layers
            .ok_or_else(|| Error::config(&src, "num_hidden_layers", "required key is missing"))?;
        for (k, v) in [
            ("attn_logit_softcapping", raw.attn_logit_softcapping),
            ("final_logit_softcapping", raw.final_logit_softcapping),
        ] {
            if let Some(v) = v {
                return Err(Error::Unsupported {
                    source_name: src.clone(),
                    key: k.into(),
                    value: v.to_string(),
                    supported: "null (logit soft-capping is not implemented)".into(),
                });
            }
        }
        if raw.use_bidirectional_attention == Some(true) {
            return Err(Error::Unsupported {
                source_name: src.clone(),
                key: "use_bidirectional_attention".into(),
                value: "true".into(),
                supported: "false (a decoder's causal attention)".into(),
            });
        }
        // Gemma 3 keeps a RoPE setting per layer type; the others one for every block.
        let rope_of = |v: &serde_json::Value, key: &str| -> Result<RawRope> {
            serde_json::from_value(v.clone())
                .map_err(|e| Error::config(&src, key, format!("invalid RoPE settings: {e}")))
        };
        let per_type = raw
            .rope_parameters
            .as_ref()
            .filter(|v| v.get("full_attention").is_some() || v.get("sliding_attention").is_some());
        let (global_key, global_rope, local_rope) = match (per_type, &raw.rope_parameters) {
            (Some(v), _) => {
                let sub = |t: &str| {
                    v.get(t)
                        .map(|x| rope_of(x, &format!("rope_parameters.{t}")))
                        .transpose()
                };
                (
                    "rope_parameters.full_attention",
                    sub("full_attention")?,
                    sub("sliding_attention")?,
                )
            }
            (None, Some(v)) => (
                "rope_parameters",
                Some(rope_of(v, "rope_parameters")?),
                None,
            ),
            (None, None) => ("rope_scaling", raw.rope_scaling, None),
        };
        // Gemma 3's defaults: global base 1e6, local base 1e4.
        let default_theta = if family.local_global { 1e6 } else { 10000.0 };
        let rope_theta = global_rope
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(default_theta);
        let rope_scaling = match &global_rope {
            Some(r) => parse_rope(&src, global_key, r)?,
            None => RopeScaling::None,
        };
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_heads.max(1));
        let (local_attention, attn_scale) = if family.local_global {
            let key = "rope_parameters.sliding_attention";
            if let Some(r) = &local_rope {
                if parse_rope(&src, key, r)? != RopeScaling::None {
                    return Err(Error::config(
                        &src,
                        key,
                        "local blocks take default RoPE only",
                    ));
                }
            }
            let local_theta = local_rope
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(raw.rope_local_base_freq)
                .unwrap_or(10000.0);
            let layers = match &raw.layer_types {
                Some(types) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(Error::Unsupported {
                            source_name: src.clone(),
                            key: "layer_types".into(),
                            value: other.to_string(),
                            supported: "sliding_attention, full_attention".into(),
                        }),
                    })
                    .collect::<Result<Vec<bool>>>()?,
                None => {
                    let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
                    (0..num_layers).map(|i| (i + 1) % pattern != 0).collect()
                }
            };
            let window = raw
                .sliding_window
                .ok_or_else(|| Error::config(&src, "sliding_window", "required key is missing"))?;
            let scalar = raw.query_pre_attn_scalar.unwrap_or(head_dim as f64);
            (
                Some(LocalAttention {
                    window,
                    layers,
                    rope_theta: local_theta,
                }),
                Some(scalar.powf(-0.5)),
            )
        } else {
            (None, None)
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            vocab_size: req(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(family.tied_embeddings),
            attention_bias: family.qkv_bias || raw.attention_bias.unwrap_or(false),
            act: match &raw.hidden_act {
                Some(a) => Act::parse(&src, a)?,
                None => family.act,
            },
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            eos_token_ids: raw.eos_token_id.as_ref().map(ids_of).unwrap_or_default(),
            bos_token_id: raw
                .bos_token_id
                .as_ref()
                .and_then(|v| ids_of(v).first().copied()),
            local_attention,
            attn_scale,
        };
        cfg.validate(&src)?;
        Ok(cfg)
    }

    /// Builds the configuration from GGUF metadata (`general.architecture`, `{arch}.*`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let src = g.path().display().to_string();
        let arch_name = g.get_str("general.architecture")?;
        let arch = Arch::parse(&src, "general.architecture", arch_name, true)?;
        let k = |s: &str| format!("{arch_name}.{s}");
        let int = |s: &str| g.get_u64(&k(s)).map(|v| v as i64);
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let vocab_size = match g.metadata.get(&k("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as i64,
            None => g
                .get("tokenizer.ggml.tokens")?
                .as_array()
                .map(|a| a.len() as i64)
                .unwrap_or(0),
        };
        let head_dim = match g
            .metadata
            .get(&k("attention.key_length"))
            .and_then(|v| v.as_u64())
        {
            Some(v) => v as i64,
            None => hidden_size / num_heads.max(1),
        };
        let num_layers = int("block_count")? as usize;
        // llama.cpp's rules for Gemma 3 files, which store neither the layer pattern nor the
        // local RoPE base nor the query scale: every sixth block global, local base 1e4, queries
        // scaled by head_dim^-0.5 (hidden / heads for the 27B model's 62 blocks).
        let (local_attention, attn_scale) = if arch.family().local_global {
            let scalar = if num_layers == 62 {
                hidden_size / num_heads.max(1)
            } else {
                head_dim
            };
            (
                Some(LocalAttention {
                    window: int("attention.sliding_window")?,
                    layers: (0..num_layers).map(|i| (i + 1) % 6 != 0).collect(),
                    rope_theta: 10000.0,
                }),
                Some((scalar as f64).powf(-0.5)),
            )
        } else {
            (None, None)
        };
        let rope_scaling = match g
            .metadata
            .get(&k("rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g.get_f64(&k("rope.scaling.factor"))?,
            },
            // llama.cpp stores LLaMA-3 scaling as a precomputed `rope_freqs.weight` tensor,
            // which the model applies when present.
            Some(_) if g.tensors.contains_key("rope_freqs.weight") => RopeScaling::None,
            Some(other) => {
                return Err(Error::Unsupported {
                    source_name: src.clone(),
                    key: k("rope.scaling.type"),
                    value: other.to_string(),
                    supported: "none, linear".into(),
                })
            }
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            vocab_size,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: !g.tensors.contains_key("output.weight"),
            attention_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            act: arch.family().act,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            eos_token_ids: vec![],
            bos_token_id: None,
            local_attention,
            attn_scale,
        };
        cfg.validate(&src)?;
        Ok(cfg)
    }

    fn validate(&self, src: &str) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_layers as i64),
        ];
        for (k, v) in positive {
            if v <= 0 {
                return Err(Error::config(src, k, format!("must be positive, got {v}")));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::config(
                src,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if let Some(local) = &self.local_attention {
            if local.layers.len() != self.num_layers {
                return Err(Error::config(
                    src,
                    "layer_types",
                    format!(
                        "{} entries for {} blocks",
                        local.layers.len(),
                        self.num_layers
                    ),
                ));
            }
            if local.window <= 0 {
                return Err(Error::config(
                    src,
                    "sliding_window",
                    format!("must be positive, got {}", local.window),
                ));
            }
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::config(
                src,
                "head_dim",
                format!("must be even for RoPE, got {}", self.head_dim),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arch_has_one_family_row() {
        for arch in [
            Arch::Llama,
            Arch::Qwen2,
            Arch::Qwen3,
            Arch::Gemma,
            Arch::Gemma3,
        ] {
            assert_eq!(FAMILIES.iter().filter(|f| f.arch == arch).count(), 1);
            assert_eq!(arch.family().arch, arch);
            for name in arch.family().names {
                assert_eq!(Arch::parse("x", "model_type", name, false).unwrap(), arch);
            }
        }
        let err = Arch::parse("x", "model_type", "gemma2", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gemma2") && err.contains("qwen3"), "{err}");
        // Gemma (1) is read from Hugging Face directories only; a GGUF file of it says so.
        let err = Arch::parse("x.gguf", "general.architecture", "gemma", true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gemma") && err.contains("Hugging Face directories of others"),
            "{err}"
        );
    }

    fn write(dir: &Path, v: serde_json::Value) -> std::path::PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    #[test]
    fn parses_v4_and_v5_rope_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let base = serde_json::json!({"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rms_norm_eps":1e-5,"tie_word_embeddings":true});
        let mut v4 = base.clone();
        v4["rope_theta"] = 500000.0.into();
        v4["rope_scaling"] = serde_json::json!({"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192});
        let mut v5 = base.clone();
        v5["rope_parameters"] = serde_json::json!({"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192});
        let a = ModelConfig::from_hf_json(&write(dir.path(), v4)).unwrap();
        let b = ModelConfig::from_hf_json(&write(dir.path(), v5)).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn family_defaults_fill_what_config_json_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let base = serde_json::json!({"model_type":"gemma","hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":16,
            "vocab_size":100});
        let g = ModelConfig::from_hf_json(&write(dir.path(), base.clone())).unwrap();
        assert!(g.tie_word_embeddings, "GemmaConfig ties by default");
        assert_eq!(g.act, Act::GeluTanh);
        let mut v = base.clone();
        v["hidden_act"] = "gelu".into();
        v["tie_word_embeddings"] = false.into();
        let g = ModelConfig::from_hf_json(&write(dir.path(), v)).unwrap();
        assert_eq!((g.act, g.tie_word_embeddings), (Act::Gelu, false));
        let mut v = base.clone();
        v["model_type"] = "llama".into();
        let l = ModelConfig::from_hf_json(&write(dir.path(), v.clone())).unwrap();
        assert_eq!((l.act, l.tie_word_embeddings), (Act::Silu, false));
        v["hidden_act"] = "relu2".into();
        let msg = ModelConfig::from_hf_json(&write(dir.path(), v))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("hidden_act") && msg.contains("relu2"), "{msg}");
    }

    #[test]
    fn gemma3_local_and_global_blocks_from_v4_and_v5_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let base = serde_json::json!({"model_type":"gemma3_text","hidden_size":64,
            "intermediate_size":96,"num_hidden_layers":7,"num_attention_heads":4,
            "num_key_value_heads":1,"head_dim":16,"vocab_size":100,"sliding_window":512,
            "query_pre_attn_scalar":256,"attn_logit_softcapping":null,
            "final_logit_softcapping":null});
        // transformers 4.x: rope_theta, rope_local_base_freq, a layer pattern, rope_scaling.
        let mut v4 = base.clone();
        v4["rope_theta"] = 1e6.into();
        v4["rope_local_base_freq"] = 1e4.into();
        v4["sliding_window_pattern"] = 6.into();
        v4["rope_scaling"] = serde_json::json!({"rope_type":"linear","factor":8.0});
        let a = ModelConfig::from_hf_json(&write(dir.path(), v4)).unwrap();
        // transformers 5: layer_types and RoPE per layer type.
        let mut v5 = base.clone();
        v5["layer_types"] = serde_json::json!([
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ]);
        v5["rope_parameters"] = serde_json::json!({
            "full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1e6},
            "sliding_attention":{"rope_type":"default","rope_theta":1e4}});
        let b = ModelConfig::from_hf_json(&write(dir.path(), v5)).unwrap();
        for c in [&a, &b] {
            assert_eq!(c.arch, Arch::Gemma3);
            assert_eq!(c.rope_theta, 1e6);
            assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
            let local = c.local_attention.as_ref().unwrap();
            assert_eq!(local.window, 512);
            assert_eq!(local.rope_theta, 1e4);
            assert_eq!(
                local.layers,
                vec![true, true, true, true, true, false, true]
            );
            assert_eq!(c.attn_scale, Some(1.0 / 16.0));
            assert!(c.tie_word_embeddings && c.act == Act::GeluTanh);
        }
        let mut bad = base.clone();
        bad["final_logit_softcapping"] = 30.0.into();
        let msg = ModelConfig::from_hf_json(&write(dir.path(), bad))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("final_logit_softcapping"), "{msg}");
        let mut bad = base.clone();
        bad["layer_types"] = serde_json::json!(["full_attention"]);
        let msg = ModelConfig::from_hf_json(&write(dir.path(), bad))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("layer_types") && msg.contains("7 blocks"),
            "{msg}"
        );
        let mut bad = base.clone();
        bad.as_object_mut().unwrap().remove("sliding_window");
        let msg = ModelConfig::from_hf_json(&write(dir.path(), bad))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sliding_window"), "{msg}");
    }

    #[test]
    fn missing_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            serde_json::json!({"model_type":"llama","hidden_size":64}),
        );
        let msg = ModelConfig::from_hf_json(&p).unwrap_err().to_string();
        assert!(
            msg.contains("config.json") && msg.contains("num_attention_heads"),
            "{msg}"
        );
        let p = write(dir.path(), serde_json::json!({"model_type":"gpt_neox"}));
        let msg = ModelConfig::from_hf_json(&p).unwrap_err().to_string();
        assert!(
            msg.contains("model_type") && msg.contains("gpt_neox"),
            "{msg}"
        );
        std::fs::write(&p, "{not json").unwrap();
        assert!(ModelConfig::from_hf_json(&p)
            .unwrap_err()
            .to_string()
            .contains("invalid config JSON"));
    }
}
