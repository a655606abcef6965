//! `drllm-infer eval`: a validation run. The same prompts are answered by the all-execute
//! baseline and by the routed model at each requested budget (each in batches), graded with the
//! task's answer check, and compared: accuracy with 95% bootstrap intervals, average cost and
//! blocks saved, tokens/s and wall time, and how often each block is skipped, executed or
//! repeated; optionally drawn (`--plot`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::types::Float64Type;
use arrow_array::{
    builder::{ListBuilder, UInt8Builder},
    ArrayRef, BooleanArray, Float64Array, ListArray, RecordBatch, StringArray, UInt32Array,
};
use drllm_eval::{answer_batch, prepare, EvalOptions, PathChoice, PreparedPrompt};
use drllm_runtime::{LayerPath, LoadedModel};
use drllm_tasks::{RewardMode, Style, Template};
use rand::{Rng, SeedableRng};

use drllm_cli::{DataArgs, ModelArgs};

#[derive(clap::Args)]
#[command(
    mut_arg("dataset", |a| a.required(true)),
    mut_arg("split", |a| a.default_value("dev"))
)]
pub struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Router package (drllm-train --out), or `embedded` for the reference routers of the
    /// embedded model shipped with drllm.
    #[arg(long, env = "DRLLM_ROUTERS")]
    routers: PathBuf,
    /// Prompts to evaluate (out-of-domain evaluation is just another task name).
    #[command(flatten)]
    d: DataArgs,
    /// Router budgets in [-1, 1], comma separated (< 0 toward skip, > 0 toward execute, 1 = the
    /// baseline); the baseline runs once and each budget is compared with it on the same
    /// prompts (a cost-vs-accuracy sweep).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0",
        allow_hyphen_values = true
    )]
    budget: Vec<f64>,
    /// Static layer paths evaluated as extra modes on the same prompts (one count per block,
    /// comma separated; repeat the flag for several): the fixed-path controls routers must beat.
    #[arg(long = "path")]
    paths: Vec<String>,
    /// Multiple-choice scoring: cloze (the gold choice's text is the most likely continuation,
    /// lm-eval's acc), cloze-norm (per character, acc_norm), strict (the paper's letter-only
    /// rule on decoded text), lenient (a leading letter), choice-logits (the letter's logit).
    /// Must be what the routers were trained on: prompts are rendered as in their search.
    #[arg(long, default_value = "cloze", value_parser = drllm_cli::reward_parser())]
    reward: RewardMode,
    /// Prompt style: instruct (chat template), base, or auto (base for cloze, else instruct).
    #[arg(long, default_value = "auto")]
    style: String,
    /// Own prompt template file (minijinja), as the search's --template: routers trained on
    /// prompts rendered with one are refused without it.
    #[arg(long)]
    template: Option<PathBuf>,
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

/// What answers the prompts in one mode of a run.
enum Mode<'a> {
    /// Every prompt along one fixed path (the baseline is all ones).
    Static(LayerPath),
    /// Each prompt along the path the routers choose for it.
    Routed(&'a drllm_router::Policy),
}

/// One mode's answers.
struct Run {
    /// None for fixed paths.
    budget: Option<f64>,
    /// The fixed path of a static mode.
    fixed: Option<LayerPath>,
    paths: Vec<LayerPath>,
    responses: Vec<String>,
    correct: Vec<bool>,
    /// Cloze scoring: each prompt's choice log-likelihoods (else empty rows).
    logliks: Vec<Vec<f64>>,
    /// Accuracy and its 95% bootstrap interval.
    ci: (f64, f64, f64),
    /// Accuracy minus the baseline's on the same prompts, with its 95% paired bootstrap interval
    /// (None for the baseline itself).
    diff: Option<(f64, f64, f64)>,
    new_tokens: usize,
    secs: f64,
}

