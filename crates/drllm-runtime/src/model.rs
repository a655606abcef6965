//! Decoder-only transformer (LLaMA family, Qwen2/2.5, Qwen3) on libtorch.
//!
//! Mirrors transformers' `models/llama/modeling_llama.py`, `models/qwen2/modeling_qwen2.py` and
//! `models/qwen3/modeling_qwen3.py`: tensors are loaded by their Hugging Face names, RMSNorm
//! computes in f32 like `LlamaRMSNorm`, RoPE uses the rotate-half convention (GGUF q/k rows are
//! un-permuted by the weight source). The loop over blocks along a path lives in
//! [`crate::exec`], nowhere else.
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;
use crate::weights::WeightSource;

/// A linear layer `y = x W^T + b`.
pub(crate) struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn load(
        ws: &dyn WeightSource,
        prefix: &str,
        out: i64,
        inp: i64,
        bias: bool,
        kind: Kind,
        dev: Device,
    ) -> Result<Self> {
        let w = ws.load_shaped(&format!("{prefix}.weight"), &[out, inp], kind, dev)?;
        let bname = format!("{prefix}.bias");
        let b = if bias || ws.contains(&bname) {
            Some(ws.load_shaped(&bname, &[out], kind, dev)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
    /// One linear layer computing `parts` side by side (outputs concatenated): fewer, larger
    /// matmuls per block, which matters when decoding one token at a time.
    fn fuse(parts: Vec<Linear>) -> Linear {
        let w = Tensor::cat(&parts.iter().map(|p| &p.w).collect::<Vec<_>>(), 0);
        let b = if parts.iter().any(|p| p.b.is_some()) {
            let bs: Vec<Tensor> = parts
                .iter()
                .map(|p| {
                    p.b.as_ref()
                        .map_or_else(|| p.w.zeros_like().select(1, 0), |b| b.shallow_clone())
                })
                .collect();
            Some(Tensor::cat(&bs, 0))
        } else {
            None
        };
        Linear { w, b }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, self.b.as_ref())
    }
}

/// RMSNorm as `LlamaRMSNorm`: normalise in f32, cast back, then scale.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    if kind == Kind::Float {
        // Same formula in one fused kernel (no casts needed in f32).
        let d = x.size()[x.dim() - 1];
        return x.rms_norm([d], Some(w), eps);
    }
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = (xf * (var + eps).rsqrt()).to_kind(kind);
    w * normed
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// One decoder block.
pub(crate) struct Block {
    in_norm: Tensor,
    /// q, k and v projections fused (split sizes `qkv_split`).
    qkv: Linear,
    qkv_split: [i64; 3],
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    /// gate and up projections fused (each `intermediate_size` wide).
    gate_up: Linear,
    down: Linear,
}

/// Keys and values cached by one (block, repetition) slot: `[rows, kv_heads, time, head_dim]`.
pub(crate) type Kv = Option<(Tensor, Tensor)>;

/// Which keys each query may attend to.
pub(crate) enum Attn {
    /// Every cached key (decoding without padding).
    All,
    /// Causal over the new tokens, nothing cached before them, no padding.
    Causal,
    /// Explicit boolean mask `[B, 1, T, T_total]`, true = may attend.
    Mask(Tensor),
}

impl Attn {
    pub(crate) fn rows(&self, idx: &Tensor) -> Attn {
        match self {
            Attn::All => Attn::All,
            Attn::Causal => Attn::Causal,
            Attn::Mask(m) => Attn::Mask(m.index_select(0, idx)),
        }
    }
}

/// Rotary tables for a batch: `[B, 1, T, head_dim]` each.
pub(crate) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub(crate) fn rows(&self, idx: &Tensor) -> Rope {
        Rope {
            cos: self.cos.index_select(0, idx),
            sin: self.sin.index_select(0, idx),
        }
    }
}

/// The model's weights and shape; stateless, shareable across threads.
pub struct Model {
    /// Resolved configuration.
    pub cfg: ModelConfig,
    embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Tensor,
    device: Device,
    kind: Kind,
}

/// Base inverse frequencies, computed in f32 the way transformers does.
fn inv_freq(cfg: &ModelConfig, dev: Device) -> Tensor {
    let dim = cfg.head_dim;
    let exps =
        Tensor::arange_start_step(0, dim, 2, (Kind::Int64, dev)).to_kind(Kind::Float) / dim as f64;
    let base = Tensor::pow_scalar(cfg.rope_theta, &exps).reciprocal();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = base.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = (&base / factor).where_self(&wavelen.gt(low_wavelen), &base);
            let smooth = (wavelen.reciprocal() * old - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * (&scaled / factor) + &smooth * &scaled;
            let medium = wavelen
                .lt(high_wavelen)
                .logical_not()
                .logical_and(&wavelen.gt(low_wavelen).logical_not());
            smoothed.where_self(&medium, &scaled)
        }
    }
}

