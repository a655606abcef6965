//! Prompts that are scored: the log-probabilities of an echoed prompt's tokens, and prompts
//! that only score sharing their prefixes (lm-eval's log-likelihood requests).

use drllm_runtime::{LayerPath, LoadedModel, PathBatch};
use tch::{Kind, Tensor};

use super::*;

/// Prompt positions whose log-probabilities are computed at once.
const ECHO_CHUNK: i64 = 512;

/// Shortest prefix worth sharing between prompts (a second forward pass costs more than a
/// few positions).
pub(super) const MIN_SHARED: usize = 8;

/// Answers the jobs of `jobs` that only score their prompt (at most one token, lm-eval's
/// log-likelihood requests), all along every block, when at least two of them share a prefix
/// of [`MIN_SHARED`] tokens or more: each shared prefix is prefilled, and its log-probabilities
/// computed, once, and every prompt resumes from it with its own rest. lm-eval sends a question
/// with each of its answer choices, so this prefills and scores the question once instead of
/// once per choice. Returns the jobs it did not take.
pub(super) fn score_shared(lm: &LoadedModel, jobs: Vec<Job>, stop_ids: &[u32]) -> Vec<Job> {
    let (scoring, mut rest): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| j.max_tokens <= 1 && j.prompt.len() > MIN_SHARED);
    // Clusters of prompts, sorted so that prompts sharing a prefix are neighbours; a cluster's
    // prefix leaves every member at least one token of its own.
    let mut scoring: Vec<Option<Job>> = scoring.into_iter().map(Some).collect();
    let mut order: Vec<usize> = (0..scoring.len()).collect();
    let prompt = |i: usize, s: &[Option<Job>]| s[i].as_ref().map_or(vec![], |j| j.prompt.clone());
    order.sort_by_key(|&i| prompt(i, &scoring));
    let mut clusters: Vec<(usize, Vec<usize>)> = vec![];
    for &i in &order {
        let p = prompt(i, &scoring);
        if let Some((plen, members)) = clusters.last_mut() {
            let first = prompt(members[0], &scoring);
            let lcp = first.iter().zip(&p).take_while(|(a, b)| a == b).count();
            let shared = lcp.min(*plen).min(p.len() - 1);
            if shared >= MIN_SHARED {
                *plen = shared;
                members.push(i);
                continue;
            }
        }
        clusters.push((p.len() - 1, vec![i]));
    }
    // Once two prompts share a prefix, the others join as clusters of one (all but their last
    // token as the prefix): the group then takes two passes (prefixes, then the prompts' own
    // tokens) rather than a third for the prompts left alone.
    if clusters.iter().all(|c| c.1.len() == 1) {
        rest.extend(scoring.into_iter().flatten());
        return rest;
    }
    let shared = clusters;
    let jobs: Vec<(usize, Job)> = shared
        .iter()
        .enumerate()
        .flat_map(|(c, (_, members))| members.iter().map(move |&i| (c, i)))
        .filter_map(|(c, i)| scoring[i].take().map(|j| (c, j)))
        .collect();
    let plens: Vec<usize> = shared.iter().map(|c| c.0).collect();
    let started = std::time::Instant::now();
    let n = lm.model.num_layers();
    let result = score_shared_rows(lm, &jobs, &plens);
    let mut rows: Vec<Row> = jobs
        .into_iter()
        .map(|(_, j)| Row::new(j, LayerPath::all_ones(n)))
        .collect();
    match result {
        Ok((prompts, last)) => {
            for (r, p) in rows.iter_mut().zip(prompts) {
                if let Some(p) = p {
                    let _ = r.job.events.send(Event::Prompt(p));
                }
            }
            for r in rows.iter_mut().filter(|r| r.job.max_tokens == 0) {
                r.finish = Some(Finish::Length);
            }
            match accept_step(lm, &mut rows, &last, stop_ids) {
                Ok(()) => {
                    for r in &mut rows {
                        r.finish.get_or_insert(Finish::Length);
                        finish(r, lm);
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for r in &mut rows {
                        fail(r, &e, 500);
                    }
                }
            }
            tracing::debug!(
                rows = rows.len(),
                prefixes = plens.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "scored with shared prefixes"
            );
        }
        Err(e) => {
            tracing::error!("scoring with shared prefixes: {e}");
            let e = e.to_string();
            for r in &mut rows {
                fail(r, &e, 500);
            }
        }
    }
    rest
}

