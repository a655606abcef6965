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
use crate::prefix::{PrefixCache, Resume};
use crate::profile::{span, Phase};
use drllm_path::LayerPath;

mod gated;
pub use gated::GateFn;

/// A router as the executor sees it: given block `l` and the hidden state entering it
/// (`[B, T, H]`, left-padded), each row's count for that block (0, 1 or 2).
pub type RouteFn<'a> = dyn FnMut(usize, &Tensor) -> Vec<u8> + 'a;

/// A router for [`crate::Paths::RoutedGrouped`]: also told which prompts (indices into the
/// caller's list) the rows of `h` are.
pub type GroupRouteFn<'a> = dyn FnMut(&[usize], usize, &Tensor) -> Vec<u8> + 'a;

struct Slot {
    layer: usize,
    /// Rows of the batch that use this slot (ascending, and as an index tensor); `None` = all.
    rows: Option<(Vec<usize>, Tensor)>,
    kv: Kv,
}

/// Decoding state of a batch of sequences along their paths.
pub struct PathBatch<'m> {
    model: &'m Model,
    /// Each row's path.
    paths: Vec<LayerPath>,
    slots: Vec<Slot>,
    /// `[B, T_total]`: which cached positions are real tokens (false = left padding).
    key_valid: Tensor,
    /// `[B]`: position id of each row's next token.
    next_pos: Tensor,
    batch: usize,
    /// Whether any row carries left padding (else attention needs no explicit mask).
    padded: bool,
    /// Per row: block applications its prefill resumed from a prefix cache.
    reused: Vec<usize>,
    /// Per row: the counts chosen so far by a routed prefill.
    routed: Vec<Vec<u8>>,
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
            paths: paths.to_vec(),
            slots,
            key_valid: Tensor::zeros([b as i64, 0], (Kind::Bool, dev)),
            next_pos: Tensor::zeros([b as i64], (Kind::Int64, dev)),
            batch: b,
            padded: false,
            reused: vec![0; b],
            routed: vec![],
        })
    }

    /// A batch of `batch` rows whose paths are chosen during [`PathBatch::prefill_routed`].
    pub fn new_routed(model: &'m Model, batch: usize) -> Self {
        let n = model.num_layers();
        let dev = model.device();
        PathBatch {
            model,
            paths: vec![],
            slots: vec![],
            key_valid: Tensor::zeros([batch as i64, 0], (Kind::Bool, dev)),
            next_pos: Tensor::zeros([batch as i64], (Kind::Int64, dev)),
            batch,
            padded: false,
            reused: vec![0; batch],
            routed: vec![vec![0; n]; batch],
        }
    }

    /// Each row's path (for a routed batch: the one chosen by its prefill).
    pub fn paths(&self) -> &[LayerPath] {
        &self.paths
    }

    /// Runs new tokens `[B, T]` through the paths. `valid[B, T]` marks real tokens (false = left
    /// padding, allowed only in the first call). With `resume` (prefill only), row `r` starts at
    /// block `resume[r].start` from its cached state. With `record`, also returns the hidden
    /// state entering each block `l` (`rec[l]`, for blocks after a block some row applies).
    /// With `route` (prefill of a batch made by [`PathBatch::new_routed`]), each row's count
    /// for block `l` is chosen from the hidden state entering it, and the block's slots are made
    /// then. Returns final-normed hidden states `[B, T, H]`.
    fn step(
        &mut self,
        ids: &Tensor,
        valid: &Tensor,
        padded: bool,
        resume: Option<&[Resume]>,
        record: bool,
        mut route: Option<&mut RouteFn<'_>>,
    ) -> (Tensor, Vec<Option<Tensor>>) {
        let model = self.model;
        let t = ids.size()[1];
        // Positions count real tokens only: left padding does not shift a row's positions.
        let positions =
            valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1 + self.next_pos.unsqueeze(1);
        let positions = positions.clamp_min(0);
        self.next_pos = positions.select(1, t - 1) + 1;
        let past = self.key_valid.size()[1];
        self.key_valid = Tensor::cat(&[&self.key_valid, valid], 1);
        self.padded |= padded;
        let mask = model.windowed(
            self.attention_mask(past, t),
            past,
            t,
            &self.key_valid,
            &positions,
        );
        let rope = model.rope(&positions);
        let mut h = model.embed(ids);
        let n_layers = model.num_layers();
        let mut rec: Vec<Option<Tensor>> = (0..if record { n_layers + 1 } else { 0 })
            .map(|_| None)
            .collect();
        if record && resume.is_none() {
            rec[0] = Some(h.shallow_clone());
        }
        let mut next_slot = 0;
        for l in 0..=n_layers {
            if let Some(rs) = resume.filter(|_| l > 0) {
                h = resumed_states(h, rs, l, t);
            }
            if l == n_layers {
                break;
            }
            if let Some(route) = route.as_mut() {
                let counts = route(l, &h);
                self.add_routed_slots(l, &counts, next_slot);
            }
            let first = next_slot;
            while next_slot < self.slots.len() && self.slots[next_slot].layer == l {
                h = self.run_slot(next_slot, next_slot - first, &h, &rope, &mask, resume);
                next_slot += 1;
            }
            if record && next_slot > first {
                rec[l + 1] = Some(h.shallow_clone());
            }
        }
        (model.final_norm(&h), rec)
    }

    /// Attention over `past` cached positions and `t` new ones: none needed for one new token
    /// without padding, plain causal for a first unpadded call, else causal over new tokens,
    /// all past keys visible, padded keys hidden (every query sees itself, so rows of padding
    /// stay finite).
    fn attention_mask(&self, past: i64, t: i64) -> Attn {
        if !self.padded && t == 1 {
            return Attn::All;
        }
        if !self.padded && past == 0 {
            return Attn::Causal;
        }
        let dev = self.model.device();
        let (b, total) = (self.batch as i64, past + t);
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
    }

    /// Makes block `l`'s slots (inserted at slot index `at`) from the routers' `counts`, one
    /// per row, and records them as the rows' path so far.
    fn add_routed_slots(&mut self, l: usize, counts: &[u8], at: usize) {
        let dev = self.model.device();
        let b = self.batch;
        let max = counts.iter().copied().max().unwrap_or(0);
        for rep in 0..max {
            let rows: Vec<usize> = (0..b).filter(|&r| counts[r] > rep).collect();
            let rows = (rows.len() != b).then(|| {
                let t = index_tensor(&rows, dev);
                (rows, t)
            });
            let slot = Slot {
                layer: l,
                rows,
                kv: None,
            };
            self.slots.insert(at + rep as usize, slot);
        }
        for (r, &c) in counts.iter().enumerate() {
            self.routed[r][l] = c;
        }
    }

    /// Applies slot `s` (repetition `rep` of its block) to `h`, extending the slot's KV cache.
    /// Rows resuming past the block (`resume`) bring the slot's keys and values from their
    /// cached state instead of computing them.
    fn run_slot(
        &mut self,
        s: usize,
        rep: usize,
        h: &Tensor,
        rope: &crate::model::Rope,
        mask: &Attn,
        resume: Option<&[Resume]>,
    ) -> Tensor {
        let model = self.model;
        let dev = model.device();
        let (b, t) = (self.batch, h.size()[1]);
        let slot = &mut self.slots[s];
        let l = slot.layer;
        let (block, cfg) = (&model.blocks[l], &model.cfg);
        let slot_rows: Vec<usize> = match &slot.rows {
            None => (0..b).collect(),
            Some((rows, _)) => rows.clone(),
        };
        let start = |r: usize| resume.map_or(0, |rs| rs[r].start);
        // Rows of this slot that compute it; the others bring its KV from the cache.
        let (computed, cached): (Vec<usize>, Vec<usize>) =
            (0..slot_rows.len()).partition(|&i| start(slot_rows[i]) <= l);
        if cached.is_empty() {
            let idx = slot.rows.as_ref().map(|(_, t)| t);
            return forward_rows(block, cfg, h, rope, mask, idx, &mut slot.kv);
        }
        let rs = resume.unwrap_or_default();
        let cache_in = span(Phase::CacheIn);
        let kv_of = |i: usize, which: usize| -> Tensor {
            let (k, v) = &rs[slot_rows[i]].kv[l][rep];
            left_pad(if which == 0 { k } else { v }, 1, t)
        };
        let k_cached = Tensor::stack(&cached.iter().map(|&i| kv_of(i, 0)).collect::<Vec<_>>(), 0);
        let v_cached = Tensor::stack(&cached.iter().map(|&i| kv_of(i, 1)).collect::<Vec<_>>(), 0);
        if computed.is_empty() {
            slot.kv = Some((k_cached, v_cached));
            return h.shallow_clone();
        }
        drop(cache_in);
        let global: Vec<usize> = computed.iter().map(|&i| slot_rows[i]).collect();
        let idx = index_tensor(&global, dev);
        let mut kv: Kv = None;
        let h = forward_rows(block, cfg, h, rope, mask, Some(&idx), &mut kv);
        let (kc, vc) = kv.expect("a block's forward always fills its KV");
        let _c = span(Phase::CacheIn);
        let mut shape = kc.size();
        shape[0] = slot_rows.len() as i64;
        let (ci, hi) = (index_tensor(&computed, dev), index_tensor(&cached, dev));
        let k_all = Tensor::zeros(&shape, (kc.kind(), dev))
            .index_copy(0, &ci, &kc)
            .index_copy(0, &hi, &k_cached.to_kind(kc.kind()));
        let v_all = Tensor::zeros(&shape, (vc.kind(), dev))
            .index_copy(0, &ci, &vc)
            .index_copy(0, &hi, &v_cached.to_kind(vc.kind()));
        slot.kv = Some((k_all, v_all));
        h
    }

    /// Checks prompts and lays them out left-padded: (ids, valid, any padding).
    fn layout(&self, prompts: &[Vec<u32>]) -> Result<(Tensor, Tensor, bool)> {
        if prompts.len() != self.batch {
            return Err(Error::Request(format!(
                "{} prompts for a batch of {} paths",
                prompts.len(),
                self.batch
            )));
        }
        if prompts.is_empty() {
            return Err(Error::Request("no prompts".into()));
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Request(format!("prompt {i} is empty")));
        }
        self.model.check_context(prompts, 0)?;
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
        Ok((ids, valid, padded))
    }

    /// Prefills left-padded prompts; returns final-normed hidden states `[B, T, H]`.
    pub fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<Tensor> {
        let _p = span(Phase::Prefill);
        let (ids, valid, padded) = self.layout(prompts)?;
        Ok(self.step(&ids, &valid, padded, None, false, None).0)
    }

    /// Prefills left-padded prompts and returns, for every block `l`, the hidden state entering
    /// it along each row's path (`[B, T, H]`, before any of block `l`'s applications; a row that
    /// skips block `l` enters `l + 1` with the same state). These are the routers' inputs under
    /// teacher forcing.
    pub fn prefill_block_inputs(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Tensor>> {
        let (ids, valid, padded) = self.layout(prompts)?;
        let (_, rec) = self.step(&ids, &valid, padded, None, true, None);
        let mut out: Vec<Tensor> = Vec::with_capacity(rec.len().saturating_sub(1));
        for r in rec.into_iter().take(self.model.num_layers()) {
            let t = match r {
                Some(t) => t,
                // No row applied the block before: the state is the one entering that block.
                None => out
                    .last()
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| Error::Request("no embedding state recorded".into()))?,
            };
            out.push(t);
        }
        Ok(out)
    }

    /// Prefills a batch made by [`PathBatch::new_routed`], routing once per prompt:
    /// `route(l, h)` gets the hidden state entering block `l` (`[B, T, H]`, left-padded like the
    /// prompts) along the counts chosen for blocks `0..l`, and returns each row's count for
    /// block `l` (0, 1 or 2). Decoding then follows the chosen paths, each (block, repetition)
    /// slot with its own KV cache. Returns final-normed hidden states `[B, T, H]`.
    pub fn prefill_routed(
        &mut self,
        prompts: &[Vec<u32>],
        route: &mut RouteFn<'_>,
    ) -> Result<Tensor> {
        if self.routed.len() != self.batch || !self.slots.is_empty() {
            return Err(Error::Request(
                "prefill_routed needs a fresh batch from PathBatch::new_routed".into(),
            ));
        }
        let (ids, valid, padded) = self.layout(prompts)?;
        let b = self.batch;
        let mut bad: Option<String> = None;
        let mut checked = |l: usize, h: &Tensor| -> Vec<u8> {
            let counts = route(l, h);
            if counts.len() != b || counts.iter().any(|&c| c > 2) {
                bad.get_or_insert_with(|| {
                    format!("the router of block {l} returned {counts:?} for {b} rows (counts 0, 1 or 2)")
                });
                return vec![1; b];
            }
            counts
        };
        let (h, _) = self.step(&ids, &valid, padded, None, false, Some(&mut checked));
        if let Some(msg) = bad {
            return Err(Error::Request(msg));
        }
        self.paths = std::mem::take(&mut self.routed)
            .into_iter()
            .map(LayerPath::from_counts)
            .collect::<std::result::Result<_, _>>()?;
        Ok(h)
    }

    /// [`PathBatch::prefill`] with prefix sharing: each row resumes from the longest prefix of
    /// its path cached for its prompt, and the states of its new prefixes are stored for later
    /// candidates.
    pub fn prefill_cached(
        &mut self,
        prompts: &[Vec<u32>],
        cache: &mut PrefixCache,
    ) -> Result<Tensor> {
        let _p = span(Phase::Prefill);
        let (ids, valid, padded) = self.layout(prompts)?;
        if cache.budget_bytes() == 0 {
            return Ok(self.step(&ids, &valid, padded, None, false, None).0);
        }
        let resume: Vec<Resume> = {
            let _c = span(Phase::CacheIn);
            (0..self.batch)
                .map(|r| cache.lookup(&prompts[r], self.paths[r].counts()))
                .collect()
        };
        let (h, rec) = self.step(&ids, &valid, padded, Some(&resume), true, None);
        self.reused = (0..self.batch)
            .map(|r| {
                self.paths[r].counts()[..resume[r].start]
                    .iter()
                    .map(|&c| c as usize)
                    .sum()
            })
            .collect();
        let t = ids.size()[1];
        let _c = span(Phase::CacheOut);
        // Store every new prefix, long to short (shorter ones end up more recent).
        for r in 0..self.batch {
            let counts = self.paths[r].counts();
            let pad = t - prompts[r].len() as i64;
            let len = prompts[r].len() as i64;
            for l in (resume[r].start + 1..=counts.len()).rev() {
                if counts[l - 1] == 0 || cache.contains(&prompts[r], &counts[..l]) {
                    continue;
                }
                let Some(hid) = &rec[l] else { continue };
                let hidden = hid.get(r as i64).narrow(0, pad, len).copy();
                let kv: Vec<(Tensor, Tensor)> = self
                    .slots
                    .iter()
                    .filter(|s| s.layer == l - 1)
                    .filter_map(|s| {
                        let local = match &s.rows {
                            None => r,
                            Some((rows, _)) => rows.binary_search(&r).ok()?,
                        };
                        let (k, v) = s.kv.as_ref()?;
                        let cut = |x: &Tensor| x.get(local as i64).narrow(1, pad, len).copy();
                        Some((cut(k), cut(v)))
                    })
                    .collect();
                cache.insert(&prompts[r], &counts[..l], hidden, kv);
            }
        }
        Ok(h)
    }

    /// Feeds a few more tokens per row after a prefill (`rows[r]` for row `r`; rows may differ
    /// in length, shorter ones are padded on the right with hidden positions, and may be empty
    /// when another is not). Returns final-normed hidden states `[B, T, H]` for the new
    /// positions, `T` the longest row; a row's real tokens come first. Used to score several
    /// continuations of one prefilled prompt (see [`Model::continuation_logliks`]).
    pub fn extend(&mut self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let _p = span(Phase::Choices);
        if rows.len() != self.batch {
            return Err(Error::Request(format!(
                "{} token rows for a batch of {}",
                rows.len(),
                self.batch
            )));
        }
        if self.key_valid.size()[1] == 0 {
            return Err(Error::Request("extend needs a prefilled batch".into()));
        }
        let vocab = self.model.cfg.vocab_size;
        if let Some(id) = rows.iter().flatten().find(|&&id| id as i64 >= vocab) {
            return Err(Error::Request(format!(
                "token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let dev = self.model.device();
        let hidden = self.model.cfg.hidden_size;
        if t == 0 {
            return Ok(Tensor::zeros(
                [self.batch as i64, 0, hidden],
                (self.model.kind(), dev),
            ));
        }
        let mut ids = vec![0i64; self.batch * t];
        let mut valid = vec![false; self.batch * t];
        for (r, row) in rows.iter().enumerate() {
            for (j, &id) in row.iter().enumerate() {
                ids[r * t + j] = id as i64;
                valid[r * t + j] = true;
            }
        }
        let shape = [self.batch as i64, t as i64];
        let padded = rows.iter().any(|r| r.len() < t);
        let ids = Tensor::from_slice(&ids).view(shape).to_device(dev);
        let valid = Tensor::from_slice(&valid).view(shape).to_device(dev);
        Ok(self.step(&ids, &valid, padded, None, false, None).0)
    }

    /// Feeds one token per row; returns logits `[B, V]` (f32) for the next token.
    pub fn decode_step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let _p = span(Phase::Decode);
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
        let (h, _) = self.step(&ids, &valid, false, None, false, None);
        Ok(self.model.logits(&h.select(1, 0)))
    }
}

/// One application of `block` to the rows `idx` of `h` (all rows when `None`), extending `kv`;
/// returns `h` with those rows replaced.
fn forward_rows(
    block: &crate::model::Block,
    cfg: &crate::config::ModelConfig,
    h: &Tensor,
    rope: &crate::model::Rope,
    mask: &Attn,
    idx: Option<&Tensor>,
    kv: &mut Kv,
) -> Tensor {
    match idx {
        None => block.forward(cfg, h, rope, mask, kv),
        Some(idx) => {
            let out = block.forward(
                cfg,
                &h.index_select(0, idx),
                &rope.rows(idx),
                &mask.rows(idx),
                kv,
            );
            h.index_copy(0, idx, &out)
        }
    }
}

/// `h` with the rows that resume at block `l` replaced by their cached hidden state.
fn resumed_states(h: Tensor, rs: &[Resume], l: usize, t: i64) -> Tensor {
    let _c = span(Phase::CacheIn);
    let rows: Vec<usize> = (0..rs.len()).filter(|&r| rs[r].start == l).collect();
    let states: Vec<Tensor> = rows
        .iter()
        .filter_map(|&r| rs[r].hidden.as_ref().map(|x| left_pad(x, 0, t)))
        .collect();
    if rows.is_empty() || states.len() != rows.len() {
        return h;
    }
    let src = Tensor::stack(&states, 0).to_kind(h.kind());
    h.index_copy(0, &index_tensor(&rows, h.device()), &src)
}

/// `x` with zeros before its real positions along `dim` (the time axis), to length `t`.
fn left_pad(x: &Tensor, dim: usize, t: i64) -> Tensor {
    let len = x.size()[dim];
    if len == t {
        return x.shallow_clone();
    }
    let mut shape = x.size();
    shape[dim] = t - len;
    Tensor::cat(
        &[&Tensor::zeros(&shape, (x.kind(), x.device())), x],
        dim as i64,
    )
}

fn index_tensor(rows: &[usize], dev: Device) -> Tensor {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_slice(&v).to_device(dev)
}

impl<'m> PathBatch<'m> {
    /// Joins batches (same model, same step count: all prefilled, none decoded yet, or all
    /// decoded equally) into one, rows in order; shorter caches are left-padded. Lets prompts
    /// prefill in groups of similar length and then decode together.
    pub fn concat(parts: Vec<PathBatch<'m>>) -> Result<PathBatch<'m>> {
        let _b = span(Phase::Batch);
        let Some(first) = parts.first() else {
            return Err(Error::Request("concat of no batches".into()));
        };
        let model = first.model;
        if parts.iter().any(|p| !std::ptr::eq(p.model, model)) {
            return Err(Error::Request(
                "concat of batches of different models".into(),
            ));
        }
        if parts.len() == 1 {
            let mut parts = parts;
            return parts
                .pop()
                .ok_or_else(|| Error::Request("concat of no batches".into()));
        }
        let dev = model.device();
        let t = parts
            .iter()
            .map(|p| p.key_valid.size()[1])
            .max()
            .unwrap_or(0);
        let key_valid = Tensor::cat(
            &parts
                .iter()
                .map(|p| left_pad(&p.key_valid, 1, t))
                .collect::<Vec<_>>(),
            0,
        );
        let next_pos = Tensor::cat(&parts.iter().map(|p| &p.next_pos).collect::<Vec<_>>(), 0);
        let padded = parts.iter().any(|p| p.padded || p.key_valid.size()[1] != t);
        // Slots by (layer, repetition), in block order.
        let mut keys: Vec<(usize, usize)> = vec![];
        for p in &parts {
            let mut rep = std::collections::HashMap::new();
            for s in &p.slots {
                let r = rep.entry(s.layer).or_insert(0usize);
                if !keys.contains(&(s.layer, *r)) {
                    keys.push((s.layer, *r));
                }
                *r += 1;
            }
        }
        keys.sort();
        let batch: usize = parts.iter().map(|p| p.batch).sum();
        let mut slots = Vec::with_capacity(keys.len());
        for &(layer, rep) in &keys {
            let (mut rows, mut ks, mut vs) = (vec![], vec![], vec![]);
            let mut offset = 0;
            for p in &parts {
                if let Some(s) = p.slots.iter().filter(|s| s.layer == layer).nth(rep) {
                    match &s.rows {
                        None => rows.extend(offset..offset + p.batch),
                        Some((r, _)) => rows.extend(r.iter().map(|&i| i + offset)),
                    }
                    if let Some((k, v)) = &s.kv {
                        ks.push(left_pad(k, 2, t));
                        vs.push(left_pad(v, 2, t));
                    }
                }
                offset += p.batch;
            }
            let kv = (!ks.is_empty()).then(|| (Tensor::cat(&ks, 0), Tensor::cat(&vs, 0)));
            if kv
                .as_ref()
                .is_some_and(|(k, _)| k.size()[0] != rows.len() as i64)
            {
                return Err(Error::Request(
                    "concat of batches at different steps (some prefilled, some not)".into(),
                ));
            }
            let rows = (rows.len() != batch).then(|| {
                let idx = index_tensor(&rows, dev);
                (rows, idx)
            });
            slots.push(Slot { layer, rows, kv });
        }
        Ok(PathBatch {
            model,
            paths: parts.iter().flat_map(|p| p.paths.iter().cloned()).collect(),
            slots,
            key_valid,
            next_pos,
            batch,
            padded,
            reused: parts
                .iter()
                .flat_map(|p| p.reused.iter().copied())
                .collect(),
            routed: vec![],
        })
    }

    /// Drops the leading cache positions that are padding in every row (left behind when the
    /// longer rows left the batch), so a batch that keeps admitting and retiring rows does not
    /// keep their length. Positions are per row, so nothing else changes.
    pub fn trim_padding(&mut self) {
        let _b = span(Phase::Batch);
        let total = self.key_valid.size()[1];
        if total == 0 || self.batch == 0 {
            return;
        }
        let lead = self
            .key_valid
            .to_kind(Kind::Int64)
            .cumsum(1, Kind::Int64)
            .eq(0)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
            .min()
            .int64_value(&[]);
        if lead > 0 {
            let keep = total - lead;
            self.key_valid = self.key_valid.narrow(1, lead, keep);
            for s in &mut self.slots {
                s.kv =
                    s.kv.take()
                        .map(|(k, v)| (k.narrow(2, lead, keep), v.narrow(2, lead, keep)));
            }
        }
        if self.key_valid.all().int64_value(&[]) != 0 {
            self.padded = false;
        }
    }

    /// Per row: block applications of its prefill resumed from a prefix cache (0 without one).
    pub fn reused_blocks(&self) -> &[usize] {
        &self.reused
    }

    /// Positions held per row so far (prompt and fed tokens, padding included).
    pub fn seq_len(&self) -> usize {
        self.key_valid.size()[1] as usize
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.batch
    }

    /// Whether the batch has no rows left.
    pub fn is_empty(&self) -> bool {
        self.batch == 0
    }

    /// A new batch of the rows `keep` (in any order; a row may be taken several times, each
    /// copy with its own caches from then on), leaving this one as it is: lets rows prefilled in
    /// different batches decode in other groupings, and one prefilled prompt be continued
    /// several ways.
    pub fn select_rows(&self, keep: &[usize]) -> Result<PathBatch<'m>> {
        let mut b = PathBatch {
            model: self.model,
            paths: self.paths.clone(),
            slots: self
                .slots
                .iter()
                .map(|s| Slot {
                    layer: s.layer,
                    rows: s.rows.as_ref().map(|(r, t)| (r.clone(), t.shallow_clone())),
                    // Caches only ever grow by concatenation, so sharing them is safe.
                    kv: s
                        .kv
                        .as_ref()
                        .map(|(k, v)| (k.shallow_clone(), v.shallow_clone())),
                })
                .collect(),
            key_valid: self.key_valid.shallow_clone(),
            next_pos: self.next_pos.shallow_clone(),
            batch: self.batch,
            padded: self.padded,
            reused: self.reused.clone(),
            routed: vec![],
        };
        if let Some(k) = keep.iter().find(|&&k| k >= self.batch) {
            return Err(Error::Request(format!(
                "select_rows: row {k} is not in the batch of {}",
                self.batch
            )));
        }
        b.take_rows(keep);
        Ok(b)
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
        self.take_rows(keep);
        Ok(())
    }

    /// Keeps the rows `keep` (checked by the caller: in range), in that order.
    fn take_rows(&mut self, keep: &[usize]) {
        let _b = span(Phase::Batch);
        if keep.len() == self.batch && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return;
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
        self.paths = keep.iter().map(|&k| self.paths[k].clone()).collect();
        self.reused = keep.iter().map(|&k| self.reused[k]).collect();
        self.batch = new_b;
    }
}
