//! Distillation gates: per-block routers trained so that the routed model keeps the full model's
//! next-token distribution on the prompt's tokens, under a penalty on the blocks it executes
//! (the dense target of FlexiDepth, Router-Tuning and D-LLM, with drllm's once-per-prompt
//! decision). No answers are needed, so any prompt text serves.
//!
//! Each router reads the pooled hidden state entering its block along the routed path, as at
//! inference, and its execute-minus-skip logit sets a hard gate in the forward pass (the block
//! runs or is skipped exactly as a path count of 1 or 0) with the gradient of a sigmoid of that
//! logit (straight-through); logistic noise on the logit during training makes the gates
//! explore. The router input is detached: no gradient reaches a gate through a later router's
//! input. The loss is KL(full || routed) of the next-token distributions, averaged over the
//! batch's prompt positions (a longer prompt weighs more), plus `penalty` x the executed share
//! of blocks. Repeat is never chosen (its logit is pinned far below the others).

use std::time::Instant;

use drllm_router::{RouterShape, Routers};
use drllm_runtime::{LayerPath, LoadedModel, PathBatch};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::OptimizerConfig;
use tch::{Kind, Tensor};

use crate::trainer::{lr_at, TrainError};

/// The repeat class's bias in a distilled package: far below any execute or skip logit, so the
/// argmax never repeats a block (budgets above 0 only favour execute).
pub const REPEAT_OFF: f64 = -30.0;

/// Hyper-parameters of distillation (each a `drllm-train distill` flag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Passes over the training prompts.
    pub epochs: usize,
    /// Most prompts per step.
    pub batch_size: usize,
    /// Most tokens (prompts x longest prompt) per step: bounds the memory of the pass.
    pub batch_tokens: usize,
    /// Peak learning rate (AdamW, linear warm-up then cosine decay).
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Fraction of steps of warm-up.
    pub warmup: f64,
    /// Weight of the executed share of blocks in the loss (nats of KL per share): for a batch of
    /// prompts of equal length, a block is worth skipping when the KL it adds is below
    /// `penalty / blocks`.
    pub penalty: f64,
    /// Scale of the logistic noise added to the gate logits in training (0 = none).
    pub noise: f64,
    /// Initial execute-minus-skip logit of every router (gates start open; the routers' output
    /// layer starts at zero).
    pub init_execute: f64,
    /// Pooling windows per prompt.
    pub windows: usize,
    /// Width of each router's hidden layer.
    pub router_hidden: usize,
    /// Seed of the initialisation, batch order and noise.
    pub seed: u64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            epochs: 4,
            batch_size: 8,
            batch_tokens: 1024,
            lr: 1e-3,
            weight_decay: 0.01,
            warmup: 0.05,
            penalty: 1.0,
            noise: 1.0,
            init_execute: 3.0,
            windows: 8,
            router_hidden: 128,
            seed: 0,
        }
    }
}

/// Metrics of one distillation epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillEpoch {
    /// Epoch number (1-based).
    pub epoch: usize,
    /// Mean KL (nats per prompt position) of the routed model from the full one, with noise.
    pub kl: f64,
    /// Mean share of blocks executed in training (with noise).
    pub executed: f64,
    /// Mean loss.
    pub loss: f64,
    /// Routed validation accuracy at budget 0, when measured.
    pub routed_accuracy: Option<f64>,
    /// Routed validation mean block applications at budget 0, when measured.
    pub routed_cost: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time in seconds.
    pub secs: f64,
}

/// Distilled routers and their history (the last epoch's weights).
#[derive(Debug)]
pub struct Distilled {
    /// The routers (on the CPU).
    pub routers: Routers,
    /// Metrics per epoch.
    pub epochs: Vec<DistillEpoch>,
}

