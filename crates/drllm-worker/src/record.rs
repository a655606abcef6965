//! A finished search as a row of the paths dataset.
use drllm_dataset::PathRecord;
use drllm_runtime::LoadedModel;
use drllm_search::SearchResult;
use drllm_tasks::{Question, Sample, Split};

use drllm_eval::{decision_point, evaluate_alone, EvalError, EvalOptions, PreparedPrompt};

/// The question as text: the context paragraph if any, the stem, then one `(X) text` line per
/// choice.
pub fn question_text(q: &Question) -> String {
    match q {
        Question::Problem(p) => p.clone(),
        Question::MultipleChoice {
            stem,
            choices,
            context,
        } => {
            let mut s = match context.as_deref().filter(|c| !c.is_empty()) {
                Some(c) => format!("{c}\n\n{stem}"),
                None => stem.clone(),
            };
            for c in choices {
                s.push_str(&format!("\n({}) {}", c.label, c.text));
            }
            s
        }
    }
}

/// The row of `sample`'s search. The best path's response is regenerated alone (one extra
/// evaluation) and cut where its reward was decided.
#[allow(clippy::too_many_arguments)]
pub fn path_record(
    lm: &LoadedModel,
    sample: &Sample,
    split: Split,
    prompt: &PreparedPrompt,
    r: &SearchResult,
    eval: &EvalOptions,
    worker: &str,
    seed: u64,
) -> Result<PathRecord, EvalError> {
    let best_response = match &r.best_path {
        Some(p) if prompt.decodes() => {
            let e = evaluate_alone(lm, prompt, p, eval)?;
            let cut = decision_point(lm, prompt, &e.tokens, eval.mode);
            Some(lm.tokenizer.decode(&e.tokens[..cut])?)
        }
        _ => None,
    };
    let model = RowModel {
        name: lm.source.name(),
        num_layers: lm.model.num_layers(),
    };
    Ok(row(
        sample,
        split,
        prompt,
        r,
        &model,
        worker,
        seed,
        best_response,
    ))
}

/// The model as a row names it.
#[derive(Debug, Clone)]
pub struct RowModel {
    /// Its name (`model` column).
    pub name: String,
    /// Its blocks (`num_layers` column).
    pub num_layers: usize,
}

/// The row of `sample`'s search result `r`, given the best path's response (if decoded).
#[allow(clippy::too_many_arguments)]
pub fn row(
    sample: &Sample,
    split: Split,
    prompt: &PreparedPrompt,
    r: &SearchResult,
    model: &RowModel,
    worker: &str,
    seed: u64,
    best_response: Option<String>,
) -> PathRecord {
    PathRecord {
        sample_id: sample.id.clone(),
        task: sample.task.to_string(),
        split: split.to_string(),
        question: question_text(&sample.question),
        answer: sample.gold.to_string(),
        prompt: prompt.text.clone(),
        model: model.name.clone(),
        num_layers: model.num_layers as u16,
        default_correct: r.default_reward >= 1.0,
        found: r.found,
        improved: r.improved,
        best_path: r.best_path.clone(),
        good_paths: r.good_paths.clone(),
        simulations: r.simulations as u32,
        evaluations: r.evaluations as u32,
        search_ms: r.wall_ms,
        worker: worker.to_string(),
        seed,
        best_response,
    }
}