fn run_mode(
    lm: &LoadedModel,
    prompts: &[PreparedPrompt],
    a: &EvalArgs,
    opts: &EvalOptions,
    mode: &Mode<'_>,
    bar: &indicatif::ProgressBar,
) -> Result<Run> {
    let mut run = Run {
        budget: match mode {
            Mode::Routed(p) => Some(p.budget()),
            Mode::Static(_) => None,
        },
        fixed: match mode {
            Mode::Static(p) => Some(p.clone()),
            Mode::Routed(_) => None,
        },
        paths: vec![],
        responses: vec![],
        correct: vec![],
        logliks: vec![],
        ci: (0.0, 0.0, 0.0),
        diff: None,
        new_tokens: 0,
        secs: 0.0,
    };
    let t0 = Instant::now();
    let batch = a.batch.max(1);
    let decodes = prompts.iter().any(PreparedPrompt::decodes);
    // Routed prompts decode in batches of similar paths, chosen from a pool of prompts.
    let step = match mode {
        Mode::Routed(_) if decodes => a.route_pool.max(batch),
        _ => batch,
    };
    let route;
    let choice = match mode {
        Mode::Static(p) => PathChoice::Fixed(p.clone()),
        Mode::Routed(policy) => {
            route = |l: usize, h: &tch::Tensor, lens: &[usize]| policy.decide(l, h, lens);
            PathChoice::Routed(&route)
        }
    };
    for chunk in prompts.chunks(step) {
        for ans in answer_batch(lm, chunk, &choice, batch, opts)? {
            run.new_tokens += ans.new_tokens;
            run.correct.push(ans.correct);
            run.responses.push(ans.response);
            run.logliks.push(ans.logliks);
            run.paths.push(ans.path);
        }
        bar.inc(chunk.len() as u64);
    }
    run.secs = t0.elapsed().as_secs_f64();
    run.ci = accuracy_ci(&run.correct, a.bootstrap);
    Ok(run)
}

/// Accuracy and its 95% percentile-bootstrap interval (seeded, so reruns agree).
fn accuracy_ci(correct: &[bool], resamples: usize) -> (f64, f64, f64) {
    let x: Vec<f64> = correct.iter().map(|&c| c as u8 as f64).collect();
    mean_ci(&x, resamples)
}

/// Mean of `x` and its 95% percentile-bootstrap interval over resampled rows (seeded). Applied to
/// per-prompt differences of two modes on the same prompts it is the paired interval.
fn mean_ci(x: &[f64], resamples: usize) -> (f64, f64, f64) {
    let n = x.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut stats: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| x[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |f: f64| stats[((stats.len() - 1) as f64 * f).round() as usize];
    (mean, q(0.025), q(0.975))
}

/// Per-prompt `a - b` of two modes' correctness on the same prompts, with its 95% paired
/// bootstrap interval.
fn paired_diff(a: &[bool], b: &[bool], resamples: usize) -> (f64, f64, f64) {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| x as u8 as f64 - y as u8 as f64)
        .collect();
    mean_ci(&d, resamples)
}

/// One task's prompts and runs.
struct TaskRuns {
    task: String,
    prompts: Vec<PreparedPrompt>,
    base: Run,
    /// Static paths (`--path`), then routed budgets.
    others: Vec<Run>,
}

impl Run {
    fn cost(&self) -> f64 {
        self.paths.iter().map(|p| p.cost()).sum::<usize>() as f64 / self.paths.len().max(1) as f64
    }
    fn tokens_per_s(&self) -> f64 {
        self.new_tokens as f64 / self.secs.max(1e-9)
    }
    fn prompts_per_s(&self) -> f64 {
        self.paths.len() as f64 / self.secs.max(1e-9)
    }
    fn label(&self) -> String {
        match (&self.budget, &self.fixed) {
            (Some(b), _) => format!("routed {b:+.2}"),
            (None, Some(p)) if p.counts().iter().all(|&c| c == 1) => "baseline".into(),
            (None, Some(p)) => format!("path -{}", p.num_layers() as i64 - p.cost() as i64),
            (None, None) => "?".into(),
        }
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
            "new_tokens": self.new_tokens, "tokens_per_s": self.tokens_per_s(),
            "prompts_per_s": self.prompts_per_s(), "wall_s": self.secs,
        });
        if let Some((d, lo, hi)) = self.diff {
            v["minus_baseline"] = serde_json::json!({"accuracy": d, "paired_ci95": [lo, hi]});
        }
        if let Some(p) = &self.fixed {
            v["path"] = p.to_string().into();
        }
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

