//! `drllm-infer eval`: a validation run. The same prompts are answered by the all-execute
//! baseline and by the routed model at each requested budget (each in batches), graded with the
//! task's answer check, and compared: accuracy with 95% bootstrap intervals, average cost and
//! blocks saved, tokens/s and wall time, and how often each block is skipped, executed or
//! repeated; optionally drawn (`--plot`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array};
use drllm_runtime::{GenerateOptions, LayerPath, LoadedModel};
use drllm_tasks::{data, LoadOptions, RewardMode, Split, Style, TaskName, Template};
use drllm_worker::{grade_generation, prepare, EvalOptions, PreparedPrompt};
use rand::{Rng, SeedableRng};

use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Router package (drllm-train --out).
    #[arg(long, env = "DRLLM_ROUTERS")]
    routers: PathBuf,
    /// Tasks, comma separated: arc_easy, arc_challenge, dart-1..dart-5, gsm8k (out-of-domain
    /// evaluation is just another task name).
    #[arg(long, value_delimiter = ',', required = true)]
    dataset: Vec<String>,
    /// Split.
    #[arg(long, default_value = "dev")]
    split: String,
    /// Samples to evaluate (after offset).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip this many samples first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Data directory (default $DRLLM_DATA, else ../shared/data).
    #[arg(long, env = "DRLLM_DATA")]
    data: Option<PathBuf>,
    /// Router budgets in [-1, 1], comma separated (< 0 toward skip, > 0 toward repeat); the
    /// baseline runs once and each budget is compared with it (a cost-vs-accuracy sweep).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0",
        allow_hyphen_values = true
    )]
    budget: Vec<f64>,
    /// Answer check for multiple choice: strict (the paper's letter-only rule) or lenient.
    #[arg(long, default_value = "lenient")]
    reward: String,
    /// Prompt style: instruct (chat template) or base.
    #[arg(long, default_value = "instruct")]
    style: String,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 10)]
    max_new_tokens: usize,
    /// Prompts per batch (prompts of a routed batch may take different paths).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Routed prompts are prefilled in batches, then decoded in batches of similar paths chosen
    /// among this many prompts (a decode step costs the blocks any row of its batch uses);
    /// the KV caches of the whole pool are held at once.
    #[arg(long, default_value_t = 64)]
    route_pool: usize,
    /// Bootstrap resamples for the accuracy intervals.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one row per sample and mode (baseline, and routed at each budget) to this Parquet file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the routing pattern (per block and task), the cost histogram (at the first budget)
    /// and accuracy vs cost (every budget) to this .png or .svg file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One mode's answers.
struct Run {
    /// None for the baseline.
    budget: Option<f64>,
    paths: Vec<LayerPath>,
    responses: Vec<String>,
    correct: Vec<bool>,
    /// Accuracy and its 95% bootstrap interval.
    ci: (f64, f64, f64),
    new_tokens: usize,
    secs: f64,
}

fn run_mode(
    lm: &LoadedModel,
    prompts: &[PreparedPrompt],
    a: &EvalArgs,
    opts: &GenerateOptions,
    mode: RewardMode,
    policy: Option<&drllm_router::Policy>,
    bar: &indicatif::ProgressBar,
) -> Result<Run> {
    let n_layers = lm.model.num_layers();
    let mut run = Run {
        budget: policy.map(|p| p.budget()),
        paths: vec![],
        responses: vec![],
        correct: vec![],
        ci: (0.0, 0.0, 0.0),
        new_tokens: 0,
        secs: 0.0,
    };
    let t0 = Instant::now();
    // Routed prompts decode in batches of similar paths, chosen from a pool of prompts.
    let batch = a.batch.max(1);
    let step = match policy {
        Some(_) => a.route_pool.max(batch),
        None => batch,
    };
    for chunk in prompts.chunks(step) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let (gens, paths) = match policy {
            Some(p) => {
                let mut route = |rows: &[usize], l: usize, h: &tch::Tensor| {
                    let lens: Vec<usize> = rows.iter().map(|&r| ids[r].len()).collect();
                    p.decide(l, h, &lens)
                };
                lm.model
                    .generate_routed_grouped(&ids, &mut route, batch, opts)?
            }
            None => {
                let paths = vec![LayerPath::all_ones(n_layers); ids.len()];
                (lm.model.generate(&ids, &paths, opts)?, paths)
            }
        };
        for ((p, g), path) in chunk.iter().zip(&gens).zip(paths) {
            run.new_tokens += g.tokens.len();
            run.correct.push(grade_generation(lm, p, &g.tokens, mode));
            run.responses.push(lm.tokenizer.decode(&g.tokens)?);
            run.paths.push(path);
        }
        bar.inc(chunk.len() as u64);
    }
    run.secs = t0.elapsed().as_secs_f64();
    run.ci = accuracy_ci(&run.correct, a.bootstrap);
    Ok(run)
}

