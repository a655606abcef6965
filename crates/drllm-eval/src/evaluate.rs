//! Batched path evaluation on the runtime: many (prompt, path) candidates per call, all in one
//! layer-synchronous batch (every candidate applying block `l` goes through it together), with
//! prefix sharing (a candidate resumes from the cached state of the longest prefix of its path
//! already run on its prompt) and early decision (a candidate leaves the batch as soon as its
//! reward is decided). In `choice-logits` mode an evaluation is one prefill and no decoding; in
//! `cloze` modes one prefill of the question and one batched pass over the choices.
use drllm_path::LayerPath;
use drllm_runtime::profile::{span, Phase};
use drllm_runtime::{GenerateOptions, GenerateRequest, LoadedModel, PathBatch, Paths, PrefixCache};
use drllm_tasks::{cloze_pick, decide, Gold, RewardMode, Verdict};

use crate::prompt::{EvalError, EvalOptions, PreparedPrompt, Scoring};

/// The outcome of one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// 0 or 1.
    pub reward: f64,
    /// Tokens generated up to the decision (empty when nothing is decoded).
    pub tokens: Vec<u32>,
    /// Cloze scoring: each choice's log-likelihood (empty otherwise).
    pub logliks: Vec<f64>,
    /// Block applications of the prefill resumed from the prefix cache instead of computed.
    pub reused_blocks: usize,
}

/// Verdict on generated text; `finished` = no more text will come.
fn verdict(
    lm: &LoadedModel,
    p: &PreparedPrompt,
    tokens: &[u32],
    mode: RewardMode,
    finished: bool,
) -> Verdict {
    let _g = span(Phase::Grade);
    let Ok(text) = lm.tokenizer.decode(tokens) else {
        return Verdict::Undecided;
    };
    // A multi-byte character cut in half decodes to U+FFFD: wait for the rest of it.
    if !finished && text.ends_with('\u{FFFD}') {
        return Verdict::Undecided;
    }
    // Base prompts: the answer ends at the first blank line, whatever follows.
    let finished = finished || p.template.truncate(&text).len() < text.len();
    decide(
        p.family,
        &p.gold,
        mode,
        &p.template.graded_text(&text),
        finished,
    )
}

/// Reward of a prompt scored without decoding, from the logits `[V]` after its prompt
/// (choice-logits) or its choices' log-likelihoods (cloze).
pub fn score_forward(
    p: &PreparedPrompt,
    last_logits: Option<&tch::Tensor>,
    logliks: &[f64],
) -> f64 {
    let _g = span(Phase::Grade);
    let ok = match &p.scoring {
        Scoring::Generate => false,
        Scoring::ChoiceLogits(tokens) => {
            let (Gold::Letter(g), Some(logits)) = (&p.gold, last_logits) else {
                return 0.0;
            };
            let letter_logits: Vec<(char, f32)> = tokens
                .iter()
                .map(|&(c, tok)| (c, logits.double_value(&[tok as i64]) as f32))
                .collect();
            drllm_tasks::choice_logits_correct(&letter_logits, *g)
        }
        Scoring::Cloze {
            chars, gold, norm, ..
        } => cloze_pick(logliks, chars, *norm) == Some(*gold),
    };
    ok as u8 as f64
}

/// Evaluates `(prompt, path)` candidates in one batch, sharing prefixes through `cache` (a
/// zero budget turns sharing off). A libtorch failure inside (tch turns C++ exceptions such as out-of-memory into panics)
/// comes back as [`EvalError::Aborted`].
pub fn evaluate_batch(
    lm: &LoadedModel,
    items: &[(&PreparedPrompt, &LayerPath)],
    opts: &EvalOptions,
    cache: &mut PrefixCache,
) -> Result<Vec<Evaluation>, EvalError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        evaluate_batch_unguarded(lm, items, opts, cache)
    }))
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(EvalError::Aborted(
            msg.lines().next().unwrap_or_default().to_string(),
        ))
    })
}