/// Batches of prompt indices: prompts sorted by length, cut where a batch would exceed
/// `batch_size` prompts or `batch_tokens` tokens (a prompt longer than that goes alone), so
/// that padding stays small and memory bounded.
pub fn length_batches(lens: &[usize], batch_size: usize, batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut out: Vec<Vec<usize>> = vec![];
    let mut cur: Vec<usize> = vec![];
    for i in order {
        // Sorted ascending: the newcomer is the longest of the batch.
        let fits = cur.len() < batch_size.max(1) && (cur.len() + 1) * lens[i] <= batch_tokens;
        if !cur.is_empty() && !fits {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `[B, T]` float mask of the real tokens of left-padded rows of lengths `lens`.
fn valid_mask(lens: &[usize], t: usize, device: tch::Device) -> Tensor {
    let mut m = vec![0f32; lens.len() * t];
    for (r, &len) in lens.iter().enumerate() {
        for j in t - len.min(t)..t {
            m[r * t + j] = 1.0;
        }
    }
    Tensor::from_slice(&m)
        .view([lens.len() as i64, t as i64])
        .to_device(device)
}

/// Block `l`'s gate for each row of `h` `[B, T, H]` (pooled with `pool` `[B, W, T]`): 1 where
/// the router's execute logit exceeds its skip logit after logistic noise of scale `noise`, else
/// 0, with the gradient of the sigmoid of the difference (straight-through). At noise 0 this is
/// the decision [`drllm_router::Policy`] makes at budget 0 (repeat pinned off).
pub fn gate_of(routers: &Routers, l: usize, h: &Tensor, pool: &Tensor, noise: f64) -> Tensor {
    let pooled = pool.bmm(&h.detach().to_kind(Kind::Float));
    let logits = routers.forward_block(l, &pooled);
    let d = logits.select(1, 1) - logits.select(1, 0);
    let d = if noise > 0.0 {
        let u = Tensor::rand([d.size()[0]], (Kind::Float, d.device())).clamp(1e-6, 1.0 - 1e-6);
        d + (u.log() - (-&u + 1.0).log()) * noise
    } else {
        d
    };
    let soft = d.sigmoid();
    let hard = d.gt(0.0).to_kind(Kind::Float);
    &hard + &soft - soft.detach()
}

/// The paths distillation's hard gates give `prompts` without noise (0 skip, 1 execute per
/// block): what training believes the routers do, to check against routed inference.
pub fn gated_paths(
    lm: &LoadedModel,
    routers: &Routers,
    windows: usize,
    prompts: &[Vec<u32>],
) -> Result<Vec<Vec<u8>>, TrainError> {
    let _g = tch::no_grad_guard();
    let model = &lm.model;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let t = lens.iter().copied().max().unwrap_or(0);
    let pool = drllm_router::pool::pool_weights(&lens, t, windows, model.device());
    let routers = routers.to_device(model.device());
    let mut gates: Vec<Tensor> = vec![];
    let mut gate = |l: usize, h: &Tensor| -> Tensor {
        let g = gate_of(&routers, l, h, &pool, 0.0);
        gates.push(g.shallow_clone());
        g
    };
    let _ = PathBatch::new_routed(model, prompts.len()).prefill_gated(prompts, &mut gate)?;
    let g = Tensor::stack(&gates, 1).to_device(tch::Device::Cpu);
    let v: Vec<f32> = Vec::try_from(g.flatten(0, -1)).map_err(TrainError::Torch)?;
    Ok(v.chunks(gates.len().max(1))
        .map(|r| r.iter().map(|&x| u8::from(x > 0.5)).collect())
        .collect())
}

/// One step's forward: the all-execute model's log-probabilities (no gradient), then the gated
/// pass. Returns (KL per real position, executed share, loss).
fn step_loss(
    lm: &LoadedModel,
    routers: &Routers,
    prompts: &[Vec<u32>],
    cfg: &DistillConfig,
) -> Result<(Tensor, Tensor, Tensor), TrainError> {
    let model = &lm.model;
    let dev = model.device();
    let n_layers = model.num_layers();
    let b = prompts.len();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let t = lens.iter().copied().max().unwrap_or(0);
    let teacher = {
        let _g = tch::no_grad_guard();
        let paths = vec![LayerPath::all_ones(n_layers); b];
        let mut batch = PathBatch::new(model, &paths)?;
        let h = batch.prefill(prompts)?;
        model.logits(&h).log_softmax(-1, Kind::Float)
    };
    let pool = drllm_router::pool::pool_weights(&lens, t, cfg.windows, dev);
    let mut gates: Vec<Tensor> = Vec::with_capacity(n_layers);
    let mut gate = |l: usize, h: &Tensor| -> Tensor {
        let g = gate_of(routers, l, h, &pool, cfg.noise);
        gates.push(g.shallow_clone());
        g
    };
    let h = PathBatch::new_routed(model, b).prefill_gated(prompts, &mut gate)?;
    let student = model.logits(&h).log_softmax(-1, Kind::Float);
    let kl_pos = (teacher.exp() * (&teacher - &student)).sum_dim_intlist(-1, false, Kind::Float);
    let mask = valid_mask(&lens, t, dev);
    let kl = (kl_pos * &mask).sum(Kind::Float) / mask.sum(Kind::Float);
    let executed = Tensor::stack(&gates, 0).mean(Kind::Float);
    let loss = &kl + &executed * cfg.penalty;
    Ok((kl, executed, loss))
}

/// Trains distillation gates on `prompts` (token ids, each within the model's context).
/// `validate(epoch, routers)` may measure routed accuracy and cost after each epoch;
/// `on_step(step, total)` reports progress.
pub fn distill(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    cfg: &DistillConfig,
    mut validate: impl FnMut(usize, &Routers) -> Result<Option<(f64, f64)>, TrainError>,
    mut on_step: impl FnMut(usize, usize),
    mut on_epoch: impl FnMut(&DistillEpoch),
) -> Result<Distilled, TrainError> {
    if prompts.is_empty() {
        return Err(TrainError::Data("no training prompts".into()));
    }
    if cfg.epochs == 0 || cfg.windows == 0 {
        return Err(TrainError::Data(
            "epochs and windows must be positive".into(),
        ));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(TrainError::Data(format!("training prompt {i} is empty")));
    }
    let model = &lm.model;
    let dev = model.device();
    let shape = RouterShape {
        num_layers: model.num_layers(),
        hidden_size: model.cfg.hidden_size as usize,
        router_hidden: cfg.router_hidden.max(1),
    };
    tch::manual_seed(cfg.seed as i64);
    let vs = tch::nn::VarStore::new(dev);
    let routers = Routers::new(&vs.root(), shape);
    {
        let _g = tch::no_grad_guard();
        // The output layer starts at zero, so every gate starts at `init_execute` whatever the
        // (unnormalised, large) hidden states are: random routers would skip blocks at random.
        let _ = routers.w2.shallow_clone().zero_();
        let b2 = routers.b2.shallow_clone();
        let _ = b2.select(1, 1).fill_(cfg.init_execute);
        let _ = b2.select(1, 2).fill_(REPEAT_OFF);
    }
    let mut opt = tch::nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(&vs, cfg.lr)?;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut batches = length_batches(&lens, cfg.batch_size, cfg.batch_tokens);
    let total = batches.len() * cfg.epochs;
    let warmup = ((cfg.warmup * total as f64).round() as usize).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut epochs = vec![];
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        let t0 = Instant::now();
        batches.shuffle(&mut rng);
        let (mut kl_sum, mut ex_sum, mut loss_sum, mut lr) = (0.0, 0.0, 0.0, cfg.lr);
        for batch in &batches {
            lr = lr_at(step, total, warmup, cfg.lr);
            opt.set_lr(lr);
            let ps: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].clone()).collect();
            let (kl, executed, loss) = step_loss(lm, &routers, &ps, cfg)?;
            opt.backward_step(&loss);
            kl_sum += kl.double_value(&[]);
            ex_sum += executed.double_value(&[]);
            loss_sum += loss.double_value(&[]);
            step += 1;
            on_step(step, total);
        }
        let n = batches.len() as f64;
        if !loss_sum.is_finite() {
            return Err(TrainError::Data(format!(
                "the distillation loss became {loss_sum} in epoch {epoch}; lower --lr (or use --dtype f32)"
            )));
        }
        let measured = validate(epoch, &cpu_routers(&routers))?;
        let m = DistillEpoch {
            epoch,
            kl: kl_sum / n,
            executed: ex_sum / n,
            loss: loss_sum / n,
            routed_accuracy: measured.map(|m| m.0),
            routed_cost: measured.map(|m| m.1),
            lr,
            secs: t0.elapsed().as_secs_f64(),
        };
        on_epoch(&m);
        epochs.push(m);
    }
    Ok(Distilled {
        routers: cpu_routers(&routers),
        epochs,
    })
}

/// A detached CPU copy of `r` with the repeat class pinned off (its weights and bias; weight
/// decay may have moved them).
fn cpu_routers(r: &Routers) -> Routers {
    let c = r.snapshot().to_device(tch::Device::Cpu);
    let _g = tch::no_grad_guard();
    let _ = c.w2.select(2, 2).fill_(0.0);
    let _ = c.b2.select(1, 2).fill_(REPEAT_OFF);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_batches_cover_every_prompt_once_within_bounds() {
        let lens = [5, 300, 12, 7, 40, 40, 1, 2000, 9];
        let batches = length_batches(&lens, 3, 100);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() <= 3);
            assert!(b.len() == 1 || b.len() * longest <= 100, "{b:?}");
        }
        // Too long for the token budget: alone.
        assert!(batches.contains(&vec![7]));
        assert!(batches.contains(&vec![1]));
    }

    #[test]
    fn valid_mask_marks_the_real_tokens_at_the_end() {
        let m = valid_mask(&[2, 4], 4, tch::Device::Cpu);
        let v: Vec<f32> = Vec::try_from(m.flatten(0, -1)).unwrap();
        assert_eq!(v, [0., 0., 1., 1., 1., 1., 1., 1.]);
    }
}
