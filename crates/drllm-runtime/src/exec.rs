//! The path executor: runs a batch of sequences, each along its own layer path, with one KV cache
//! per (block, repetition) slot. This is the only place that loops over blocks and counts.
//!
//! Layer-synchronous: for block `l`, every row whose count at `l` is at least 1 goes through the
//! block in one batched call; rows with count 2 go through it once more (slot `(l, 1)`). A slot's
//! cache holds exactly its rows; rows only change when finished rows leave the batch
//! ([`PathBatch::retain`]), which drops them from every cache.
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{Attn, Kv, Model};
use drllm_path::LayerPath;

struct Slot {
    layer: usize,
    /// Rows of the batch that use this slot (ascending, and as an index tensor); `None` = all.
    rows: Option<(Vec<usize>, Tensor)>,
    kv: Kv,
}

/// Decoding state of a batch of sequences along their paths.
pub struct PathBatch<'m> {
    model: &'m Model,
    slots: Vec<Slot>,
    /// `[B, T_total]`: which cached positions are real tokens (false = left padding).
    key_valid: Tensor,
    /// `[B]`: position id of each row's next token.
    next_pos: Tensor,
    batch: usize,
    /// Whether any row carries left padding (else attention needs no explicit mask).
    padded: bool,
}

impl<'m> PathBatch<'m> {
    /// Prepares slots for `paths` (one per row, each of the model's length).
    pub fn new(model: &'m Model, paths: &[LayerPath]) -> Result<Self> {
        let n_layers = model.num_layers();
        for p in paths {
            p.check_len(n_layers)?;
        }
        let b = paths.len();
        let dev = model.device();
        let mut slots = Vec::new();
        for l in 0..n_layers {
            let max = paths.iter().map(|p| p.counts()[l]).max().unwrap_or(0);
            for r in 0..max {
                let rows: Vec<usize> = paths
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.counts()[l] > r)
                    .map(|(i, _)| i)
                    .collect();
                let rows = (rows.len() != b).then(|| {
                    let t = index_tensor(&rows, dev);
                    (rows, t)
                });
                slots.push(Slot {
                    layer: l,
                    rows,
                    kv: None,
                });
            }
        }
        Ok(PathBatch {
            model,
            slots,
            key_valid: Tensor::zeros([b as i64, 0], (Kind::Bool, dev)),
            next_pos: Tensor::zeros([b as i64], (Kind::Int64, dev)),
            batch: b,
            padded: false,
        })
    }

    /// Runs new tokens `[B, T]` through the paths. `valid[B, T]` marks real tokens (false = left
    /// padding, allowed only in the first call). Returns final-normed hidden states `[B, T, H]`.
    fn step(&mut self, ids: &Tensor, valid: &Tensor, padded: bool) -> Tensor {
        let model = self.model;
        let dev = model.device();
        let (b, t) = (ids.size()[0], ids.size()[1]);
        // Positions count real tokens only: left padding does not shift a row's positions.
        let positions =
            valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1 + self.next_pos.unsqueeze(1);
        let positions = positions.clamp_min(0);
        self.next_pos = positions.select(1, t - 1) + 1;
        let past = self.key_valid.size()[1];
        self.key_valid = Tensor::cat(&[&self.key_valid, valid], 1);
        let total = past + t;
        self.padded |= padded;
        let mask = if !self.padded && t == 1 {
            Attn::All
        } else if !self.padded && past == 0 {
            Attn::Causal
        } else {
            // Causal over new tokens, all past keys visible, padded keys hidden; every query
            // may see itself so rows of padding stay finite.
            let q_idx = Tensor::arange_start(past, total, (Kind::Int64, dev)).view([t, 1]);
            let k_idx = Tensor::arange(total, (Kind::Int64, dev)).view([1, total]);
            let causal = k_idx.le_tensor(&q_idx);
            let diag = k_idx.eq_tensor(&q_idx);
            Attn::Mask(
                causal
                    .view([1, 1, t, total])
                    .logical_and(&self.key_valid.view([b, 1, 1, total]))
                    .logical_or(&diag.view([1, 1, t, total])),
            )
        };
        let rope = model.rope(&positions);
        let mut h = model.embed(ids);
        let cfg = &model.cfg;
        for slot in &mut self.slots {
            let block = &model.blocks[slot.layer];
            h = match slot.rows.as_ref().map(|(_, t)| t) {
                None => block.forward(cfg, &h, &rope, &mask, &mut slot.kv),
                Some(idx) => {
                    let out = block.forward(
                        cfg,
                        &h.index_select(0, idx),
                        &rope.rows(idx),
                        &mask.rows(idx),
                        &mut slot.kv,
                    );
                    h.index_copy(0, idx, &out)
                }
            };
        }
        model.final_norm(&h)
    }

    /// Prefills left-padded prompts; returns final-normed hidden states `[B, T, H]`.
    pub fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Tensor> {
        if prompts.len() != self.batch {
            return Err(Error::Request(format!(
                "{} prompts for a batch of {} paths",
                prompts.len(),
                self.batch
            )));
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Request(format!("prompt {i} is empty")));
        }
        let vocab = self.model.cfg.vocab_size;
        if let Some(id) = prompts.iter().flatten().find(|&&id| id as i64 >= vocab) {
            return Err(Error::Request(format!(
                "token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![0i64; self.batch * t];
        let mut valid = vec![false; self.batch * t];
        for (r, p) in prompts.iter().enumerate() {
            let pad = t - p.len();
            for (j, &id) in p.iter().enumerate() {
                ids[r * t + pad + j] = id as i64;
                valid[r * t + pad + j] = true;
            }
        }
        let dev = self.model.device();
        let shape = [self.batch as i64, t as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(dev);
        let padded = prompts.iter().any(|p| p.len() < t);
        let valid = Tensor::from_slice(&valid).view(shape).to_device(dev);
        Ok(self.step(&ids, &valid, padded))
    }

    /// Feeds one token per row; returns logits `[B, V]` (f32) for the next token.
    pub fn decode_step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.len() != self.batch {
            return Err(Error::Request(format!(
                "{} tokens for a batch of {}",
                tokens.len(),
                self.batch
            )));
        }
        let dev = self.model.device();
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::from_slice(&ids)
            .view([self.batch as i64, 1])
            .to_device(dev);
        let valid = Tensor::ones([self.batch as i64, 1], (Kind::Bool, dev));
        let h = self.step(&ids, &valid, false);
        Ok(self.model.logits(&h.select(1, 0)))
    }
}

fn index_tensor(rows: &[usize], dev: Device) -> Tensor {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_slice(&v).to_device(dev)
}

impl PathBatch<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.batch
    }

    /// Whether the batch has no rows left.
    pub fn is_empty(&self) -> bool {
        self.batch == 0
    }

    /// Keeps only the rows `keep` (ascending indices into the current batch), dropping the
    /// others from every cache: rows whose reward is decided stop costing compute.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&k| k >= self.batch) {
            return Err(Error::Request(format!(
                "retain: {keep:?} is not an ascending subset of 0..{}",
                self.batch
            )));
        }
        if keep.len() == self.batch {
            return Ok(());
        }
        let dev = self.model.device();
        let keep_t = index_tensor(keep, dev);
        self.key_valid = self.key_valid.index_select(0, &keep_t);
        self.next_pos = self.next_pos.index_select(0, &keep_t);
        let new_b = keep.len();
        let mut slots = Vec::with_capacity(self.slots.len());
        for mut slot in std::mem::take(&mut self.slots) {
            // Positions inside the slot's cache of the kept rows, and their new batch indices.
            let (local, rows): (Vec<usize>, Vec<usize>) = match &slot.rows {
                None => (
                    (0..keep.len()).map(|i| keep[i]).collect(),
                    (0..new_b).collect(),
                ),
                Some((rows, _)) => keep
                    .iter()
                    .enumerate()
                    .filter_map(|(new_i, k)| rows.binary_search(k).ok().map(|pos| (pos, new_i)))
                    .unzip(),
            };
            if rows.is_empty() {
                continue;
            }
            let local_t = index_tensor(&local, dev);
            slot.kv = slot
                .kv
                .map(|(k, v)| (k.index_select(0, &local_t), v.index_select(0, &local_t)));
            slot.rows = (rows.len() != new_b).then(|| {
                let t = index_tensor(&rows, dev);
                (rows, t)
            });
            slots.push(slot);
        }
        self.slots = slots;
        self.batch = new_b;
        Ok(())
    }
}

