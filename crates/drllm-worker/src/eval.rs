//! Batched path evaluation on the runtime: many (prompt, path) candidates per call, all in one
//! layer-synchronous batch (every candidate applying block `l` goes through it together), with
//! prefix sharing (a candidate resumes from the cached state of the longest prefix of its path
//! already run on its prompt) and early decision (a candidate leaves the batch as soon as its
//! reward is decided). In `choice-logits` mode an evaluation is one prefill and no decoding.
use drllm_path::LayerPath;
use drllm_runtime::{GenerateOptions, LoadedModel, Message, PrefixCache};
use drllm_tasks::{decide, Family, Gold, Question, RewardMode, Sample, Style, Template, Verdict};

/// Errors of preparing or evaluating a prompt; recorded per sample, never fatal for the run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The prompt cannot be evaluated as asked.
    #[error("sample {sample_id}: {msg}")]
    Prompt {
        /// The sample.
        sample_id: String,
        /// What is wrong.
        msg: String,
    },
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] drllm_runtime::Error),
    /// The task crate failed (template rendering).
    #[error(transparent)]
    Task(#[from] drllm_tasks::Error),
    /// libtorch raised inside an operation (e.g. out of memory); caught, not fatal.
    #[error("evaluation aborted: {0}")]
    Aborted(String),
}

/// How candidates are scored.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Reward mode (multiple choice); math and GSM8K always decode.
    pub mode: RewardMode,
    /// Token budget of a decoded answer.
    pub max_new_tokens: usize,
}

/// A sample turned into model input, with what grading needs.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// Sample id.
    pub sample_id: String,
    /// Answer family.
    pub family: Family,
    /// Reference answer.
    pub gold: Gold,
    /// The prompt as the model sees it (chat template applied for instruct templates).
    pub text: String,
    /// Prompt token ids (chat template applied for instruct templates).
    pub ids: Vec<u32>,
    /// Template (for response prefix and truncation).
    pub template: Template,
    /// choice-logits: each choice letter and its token id at the answer position.
    pub choice_tokens: Vec<(char, u32)>,
    /// Whether this prompt is scored by choice logits (no decoding).
    pub by_logits: bool,
}

/// Renders, tokenizes and checks one sample.
pub fn prepare(
    lm: &LoadedModel,
    sample: &Sample,
    template: &Template,
    opts: &EvalOptions,
) -> Result<PreparedPrompt, EvalError> {
    let err = |msg: String| EvalError::Prompt {
        sample_id: sample.id.clone(),
        msg,
    };
    let by_logits =
        opts.mode == RewardMode::ChoiceLogits && sample.task.family() == Family::MultipleChoice;
    let text = template.render(sample)?;
    let (text, ids) = match template.style() {
        Style::Instruct => {
            let mut chat = lm.tokenizer.apply_chat_template(&[Message::user(text)])?;
            if by_logits {
                // The assistant turn is pre-filled up to the answer.
                chat.push_str("Answer:");
            }
            let ids = lm.tokenizer.encode(&chat, false)?;
            (chat, ids)
        }
        Style::Base => {
            let ids = lm.tokenizer.encode(&text, true)?;
            (text, ids)
        }
    };
    if ids.is_empty() {
        return Err(err("the prompt renders to no tokens".into()));
    }
    let budget = if by_logits { 0 } else { opts.max_new_tokens };
    let ctx = lm.model.cfg.max_position_embeddings as usize;
    if ids.len() + budget > ctx {
        return Err(err(format!(
            "prompt of {} tokens + {budget} new tokens exceeds the model's context of {ctx}",
            ids.len()
        )));
    }
    let mut choice_tokens = vec![];
    if by_logits {
        let Question::MultipleChoice { choices, .. } = &sample.question else {
            return Err(err("choice-logits needs a multiple-choice question".into()));
        };
        for c in choices {
            // After "Answer:" the letter comes with its leading space; fall back to the bare one.
            let tok = [format!(" {}", c.label), c.label.to_string()]
                .iter()
                .find_map(|s| match lm.tokenizer.encode(s, false).ok()?.as_slice() {
                    [t] => Some(*t),
                    _ => None,
                })
                .ok_or_else(|| err(format!("choice letter {} is not a single token", c.label)))?;
            choice_tokens.push((c.label, tok));
        }
    }
    Ok(PreparedPrompt {
        text,
        sample_id: sample.id.clone(),
        family: sample.task.family(),
        gold: sample.gold.clone(),
        ids,
        template: template.clone(),
        choice_tokens,
        by_logits,
    })
}

