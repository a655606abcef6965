//! One request in the running batch: its tokens, incremental text, stop strings, sampling
//! and the events it sends.

use drllm_runtime::{LayerPath, LoadedModel};
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use super::*;

/// A row of the running batch.
pub(super) struct Row {
    pub(super) job: Job,
    pub(super) path: LayerPath,
    pub(super) rng: rand::rngs::StdRng,
    /// Tokens generated so far, and their log-probabilities when asked for.
    pub(super) tokens: Vec<u32>,
    pub(super) logprobs: Vec<TokenLogprob>,
    /// The text of `tokens[..read_offset]`, decoded incrementally: each step decodes only the
    /// tokens since `prefix_offset` (a window that starts a few tokens back, so that merges
    /// and multi-byte characters across the boundary come out as a whole decode gives them).
    pub(super) text: String,
    pub(super) prefix_offset: usize,
    pub(super) read_offset: usize,
    /// Bytes of `text` already searched for stop strings.
    pub(super) searched: usize,
    /// Bytes of the decoded text and tokens already sent.
    pub(super) sent_text: usize,
    pub(super) sent_tokens: usize,
    /// Set once the row has ended.
    pub(super) finish: Option<Finish>,
    /// It ended at a stop string (its text is cut there; nothing held back is sent).
    pub(super) at_stop_string: bool,
}

impl Row {
    pub(super) fn new(job: Job, path: LayerPath) -> Row {
        let rng = match job.sampling.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Row {
            job,
            path,
            rng,
            tokens: vec![],
            logprobs: vec![],
            text: String::new(),
            prefix_offset: 0,
            read_offset: 0,
            searched: 0,
            sent_text: 0,
            sent_tokens: 0,
            finish: None,
            at_stop_string: false,
        }
    }