fn evaluate_batch_unguarded(
    lm: &LoadedModel,
    items: &[(&PreparedPrompt, &LayerPath)],
    opts: &EvalOptions,
    cache: &mut PrefixCache,
) -> Result<Vec<Evaluation>, EvalError> {
    let mut out = vec![
        Evaluation {
            reward: 0.0,
            tokens: vec![],
            logliks: vec![],
            reused_blocks: 0,
        };
        items.len()
    ];
    let _g = tch::no_grad_guard();
    let pick = |f: fn(&Scoring) -> bool| -> Vec<usize> {
        (0..items.len())
            .filter(|&i| f(&items[i].0.scoring))
            .collect()
    };
    let prompts_of = |idx: &[usize]| -> (Vec<Vec<u32>>, Vec<LayerPath>) {
        idx.iter()
            .map(|&i| (items[i].0.ids.clone(), items[i].1.clone()))
            .unzip()
    };
    // choice-logits candidates: one prefill each, scored from the last position's logits.
    let letters = pick(|s| matches!(s, Scoring::ChoiceLogits(_)));
    if !letters.is_empty() {
        let (prompts, paths) = prompts_of(&letters);
        let (logits, reused) = lm.model.last_logits_cached(&prompts, &paths, cache)?;
        let logits = logits.to_device(tch::Device::Cpu);
        for (row, &i) in letters.iter().enumerate() {
            out[i].reward = score_forward(items[i].0, Some(&logits.get(row as i64)), &[]);
            out[i].reused_blocks = reused[row];
        }
    }
    // cloze candidates: one prefill of the question, the choices scored resuming from it.
    let cloze = pick(|s| matches!(s, Scoring::Cloze { .. }));
    if !cloze.is_empty() {
        let (prompts, paths) = prompts_of(&cloze);
        let conts: Vec<Vec<Vec<u32>>> = cloze
            .iter()
            .map(|&i| match &items[i].0.scoring {
                Scoring::Cloze { choices, .. } => choices.clone(),
                _ => vec![],
            })
            .collect();
        let (lls, reused) = lm
            .model
            .cloze_logliks_cached(&prompts, &paths, &conts, cache)?;
        for ((&i, ll), reused) in cloze.iter().zip(lls).zip(reused) {
            out[i].reward = score_forward(items[i].0, None, &ll);
            out[i].logliks = ll;
            out[i].reused_blocks = reused;
        }
    }
    let gen_idx = pick(|s| *s == Scoring::Generate);
    if !gen_idx.is_empty() {
        let (prompts, paths) = prompts_of(&gen_idx);
        let stop_ids = lm.stop_ids();
        let gopts = GenerateOptions {
            max_new_tokens: opts.max_new_tokens,
            stop_ids,
        };
        let mut decided = |row: usize, toks: &[u32]| {
            verdict(lm, items[gen_idx[row]].0, toks, opts.mode, false) != Verdict::Undecided
        };
        let req = GenerateRequest::new(
            &prompts,
            Paths::Cached {
                paths: &paths,
                cache,
            },
            gopts,
        )
        .until(&mut decided);
        let gens = lm.model.generate(req)?.outputs;
        for (row, g) in gens.into_iter().enumerate() {
            let i = gen_idx[row];
            let v = verdict(lm, items[i].0, &g.tokens, opts.mode, true);
            out[i] = Evaluation {
                reward: (v == Verdict::Correct) as u8 as f64,
                tokens: g.tokens,
                logliks: vec![],
                reused_blocks: g.reused_blocks,
            };
        }
    }
    Ok(out)
}

/// Reference: one candidate alone with the plain runtime and no shared state: decoding the
/// whole budget, or (cloze) each choice appended to the prompt and run as its own sequence.
pub fn evaluate_alone(
    lm: &LoadedModel,
    p: &PreparedPrompt,
    path: &LayerPath,
    opts: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    let _g = tch::no_grad_guard();
    let none = |reward: f64, logliks: Vec<f64>| Evaluation {
        reward,
        tokens: vec![],
        logliks,
        reused_blocks: 0,
    };
    match &p.scoring {
        Scoring::ChoiceLogits(_) => {
            let logits = lm
                .model
                .prompt_logits(std::slice::from_ref(&p.ids), std::slice::from_ref(path))?;
            let last = logits[0].get(p.ids.len() as i64 - 1);
            return Ok(none(score_forward(p, Some(&last), &[]), vec![]));
        }
        Scoring::Cloze { choices, .. } => {
            let seqs: Vec<Vec<u32>> = choices.iter().map(|c| [&p.ids[..], c].concat()).collect();
            let paths = vec![path.clone(); seqs.len()];
            let logits = lm.model.prompt_logits(&seqs, &paths)?;
            let mut lls = vec![];
            for (c, l) in choices.iter().zip(logits) {
                let logp = l.log_softmax(-1, tch::Kind::Float);
                let n = p.ids.len();
                lls.push(
                    c.iter()
                        .enumerate()
                        .map(|(j, &tok)| logp.double_value(&[(n + j - 1) as i64, tok as i64]))
                        .sum(),
                );
            }
            return Ok(none(score_forward(p, None, &lls), lls));
        }
        Scoring::Generate => {}
    }
    let gopts = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let prompts = std::slice::from_ref(&p.ids);
    let req = GenerateRequest::new(prompts, Paths::Fixed(std::slice::from_ref(path)), gopts);
    let g = lm.model.generate(req)?.outputs.remove(0);
    let v = verdict(lm, p, &g.tokens, opts.mode, true);
    Ok(Evaluation {
        reward: (v == Verdict::Correct) as u8 as f64,
        tokens: g.tokens,
        logliks: vec![],
        reused_blocks: 0,
    })
}