/// Accuracy and its 95% percentile-bootstrap interval (seeded, so reruns agree).
fn accuracy_ci(correct: &[bool], resamples: usize) -> (f64, f64, f64) {
    let n = correct.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let acc = correct.iter().filter(|&&c| c).count() as f64 / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut stats: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).filter(|_| correct[rng.random_range(0..n)]).count() as f64 / n as f64)
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |f: f64| stats[((stats.len() - 1) as f64 * f).round() as usize];
    (acc, q(0.025), q(0.975))
}

/// One task's prompts and runs.
struct TaskRuns {
    task: String,
    prompts: Vec<PreparedPrompt>,
    base: Run,
    routed: Vec<Run>,
}

impl Run {
    fn cost(&self) -> f64 {
        self.paths.iter().map(|p| p.cost()).sum::<usize>() as f64 / self.paths.len().max(1) as f64
    }
    fn tokens_per_s(&self) -> f64 {
        self.new_tokens as f64 / self.secs.max(1e-9)
    }
    /// Per block: fraction of prompts that skip, execute, repeat it.
    fn frequencies(&self, n_layers: usize) -> Vec<[f64; 3]> {
        let mut freq = vec![[0f64; 3]; n_layers];
        let n = self.paths.len().max(1) as f64;
        for p in &self.paths {
            for (l, &c) in p.counts().iter().enumerate() {
                freq[l][(c as usize).min(2)] += 1.0 / n;
            }
        }
        freq
    }
    fn summary(&self, n_layers: usize) -> serde_json::Value {
        let (acc, lo, hi) = self.ci;
        let mut v = serde_json::json!({
            "accuracy": acc, "ci95": [lo, hi], "cost": self.cost(),
            "blocks_saved": n_layers as f64 - self.cost(),
            "new_tokens": self.new_tokens, "tokens_per_s": self.tokens_per_s(), "wall_s": self.secs,
        });
        if let Some(b) = self.budget {
            v["budget"] = b.into();
            v["decision_frequencies"] = self
                .frequencies(n_layers)
                .iter()
                .map(|f| serde_json::json!({"skip": f[0], "execute": f[1], "repeat": f[2]}))
                .collect();
        }
        v
    }
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    let mode: RewardMode = a.reward.parse()?;
    if mode == RewardMode::ChoiceLogits {
        bail!("--reward choice-logits scores without decoding; eval compares generated answers: use strict or lenient");
    }
    let tasks: Vec<TaskName> = a
        .dataset
        .iter()
        .map(|d| d.parse::<TaskName>())
        .collect::<Result<_, _>>()?;
    let split: Split = a.split.parse()?;
    let style: Style = a.style.parse()?;
    if let Some(p) = &a.plot {
        crate::plot::Format::of(p)?;
    }
    let dir = data::resolve_data_dir(a.data.as_deref())?;
    let mut loaded = vec![];
    for (name, &task) in a.dataset.iter().zip(&tasks) {
        let l = data::load(
            &dir,
            task,
            split,
            &LoadOptions {
                offset: a.offset,
                limit: a.limit,
                ..Default::default()
            },
        )
        .with_context(|| format!("loading {name}/{}", a.split))?;
        if l.samples.is_empty() {
            bail!("{name}/{} has no samples in {}", a.split, dir.display());
        }
        loaded.push(l);
    }
    let lm = a.m.load()?;
    // Every budget is checked (and the package with it) before any answer is generated.
    let policies = crate::load_policies(&lm, &a.routers, &a.budget)
        .with_context(|| format!("--routers {}", a.routers.display()))?;
    let opts = EvalOptions {
        mode,
        max_new_tokens: a.max_new_tokens,
    };
    let gopts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let mut prepared = vec![];
    for ((name, &task), l) in a.dataset.iter().zip(&tasks).zip(&loaded) {
        let template = Template::builtin(task.family(), style);
        let mut prompts = vec![];
        for s in &l.samples {
            match prepare(&lm, s, &template, &opts) {
                Ok(p) => prompts.push(p),
                Err(e) => {
                    tracing::warn!(task = %name, sample = %s.id, error = %e, "sample skipped")
                }
            }
        }
        prepared.push((name.clone(), prompts));
    }
    let answers: usize =
        prepared.iter().map(|(_, p)| p.len()).sum::<usize>() * (1 + policies.len());
    let bar = indicatif::ProgressBar::new(answers as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} answers [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut runs = vec![];
    for (task, prompts) in prepared {
        let base = run_mode(&lm, &prompts, &a, &gopts, mode, None, &bar)?;
        let routed = policies
            .iter()
            .map(|p| run_mode(&lm, &prompts, &a, &gopts, mode, Some(p), &bar))
            .collect::<Result<Vec<_>>>()?;
        runs.push(TaskRuns {
            task,
            prompts,
            base,
            routed,
        });
    }
    bar.finish_and_clear();

    let n_layers = lm.model.num_layers();
    println!(
        "{} split, reward {}, batch {}, {} new tokens at most, routers {}",
        a.split,
        a.reward,
        a.batch,
        a.max_new_tokens,
        a.routers.display()
    );
    println!(
        "{:<14} {:>7} {:<16} {:<24} {:>8} {:>7} {:>9} {:>8}",
        "task", "prompts", "mode", "accuracy [95% CI]", "cost", "saved", "tokens/s", "wall"
    );
    for t in &runs {
        for r in std::iter::once(&t.base).chain(&t.routed) {
            let (acc, lo, hi) = r.ci;
            let mode = match r.budget {
                None => "baseline".to_string(),
                Some(b) => format!("routed {b:+.2}"),
            };
            println!(
                "{:<14} {:>7} {:<16} {:.3} [{:.3}, {:.3}]    {:>8.2} {:>6.1}% {:>9.1} {:>7.1}s",
                t.task,
                t.prompts.len(),
                mode,
                acc,
                lo,
                hi,
                r.cost(),
                100.0 * (1.0 - r.cost() / n_layers as f64),
                r.tokens_per_s(),
                r.secs
            );
        }
    }
    println!("cost = block applications per token (the baseline runs each of the {n_layers} blocks once)");
    let summary = serde_json::json!({
        "split": a.split, "reward": a.reward, "batch": a.batch,
        "max_new_tokens": a.max_new_tokens, "budgets": a.budget, "num_layers": n_layers,
        "model": lm.source.name(), "routers": a.routers.display().to_string(),
        "tasks": runs.iter().map(|t| serde_json::json!({
            "task": t.task, "prompts": t.prompts.len(),
            "baseline": t.base.summary(n_layers),
            "routed": t.routed.iter().map(|r| r.summary(n_layers)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.out {
        write_parquet(path, &runs).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        let data = crate::plot::PlotData {
            title: format!(
                "{} routers on {} ({} split, reward {})",
                lm.source.name(),
                a.dataset.join(", "),
                a.split,
                a.reward
            ),
            num_layers: n_layers,
            budget: a.budget[0],
            tasks: runs
                .iter()
                .map(|t| crate::plot::TaskPlot {
                    name: t.task.clone(),
                    freq: t.routed[0].frequencies(n_layers),
                    costs: t.routed[0].paths.iter().map(|p| p.cost()).collect(),
                    baseline_accuracy: t.base.ci.0,
                    sweep: t
                        .routed
                        .iter()
                        .map(|r| (r.budget.unwrap_or(0.0), r.cost(), r.ci.0))
                        .collect(),
                })
                .collect(),
        };
        crate::plot::draw(path, &data)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn write_parquet(path: &std::path::Path, runs: &[TaskRuns]) -> Result<()> {
    let (mut task, mut id, mut prompt, mut mode, mut budget) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut rpath, mut cost, mut response, mut correct) = (vec![], vec![], vec![], vec![]);
    for t in runs {
        for r in std::iter::once(&t.base).chain(&t.routed) {
            for (i, p) in t.prompts.iter().enumerate() {
                task.push(t.task.clone());
                id.push(p.sample_id.clone());
                prompt.push(p.text.clone());
                mode.push(if r.budget.is_some() {
                    "routed"
                } else {
                    "baseline"
                });
                budget.push(r.budget);
                rpath.push(r.paths[i].to_string());
                cost.push(r.paths[i].cost() as u32);
                response.push(r.responses[i].clone());
                correct.push(r.correct[i]);
            }
        }
    }
    let s = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
    let batch = RecordBatch::try_from_iter([
        ("task", s(task)),
        ("sample_id", s(id)),
        ("prompt", s(prompt)),
        ("mode", Arc::new(StringArray::from(mode)) as ArrayRef),
        ("budget", Arc::new(Float64Array::from(budget)) as ArrayRef),
        ("path", s(rpath)),
        ("cost", Arc::new(UInt32Array::from(cost)) as ArrayRef),
        ("response", s(response)),
        ("correct", Arc::new(BooleanArray::from(correct)) as ArrayRef),
    ])?;
    // Written beside the target and renamed: an interrupted run leaves no half file behind.
    let tmp = path.with_extension("parquet.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
