//! Decoder-only transformer (LLaMA family, Qwen2/2.5, Qwen3, Gemma, Gemma 3) on libtorch.
//!
//! Mirrors transformers' `models/{llama,qwen2,qwen3,gemma,gemma3}/modeling_*.py`: one block definition
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
    /// The MLP's input norm (`post_attention_layernorm`, or `pre_feedforward_layernorm` with
    /// sandwich norms).
    post_norm: Norm,
    /// Norms of the attention's and the MLP's outputs (families with sandwich norms).
    attn_out_norm: Option<Norm>,
    mlp_out_norm: Option<Norm>,
    /// A local (sliding-window) block: attends through the local mask with the local RoPE.
    local: bool,
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
    /// For global blocks `global`; local blocks attend through `local` (`[B, 1, T, T_total]`),
    /// which also hides keys a sliding window or more back.
    Windowed { global: Box<Attn>, local: Tensor },
}

impl Attn {
    pub(crate) fn rows(&self, idx: &Tensor) -> Attn {
        match self {
            Attn::All => Attn::All,
            Attn::Causal => Attn::Causal,
            Attn::Mask(m) => Attn::Mask(m.index_select(0, idx)),
            Attn::Windowed { global, local } => Attn::Windowed {
                global: Box::new(global.rows(idx)),
                local: local.index_select(0, idx),
            },
        }
    }

    /// The mask a block applies: the local one for a local block, else the global one.
    fn for_block(&self, local_block: bool) -> (Option<&Tensor>, bool) {
        match self {
            Attn::All => (None, false),
            Attn::Causal => (None, true),
            Attn::Mask(m) => (Some(m), false),
            Attn::Windowed { local, .. } if local_block => (Some(local), false),
            Attn::Windowed { global, .. } => global.for_block(false),
        }
    }
}

/// Rotary tables for a batch: `[B, 1, T, head_dim]` each; `local` those of local blocks when
/// their RoPE base differs.
pub(crate) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub local: Option<(Tensor, Tensor)>,
}

impl Rope {
    pub(crate) fn rows(&self, idx: &Tensor) -> Rope {
        Rope {
            cos: self.cos.index_select(0, idx),
            sin: self.sin.index_select(0, idx),
            local: self
                .local
                .as_ref()
                .map(|(c, s)| (c.index_select(0, idx), s.index_select(0, idx))),
        }
    }

    /// (cos, sin) for a local or a global block.
    fn for_block(&self, local_block: bool) -> (&Tensor, &Tensor) {
        match &self.local {
            Some((c, s)) if local_block => (c, s),
            _ => (&self.cos, &self.sin),
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
    /// Local blocks' RoPE frequencies (their own base).
    inv_freq_local: Option<Tensor>,
    device: Device,
    kind: Kind,
}

/// Base inverse frequencies for RoPE base `theta`, computed in f32 the way transformers does.
fn base_inv_freq(cfg: &ModelConfig, theta: f64, dev: Device) -> Tensor {
    let dim = cfg.head_dim;
    let exps =
        Tensor::arange_start_step(0, dim, 2, (Kind::Int64, dev)).to_kind(Kind::Float) / dim as f64;
    Tensor::pow_scalar(theta, &exps).reciprocal()
}

/// The global blocks' inverse frequencies, scaled as the configuration says.
fn inv_freq(cfg: &ModelConfig, dev: Device) -> Tensor {
    let base = base_inv_freq(cfg, cfg.rope_theta, dev);
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base / factor,
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
        let sandwich = family.sandwich_norms;
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
                post_norm: norm(
                    if sandwich {
                        "pre_feedforward_layernorm"
                    } else {
                        "post_attention_layernorm"
                    },
                    h,
                )?,
                attn_out_norm: if sandwich {
                    Some(norm("post_attention_layernorm", h)?)
                } else {
                    None
                },
                mlp_out_norm: if sandwich {
                    Some(norm("post_feedforward_layernorm", h)?)
                } else {
                    None
                },
                local: cfg
                    .local_attention
                    .as_ref()
                    .is_some_and(|a| a.layers.get(l).copied().unwrap_or(false)),
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
        let inv_freq_local = cfg
            .local_attention
            .as_ref()
            .map(|a| base_inv_freq(&cfg, a.rope_theta, device));
        Ok(Model {
            cfg,
            embed,
            embed_scale,
            blocks,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
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
        let tables = |inv_freq: &Tensor| {
            let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
            let emb = Tensor::cat(&[&freqs, &freqs], -1);
            (
                emb.cos().to_kind(self.kind).unsqueeze(1),
                emb.sin().to_kind(self.kind).unsqueeze(1),
            )
        };
        let (cos, sin) = tables(&self.inv_freq);
        Rope {
            cos,
            sin,
            local: self.inv_freq_local.as_ref().map(tables),
        }
    }

    /// The attention mask of local blocks, from the global one, when a sliding window hides
    /// some key: `past + t` keys whose validity is `key_valid` `[B, past + t]`, queries at
    /// `positions` `[B, t]`. A key is visible within the window when its position (its count
    /// among valid keys) is greater than the query's minus the window; every query still sees
    /// itself, as in the global mask.
    pub(crate) fn windowed(
        &self,
        global: Attn,
        past: i64,
        t: i64,
        key_valid: &Tensor,
        positions: &Tensor,
    ) -> Attn {
        let Some(local) = &self.cfg.local_attention else {
            return global;
        };
        let total = past + t;
        if total <= local.window || !local.layers.iter().any(|&l| l) {
            return global;
        }
        let dev = self.device;
        let b = key_valid.size()[0];
        let q_idx = Tensor::arange_start(past, total, (Kind::Int64, dev)).view([t, 1]);
        let k_idx = Tensor::arange(total, (Kind::Int64, dev)).view([1, total]);
        let base = match &global {
            Attn::All => Tensor::ones([1, 1, t, total], (Kind::Bool, dev)),
            Attn::Causal => k_idx.le_tensor(&q_idx).view([1, 1, t, total]),
            Attn::Mask(m) => m.shallow_clone(),
            Attn::Windowed { local, .. } => local.shallow_clone(),
        };
        let key_pos = key_valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        let near = key_pos
            .view([b, 1, 1, total])
            .gt_tensor(&(positions.view([b, 1, t, 1]) - local.window));
        let diag = k_idx.eq_tensor(&q_idx).view([1, 1, t, total]);
        let local = base.logical_and(&near).logical_or(&diag);
        Attn::Windowed {
            global: Box::new(global),
            local,
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
        let (cos, sin) = rope.for_block(self.local);
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
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
            None => (k, v),
        };
        let (m, causal) = mask.for_block(self.local);
        let attn = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            m,
            0.0,
            causal,
            cfg.attn_scale,
            nh != nkv,
        );
        *kv = Some((k, v));
        let attn = attn.transpose(1, 2).reshape([b, t, nh * hd]);
        let attn = self.o.forward(&attn);
        let x = match &self.attn_out_norm {
            Some(n) => x + n.forward(&attn, eps),
            None => x + attn,
        };
        let h = self.post_norm.forward(&x, eps);
        let gu = self.gate_up.forward(&h).chunk(2, -1);
        let gate = match cfg.act {
            Act::Silu => gu[0].silu(),
            Act::GeluTanh => gu[0].gelu("tanh"),
            Act::Gelu => gu[0].gelu("none"),
        };
        let mlp = self.down.forward(&(gate * &gu[1]));
        match &self.mlp_out_norm {
            Some(n) => x + n.forward(&mlp, eps),
            None => x + mlp,
        }
    }
}