/// The prompt events (for the rows that echo) and the next-token logits `[B, V]` of `jobs`,
/// each `(cluster, job)`, whose cluster `c` shares its first `plens[c]` tokens.
#[allow(clippy::type_complexity)]
pub(super) fn score_shared_rows(
    lm: &LoadedModel,
    jobs: &[(usize, Job)],
    plens: &[usize],
) -> Result<(Vec<Option<Vec<TokenLogprob>>>, Tensor), EngineError> {
    let n = lm.model.num_layers();
    let first = |c: usize| jobs.iter().find(|(cc, _)| *cc == c).map(|(_, j)| j);
    let prefixes: Vec<Vec<u32>> = (0..plens.len())
        .map(|c| first(c).map_or(vec![], |j| j.prompt[..plens[c]].to_vec()))
        .collect();
    let mut pb = PathBatch::new(&lm.model, &vec![LayerPath::all_ones(n); prefixes.len()])?;
    let hp = pb.prefill(&prefixes)?;
    let rows: Vec<usize> = jobs.iter().map(|(c, _)| *c).collect();
    let mut rb = pb.select_rows(&rows)?;
    let rests: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(c, j)| j.prompt[plens[*c]..].to_vec())
        .collect();
    let hs = rb.extend(&rests)?;
    // Per cluster, once: the log-probabilities of the prefix's own tokens, and the
    // distribution after it (each member's first own token is scored from it).
    let tp = hp.size()[1];
    let k_max = jobs
        .iter()
        .filter(|(_, j)| j.echo)
        .filter_map(|(_, j)| j.logprobs)
        .max();
    let mut shared: Vec<Option<(Vec<f32>, Vec<Vec<(u32, f32)>>, Tensor, Vec<(u32, f32)>)>> =
        (0..plens.len()).map(|_| None).collect();
    if let Some(k) = k_max {
        for (c, &plen) in plens.iter().enumerate() {
            if !jobs
                .iter()
                .any(|(cc, j)| *cc == c && j.echo && j.logprobs.is_some())
            {
                continue;
            }
            let h = hp.get(c as i64).narrow(0, tp - plen as i64, plen as i64);
            let (chosen, tops) =
                position_logprobs(lm, &h.narrow(0, 0, plen as i64 - 1), &prefixes[c][1..], k)?;
            let after = lm
                .model
                .logits(&h.narrow(0, plen as i64 - 1, 1))
                .log_softmax(-1, Kind::Float);
            let top_after = top_k(&after, k)?.pop().unwrap_or_default();
            shared[c] = Some((chosen, tops, after, top_after));
        }
    }
    let mut events = vec![];
    let mut last_h = vec![];
    for (r, (c, job)) in jobs.iter().enumerate() {
        let plen = plens[*c];
        let own = job.prompt.len() - plen;
        let h = hs.get(r as i64);
        last_h.push(h.get(own as i64 - 1));
        if !job.echo {
            events.push(None);
            continue;
        }
        let mut out = unscored(&job.prompt);
        if let (Some(k), Some((chosen, tops, after, top_after))) = (job.logprobs, &shared[*c]) {
            // Tokens 1..plen from the prefix, token plen from the distribution after it, the
            // rest from the row's own positions.
            for (j, (v, top)) in chosen.iter().zip(tops).enumerate() {
                out[1 + j].logprob = Some(*v);
                out[1 + j].top = top.iter().take(k).copied().collect();
            }
            out[plen].logprob = Some(after.double_value(&[0, job.prompt[plen] as i64]) as f32);
            out[plen].top = top_after.iter().take(k).copied().collect();
            if own > 1 {
                let (chosen, tops) = position_logprobs(
                    lm,
                    &h.narrow(0, 0, own as i64 - 1),
                    &job.prompt[plen + 1..],
                    k,
                )?;
                for (j, (v, top)) in chosen.into_iter().zip(tops).enumerate() {
                    out[plen + 1 + j].logprob = Some(v);
                    out[plen + 1 + j].top = top;
                }
            }
        }
        events.push(Some(out));
    }
    Ok((events, lm.model.logits(&Tensor::stack(&last_h, 0))))
}

