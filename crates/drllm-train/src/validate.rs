//! Routed validation: the held-out prompts answered along the paths the routers choose for them
//! (routing once per prompt during prefill, as `drllm-infer` does), graded like the search
//! graded them. This is what decides which epoch is shipped: teacher-forced F1 says how often a
//! router repeats its label, not whether the routed model still answers.

use std::collections::HashMap;
use std::path::Path;

use drllm_eval::{answer_batch, prepare, EvalOptions, PathChoice, PreparedPrompt};
use drllm_path::LayerPath;
use drllm_router::{Policy, Routers};
use drllm_runtime::LoadedModel;
use drllm_tasks::{data, LoadOptions, Sample, Split, TaskName};

use crate::examples::{Example, ExampleSet};
use crate::trainer::TrainError;

/// Held-out prompts ready to be answered, with the baseline's accuracy on them.
pub struct RoutedValidation {
    prompts: Vec<PreparedPrompt>,
    opts: EvalOptions,
    windows: usize,
    batch: usize,
    /// Accuracy of the all-execute baseline on the same prompts.
    pub baseline_accuracy: f64,
}

/// Accuracy and mean path cost of answers.
fn score(answers: &[drllm_eval::Answer]) -> (f64, f64) {
    let n = answers.len().max(1) as f64;
    (
        answers.iter().filter(|a| a.correct).count() as f64 / n,
        answers.iter().map(|a| a.path.cost()).sum::<usize>() as f64 / n,
    )
}

/// Prepares `examples` (rows of `set`) from the task data in `data_dir`, rendered with their
/// dataset's run configuration, and checks each prompt is exactly the text the search stored
/// (the routers train on that text, so they must be measured on it). `what` names the use in
/// errors. All must share one reward mode, returned with the prompts.
pub fn prepare_examples(
    lm: &LoadedModel,
    set: &ExampleSet,
    examples: &[&Example],
    data_dir: &Path,
    what: &str,
) -> Result<(Vec<PreparedPrompt>, EvalOptions), TrainError> {
    let data_err = |msg: String| TrainError::Data(format!("{what}: {msg}"));
    let mut samples: HashMap<(String, String), HashMap<String, Sample>> = HashMap::new();
    let mut prompts = vec![];
    let mut opts: Option<EvalOptions> = None;
    for e in examples {
        let src = &set.sources[e.source];
        let cfg = &src.config;
        let eval = cfg.eval();
        if opts.as_ref().is_some_and(|o| o.mode != eval.mode) {
            return Err(data_err(format!(
                "the datasets were searched with different rewards ({} and {}): train on \
                     one kind of prompt",
                opts.as_ref().map_or("?", |o| o.mode.name()),
                eval.mode
            )));
        }
        let key = (e.task.clone(), e.split.clone());
        if !samples.contains_key(&key) {
            let task: TaskName = e.task.parse().map_err(|x| data_err(format!("{x}")))?;
            let split: Split = e.split.parse().map_err(|x| data_err(format!("{x}")))?;
            let loaded = data::load(data_dir, task, split, &LoadOptions::default())
                .map_err(|x| data_err(format!("{x} (pass --task-data DIR)")))?;
            let by_id = loaded
                .samples
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect();
            samples.insert(key.clone(), by_id);
        }
        let sample = samples[&key].get(&e.sample_id).ok_or_else(|| {
            data_err(format!(
                "sample {} ({}/{}) is not in {}",
                e.sample_id,
                e.task,
                e.split,
                data_dir.display()
            ))
        })?;
        let template = cfg
            .template(sample.task.family())
            .map_err(|x| data_err(x.to_string()))?;
        let p = prepare(lm, sample, &template, &eval)
            .map_err(|x| data_err(format!("sample {}: {x}", e.sample_id)))?;
        if p.text != e.prompt {
            return Err(data_err(format!(
                "sample {} renders to other text now than in {} (template, chat template or \
                     reward changed since the search): {:?} vs {:?}",
                e.sample_id,
                src.path.display(),
                p.text,
                e.prompt
            )));
        }
        prompts.push(p);
        opts.get_or_insert(eval);
    }
    let opts = opts.ok_or_else(|| data_err("no prompts".into()))?;
    Ok((prompts, opts))
}

impl RoutedValidation {
    /// Prepares `held_out` (rows of `set`) from the task data in `data_dir` (see
    /// [`prepare_examples`]) and answers them along the default path for the baseline.
    pub fn new(
        lm: &LoadedModel,
        set: &ExampleSet,
        held_out: &[&Example],
        data_dir: &Path,
        windows: usize,
        batch: usize,
    ) -> Result<Self, TrainError> {
        let (prompts, opts) = prepare_examples(lm, set, held_out, data_dir, "routed validation")?;
        Self::from_prompts(lm, prompts, opts, windows, batch)
    }

    /// Held-out prompts already prepared (e.g. read from task data rather than a paths
    /// dataset), answered along the default path for the baseline.
    pub fn from_prompts(
        lm: &LoadedModel,
        prompts: Vec<PreparedPrompt>,
        opts: EvalOptions,
        windows: usize,
        batch: usize,
    ) -> Result<Self, TrainError> {
        let mut v = RoutedValidation {
            prompts,
            opts,
            windows,
            batch,
            baseline_accuracy: 0.0,
        };
        let n = lm.model.num_layers();
        let base = answer_batch(
            lm,
            &v.prompts,
            &PathChoice::Fixed(LayerPath::all_ones(n)),
            v.batch,
            &v.opts,
        )?;
        v.baseline_accuracy = score(&base).0;
        Ok(v)
    }

    /// Prompts held out.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Routed accuracy and mean path cost of `routers` at `budget` on the held-out prompts.
    pub fn measure(
        &self,
        lm: &LoadedModel,
        routers: &Routers,
        budget: f64,
    ) -> Result<(f64, f64), TrainError> {
        let policy = Policy::new(routers.to_device(lm.model.device()), self.windows, budget)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let route = |l: usize, h: &tch::Tensor, lens: &[usize]| policy.decide(l, h, lens);
        let mut answers = vec![];
        // Decoded prompts are regrouped by path within a pool; forward-scored ones batch alone.
        for chunk in self.prompts.chunks(self.batch.max(1) * 8) {
            answers.extend(answer_batch(
                lm,
                chunk,
                &PathChoice::Routed(&route),
                self.batch,
                &self.opts,
            )?);
        }
        Ok(score(&answers))
    }
}

/// Each budget's (budget, accuracy, cost) on the held-out prompts, and the cheapest budget that
/// kept the baseline's accuracy.
pub type Sweep = (Vec<(f64, f64, f64)>, Option<f64>);

impl RoutedValidation {
    /// The kept routers at every budget of `budgets` (`at_zero`: budget 0's accuracy and cost
    /// when already measured): the operating point is chosen here, on training data, never on
    /// the evaluation split.
    pub fn sweep(
        &self,
        lm: &LoadedModel,
        routers: &Routers,
        budgets: &[f64],
        at_zero: Option<(f64, f64)>,
    ) -> Result<Sweep, TrainError> {
        let mut sweep = vec![];
        for &b in budgets {
            let (acc, cost) = match (b, at_zero) {
                (0.0, Some(m)) => m,
                _ => self.measure(lm, routers, b)?,
            };
            sweep.push((b, acc, cost));
        }
        let recommended = sweep
            .iter()
            .filter(|s| s.1 >= self.baseline_accuracy)
            .min_by(|x, y| x.2.total_cmp(&y.2))
            .map(|s| s.0);
        Ok((sweep, recommended))
    }
}
