//! Prompt preparation: a task sample rendered with its template (and the model's chat template for
//! instruct prompts), tokenized exactly as search, training and eval all need it, and checked
//! against the model's context, with how its answer will be scored.
use drllm_runtime::{LoadedModel, Message};
use drllm_tasks::{
    add_special_tokens, Family, Gold, Question, RewardMode, Sample, Style, Template,
};

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

/// How one prompt's answer is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum Scoring {
    /// Greedy decoding, then the task's answer check on the text.
    Generate,
    /// One prefill: the gold letter must have the highest logit among the choice letters (each
    /// with its token id) at the answer position.
    ChoiceLogits(Vec<(char, u32)>),
    /// One prefill of the question, then every choice's continuation scored resuming from it:
    /// the gold choice must have the highest log-likelihood (per character with `norm`).
    Cloze {
        /// Token ids of each choice's continuation (non-empty).
        choices: Vec<Vec<u32>>,
        /// Length of each choice's text in characters (for `norm`).
        chars: Vec<usize>,
        /// Each choice's letter.
        labels: Vec<char>,
        /// Index of the gold choice.
        gold: usize,
        /// Divide each log-likelihood by its choice's length (lm-eval's `acc_norm`).
        norm: bool,
    },
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
    /// The prompt as the model sees it (chat template applied for instruct templates); its
    /// tokenization with `add_special` special tokens is `ids` (the text routers read in
    /// training is this one).
    pub text: String,
    /// Whether `text` is tokenized with the tokenizer's special tokens.
    pub add_special: bool,
    /// Prompt token ids: what is prefilled along a path and what routers read.
    pub ids: Vec<u32>,
    /// Template (for response prefix and truncation).
    pub template: Template,
    /// How the answer is scored.
    pub scoring: Scoring,
}

impl PreparedPrompt {
    /// Whether the answer is decoded (else scored from one forward pass).
    pub fn decodes(&self) -> bool {
        self.scoring == Scoring::Generate
    }
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
    let family = sample.task.family();
    let mode = opts.mode;
    let by_letter = mode == RewardMode::ChoiceLogits && family == Family::MultipleChoice;
    let cloze = mode.is_cloze() && family == Family::MultipleChoice;
    let add_special = add_special_tokens(template.style(), mode, family, lm.needs_bos());
    let mut text = template.render(sample)?;
    if template.style() == Style::Instruct {
        text = lm.tokenizer.apply_chat_template(&[Message::user(text)])?;
        if by_letter {
            // The assistant turn is pre-filled up to the answer.
            text.push_str("Answer:");
        }
    }
    let mut scoring = Scoring::Generate;
    let mut context_ids = None;
    if by_letter || cloze {
        let Question::MultipleChoice { choices, .. } = &sample.question else {
            return Err(err(format!(
                "--reward {mode} needs a multiple-choice question"
            )));
        };
        if by_letter {
            let mut tokens = vec![];
            for c in choices {
                // After "Answer:" the letter comes with its leading space; else the bare one.
                let tok = [format!(" {}", c.label), c.label.to_string()]
                    .iter()
                    .find_map(|s| match lm.tokenizer.encode(s, false).ok()?.as_slice() {
                        [t] => Some(*t),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        err(format!("choice letter {} is not a single token", c.label))
                    })?;
                tokens.push((c.label, tok));
            }
            scoring = Scoring::ChoiceLogits(tokens);
        } else {
            let Gold::Letter(g) = sample.gold else {
                return Err(err("cloze scoring needs a gold letter".into()));
            };
            let gold = choices
                .iter()
                .position(|c| c.label == g)
                .ok_or_else(|| err(format!("the gold letter {g} is not among the choices")))?;
            // lm-evaluation-harness's context/continuation split: trailing whitespace of the
            // context moves to the continuation; the continuation's tokens are those of
            // context + continuation after the context's own tokens.
            let kept = text.trim_end().len();
            let moved = text[kept..].to_string();
            text.truncate(kept);
            let ctx = lm.tokenizer.encode(&text, add_special)?;
            context_ids = Some(ctx.clone());
            let mut conts = vec![];
            let mut chars = vec![];
            for c in choices {
                let cont = format!("{moved}{}", template.cloze_continuation(c));
                let whole = lm.tokenizer.encode(&format!("{text}{cont}"), add_special)?;
                let ids = whole.get(ctx.len()..).unwrap_or_default().to_vec();
                if ids.is_empty() {
                    return Err(err(format!(
                        "choice {} ({:?}) adds no tokens to the question",
                        c.label, c.text
                    )));
                }
                conts.push(ids);
                chars.push(c.text.chars().count());
            }
            scoring = Scoring::Cloze {
                choices: conts,
                chars,
                labels: choices.iter().map(|c| c.label).collect(),
                gold,
                norm: mode == RewardMode::ClozeNorm,
            };
        }
    }
    let ids = match context_ids {
        Some(ids) => ids,
        None => lm.tokenizer.encode(&text, add_special)?,
    };
    if ids.is_empty() {
        return Err(err("the prompt renders to no tokens".into()));
    }
    // Positions the answer adds (a choice's last token is scored, never fed).
    let extra = match &scoring {
        Scoring::Generate => opts.max_new_tokens,
        Scoring::ChoiceLogits(_) => 0,
        Scoring::Cloze { choices, .. } => {
            choices.iter().map(Vec::len).max().unwrap_or(1).max(1) - 1
        }
    };
    let ctx = lm.model.cfg.max_position_embeddings as usize;
    if ids.len() + extra > ctx {
        return Err(err(format!(
            "prompt of {} tokens + {extra} {} exceeds the model's context of {ctx}",
            ids.len(),
            if scoring == Scoring::Generate {
                "new tokens"
            } else {
                "answer tokens"
            }
        )));
    }
    Ok(PreparedPrompt {
        text,
        add_special,
        sample_id: sample.id.clone(),
        family,
        gold: sample.gold.clone(),
        ids,
        template: template.clone(),
        scoring,
    })
}