/// A router over a whole batch: `route(l, h, lens)` gets the hidden state entering block `l`
/// (`[B, T, H]`, left-padded, row `r` holding `lens[r]` real tokens) and returns each row's count
/// for the block.
pub type BatchRouter<'a> = dyn Fn(usize, &tch::Tensor, &[usize]) -> Vec<u8> + 'a;

/// How the prompts of [`answer_batch`] choose their paths.
pub enum PathChoice<'a> {
    /// Every prompt along this path.
    Fixed(LayerPath),
    /// Each prompt along its own path (one per prompt, in order).
    Each(Vec<LayerPath>),
    /// Each prompt routed once during its prefill.
    Routed(&'a BatchRouter<'a>),
}

impl PathChoice<'_> {
    /// The choice for the prompts at `idx` of those this one was made for.
    fn subset(&self, idx: &[usize]) -> PathChoice<'_> {
        match self {
            PathChoice::Fixed(p) => PathChoice::Fixed(p.clone()),
            PathChoice::Each(ps) => PathChoice::Each(idx.iter().map(|&i| ps[i].clone()).collect()),
            PathChoice::Routed(r) => PathChoice::Routed(*r),
        }
    }
}

/// One prompt answered and graded.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The path it was answered along.
    pub path: LayerPath,
    /// Whether the answer is right.
    pub correct: bool,
    /// The decoded text, or the letter picked (forward-scored prompts).
    pub response: String,
    /// Cloze scoring: each choice's log-likelihood (else empty).
    pub logliks: Vec<f64>,
    /// Tokens decoded.
    pub new_tokens: usize,
}

/// Answers and grades `prompts` (validation runs, routed or along one path), in their order.
/// Decoded prompts are prefilled in batches of `batch` and, when routed, decoded in batches of
/// `batch` rows with similar paths (all decoded prompts of the call are the pool);
/// forward-scored ones (choice letters, cloze) run in batches of `batch`.
pub fn answer_batch(
    lm: &LoadedModel,
    prompts: &[PreparedPrompt],
    choice: &PathChoice<'_>,
    batch: usize,
    opts: &EvalOptions,
) -> Result<Vec<Answer>, EvalError> {
    let _g = tch::no_grad_guard();
    let batch = batch.max(1);
    if let PathChoice::Each(paths) = choice {
        if paths.len() != prompts.len() {
            return Err(EvalError::Aborted(format!(
                "{} paths for {} prompts",
                paths.len(),
                prompts.len()
            )));
        }
    }
    // Tasks of different families may be mixed: each prompt is answered its own way.
    let (decoded, forward): (Vec<usize>, Vec<usize>) =
        (0..prompts.len()).partition(|&i| prompts[i].decodes());
    let mut out: Vec<Option<Answer>> = vec![None; prompts.len()];
    if !decoded.is_empty() {
        let ps: Vec<&PreparedPrompt> = decoded.iter().map(|&i| &prompts[i]).collect();
        for (&i, a) in decoded.iter().zip(answer_decoded(
            lm,
            &ps,
            &choice.subset(&decoded),
            batch,
            opts,
        )?) {
            out[i] = Some(a);
        }
    }
    let fwd: Vec<&PreparedPrompt> = forward.iter().map(|&i| &prompts[i]).collect();
    for (idx, chunk) in forward.chunks(batch).zip(fwd.chunks(batch)) {
        for (&i, a) in idx
            .iter()
            .zip(answer_forward(lm, chunk, &choice.subset(idx))?)
        {
            out[i] = Some(a);
        }
    }
    out.into_iter()
        .map(|a| a.ok_or_else(|| EvalError::Aborted("a prompt was left unanswered".into())))
        .collect()
}