    /// Appends the text of the tokens since the last call to `text`, once it is whole (not
    /// ending in an unfinished character), or in any case with `last`. Decoding only the
    /// window keeps a step's cost independent of the length generated so far.
    pub(super) fn decode_new(&mut self, lm: &LoadedModel, last: bool) {
        if self.read_offset >= self.tokens.len() {
            return;
        }
        let t = &lm.tokenizer;
        let before = t
            .decode(&self.tokens[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let after = t
            .decode(&self.tokens[self.prefix_offset..])
            .unwrap_or_default();
        // (byte-fallback tokenizers decode each byte of an unfinished character to U+FFFD)
        if (last || !after.ends_with('\u{FFFD}'))
            && after.len() >= before.len()
            && after.is_char_boundary(before.len())
        {
            self.text.push_str(&after[before.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
    }

    /// What the row may come to hold: its prompt and its whole token budget.
    pub(super) fn tokens_held(&self) -> usize {
        self.job.prompt.len().saturating_add(self.job.max_tokens)
    }
}

/// Draws each unfinished row's next token from `logits` `[B, V]` (rows in batch order) and
/// applies it: stop token, text, stop strings, token budget.
pub(super) fn accept_step(
    lm: &LoadedModel,
    rows: &mut [Row],
    logits: &Tensor,
    stop_ids: &[u32],
) -> Result<(), EngineError> {
    let greedy = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?;
    let want_lp = rows.iter().any(|r| r.job.logprobs.is_some());
    let lp = want_lp.then(|| logits.log_softmax(-1, Kind::Float));
    for (i, r) in rows.iter_mut().enumerate() {
        if r.finish.is_some() {
            continue;
        }
        let s = r.job.sampling;
        let tok = if s.temperature <= 0.0 {
            greedy[i] as u32
        } else {
            let row = Vec::<f32>::try_from(logits.get(i as i64).to_device(tch::Device::Cpu))?;
            sample(&row, &s, &mut r.rng)
        };
        if let (Some(k), Some(lp)) = (r.job.logprobs, &lp) {
            let row = lp.get(i as i64);
            let logprob = row.double_value(&[tok as i64]) as f32;
            let top = top_k(&row.unsqueeze(0), k)?.pop().unwrap_or_default();
            r.logprobs.push(TokenLogprob {
                id: tok,
                logprob: Some(logprob),
                top,
            });
        }
        if stop_ids.contains(&tok) {
            // Not part of the text, but its log-probability is reported (an echo request
            // scoring a continuation reads one generated token's entry after the prompt's).
            r.finish = Some(Finish::Stop);
            continue;
        }
        r.tokens.push(tok);
        emit(r, lm);
        if r.finish.is_none() && r.tokens.len() >= r.job.max_tokens {
            r.finish = Some(Finish::Length);
        }
    }
    Ok(())
}

/// Sends the row's new text (holding back what could be the start of a stop string), or ends
/// it at a stop string.
pub(super) fn emit(r: &mut Row, lm: &LoadedModel) {
    r.decode_new(lm, false);
    let text = &r.text;
    let mut end = text.len();
    // Only where a stop string can newly appear: no match ends before what was searched.
    let longest = r.job.stop.iter().map(String::len).max().unwrap_or(0);
    let mut from = r.searched.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    r.searched = text.len();
    if let Some(pos) = r
        .job
        .stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[from..].find(s.as_str()).map(|p| p + from))
        .min()
    {
        end = pos;
        r.finish = Some(Finish::Stop);
        r.at_stop_string = true;
    } else {
        // A suffix that may grow into a stop string waits.
        let held = r
            .job
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && text[..end].ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        end -= held;
    }
    if end > r.sent_text && text.is_char_boundary(end) && text.is_char_boundary(r.sent_text) {
        let delta = r.text[r.sent_text..end].to_string();
        let tokens = new_tokens(r);
        r.sent_text = end;
        let _ = r.job.events.send(Event::Delta {
            text: delta,
            tokens,
        });
    }
}

/// Tokens not sent yet (with a stop token's log-probability entry last, once it ended the
/// row).
pub(super) fn new_tokens(r: &mut Row) -> Vec<TokenLogprob> {
    let from = r.sent_tokens;
    let end = r.tokens.len().max(r.logprobs.len());
    r.sent_tokens = end;
    (from..end)
        .map(|i| {
            r.logprobs.get(i).cloned().unwrap_or_else(|| TokenLogprob {
                id: r.tokens[i],
                logprob: None,
                top: vec![],
            })
        })
        .collect()
}

/// Sends what a finished row still holds back, then `Done`.
pub(super) fn finish(r: &mut Row, lm: &LoadedModel) {
    // A stop token or the budget ended it: text held back for a possible stop string is
    // final now (at a stop string, the text ends where it starts).
    let text = if r.at_stop_string {
        String::new()
    } else {
        r.decode_new(lm, true);
        let from = r.sent_text.min(r.text.len());
        if r.text.is_char_boundary(from) {
            r.sent_text = r.text.len();
            r.text[from..].to_string()
        } else {
            String::new()
        }
    };
    let tokens = new_tokens(r);
    if !text.is_empty() || !tokens.is_empty() {
        let _ = r.job.events.send(Event::Delta { text, tokens });
    }
    let _ = r.job.events.send(Event::Done {
        finish: r.finish.unwrap_or(Finish::Stop),
        path: r.path.clone(),
        completion_tokens: r.tokens.len(),
    });
}

/// A token drawn from `logits / temperature`, restricted to the top-p nucleus.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let t = s.temperature.max(1e-6);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / t).exp()))
        .collect();
    let total: f64 = p.iter().map(|x| x.1).sum();
    if s.top_p < 1.0 {
        p.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut acc = 0.0;
        let mut keep = p.len();
        for (n, x) in p.iter().enumerate() {
            acc += x.1 / total;
            if acc >= s.top_p {
                keep = n + 1;
                break;
            }
        }
        p.truncate(keep.max(1));
    }
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f64>() * total;
    for &(i, w) in &p {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    p.last().map_or(0, |x| x.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_temperature_and_top_p() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
        };
        let mut counts = [0usize; 4];
        for _ in 0..20000 {
            counts[sample(&logits, &s, &mut rng) as usize] += 1;
        }
        // softmax(2, 1, 0, -1) = 0.644, 0.237, 0.087, 0.032
        let share = |i: usize| counts[i] as f64 / 20000.0;
        assert!((share(0) - 0.644).abs() < 0.02, "{counts:?}");
        assert!((share(3) - 0.032).abs() < 0.01, "{counts:?}");
        // top_p 0.7 keeps the two most probable tokens only.
        let s = Sampling { top_p: 0.7, ..s };
        for _ in 0..2000 {
            assert!(sample(&logits, &s, &mut rng) < 2);
        }
        // A tiny temperature is the argmax.
        let s = Sampling {
            temperature: 1e-4,
            top_p: 1.0,
            seed: None,
        };
        assert_eq!(sample(&logits, &s, &mut rng), 0);
    }
}
