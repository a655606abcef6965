//! Scoring along layer paths: logits at every prompt position, next-token logits of many
//! candidates with prefix sharing, and log-likelihoods of continuations (multiple choice as
//! lm-evaluation-harness scores it: each prompt is prefilled once along its path, then every one
//! of its continuations is fed as a row resuming from that prefill, all continuations of a batch
//! in one forward pass).
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::exec::PathBatch;
use crate::model::Model;
use crate::prefix::PrefixCache;
use drllm_path::LayerPath;

/// Continuation tokens fed per forward pass at most (bounds the `[rows, T, vocab]` logits).
const TOKENS_PER_PASS: usize = 512;
/// Rows x (prompt + continuation) positions per pass at most: every row carries a copy of its
/// prompt's KV caches.
const POSITIONS_PER_PASS: usize = 8192;

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

    /// Next-token logits `[B, V]` (f32) after each prompt along its path, prefilled like
    /// [`crate::Paths::Cached`]; also each row's block applications resumed from `cache`.
    pub fn last_logits_cached(
        &self,
        prompts: &[Vec<u32>],
        paths: &[LayerPath],
        cache: &mut PrefixCache,
    ) -> Result<(Tensor, Vec<usize>)> {
        let _g = tch::no_grad_guard();
        let (batch, logits, order) = self.prefill_grouped(prompts, paths, cache)?;
        // Back from the batch's row order to the caller's.
        let mut reused = vec![0; prompts.len()];
        let mut inverse = vec![0i64; order.len()];
        for (row, &i) in order.iter().enumerate() {
            reused[i] = batch.reused_blocks()[row];
            inverse[i] = row as i64;
        }
        let idx = Tensor::from_slice(&inverse).to_device(logits.device());
        Ok((logits.index_select(0, &idx), reused))
    }

    /// Prefills in groups of similar prompt length and joins the groups into one batch.
    /// Returns the batch, its rows' next-token logits, and each row's index into `prompts`.
    pub(crate) fn prefill_grouped(
        &self,
        prompts: &[Vec<u32>],
        paths: &[LayerPath],
        cache: &mut PrefixCache,
    ) -> Result<(PathBatch<'_>, Tensor, Vec<usize>)> {
        if prompts.len() != paths.len() {
            return Err(Error::Request(format!(
                "{} prompts for {} paths",
                prompts.len(),
                paths.len()
            )));
        }
        let _p = crate::profile::span(crate::profile::Phase::Prefill);
        let groups = length_groups(prompts);
        let mut parts = Vec::with_capacity(groups.len());
        let mut logits = Vec::with_capacity(groups.len());
        for g in &groups {
            let gp: Vec<Vec<u32>> = g.iter().map(|&i| prompts[i].clone()).collect();
            let gpaths: Vec<LayerPath> = g.iter().map(|&i| paths[i].clone()).collect();
            let mut b = PathBatch::new(self, &gpaths)?;
            let h = b.prefill_cached(&gp, cache)?;
            let t = h.size()[1];
            logits.push(self.logits(&h.select(1, t - 1)));
            parts.push(b);
        }
        let order = groups.concat();
        Ok((PathBatch::concat(parts)?, Tensor::cat(&logits, 0), order))
    }

    /// Summed log-probability of each continuation `conts[r][k]` after row `r` of a prefilled
    /// `batch` (along the row's path), given `last_logits` `[B, V]`, the logits after each row's
    /// prompt. Continuations must be non-empty. The batch itself is left as it is.
    pub fn continuation_logliks(
        &self,
        batch: &PathBatch<'_>,
        last_logits: &Tensor,
        conts: &[Vec<Vec<u32>>],
    ) -> Result<Vec<Vec<f64>>> {
        let _g = tch::no_grad_guard();
        if conts.len() != batch.len() || last_logits.size().first() != Some(&(batch.len() as i64)) {
            return Err(Error::Request(format!(
                "{} continuation lists and {:?} logits for a batch of {}",
                conts.len(),
                last_logits.size(),
                batch.len()
            )));
        }
        if let Some(r) = conts.iter().position(|c| c.iter().any(Vec::is_empty)) {
            return Err(Error::Request(format!("row {r} has an empty continuation")));
        }
        let vocab = self.cfg.vocab_size;
        if let Some(id) = conts
            .iter()
            .flatten()
            .flatten()
            .find(|&&id| id as i64 >= vocab)
        {
            return Err(Error::Request(format!(
                "token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        // The first token of each continuation is scored from the prompt's own logits.
        let first = last_logits
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .to_device(tch::Device::Cpu);
        let mut out: Vec<Vec<f64>> = conts
            .iter()
            .enumerate()
            .map(|(r, cs)| {
                cs.iter()
                    .map(|c| first.double_value(&[r as i64, c[0] as i64]))
                    .collect()
            })
            .collect();
        // The rest: one row per continuation, resuming from its prompt's prefill; longest first,
        // so each pass pads little.
        let mut jobs: Vec<(usize, usize)> = conts
            .iter()
            .enumerate()
            .flat_map(|(r, cs)| (0..cs.len()).map(move |k| (r, k)))
            .filter(|&(r, k)| conts[r][k].len() > 1)
            .collect();
        jobs.sort_by_key(|&(r, k)| std::cmp::Reverse(conts[r][k].len()));
        let mut start = 0;
        while start < jobs.len() {
            // Rows of this pass: as many as fit the token bound (at least one).
            let widest = conts[jobs[start].0][jobs[start].1].len() - 1;
            let rows_per_pass = (TOKENS_PER_PASS / widest.max(1))
                .min(POSITIONS_PER_PASS / (batch.seq_len() + widest).max(1))
                .max(1);
            let end = (start + rows_per_pass).min(jobs.len());
            let part = &jobs[start..end];
            let rows: Vec<usize> = part.iter().map(|&(r, _)| r).collect();
            let mut b = batch.select_rows(&rows)?;
            let feed: Vec<Vec<u32>> = part
                .iter()
                .map(|&(r, k)| conts[r][k][..conts[r][k].len() - 1].to_vec())
                .collect();
            let h = b.extend(&feed)?;
            // Logits only at real positions (not the right padding): the LM head is a large
            // share of this pass.
            let t = h.size()[1];
            let (mut at, mut targets) = (vec![], vec![]);
            for (i, &(r, k)) in part.iter().enumerate() {
                for (j, &tok) in conts[r][k][1..].iter().enumerate() {
                    at.push(i as i64 * t + j as i64);
                    targets.push(tok as i64);
                }
            }
            let dev = h.device();
            let hs = h
                .view([-1, h.size()[2]])
                .index_select(0, &Tensor::from_slice(&at).to_device(dev));
            let logp = self.logits(&hs).log_softmax(-1, Kind::Float);
            let picked = logp
                .gather(
                    1,
                    &Tensor::from_slice(&targets).to_device(dev).unsqueeze(1),
                    false,
                )
                .squeeze_dim(1)
                .to_device(tch::Device::Cpu);
            let picked: Vec<f32> = Vec::try_from(&picked)?;
            let mut next = 0;
            for &(r, k) in part {
                let n = conts[r][k].len() - 1;
                out[r][k] += picked[next..next + n]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>();
                next += n;
            }
            start = end;
        }
        Ok(out)
    }

    /// Continuation log-likelihoods (see [`Model::continuation_logliks`]) of search candidates,
    /// each prompt along its path: prefilled in groups of similar length, sharing path prefixes
    /// through `cache`; also each row's block applications resumed from the cache.
    pub fn cloze_logliks_cached(
        &self,
        prompts: &[Vec<u32>],
        paths: &[LayerPath],
        conts: &[Vec<Vec<u32>>],
        cache: &mut PrefixCache,
    ) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
        let _g = tch::no_grad_guard();
        if conts.len() != prompts.len() {
            return Err(Error::Request(format!(
                "{} continuation lists for {} prompts",
                conts.len(),
                prompts.len()
            )));
        }
        let (batch, last, order) = self.prefill_grouped(prompts, paths, cache)?;
        let ordered: Vec<Vec<Vec<u32>>> = order.iter().map(|&i| conts[i].clone()).collect();
        let ll = self.continuation_logliks(&batch, &last, &ordered)?;
        let mut out = vec![vec![]; prompts.len()];
        let mut reused = vec![0; prompts.len()];
        for (row, (&i, l)) in order.iter().zip(ll).enumerate() {
            out[i] = l;
            reused[i] = batch.reused_blocks()[row];
        }
        Ok((out, reused))
    }
}

/// Prompt indices grouped for prefill: longest first, a group closed when padding would exceed
/// a tenth of its tokens. Padding is pure waste in prefill, and a prefill of even one prompt of
/// ordinary length keeps the matmuls large, so small groups cost little.
fn length_groups(prompts: &[Vec<u32>]) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..prompts.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut groups: Vec<Vec<usize>> = vec![];
    let (mut max, mut real) = (0usize, 0usize);
    for i in idx {
        let len = prompts[i].len();
        match groups.last_mut() {
            Some(g) if max * (g.len() + 1) * 10 <= (real + len) * 11 => {
                g.push(i);
                real += len;
            }
            _ => {
                groups.push(vec![i]);
                (max, real) = (len, len);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::length_groups;

    #[test]
    fn length_groups_bound_padding_and_cover_every_prompt() {
        let lens = [148, 80, 110, 92, 78, 100, 5];
        let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1; n]).collect();
        let groups = length_groups(&prompts);
        let mut all: Vec<usize> = groups.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        for g in &groups {
            let max = g.iter().map(|&i| lens[i]).max().unwrap();
            let real: usize = g.iter().map(|&i| lens[i]).sum();
            assert!(max * g.len() * 10 <= real * 11, "{g:?}");
        }
        assert_eq!(groups[0], [0]);
        assert!(length_groups(&[]).is_empty());
    }
}