/// A prompt's tokens without log-probabilities (filled in where they are asked for).
fn unscored(prompt: &[u32]) -> Vec<TokenLogprob> {
    prompt
        .iter()
        .map(|&id| TokenLogprob {
            id,
            logprob: None,
            top: vec![],
        })
        .collect()
}

/// Each position's log-probability of its target, and its top tokens.
pub(super) type PositionLogprobs = (Vec<f32>, Vec<Vec<(u32, f32)>>);

/// Log-probabilities of `targets[i]` after position `i` of `h` `[N, H]` (final-normed hidden
/// states), and the `k` most probable tokens there, in chunks of positions.
pub(super) fn position_logprobs(
    lm: &LoadedModel,
    h: &Tensor,
    targets: &[u32],
    k: usize,
) -> Result<PositionLogprobs, EngineError> {
    let len = targets.len() as i64;
    let (mut chosen, mut tops) = (vec![], vec![]);
    let mut from = 0i64;
    while from < len {
        let n = ECHO_CHUNK.min(len - from);
        let lp = lm
            .model
            .logits(&h.narrow(0, from, n))
            .log_softmax(-1, Kind::Float);
        let ids: Vec<i64> = targets[from as usize..(from + n) as usize]
            .iter()
            .map(|&x| x as i64)
            .collect();
        let idx = Tensor::from_slice(&ids).to_device(lp.device()).unsqueeze(1);
        chosen.extend(Vec::<f32>::try_from(
            lp.gather(1, &idx, false)
                .squeeze_dim(1)
                .to_device(tch::Device::Cpu),
        )?);
        tops.extend(top_k(&lp, k)?);
        from += n;
    }
    Ok((chosen, tops))
}

/// Sends each echo row its prompt's tokens (with log-probabilities when asked for), from the
/// prefill's final hidden states `h` `[B, T, H]` (left-padded).
pub(super) fn prompt_events(
    lm: &LoadedModel,
    rows: &mut [Row],
    h: &Tensor,
) -> Result<(), EngineError> {
    let t = h.size()[1];
    for (i, r) in rows.iter_mut().enumerate() {
        if !r.job.echo {
            continue;
        }
        let p = &r.job.prompt;
        let mut out = unscored(p);
        if let (Some(k), true) = (r.job.logprobs, p.len() > 1) {
            let len = p.len() as i64;
            let row = h.get(i as i64).narrow(0, t - len, len - 1);
            let (chosen, tops) = position_logprobs(lm, &row, &p[1..], k)?;
            for (j, (c, top)) in chosen.into_iter().zip(tops).enumerate() {
                out[1 + j].logprob = Some(c);
                out[1 + j].top = top;
            }
        }
        let _ = r.job.events.send(Event::Prompt(out));
    }
    Ok(())
}

/// The `k` most probable `(id, logprob)` of each row of `lp` `[N, V]`.
pub(super) fn top_k(lp: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>, EngineError> {
    let n = lp.size()[0] as usize;
    if k == 0 {
        return Ok(vec![vec![]; n]);
    }
    let (v, i) = lp.topk(k as i64, -1, true, true);
    let v = Vec::<f32>::try_from(v.to_device(tch::Device::Cpu).reshape([-1]))?;
    let i = Vec::<i64>::try_from(i.to_device(tch::Device::Cpu).reshape([-1]))?;
    Ok((0..n)
        .map(|r| {
            (0..k)
                .map(|j| (i[r * k + j] as u32, v[r * k + j]))
                .collect()
        })
        .collect())
}