pub fn eval(a: EvalArgs) -> Result<()> {
    let reward = a.reward;
    let split = a.d.split;
    let style = Style::resolve(&a.style, reward)?;
    // Read (and parsed) before any model work.
    let own_template = match &a.template {
        Some(p) => Some(Template::from_file(p, style).context("--template")?),
        None => None,
    };
    if let Some(p) = &a.plot {
        crate::plot::Format::of(p)?;
    }
    let dir = a.d.dir()?;
    let loaded = a.d.load(&dir)?;
    for (task, l) in &loaded {
        if l.samples.is_empty() {
            bail!("{task}/{split} has no samples in {}", dir.display());
        }
    }
    let names: Vec<String> = a.d.dataset.iter().map(ToString::to_string).collect();
    // Flags are checked before the model loads: a typo fails fast.
    let statics = a
        .paths
        .iter()
        .map(|p| p.parse().with_context(|| format!("--path {p}")))
        .collect::<Result<Vec<LayerPath>>>()?;
    let pkg = crate::routing::open_package(&a.routers)?;
    let routers_fingerprint = drllm_router::Package::fingerprint(&pkg.0)
        .with_context(|| format!("--routers {}", a.routers.display()))?;
    let lm = a.m.load()?;
    let ids = Identity {
        model: lm.source.name(),
        model_fingerprint: lm.source.fingerprint()?,
        routers_fingerprint,
    };
    let n_layers = lm.model.num_layers();
    let statics: Vec<LayerPath> = statics
        .into_iter()
        .zip(&a.paths)
        .map(|(p, s)| {
            crate::routing::path_for(Some(p), n_layers).with_context(|| format!("--path {s}"))
        })
        .collect::<Result<_>>()?;
    // Every budget is checked (and the package with it) before any answer is generated.
    let (policies, trained) = crate::routing::load_policies(&lm, &a.routers, pkg, &a.budget)
        .with_context(|| format!("--routers {}", a.routers.display()))?;
    // Routers read the hidden states of the prompts they were trained on: refuse prompts of
    // another form (cloze and cloze-norm share theirs, as strict and lenient do).
    if let Some(p) = &trained.prompts {
        let (theirs, their_style): (RewardMode, Style) = (p.reward.parse()?, p.style.parse()?);
        if theirs.prompt_form() != reward.prompt_form() || their_style != style {
            bail!(
                "--routers {}: trained on prompts of reward {theirs} and style {their_style}, \
                 asked to route prompts of reward {reward} and style {style}: the routers would \
                 read other tokens (pass --reward {theirs} --style {their_style})",
                a.routers.display()
            );
        }
    }
    // Each task's template, made once.
    let templates: Vec<Template> = loaded
        .iter()
        .map(|(task, _)| match &own_template {
            Some(t) => t.clone(),
            None => Template::builtin_for(task.family(), style, reward),
        })
        .collect();
    // ... and with the templates they were rendered with.
    if let Some(p) = &trained.prompts {
        for ((task, _), ours) in loaded.iter().zip(&templates) {
            let family = task.family();
            let theirs = p.templates.iter().find(|t| t.family == family.name());
            if let Some(t) = theirs.filter(|t| t.source != ours.source()) {
                bail!(
                    "--routers {}: trained on {} prompts rendered with the template {}, which \
                     differs from {} used here: the routers would read other tokens (pass \
                     --template with the search's template file)",
                    a.routers.display(),
                    family.name(),
                    t.name,
                    ours.name()
                );
            }
        }
    }
    let opts = EvalOptions {
        mode: reward,
        max_new_tokens: a.max_new_tokens,
    };
    let mut prepared = vec![];
    for ((task, l), template) in loaded.iter().zip(&templates) {
        let name = task.to_string();
        let mut prompts = vec![];
        for s in &l.samples {
            match prepare(&lm, s, template, &opts) {
                Ok(p) => prompts.push(p),
                Err(e) => {
                    tracing::warn!(task = %name, sample = %s.id, error = %e, "sample skipped")
                }
            }
        }
        prepared.push((name.clone(), prompts));
    }
    let modes: Vec<Mode<'_>> = statics
        .iter()
        .map(|p| Mode::Static(p.clone()))
        .chain(policies.iter().map(Mode::Routed))
        .collect();
    let answers: usize = prepared.iter().map(|(_, p)| p.len()).sum::<usize>() * (1 + modes.len());
    let bar = indicatif::ProgressBar::new(answers as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} answers [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let baseline = Mode::Static(LayerPath::all_ones(n_layers));
    let mut runs = vec![];
    for (task, prompts) in prepared {
        let base = run_mode(&lm, &prompts, &a, &opts, &baseline, &bar)?;
        let mut others = vec![];
        for m in &modes {
            let mut r = run_mode(&lm, &prompts, &a, &opts, m, &bar)?;
            r.diff = Some(paired_diff(&r.correct, &base.correct, a.bootstrap));
            others.push(r);
        }
        runs.push(TaskRuns {
            task,
            prompts,
            base,
            others,
        });
    }
    bar.finish_and_clear();

    println!(
        "{} split, reward {reward}, style {style}, batch {}, routers {}",
        split,
        a.batch,
        a.routers.display()
    );
    let decodes = runs
        .iter()
        .any(|t| t.prompts.iter().any(PreparedPrompt::decodes));
    println!(
        "{:<14} {:>7} {:<14} {:<22} {:<26} {:>7} {:>7} {:>9} {:>7}",
        "task",
        "prompts",
        "mode",
        "accuracy [95% CI]",
        "- baseline [paired 95%]",
        "cost",
        "saved",
        if decodes { "tokens/s" } else { "prompts/s" },
        "wall"
    );
    for t in &runs {
        for r in std::iter::once(&t.base).chain(&t.others) {
            let (acc, lo, hi) = r.ci;
            let diff = match r.diff {
                Some((d, lo, hi)) => format!("{:+.3} [{:+.3}, {:+.3}]", d, lo, hi),
                None => String::new(),
            };
            println!(
                "{:<14} {:>7} {:<14} {:.3} [{:.3}, {:.3}]   {:<26} {:>7.2} {:>6.1}% {:>9.1} {:>6.1}s",
                t.task,
                t.prompts.len(),
                r.label(),
                acc,
                lo,
                hi,
                diff,
                r.cost(),
                100.0 * (1.0 - r.cost() / n_layers as f64),
                if decodes { r.tokens_per_s() } else { r.prompts_per_s() },
                r.secs
            );
        }
    }
    println!("cost = block applications per token (the baseline runs each of the {n_layers} blocks once)");
    let summary = serde_json::json!({
        "split": split.to_string(), "reward": reward.name(), "style": style.name(), "template": a.template.as_ref().map(|p| p.display().to_string()), "batch": a.batch,
        "max_new_tokens": a.max_new_tokens, "budgets": a.budget, "num_layers": n_layers,
        "model": ids.model, "model_fingerprint": ids.model_fingerprint,
        "routers": a.routers.display().to_string(), "routers_fingerprint": ids.routers_fingerprint,
        "bootstrap": a.bootstrap,
        "tasks": runs.iter().map(|t| serde_json::json!({
            "task": t.task, "prompts": t.prompts.len(),
            "baseline": t.base.summary(n_layers),
            "static": t.others.iter().filter(|r| r.budget.is_none()).map(|r| r.summary(n_layers)).collect::<Vec<_>>(),
            "routed": t.others.iter().filter(|r| r.budget.is_some()).map(|r| r.summary(n_layers)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.out {
        write_parquet(path, &runs, &ids).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        fn routed(t: &TaskRuns) -> Vec<&Run> {
            t.others.iter().filter(|r| r.budget.is_some()).collect()
        }
        let data = crate::plot::PlotData {
            title: format!(
                "{} routers on {} ({} split, reward {reward})",
                lm.source.name(),
                names.join(", "),
                split,
            ),
            num_layers: n_layers,
            budget: a.budget[0],
            tasks: runs
                .iter()
                .map(|t| crate::plot::TaskPlot {
                    name: t.task.clone(),
                    freq: routed(t)[0].frequencies(n_layers),
                    costs: routed(t)[0].paths.iter().map(|p| p.cost()).collect(),
                    baseline_accuracy: t.base.ci.0,
                    sweep: routed(t)
                        .iter()
                        .map(|r| (r.budget.unwrap_or(0.0), r.cost(), r.ci.0))
                        .collect(),
                    statics: t
                        .others
                        .iter()
                        .filter(|r| r.budget.is_none())
                        .map(|r| (r.cost(), r.ci.0))
                        .collect(),
                })
                .collect(),
        };
        crate::plot::draw(path, &data)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// What made an evaluation's answers: written into every row of `--out` (so files of an array
/// job can be concatenated and still told apart) and into the `--json` summary.
struct Identity {
    model: String,
    model_fingerprint: String,
    routers_fingerprint: String,
}

fn write_parquet(path: &std::path::Path, runs: &[TaskRuns], ids: &Identity) -> Result<()> {
    let (mut task, mut id, mut prompt, mut mode, mut budget) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut gold, mut cost, mut response, mut correct) = (vec![], vec![], vec![], vec![]);
    // Counts per block, as the paths dataset stores them (list<uint8>).
    let mut rpath = ListBuilder::new(UInt8Builder::new());
    let mut logliks: Vec<Option<Vec<Option<f64>>>> = vec![];
    for t in runs {
        for r in std::iter::once(&t.base).chain(&t.others) {
            let m = match (r.budget, &r.fixed) {
                (Some(_), _) => "routed",
                (None, Some(p)) if p.counts().iter().all(|&c| c == 1) => "baseline",
                _ => "static",
            };
            for (i, p) in t.prompts.iter().enumerate() {
                task.push(t.task.clone());
                id.push(p.sample_id.clone());
                prompt.push(p.text.clone());
                gold.push(p.gold.to_string());
                mode.push(m);
                budget.push(r.budget);
                rpath.values().append_slice(r.paths[i].counts());
                rpath.append(true);
                cost.push(r.paths[i].cost() as u32);
                response.push(r.responses[i].clone());
                correct.push(r.correct[i]);
                let ll = &r.logliks[i];
                logliks.push((!ll.is_empty()).then(|| ll.iter().map(|&x| Some(x)).collect()));
            }
        }
    }
    let rows = task.len();
    let s = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
    let same = |v: &str| Arc::new(StringArray::from(vec![v; rows])) as ArrayRef;
    let batch = RecordBatch::try_from_iter([
        ("task", s(task)),
        ("sample_id", s(id)),
        ("prompt", s(prompt)),
        ("gold", s(gold)),
        ("mode", Arc::new(StringArray::from(mode)) as ArrayRef),
        ("budget", Arc::new(Float64Array::from(budget)) as ArrayRef),
        ("path", Arc::new(rpath.finish()) as ArrayRef),
        ("cost", Arc::new(UInt32Array::from(cost)) as ArrayRef),
        ("response", s(response)),
        ("correct", Arc::new(BooleanArray::from(correct)) as ArrayRef),
        (
            "choice_logliks",
            Arc::new(ListArray::from_iter_primitive::<Float64Type, _, _>(logliks)) as ArrayRef,
        ),
        ("model", same(&ids.model)),
        ("model_fingerprint", same(&ids.model_fingerprint)),
        ("routers_fingerprint", same(&ids.routers_fingerprint)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_interval_is_tighter_than_unpaired_when_modes_agree() {
        // Two modes that agree on all but 3 of 200 prompts: their accuracies' own intervals
        // are wide, the paired interval of the difference is narrow and holds the truth.
        let base: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
        let mut other = base.clone();
        for i in [1, 3, 5] {
            other[i] = true;
        }
        let (d, lo, hi) = paired_diff(&other, &base, 2000);
        assert!((d - 0.015).abs() < 1e-12);
        assert!(lo >= 0.0 && hi <= 0.04, "[{lo}, {hi}]");
        let (_, alo, ahi) = accuracy_ci(&base, 2000);
        assert!(ahi - alo > 3.0 * (hi - lo), "{alo} {ahi} vs {lo} {hi}");
        // Identical modes: a zero-width interval at 0.
        assert_eq!(paired_diff(&base, &base, 500), (0.0, 0.0, 0.0));
    }
}