/// Options of greedy generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most new tokens per sequence.
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (not included in the output).
    pub stop_ids: Vec<u32>,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New token ids (stop token excluded).
    pub tokens: Vec<u32>,
    /// Whether a stop id ended the sequence (else the token budget did).
    pub stopped: bool,
}

/// Greedy choice per row of `[B, V]` logits.
pub fn argmax_tokens(logits: &Tensor) -> Result<Vec<u32>> {
    let ids = logits.argmax(-1, false).to_device(Device::Cpu);
    let v: Vec<i64> = Vec::<i64>::try_from(&ids)?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

impl Model {
    /// Logits `[T_i, V]` (f32) at every position of each prompt, run along its path.
    pub fn prompt_logits(&self, prompts: &[Vec<u32>], paths: &[LayerPath]) -> Result<Vec<Tensor>> {
        let _g = tch::no_grad_guard();
        let mut batch = PathBatch::new(self, paths)?;
        let h = batch.prefill(prompts)?;
        let t = h.size()[1];
        Ok(prompts
            .iter()
            .enumerate()
            .map(|(r, p)| {
                self.logits(
                    &h.get(r as i64)
                        .narrow(0, t - p.len() as i64, p.len() as i64),
                )
            })
            .collect())
    }

    /// Greedy generation for a batch of prompts, each along its own path.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        paths: &[LayerPath],
        opts: &GenerateOptions,
    ) -> Result<Vec<Generated>> {
        self.generate_until(prompts, paths, opts, |_, _| false)
    }

    /// Greedy generation that also ends a row as soon as `decided(row, tokens_so_far)` says its
    /// outcome is known (e.g. its reward is decided). Ended rows leave the batch, so they stop
    /// costing compute; the others continue exactly as they would have.
    pub fn generate_until(
        &self,
        prompts: &[Vec<u32>],
        paths: &[LayerPath],
        opts: &GenerateOptions,
        mut decided: impl FnMut(usize, &[u32]) -> bool,
    ) -> Result<Vec<Generated>> {
        let _g = tch::no_grad_guard();
        let mut batch = PathBatch::new(self, paths)?;
        let h = batch.prefill(prompts)?;
        let t = h.size()[1];
        let mut out: Vec<Generated> = prompts
            .iter()
            .map(|_| Generated {
                tokens: vec![],
                stopped: false,
            })
            .collect();
        // Output index of each batch row still decoding.
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        let mut next = argmax_tokens(&self.logits(&h.select(1, t - 1)))?;
        for step in 0..opts.max_new_tokens {
            let mut keep = Vec::with_capacity(active.len());
            for (row, (&i, &tok)) in active.iter().zip(&next).enumerate() {
                let g = &mut out[i];
                if opts.stop_ids.contains(&tok) {
                    g.stopped = true;
                    continue;
                }
                g.tokens.push(tok);
                if !decided(i, &g.tokens) {
                    keep.push(row);
                }
            }
            if keep.is_empty() || step + 1 == opts.max_new_tokens {
                break;
            }
            batch.retain(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
            let feed: Vec<u32> = keep.iter().map(|&r| next[r]).collect();
            next = argmax_tokens(&batch.decode_step(&feed)?)?;
        }
        Ok(out)
    }
}
