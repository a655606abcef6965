//! Decoder-only transformer (LLaMA family, Qwen2/2.5, Qwen3, Gemma) on libtorch.
//!
//! Mirrors transformers' `models/{llama,qwen2,qwen3,gemma}/modeling_*.py`: one block definition
//! whose family differences are the traits of [`crate::config::Family`] (q/k/v biases, q/k
//! norms, norm scaling, embedding scale, activation). Tensors are loaded by their Hugging Face
//! names, RMSNorm computes in f32 like `LlamaRMSNorm` (or `GemmaRMSNorm`), RoPE uses the
//! rotate-half convention (GGUF q/k rows are un-permuted by the weight source). The loop over
//! blocks along a path lives in [`crate::exec`], nowhere else.
use tch::{Device, Kind, Tensor};

use crate::config::{Act, ModelConfig, RopeScaling};
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

/// An RMS norm's scale: as `LlamaRMSNorm` (normalise in f32, cast back, then scale by `w`) or,
/// for families with [`crate::config::Family::norm_one_plus`], as `GemmaRMSNorm` (scale by
/// `1 + w` in f32, then cast back).
pub(crate) struct Norm {
    /// `w`, in the model's dtype; or `1 + w` in f32.
    scale: Tensor,
    in_f32: bool,
}

impl Norm {
    fn load(
        ws: &dyn WeightSource,
        name: &str,
        d: i64,
        one_plus: bool,
        kind: Kind,
        dev: Device,
    ) -> Result<Self> {
        if one_plus {
            let w = ws.load_shaped(name, &[d], Kind::Float, dev)?;
            Ok(Norm {
                scale: w + 1.0,
                in_f32: true,
            })
        } else {
            Ok(Norm {
                scale: ws.load_shaped(name, &[d], kind, dev)?,
                in_f32: false,
            })
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, eps: f64) -> Tensor {
        let kind = x.kind();
        if kind == Kind::Float {
            // The same formula in one fused kernel (no casts needed in f32).
            let d = x.size()[x.dim() - 1];
            return x.rms_norm([d], Some(&self.scale), eps);
        }
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + eps).rsqrt();
        if self.in_f32 {
            (normed * &self.scale).to_kind(kind)
        } else {
            &self.scale * normed.to_kind(kind)
        }
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// One decoder block.
pub(crate) struct Block {
    in_norm: Norm,
    /// q, k and v projections fused (split sizes `qkv_split`).
    qkv: Linear,
    qkv_split: [i64; 3],
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_norm: Norm,
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
    /// Embeddings are multiplied by this (sqrt(hidden) in the model's dtype) when the family
    /// scales them.
    embed_scale: Option<Tensor>,
    pub(crate) blocks: Vec<Block>,
    norm: Norm,
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
        let family = cfg.arch.family();
        let one_plus = family.norm_one_plus;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let norm = |n: &str, d: i64| {
                Norm::load(ws, &format!("{p}.{n}.weight"), d, one_plus, kind, device)
            };
            let lin = |n: &str, o: i64, inp: i64, bias: bool| {
                Linear::load(ws, &format!("{p}.{n}"), o, inp, bias, kind, device)
            };
            let qkv_bias = cfg.attention_bias;
            let qk_norm = family.qk_norm;
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
        let norm = Norm::load(ws, "model.norm.weight", h, one_plus, kind, device)?;
        let embed_scale = family.embed_scale.then(|| {
            Tensor::from((h as f64).sqrt())
                .to_kind(kind)
                .to_device(device)
        });
        let lm_head = if cfg.tie_word_embeddings && !ws.contains("lm_head.weight") {
            embed.shallow_clone()
        } else {
            ws.load_shaped("lm_head.weight", &[cfg.vocab_size, h], kind, device)?
        };
        let inv_freq = inv_freq(&cfg, device);
        Ok(Model {
            cfg,
            embed,
            embed_scale,
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
        let e = Tensor::embedding(&self.embed, ids, -1, false, false);
        match &self.embed_scale {
            Some(s) => e * s,
            None => e,
        }
    }

    pub(crate) fn final_norm(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h, self.cfg.rms_norm_eps)
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
        let h = self.in_norm.forward(x, eps);
        let qkv = self.qkv.forward(&h).split_with_sizes(self.qkv_split, -1);
        let mut q = qkv[0].view([b, t, nh, hd]);
        let mut k = qkv[1].view([b, t, nkv, hd]);
        let v = qkv[2].view([b, t, nkv, hd]).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q, eps);
            k = kn.forward(&k, eps);
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
        let h = self.post_norm.forward(&x, eps);
        let gu = self.gate_up.forward(&h).chunk(2, -1);
        let gate = match cfg.act {
            Act::Silu => gu[0].silu(),
            Act::GeluTanh => gu[0].gelu("tanh"),
            Act::Gelu => gu[0].gelu("none"),
        };
        let mlp = self.down.forward(&(gate * &gu[1]));
        x + mlp
    }
}