/// Decoded prompts: greedy generation (routed ones regrouped by path), graded on the text.
fn answer_decoded(
    lm: &LoadedModel,
    prompts: &[&PreparedPrompt],
    choice: &PathChoice<'_>,
    batch: usize,
    opts: &EvalOptions,
) -> Result<Vec<Answer>, EvalError> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let gopts = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    // Given paths: generated in batches of `batch` rows.
    let along = |paths: Vec<LayerPath>| -> Result<_, EvalError> {
        let mut gens = vec![];
        for (c, p) in ids.chunks(batch).zip(paths.chunks(batch)) {
            let req = GenerateRequest::new(c, Paths::Fixed(p), gopts.clone());
            gens.extend(lm.model.generate(req)?.outputs);
        }
        Ok((gens, paths))
    };
    let (gens, paths) = match choice {
        PathChoice::Routed(route) => {
            let mut f = |rows: &[usize], l: usize, h: &tch::Tensor| {
                let lens: Vec<usize> = rows.iter().map(|&r| ids[r].len()).collect();
                route(l, h, &lens)
            };
            let routed = Paths::RoutedGrouped {
                route: &mut f,
                batch,
            };
            let g = lm
                .model
                .generate(GenerateRequest::new(&ids, routed, gopts.clone()))?;
            (g.outputs, g.paths)
        }
        PathChoice::Fixed(path) => along(vec![path.clone(); ids.len()])?,
        PathChoice::Each(paths) => along(paths.clone())?,
    };
    let mut out = vec![];
    for ((p, g), path) in prompts.iter().zip(gens).zip(paths) {
        out.push(Answer {
            path,
            correct: grade_generation(lm, p, &g.tokens, opts.mode),
            response: lm.tokenizer.decode(&g.tokens)?,
            logliks: vec![],
            new_tokens: g.tokens.len(),
        });
    }
    Ok(out)
}

/// Forward-scored prompts (choice letters, cloze) in one batch.
fn answer_forward(
    lm: &LoadedModel,
    prompts: &[&PreparedPrompt],
    choice: &PathChoice<'_>,
) -> Result<Vec<Answer>, EvalError> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let (batch, h) = match choice {
        PathChoice::Fixed(path) => {
            let mut b = PathBatch::new(&lm.model, &vec![path.clone(); ids.len()])?;
            let h = b.prefill(&ids)?;
            (b, h)
        }
        PathChoice::Each(paths) => {
            let mut b = PathBatch::new(&lm.model, paths)?;
            let h = b.prefill(&ids)?;
            (b, h)
        }
        PathChoice::Routed(route) => {
            let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
            let mut b = PathBatch::new_routed(&lm.model, ids.len());
            let h = b.prefill_routed(&ids, &mut |l, h| route(l, h, &lens))?;
            (b, h)
        }
    };
    let t = h.size()[1];
    let last = lm.model.logits(&h.select(1, t - 1));
    let conts: Vec<Vec<Vec<u32>>> = prompts
        .iter()
        .map(|p| match &p.scoring {
            Scoring::Cloze { choices, .. } => choices.clone(),
            _ => vec![],
        })
        .collect();
    let lls = if conts.iter().any(|c| !c.is_empty()) {
        lm.model.continuation_logliks(&batch, &last, &conts)?
    } else {
        vec![vec![]; prompts.len()]
    };
    let last = last.to_device(tch::Device::Cpu);
    let paths = batch.paths().to_vec();
    let mut out = vec![];
    for (r, (p, ll)) in prompts.iter().zip(lls).enumerate() {
        let row = last.get(r as i64);
        let picked = match &p.scoring {
            Scoring::Cloze {
                chars,
                labels,
                norm,
                ..
            } => cloze_pick(&ll, chars, *norm).and_then(|i| labels.get(i).copied()),
            Scoring::ChoiceLogits(tokens) => tokens
                .iter()
                .map(|&(c, tok)| (c, row.double_value(&[tok as i64])))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(c, _)| c),
            Scoring::Generate => None,
        };
        out.push(Answer {
            path: paths[r].clone(),
            correct: score_forward(p, Some(&row), &ll) >= 1.0,
            response: picked.map(String::from).unwrap_or_default(),
            logliks: ll,
            new_tokens: 0,
        });
    }
    Ok(out)
}

/// Whether a complete generation (`tokens`, the whole budget or up to a stop token) answers `p`
/// correctly under `mode` (validation runs grade this way).
pub fn grade_generation(
    lm: &LoadedModel,
    p: &PreparedPrompt,
    tokens: &[u32],
    mode: RewardMode,
) -> bool {
    verdict(lm, p, tokens, mode, true) == Verdict::Correct
}

/// The shortest prefix of `tokens` on which the reward is already decided (the decision point).
pub fn decision_point(
    lm: &LoadedModel,
    p: &PreparedPrompt,
    tokens: &[u32],
    mode: RewardMode,
) -> usize {
    (1..=tokens.len())
        .find(|&n| verdict(lm, p, &tokens[..n], mode, false) != Verdict::Undecided)
        .unwrap_or(tokens.len())
}
