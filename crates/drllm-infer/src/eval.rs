//! `drllm-infer eval`: a validation run. The same prompts are answered by the all-execute
//! baseline and by the routed model (each in batches), graded with the task's answer check, and
//! compared: accuracy with 95% bootstrap intervals, average cost and blocks saved, tokens/s and
//! wall time, and how often each block is skipped, executed or repeated.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, BooleanArray, RecordBatch, StringArray, UInt32Array};
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
    /// Task: arc_easy, arc_challenge, dart-1..dart-5, gsm8k (out-of-domain is just another task).
    #[arg(long)]
    dataset: String,
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
    /// Router budget in [-1, 1] (< 0 toward skip, > 0 toward repeat).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    budget: f64,
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
    /// Bootstrap resamples for the accuracy intervals.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one row per sample (both modes) to this Parquet file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One mode's answers.
struct Run {
    paths: Vec<LayerPath>,
    responses: Vec<String>,
    correct: Vec<bool>,
    new_tokens: usize,
    secs: f64,
}

fn run_mode(
    lm: &LoadedModel,
    prompts: &[PreparedPrompt],
    batch: usize,
    opts: &GenerateOptions,
    mode: RewardMode,
    policy: Option<&drllm_router::Policy>,
    bar: &indicatif::ProgressBar,
) -> Result<Run> {
    let n_layers = lm.model.num_layers();
    let mut run = Run {
        paths: vec![],
        responses: vec![],
        correct: vec![],
        new_tokens: 0,
        secs: 0.0,
    };
    let t0 = Instant::now();
    for chunk in prompts.chunks(batch.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let (gens, paths) = match policy {
            Some(p) => {
                let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
                lm.model
                    .generate_routed(&ids, &mut |l, h| p.decide(l, h, &lens), opts)?
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

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    let mode: RewardMode = a.reward.parse()?;
    if mode == RewardMode::ChoiceLogits {
        bail!("--reward choice-logits scores without decoding; eval compares generated answers: use strict or lenient");
    }
    let task: TaskName = a.dataset.parse()?;
    let split: Split = a.split.parse()?;
    let style: Style = a.style.parse()?;
    let dir = data::resolve_data_dir(a.data.as_deref())?;
    let loaded = data::load(
        &dir,
        task,
        split,
        &LoadOptions {
            offset: a.offset,
            limit: a.limit,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}/{}", a.dataset, a.split))?;
    if loaded.samples.is_empty() {
        bail!(
            "{}/{} has no samples in {}",
            a.dataset,
            a.split,
            dir.display()
        );
    }
    let lm = a.m.load()?;
    let policy = crate::load_policy(&lm, &a.routers, a.budget)
        .with_context(|| format!("--routers {}", a.routers.display()))?;
    let template = Template::builtin(task.family(), style);
    let opts = EvalOptions {
        mode,
        max_new_tokens: a.max_new_tokens,
    };
    let mut prompts = vec![];
    for s in &loaded.samples {
        match prepare(&lm, s, &template, &opts) {
            Ok(p) => prompts.push(p),
            Err(e) => tracing::warn!(sample = %s.id, error = %e, "sample skipped"),
        }
    }
    let n = prompts.len();
    let gopts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let bar = indicatif::ProgressBar::new(2 * n as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} answers [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let base = run_mode(&lm, &prompts, a.batch, &gopts, mode, None, &bar)?;
    let routed = run_mode(&lm, &prompts, a.batch, &gopts, mode, Some(&policy), &bar)?;
    bar.finish_and_clear();

    let n_layers = lm.model.num_layers();
    let (acc_b, lo_b, hi_b) = accuracy_ci(&base.correct, a.bootstrap);
    let (acc_r, lo_r, hi_r) = accuracy_ci(&routed.correct, a.bootstrap);
    let cost_r = routed.paths.iter().map(|p| p.cost()).sum::<usize>() as f64 / n as f64;
    let mut freq = vec![[0f64; 3]; n_layers];
    for p in &routed.paths {
        for (l, &c) in p.counts().iter().enumerate() {
            freq[l][c as usize] += 1.0 / n as f64;
        }
    }
    let tps = |r: &Run| r.new_tokens as f64 / r.secs.max(1e-9);
    println!(
        "{} {} ({n} prompts, reward {}, budget {}, batch {})",
        a.dataset, a.split, a.reward, a.budget, a.batch
    );
    println!("mode      accuracy [95% CI]         cost/{n_layers}  tokens/s   wall");
    println!(
        "baseline  {:.3} [{:.3}, {:.3}]     {:>7.2}  {:>8.1}  {:>6.1}s",
        acc_b,
        lo_b,
        hi_b,
        n_layers as f64,
        tps(&base),
        base.secs
    );
    println!(
        "routed    {:.3} [{:.3}, {:.3}]     {:>7.2}  {:>8.1}  {:>6.1}s",
        acc_r,
        lo_r,
        hi_r,
        cost_r,
        tps(&routed),
        routed.secs
    );
    println!(
        "blocks saved per prompt: {:.2} ({:.1}%); accuracy change {:+.3}",
        n_layers as f64 - cost_r,
        100.0 * (1.0 - cost_r / n_layers as f64),
        acc_r - acc_b
    );
    let summary = serde_json::json!({
        "task": a.dataset, "split": a.split, "prompts": n, "reward": a.reward,
        "budget": a.budget, "batch": a.batch, "max_new_tokens": a.max_new_tokens,
        "model": lm.source.name(), "routers": a.routers.display().to_string(),
        "baseline": {"accuracy": acc_b, "ci95": [lo_b, hi_b], "cost": n_layers,
                     "tokens_per_s": tps(&base), "wall_s": base.secs},
        "routed": {"accuracy": acc_r, "ci95": [lo_r, hi_r], "cost": cost_r,
                   "blocks_saved": n_layers as f64 - cost_r,
                   "tokens_per_s": tps(&routed), "wall_s": routed.secs},
        "decision_frequencies": freq.iter().map(|f| serde_json::json!({
            "skip": f[0], "execute": f[1], "repeat": f[2]})).collect::<Vec<_>>(),
    });
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.out {
        write_parquet(path, &prompts, &base, &routed)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_parquet(
    path: &std::path::Path,
    prompts: &[PreparedPrompt],
    base: &Run,
    routed: &Run,
) -> Result<()> {
    let s = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
    let b = |v: &[bool]| Arc::new(BooleanArray::from(v.to_vec())) as ArrayRef;
    let cost = |r: &Run| {
        Arc::new(UInt32Array::from(
            r.paths.iter().map(|p| p.cost() as u32).collect::<Vec<_>>(),
        )) as ArrayRef
    };
    let batch = RecordBatch::try_from_iter([
        (
            "sample_id",
            s(prompts.iter().map(|p| p.sample_id.clone()).collect()),
        ),
        (
            "prompt",
            s(prompts.iter().map(|p| p.text.clone()).collect()),
        ),
        ("baseline_cost", cost(base)),
        ("baseline_response", s(base.responses.clone())),
        ("baseline_correct", b(&base.correct)),
        (
            "routed_path",
            s(routed.paths.iter().map(|p| p.to_string()).collect()),
        ),
        ("routed_cost", cost(routed)),
        ("routed_response", s(routed.responses.clone())),
        ("routed_correct", b(&routed.correct)),
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