/// The outcome of one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// 0 or 1.
    pub reward: f64,
    /// Tokens generated up to the decision (empty in choice-logits mode).
    pub tokens: Vec<u32>,
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

/// choice-logits reward from the logits `[V]` at the answer position.
fn score_choice(p: &PreparedPrompt, logits: &tch::Tensor) -> f64 {
    let Gold::Letter(g) = p.gold else { return 0.0 };
    let letter_logits: Vec<(char, f32)> = p
        .choice_tokens
        .iter()
        .map(|&(c, tok)| (c, logits.double_value(&[tok as i64]) as f32))
        .collect();
    drllm_tasks::choice_logits_correct(&letter_logits, g) as u8 as f64
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
            reused_blocks: 0,
        };
        items.len()
    ];
    // choice-logits candidates: one prefill each, scored from the last position's logits.
    let (logit_idx, gen_idx): (Vec<usize>, Vec<usize>) =
        (0..items.len()).partition(|&i| items[i].0.by_logits);
    if !logit_idx.is_empty() {
        let _g = tch::no_grad_guard();
        let prompts: Vec<Vec<u32>> = logit_idx.iter().map(|&i| items[i].0.ids.clone()).collect();
        let paths: Vec<LayerPath> = logit_idx.iter().map(|&i| items[i].1.clone()).collect();
        let (logits, reused) = lm.model.last_logits_cached(&prompts, &paths, cache)?;
        let logits = logits.to_device(tch::Device::Cpu);
        for (row, &i) in logit_idx.iter().enumerate() {
            out[i].reward = score_choice(items[i].0, &logits.get(row as i64));
            out[i].reused_blocks = reused[row];
        }
    }
    if !gen_idx.is_empty() {
        let prompts: Vec<Vec<u32>> = gen_idx.iter().map(|&i| items[i].0.ids.clone()).collect();
        let paths: Vec<LayerPath> = gen_idx.iter().map(|&i| items[i].1.clone()).collect();
        let stop_ids = lm.stop_ids();
        let gopts = GenerateOptions {
            max_new_tokens: opts.max_new_tokens,
            stop_ids,
        };
        let decided = |row: usize, toks: &[u32]| {
            verdict(lm, items[gen_idx[row]].0, toks, opts.mode, false) != Verdict::Undecided
        };
        let gens = lm
            .model
            .generate_until_cached(&prompts, &paths, cache, &gopts, decided)?;
        for (row, g) in gens.into_iter().enumerate() {
            let i = gen_idx[row];
            let v = verdict(lm, items[i].0, &g.tokens, opts.mode, true);
            out[i] = Evaluation {
                reward: (v == Verdict::Correct) as u8 as f64,
                tokens: g.tokens,
                reused_blocks: g.reused_blocks,
            };
        }
    }
    Ok(out)
}

/// Reference: one candidate alone with the plain runtime, decoding the whole budget.
pub fn evaluate_alone(
    lm: &LoadedModel,
    p: &PreparedPrompt,
    path: &LayerPath,
    opts: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    if p.by_logits {
        let logits = lm
            .model
            .prompt_logits(std::slice::from_ref(&p.ids), std::slice::from_ref(path))?;
        let last = logits[0].get(p.ids.len() as i64 - 1);
        return Ok(Evaluation {
            reward: score_choice(p, &last),
            tokens: vec![],
            reused_blocks: 0,
        });
    }
    let gopts = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let g = lm
        .model
        .generate(
            std::slice::from_ref(&p.ids),
            std::slice::from_ref(path),
            &gopts,
        )?
        .remove(0);
    let v = verdict(lm, p, &g.tokens, opts.mode, true);
    Ok(Evaluation {
        reward: (v == Verdict::Correct) as u8 as f64,
        tokens: g.tokens,
        reused_blocks: 0,
    })
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