impl Model {
    /// Loads every tensor of the model from `ws` into `kind` on `device`.
    pub fn load(
        ws: &dyn WeightSource,
        cfg: ModelConfig,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let embed = ws.load_shaped(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            kind,
            device,
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let norm =
                |n: &str, d: i64| ws.load_shaped(&format!("{p}.{n}.weight"), &[d], kind, device);
            let lin = |n: &str, o: i64, inp: i64, bias: bool| {
                Linear::load(ws, &format!("{p}.{n}"), o, inp, bias, kind, device)
            };
            let qkv_bias = cfg.attention_bias;
            let qk_norm = cfg.arch.family().qk_norm;
            blocks.push(Block {
                in_norm: norm("input_layernorm", h)?,
                qkv: Linear::fuse(vec![
                    lin("self_attn.q_proj", nh * hd, h, qkv_bias)?,
                    lin("self_attn.k_proj", nkv * hd, h, qkv_bias)?,
                    lin("self_attn.v_proj", nkv * hd, h, qkv_bias)?,
                ]),
                qkv_split: [nh * hd, nkv * hd, nkv * hd],
                o: lin("self_attn.o_proj", h, nh * hd, false)?,
                q_norm: if qk_norm {
                    Some(norm("self_attn.q_norm", hd)?)
                } else {
                    None
                },
                k_norm: if qk_norm {
                    Some(norm("self_attn.k_norm", hd)?)
                } else {
                    None
                },
                post_norm: norm("post_attention_layernorm", h)?,
                gate_up: Linear::fuse(vec![
                    lin("mlp.gate_proj", i, h, false)?,
                    lin("mlp.up_proj", i, h, false)?,
                ]),
                down: lin("mlp.down_proj", h, i, false)?,
            });
        }
        let norm = ws.load_shaped("model.norm.weight", &[h], kind, device)?;
        let lm_head = if cfg.tie_word_embeddings && !ws.contains("lm_head.weight") {
            embed.shallow_clone()
        } else {
            ws.load_shaped("lm_head.weight", &[cfg.vocab_size, h], kind, device)?
        };
        let inv_freq = inv_freq(&cfg, device);
        Ok(Model {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            device,
            kind,
        })
    }

    /// Divides the RoPE frequencies by llama.cpp's precomputed `rope_freqs` factors (how GGUF
    /// files store LLaMA-3 scaling).
    pub fn apply_rope_freq_factors(&mut self, factors: &Tensor) {
        self.inv_freq = &self.inv_freq / factors.to_kind(Kind::Float).to_device(self.device);
    }

    /// Device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Compute dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Number of blocks (L).
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    pub(crate) fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, ids, -1, false, false)
    }

    pub(crate) fn final_norm(&self, h: &Tensor) -> Tensor {
        rms_norm(h, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits (f32) for final-normed hidden states (as returned by [`crate::PathBatch::prefill`]).
    pub fn logits(&self, h: &Tensor) -> Tensor {
        h.linear::<Tensor>(&self.lm_head, None).to_kind(Kind::Float)
    }

    /// RoPE tables for position ids `[B, T]`.
    pub(crate) fn rope(&self, positions: &Tensor) -> Rope {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: emb.cos().to_kind(self.kind).unsqueeze(1),
            sin: emb.sin().to_kind(self.kind).unsqueeze(1),
        }
    }
}

impl Block {
    /// One application of the block to `x: [B, T, H]`, attending over `kv` (extended in place)
    /// under `mask`.
    pub(crate) fn forward(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        rope: &Rope,
        mask: &Attn,
        kv: &mut Kv,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        let h = rms_norm(x, &self.in_norm, eps);
        let qkv = self.qkv.forward(&h).split_with_sizes(self.qkv_split, -1);
        let mut q = qkv[0].view([b, t, nh, hd]);
        let mut k = qkv[1].view([b, t, nkv, hd]);
        let v = qkv[2].view([b, t, nkv, hd]).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, eps);
            k = rms_norm(&k, kn, eps);
        }
        let q = q.transpose(1, 2);
        let k = k.transpose(1, 2);
        let q = &q * &rope.cos + rotate_half(&q) * &rope.sin;
        let k = &k * &rope.cos + rotate_half(&k) * &rope.sin;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
            None => (k, v),
        };
        let (m, causal) = match mask {
            Attn::All => (None, false),
            Attn::Causal => (None, true),
            Attn::Mask(m) => (Some(m), false),
        };
        let attn =
            Tensor::scaled_dot_product_attention(&q, &k, &v, m, 0.0, causal, None, nh != nkv);
        *kv = Some((k, v));
        let attn = attn.transpose(1, 2).reshape([b, t, nh * hd]);
        let x = x + self.o.forward(&attn);
        let h = rms_norm(&x, &self.post_norm, eps);
        let gu = self.gate_up.forward(&h).chunk(2, -1);
        let mlp = self.down.forward(&(gu[0].silu() * &gu[1]));
        x + mlp
    }
}
