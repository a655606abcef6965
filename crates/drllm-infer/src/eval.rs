//! `drllm-infer eval`: a validation run. The same prompts are answered by the all-execute
//! baseline, by fixed paths (one for every task, or one per task), by the routed model at each
//! requested budget and by the controls that tell routing from a static path (routes permuted
//! across prompts of a task, random paths of the routed cost), each in batches, graded with the
//! task's answer check, and compared: accuracy with 95% bootstrap intervals, paired intervals
//! against the baseline and the routers, average cost and blocks saved, tokens/s and wall time,
//! per task and pooled, and how often each block is skipped, executed or repeated; optionally
//! drawn (`--plot`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::types::Float64Type;
use arrow_array::{
    builder::{ListBuilder, UInt8Builder},
    ArrayRef, BooleanArray, Float64Array, ListArray, RecordBatch, StringArray, UInt32Array,
};
use drllm_eval::stats::mean_ci;
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
    /// embedded model shipped with drllm. Without one, the baseline and the fixed paths
    /// (`--path`, `--task-path`) are evaluated alone.
    #[arg(long, env = "DRLLM_ROUTERS")]
    routers: Option<PathBuf>,
    /// Prompts to evaluate (out-of-domain evaluation is just another task name).
    #[command(flatten)]
    d: DataArgs,
    /// Router budgets in [-1, 1], comma separated (< 0 toward skip, > 0 toward execute, 1 = the
    /// baseline); the baseline runs once and each budget is compared with it on the same
    /// prompts (a cost-vs-accuracy sweep). Default 0 with --routers.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    budget: Vec<f64>,
    /// Static layer paths evaluated as extra modes on the same prompts (one count per block,
    /// comma separated; repeat the flag for several): the fixed-path controls routers must beat.
    #[arg(long = "path")]
    paths: Vec<String>,
    /// A fixed path for one task, `TASK=COUNTS` (repeat the flag: every evaluated task needs
    /// one; the k-th given for each task make up the k-th per-task mode): paths chosen per task
    /// on train, the control for routing that only learns which task a prompt is from.
    #[arg(long = "task-path")]
    task_paths: Vec<String>,
    /// Controls of each routed budget, comma separated: `permuted` (each prompt runs the path
    /// the routers chose for another prompt of its task: the same mix of paths without the
    /// prompt), `random` (a random path with the routed path's numbers of skips and repeats).
    #[arg(long = "control", value_delimiter = ',', value_parser = ["permuted", "random"])]
    controls: Vec<String>,
    /// Seed of the controls' permutations and random paths.
    #[arg(long, default_value_t = 0)]
    control_seed: u64,
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
    /// Each prompt along its own given path (the controls).
    Each(Vec<LayerPath>),
}

/// Which mode a run is, for tables, JSON and Parquet.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Baseline,
    /// A `--path` for every task.
    Static,
    /// The k-th per-task path set (`--task-path`).
    PerTask(usize),
    Routed,
    /// Routes of the routed run at the same budget, permuted across the task's prompts.
    Permuted,
    /// Random paths with the routed paths' numbers of skips and repeats.
    Random,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::Static => "static",
            Kind::PerTask(_) => "per_task_static",
            Kind::Routed => "routed",
            Kind::Permuted => "permuted",
            Kind::Random => "random",
        }
    }
    fn is_control(self) -> bool {
        matches!(self, Kind::Permuted | Kind::Random)
    }
}

/// One mode's answers.
struct Run {
    kind: Kind,
    /// The budget of routed runs and their controls.
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
    /// Routed accuracy (at this run's budget, else the first) minus this run's, paired: how much
    /// routing beats this control (None for the baseline and routed runs, or without routers).
    routed_minus: Option<(f64, f64, f64)>,
    new_tokens: usize,
    secs: f64,
}

impl Run {
    /// A run of `kind` with nothing measured yet.
    fn empty(kind: Kind, budget: Option<f64>, fixed: Option<LayerPath>) -> Run {
        Run {
            kind,
            budget,
            fixed,
            paths: vec![],
            responses: vec![],
            correct: vec![],
            logliks: vec![],
            ci: (0.0, 0.0, 0.0),
            diff: None,
            routed_minus: None,
            new_tokens: 0,
            secs: 0.0,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_mode(
    lm: &LoadedModel,
    prompts: &[PreparedPrompt],
    a: &EvalPlan,
    opts: &EvalOptions,
    mode: &Mode<'_>,
    kind: Kind,
    budget: Option<f64>,
    bar: &indicatif::ProgressBar,
) -> Result<Run> {
    let fixed = match mode {
        Mode::Static(p) => Some(p.clone()),
        _ => None,
    };
    let mut run = Run::empty(kind, budget, fixed);
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
        Mode::Each(paths) => PathChoice::Each(paths.clone()),
        Mode::Routed(policy) => {
            route = |l: usize, h: &tch::Tensor, lens: &[usize]| policy.decide(l, h, lens);
            PathChoice::Routed(&route)
        }
    };
    for (k, chunk) in prompts.chunks(step).enumerate() {
        let choice = match &choice {
            PathChoice::Each(paths) => {
                PathChoice::Each(paths[k * step..k * step + chunk.len()].to_vec())
            }
            PathChoice::Fixed(p) => PathChoice::Fixed(p.clone()),
            PathChoice::Routed(r) => PathChoice::Routed(*r),
        };
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
        let b = self.budget.unwrap_or(0.0);
        let saved = |p: &LayerPath| p.num_layers() as i64 - p.cost() as i64;
        match (self.kind, &self.fixed) {
            (Kind::Baseline, _) => "baseline".into(),
            (Kind::Static, Some(p)) => format!("path -{}", saved(p)),
            (Kind::PerTask(k), _) => format!("task path #{}", k + 1),
            (Kind::Routed, _) => format!("routed {b:+.2}"),
            (Kind::Permuted, _) => format!("permuted {b:+.2}"),
            (Kind::Random, _) => format!("random {b:+.2}"),
            (Kind::Static, None) => "path".into(),
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
        v["mode"] = self.kind.name().into();
        if let Kind::PerTask(k) = self.kind {
            v["per_task_set"] = (k + 1).into();
        }
        if let Some((d, lo, hi)) = self.diff {
            v["minus_baseline"] = serde_json::json!({"accuracy": d, "paired_ci95": [lo, hi]});
        }
        if let Some((d, lo, hi)) = self.routed_minus {
            v["routed_minus_this"] = serde_json::json!({"accuracy": d, "paired_ci95": [lo, hi]});
        }
        if let Some(p) = &self.fixed {
            v["path"] = p.to_string().into();
        }
        if let Some(b) = self.budget {
            v["budget"] = b.into();
        }
        if self.kind == Kind::Routed {
            // Prompts per path cost, so merged summaries can redraw the cost histogram.
            let mut counts = std::collections::BTreeMap::<usize, usize>::new();
            for p in &self.paths {
                *counts.entry(p.cost()).or_default() += 1;
            }
            v["cost_counts"] = counts
                .into_iter()
                .map(|(c, n)| serde_json::json!([c, n]))
                .collect();
            v["decision_frequencies"] = self
                .frequencies(n_layers)
                .iter()
                .map(|f| serde_json::json!({"skip": f[0], "execute": f[1], "repeat": f[2]}))
                .collect();
        }
        v
    }
}

/// Routers opened for a run: the package's path as given, its policies (one per budget) and
/// what it records of its training.
struct Routing {
    spec: PathBuf,
    policies: Vec<drllm_router::Policy>,
    trained: drllm_router::PackageManifest,
}

/// `--task-path TASK=COUNTS` flags: each task's paths in the order given (checked against the
/// model's block count once it is loaded).
fn parse_task_paths(flags: &[String]) -> Result<Vec<(String, Vec<LayerPath>)>> {
    let mut out: Vec<(String, Vec<LayerPath>)> = vec![];
    for f in flags {
        let (task, counts) = f
            .split_once('=')
            .with_context(|| format!("--task-path {f}: expected TASK=COUNTS"))?;
        let path: LayerPath = counts.parse().with_context(|| format!("--task-path {f}"))?;
        match out.iter_mut().find(|(t, _)| t == task) {
            Some((_, v)) => v.push(path),
            None => out.push((task.to_string(), vec![path])),
        }
    }
    Ok(out)
}

/// A seeded permutation of `0..n` without fixed points when `n >= 2` (Sattolo's algorithm draws
/// a single cycle): every prompt gets another prompt's route.
fn derangement(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in (1..n).rev() {
        let j = rng.random_range(0..i);
        p.swap(i, j);
    }
    p
}

/// A random path with `like`'s numbers of skipped and repeated blocks (so its cost), placed
/// uniformly over the blocks.
fn random_like(like: &LayerPath, rng: &mut impl Rng) -> Result<LayerPath> {
    let counts = like.counts();
    let skips = counts.iter().filter(|&&c| c == 0).count();
    let repeats = counts.iter().filter(|&&c| c == 2).count();
    let mut blocks: Vec<usize> = (0..counts.len()).collect();
    rand::seq::SliceRandom::shuffle(&mut blocks[..], rng);
    let mut out = vec![1u8; counts.len()];
    for &b in &blocks[..skips] {
        out[b] = 0;
    }
    for &b in &blocks[skips..skips + repeats] {
        out[b] = 2;
    }
    Ok(LayerPath::from_counts(out)?)
}

/// A stable seed for one task's and budget's control draws (FNV-1a over the task name, mixed
/// with the run's seed and the budget's index; std's hasher is not stable across releases).
fn control_seed(seed: u64, task: &str, budget_index: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in task.bytes().chain((budget_index as u64).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A control of each routed budget (`--control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Each prompt runs the path the routers chose for another prompt of its task.
    Permuted,
    /// A random path with the routed path's numbers of skips and repeats.
    Random,
}

/// An evaluation with every flag checked and parsed (nothing loaded yet): what [`execute`]
/// runs. Made from [`EvalArgs`] by [`EvalPlan::from_args`].
pub struct EvalPlan {
    /// The model and where it runs.
    pub model: ModelArgs,
    /// The tasks, split and samples.
    pub data: DataArgs,
    /// The router package as given (None: the baseline and fixed paths alone).
    pub routers: Option<PathBuf>,
    /// Router budgets (0 when routers are given without budgets).
    pub budgets: Vec<f64>,
    /// `--path` flags as given, with their paths (lengths are checked against the model).
    pub statics: Vec<(String, LayerPath)>,
    /// `--task-path` paths per task, in the order given.
    pub task_paths: Vec<(String, Vec<LayerPath>)>,
    /// Per-task path sets (each task has this many).
    pub per_task_sets: usize,
    /// Controls of each routed budget.
    pub controls: Vec<Control>,
    /// Seed of the controls' draws.
    pub control_seed: u64,
    /// Answer scoring.
    pub reward: RewardMode,
    /// Prompt style (resolved).
    pub style: Style,
    /// Own prompt template: its file and the template read from it.
    pub template: Option<(PathBuf, Template)>,
    /// Most new tokens per answer.
    pub max_new_tokens: usize,
    /// Prompts per batch.
    pub batch: usize,
    /// Routed prompts decode in batches chosen among this many.
    pub route_pool: usize,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// Summary JSON file.
    pub json: Option<PathBuf>,
    /// Per-sample Parquet file.
    pub out: Option<PathBuf>,
    /// Plot file (.png or .svg).
    pub plot: Option<PathBuf>,
}

impl EvalPlan {
    /// Checks and parses the flags: a typo fails before any model work.
    pub fn from_args(a: EvalArgs) -> Result<Self> {
        let style = Style::resolve(&a.style, a.reward)?;
        let template = match a.template {
            Some(p) => {
                let t = Template::from_file(&p, style).context("--template")?;
                Some((p, t))
            }
            None => None,
        };
        if let Some(p) = &a.plot {
            crate::plot::Format::of(p)?;
        }
        if a.routers.is_none() {
            if !a.budget.is_empty() {
                bail!("--budget sets the routers' budget: pass --routers too (without routers, --path and --task-path evaluate fixed paths alone)");
            }
            if !a.controls.is_empty() {
                bail!("--control permutes or redraws the routers' paths: pass --routers too");
            }
            if a.plot.is_some() {
                bail!("--plot draws the routing: pass --routers too");
            }
        }
        let budgets = match (&a.routers, a.budget.is_empty()) {
            (Some(_), true) => vec![0.0],
            _ => a.budget,
        };
        let statics = a
            .paths
            .into_iter()
            .map(|p| {
                let path = p.parse().with_context(|| format!("--path {p}"))?;
                Ok((p, path))
            })
            .collect::<Result<Vec<(String, LayerPath)>>>()?;
        let task_paths = parse_task_paths(&a.task_paths)?;
        let names: Vec<String> = a.d.dataset.iter().map(ToString::to_string).collect();
        let per_task_sets = check_task_paths(&task_paths, &names)?;
        let controls = a
            .controls
            .iter()
            .map(|c| match c.as_str() {
                "permuted" => Ok(Control::Permuted),
                "random" => Ok(Control::Random),
                other => bail!("--control {other}: expected permuted or random"),
            })
            .collect::<Result<_>>()?;
        Ok(EvalPlan {
            model: a.m,
            data: a.d,
            routers: a.routers,
            budgets,
            statics,
            task_paths,
            per_task_sets,
            controls,
            control_seed: a.control_seed,
            reward: a.reward,
            style,
            template,
            max_new_tokens: a.max_new_tokens,
            batch: a.batch,
            route_pool: a.route_pool,
            bootstrap: a.bootstrap,
            json: a.json,
            out: a.out,
            plot: a.plot,
        })
    }

    /// The controls' names, as the summary records them.
    fn control_names(&self) -> Vec<&'static str> {
        self.controls
            .iter()
            .map(|c| match c {
                Control::Permuted => "permuted",
                Control::Random => "random",
            })
            .collect()
    }
}

/// A finished evaluation: every task's modes, pooled when there are several tasks, and its
/// summary.
pub struct EvalReport {
    header: String,
    title: String,
    runs: Vec<TaskRuns>,
    pooled: Option<(usize, Run, Vec<Run>)>,
    n_layers: usize,
    ids: Identity,
    /// The summary (what `--json` writes): settings, and per task and pooled every mode's
    /// accuracy, interval, paired differences, cost and speed.
    pub summary: serde_json::Value,
}

/// A validation run from flags: [`EvalPlan::from_args`], [`execute`], the table on stdout,
/// then [`write_outputs`].
pub fn eval(a: EvalArgs) -> Result<()> {
    let plan = EvalPlan::from_args(a)?;
    let report = execute(&plan)?;
    print_report(&report);
    write_outputs(&plan, &report)
}

/// Prints a finished evaluation (stdout): its settings and the table.
pub fn print_report(r: &EvalReport) {
    println!("{}", r.header);
    print_table(&r.runs, r.pooled.as_ref(), r.n_layers);
}

/// Writes what the plan asks for: the summary (`--json`), one row per sample and mode
/// (`--out`) and the plot (`--plot`, its file named on stdout).
pub fn write_outputs(plan: &EvalPlan, r: &EvalReport) -> Result<()> {
    if let Some(path) = &plan.json {
        std::fs::write(path, serde_json::to_string_pretty(&r.summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &plan.out {
        write_parquet(path, &r.runs, &r.ids)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &plan.plot {
        let data = plot_data(r.title.clone(), &r.runs, r.n_layers, plan.budgets[0]);
        crate::plot::draw(path, &data)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// Runs an evaluation: the tasks' prompts in every mode (baseline, fixed paths, per-task paths,
/// routed budgets and their controls), each paired with the baseline and the routers, and
/// pooled over tasks. Progress on stderr.
pub fn execute(plan: &EvalPlan) -> Result<EvalReport> {
    let (reward, style) = (plan.reward, plan.style);
    let split = plan.data.split;
    let dir = plan.data.dir()?;
    let loaded = plan.data.load(&dir)?;
    for (task, l) in &loaded {
        if l.samples.is_empty() {
            bail!("{task}/{split} has no samples in {}", dir.display());
        }
    }
    let names: Vec<String> = plan.data.dataset.iter().map(ToString::to_string).collect();
    let pkg = plan
        .routers
        .as_ref()
        .map(|r| crate::routing::open_package(r).map(|p| (r, p)))
        .transpose()?;
    let routers_fingerprint = pkg
        .as_ref()
        .map(|(r, p)| {
            drllm_router::Package::fingerprint(&p.0)
                .with_context(|| format!("--routers {}", r.display()))
        })
        .transpose()?;
    let lm = plan.model.load()?;
    let ids = Identity {
        model: lm.source.name(),
        model_fingerprint: lm.source.fingerprint()?,
        routers_fingerprint,
    };
    let n_layers = lm.model.num_layers();
    let statics: Vec<LayerPath> = plan
        .statics
        .iter()
        .map(|(s, p)| {
            crate::routing::path_for(Some(p.clone()), n_layers)
                .with_context(|| format!("--path {s}"))
        })
        .collect::<Result<_>>()?;
    for (t, v) in &plan.task_paths {
        for p in v {
            p.check_len(n_layers)
                .with_context(|| format!("--task-path {t}={p}"))?;
        }
    }
    // Every budget is checked (and the package with it) before any answer is generated.
    let routing = match pkg {
        Some((spec, pkg)) => {
            let (policies, trained) = crate::routing::load_policies(&lm, spec, pkg, &plan.budgets)
                .with_context(|| format!("--routers {}", spec.display()))?;
            Some(Routing {
                spec: spec.clone(),
                policies,
                trained,
            })
        }
        None => None,
    };
    // Each task's template, made once.
    let templates: Vec<Template> = loaded
        .iter()
        .map(|(task, _)| match &plan.template {
            Some((_, t)) => t.clone(),
            None => Template::builtin_for(task.family(), style, reward),
        })
        .collect();
    if let Some(r) = &routing {
        check_prompts_match(r, reward, style, &loaded, &templates)?;
    }
    let opts = EvalOptions {
        mode: reward,
        max_new_tokens: plan.max_new_tokens,
    };
    let prepared = prepare_tasks(&lm, &loaded, &templates, &opts);
    let policies: &[drllm_router::Policy] = routing.as_ref().map_or(&[], |r| &r.policies);
    let modes_per_task =
        1 + statics.len() + plan.per_task_sets + policies.len() * (1 + plan.controls.len());
    let answers: usize = prepared.iter().map(|(_, p)| p.len()).sum::<usize>() * modes_per_task;
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
        let run = |mode: &Mode<'_>, kind: Kind, budget: Option<f64>| {
            run_mode(&lm, &prompts, plan, &opts, mode, kind, budget, &bar)
        };
        let base = run(&baseline, Kind::Baseline, None)?;
        let mut others = vec![];
        for p in &statics {
            others.push(run(&Mode::Static(p.clone()), Kind::Static, None)?);
        }
        let mine = plan
            .task_paths
            .iter()
            .find(|(t, _)| *t == task)
            .map(|(_, v)| v);
        for (k, p) in mine.into_iter().flatten().enumerate() {
            others.push(run(&Mode::Static(p.clone()), Kind::PerTask(k), None)?);
        }
        for (b, policy) in policies.iter().enumerate() {
            let routed = run(&Mode::Routed(policy), Kind::Routed, Some(policy.budget()))?;
            let seed = control_seed(plan.control_seed, &task, b);
            let mut controls = vec![];
            for c in &plan.controls {
                let (paths, kind) = match c {
                    Control::Permuted => {
                        let perm = derangement(routed.paths.len(), seed);
                        (
                            perm.iter().map(|&j| routed.paths[j].clone()).collect(),
                            Kind::Permuted,
                        )
                    }
                    Control::Random => {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
                        (
                            routed
                                .paths
                                .iter()
                                .map(|p| random_like(p, &mut rng))
                                .collect::<Result<Vec<_>>>()?,
                            Kind::Random,
                        )
                    }
                };
                controls.push(run(&Mode::Each(paths), kind, Some(policy.budget()))?);
            }
            others.push(routed);
            others.extend(controls);
        }
        pair_up(&base, &mut others, plan.bootstrap);
        runs.push(TaskRuns {
            task,
            prompts,
            base,
            others,
        });
    }
    bar.finish_and_clear();
    let pooled = (runs.len() > 1).then(|| pool(&runs, plan.bootstrap));

    let routers_label = plan
        .routers
        .as_ref()
        .map_or("none".to_string(), |r| r.display().to_string());
    let header = format!(
        "{} split, reward {reward}, style {style}, batch {}, routers {routers_label}",
        split, plan.batch,
    );
    let task_json = |task: &str, n: usize, base: &Run, others: &[Run]| {
        let of = |f: &dyn Fn(&Run) -> bool| {
            others
                .iter()
                .filter(|r| f(r))
                .map(|r| r.summary(n_layers))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "task": task, "prompts": n,
            "baseline": base.summary(n_layers),
            "static": of(&|r| matches!(r.kind, Kind::Static | Kind::PerTask(_))),
            "routed": of(&|r| r.kind == Kind::Routed),
            "controls": of(&|r| r.kind.is_control()),
        })
    };
    let summary = serde_json::json!({
        "split": split.to_string(), "reward": reward.name(), "style": style.name(), "template": plan.template.as_ref().map(|(p, _)| p.display().to_string()), "batch": plan.batch,
        "max_new_tokens": plan.max_new_tokens, "budgets": plan.budgets, "num_layers": n_layers,
        "model": ids.model, "model_fingerprint": ids.model_fingerprint,
        "routers": plan.routers.as_ref().map(|r| r.display().to_string()), "routers_fingerprint": ids.routers_fingerprint,
        "bootstrap": plan.bootstrap, "controls": plan.control_names(), "control_seed": plan.control_seed,
        "tasks": runs.iter().map(|t| task_json(&t.task, t.prompts.len(), &t.base, &t.others)).collect::<Vec<_>>(),
        "pooled": pooled.as_ref().map(|(n, base, others)| task_json("pooled", *n, base, others)),
    });
    let title = format!(
        "{} routers on {} ({} split, reward {reward})",
        lm.source.name(),
        names.join(", "),
        split,
    );
    Ok(EvalReport {
        header,
        title,
        runs,
        pooled,
        n_layers,
        ids,
        summary,
    })
}

/// The eval plot: per task the routing pattern and cost histogram at the first budget, and
/// accuracy vs cost over every budget and fixed path.
fn plot_data(
    title: String,
    runs: &[TaskRuns],
    n_layers: usize,
    budget: f64,
) -> crate::plot::PlotData {
    fn routed(t: &TaskRuns) -> Vec<&Run> {
        t.others.iter().filter(|r| r.kind == Kind::Routed).collect()
    }
    crate::plot::PlotData {
        title,
        num_layers: n_layers,
        budget,
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
                    .filter(|r| matches!(r.kind, Kind::Static | Kind::PerTask(_)))
                    .map(|r| (r.cost(), r.ci.0))
                    .collect(),
            })
            .collect(),
    }
}

/// Checks `--task-path` against the evaluated tasks: every task named is evaluated, each has the
/// same number of paths, and (when any is given) every evaluated task has them. Returns that
/// number (0 without the flag).
fn check_task_paths(task_paths: &[(String, Vec<LayerPath>)], names: &[String]) -> Result<usize> {
    let per_task_sets = task_paths.first().map_or(0, |(_, v)| v.len());
    for (t, v) in task_paths {
        if !names.contains(t) {
            bail!(
                "--task-path {t}=...: {t} is not among the evaluated tasks ({})",
                names.join(", ")
            );
        }
        if v.len() != per_task_sets {
            bail!("--task-path: every task needs the same number of paths ({} has {}, {} has {per_task_sets})", t, v.len(), task_paths[0].0);
        }
    }
    if per_task_sets > 0 {
        if let Some(t) = names
            .iter()
            .find(|n| !task_paths.iter().any(|(t, _)| t == *n))
        {
            bail!("--task-path: no path for {t} (every evaluated task needs one)");
        }
    }
    Ok(per_task_sets)
}

/// Refuses routers trained on prompts of another form: another reward's prompt form or style,
/// or a template that renders any of these samples otherwise than the one used here (routers
/// read the hidden states of the prompts they were trained on).
fn check_prompts_match(
    r: &Routing,
    reward: RewardMode,
    style: Style,
    loaded: &[(drllm_tasks::TaskName, drllm_tasks::data::Loaded)],
    templates: &[Template],
) -> Result<()> {
    // A package without a record of its prompts (an older one) is taken on trust.
    let Some(p) = &r.trained.prompts else {
        return Ok(());
    };
    let spec = r.spec.display().to_string();
    // Prompts of another form (cloze and cloze-norm share theirs, as strict and lenient do).
    let (theirs, their_style): (RewardMode, Style) = (p.reward.parse()?, p.style.parse()?);
    if theirs.prompt_form() != reward.prompt_form() || their_style != style {
        bail!(
            "--routers {spec}: trained on prompts of reward {theirs} and style {their_style}, \
             asked to route prompts of reward {reward} and style {style}: the routers would \
             read other tokens (pass --reward {theirs} --style {their_style})"
        );
    }
    // ... and rendered as they were: each prompt here must render the same with the template
    // the package records for its family (sources may differ where the prompts do not, e.g. a
    // built-in that learned another task).
    for ((task, l), ours) in loaded.iter().zip(templates) {
        let family = task.family();
        let Some(t) = p.templates.iter().find(|t| t.family == family.name()) else {
            continue;
        };
        if t.source == ours.source() {
            continue;
        }
        let theirs = Template::from_source(t.name.clone(), t.source.clone(), style)
            .with_context(|| format!("--routers {spec}: its {} template", t.name))?;
        for s in &l.samples {
            let (x, y) = (theirs.render(s), ours.render(s));
            if x.is_err() || y.is_err() || x.ok() != y.ok() {
                bail!(
                    "--routers {spec}: trained on {} prompts rendered with the template {}, which \
                     renders {task} sample {} otherwise than {} used here: the routers would \
                     read other tokens (pass --template with the search's template file)",
                    family.name(),
                    t.name,
                    s.id,
                    ours.name()
                );
            }
        }
    }
    Ok(())
}

/// Every task's samples as prepared prompts (a sample that cannot be prepared is skipped with a
/// warning).
fn prepare_tasks(
    lm: &LoadedModel,
    loaded: &[(drllm_tasks::TaskName, drllm_tasks::data::Loaded)],
    templates: &[Template],
    opts: &EvalOptions,
) -> Vec<(String, Vec<PreparedPrompt>)> {
    let mut prepared = vec![];
    for ((task, l), template) in loaded.iter().zip(templates) {
        let name = task.to_string();
        let mut prompts = vec![];
        for s in &l.samples {
            match prepare(lm, s, template, opts) {
                Ok(p) => prompts.push(p),
                Err(e) => {
                    tracing::warn!(task = %name, sample = %s.id, error = %e, "sample skipped")
                }
            }
        }
        prepared.push((name, prompts));
    }
    prepared
}

/// The accuracy table (stdout): per task and pooled, every mode with its interval, its paired
/// differences, cost and speed.
fn print_table(runs: &[TaskRuns], pooled: Option<&(usize, Run, Vec<Run>)>, n_layers: usize) {
    let decodes = runs
        .iter()
        .any(|t| t.prompts.iter().any(PreparedPrompt::decodes));
    println!(
        "{:<14} {:>7} {:<16} {:<22} {:<26} {:<26} {:>7} {:>7} {:>9} {:>7}",
        "task",
        "prompts",
        "mode",
        "accuracy [95% CI]",
        "- baseline [paired 95%]",
        "routed - this [paired]",
        "cost",
        "saved",
        if decodes { "tokens/s" } else { "prompts/s" },
        "wall"
    );
    let table = runs
        .iter()
        .map(|t| (t.task.as_str(), t.prompts.len(), &t.base, &t.others))
        .chain(
            pooled
                .into_iter()
                .map(|(n, base, others)| ("pooled", *n, base, others)),
        );
    for (task, n, base, others) in table {
        for r in std::iter::once(base).chain(others) {
            let (acc, lo, hi) = r.ci;
            let fmt = |d: Option<(f64, f64, f64)>| match d {
                Some((d, lo, hi)) => format!("{:+.3} [{:+.3}, {:+.3}]", d, lo, hi),
                None => String::new(),
            };
            println!(
                "{:<14} {:>7} {:<16} {:.3} [{:.3}, {:.3}]   {:<26} {:<26} {:>7.2} {:>6.1}% {:>9.1} {:>6.1}s",
                task,
                n,
                r.label(),
                acc,
                lo,
                hi,
                fmt(r.diff),
                fmt(r.routed_minus),
                r.cost(),
                100.0 * (1.0 - r.cost() / n_layers as f64),
                if decodes { r.tokens_per_s() } else { r.prompts_per_s() },
                r.secs
            );
        }
    }
    println!("cost = block applications per token (the baseline runs each of the {n_layers} blocks once); routed - this = the routers (at the control's budget, else the first) minus the mode on the same prompts");
}

/// Pairs every mode with the baseline, and every mode that is not routed with the routers (at
/// the same budget for the controls, at the first budget for fixed paths).
fn pair_up(base: &Run, others: &mut [Run], resamples: usize) {
    let routed: Vec<(f64, Vec<bool>)> = others
        .iter()
        .filter(|r| r.kind == Kind::Routed)
        .filter_map(|r| Some((r.budget?, r.correct.clone())))
        .collect();
    for r in others.iter_mut() {
        r.diff = Some(paired_diff(&r.correct, &base.correct, resamples));
        if r.kind == Kind::Routed {
            continue;
        }
        let against = match r.budget {
            Some(b) => routed.iter().find(|(x, _)| *x == b),
            None => routed.first(),
        };
        if let Some((_, c)) = against {
            r.routed_minus = Some(paired_diff(c, &r.correct, resamples));
        }
    }
}

/// Every task's modes pooled (the modes line up: each task runs the same list), with their
/// intervals recomputed over all prompts: (prompts, baseline, other modes).
fn pool(runs: &[TaskRuns], resamples: usize) -> (usize, Run, Vec<Run>) {
    let join = |pick: &dyn Fn(&TaskRuns) -> &Run| {
        let first = pick(&runs[0]);
        let fixed = match first.kind {
            // A per-task mode has no one path.
            Kind::PerTask(_) => None,
            _ => first.fixed.clone(),
        };
        let mut r = Run::empty(first.kind, first.budget, fixed);
        for t in runs {
            let x = pick(t);
            r.paths.extend(x.paths.iter().cloned());
            r.correct.extend(&x.correct);
            r.new_tokens += x.new_tokens;
            r.secs += x.secs;
        }
        r.ci = accuracy_ci(&r.correct, resamples);
        r
    };
    let n = runs.iter().map(|t| t.prompts.len()).sum();
    let base = join(&|t| &t.base);
    let mut others: Vec<Run> = (0..runs[0].others.len())
        .map(|i| join(&|t| &t.others[i]))
        .collect();
    pair_up(&base, &mut others, resamples);
    (n, base, others)
}

/// What made an evaluation's answers: written into every row of `--out` (so files of an array
/// job can be concatenated and still told apart) and into the `--json` summary.
struct Identity {
    model: String,
    model_fingerprint: String,
    /// None without routers.
    routers_fingerprint: Option<String>,
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
            let m = r.kind.name();
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
        (
            "routers_fingerprint",
            Arc::new(StringArray::from(vec![
                ids.routers_fingerprint.as_deref();
                rows
            ])) as ArrayRef,
        ),
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
    fn controls_keep_the_mix_and_the_cost() {
        // Every prompt gets another's route, and every route is used once.
        for n in [2, 3, 10, 57] {
            let p = derangement(n, 7);
            assert!(p.iter().enumerate().all(|(i, &j)| i != j), "{p:?}");
            let mut q = p.clone();
            q.sort_unstable();
            assert_eq!(q, (0..n).collect::<Vec<_>>());
            assert_eq!(p, derangement(n, 7), "seeded");
        }
        assert_eq!(derangement(1, 0), [0]);
        // Random paths keep the numbers of skips and repeats, not the blocks.
        let like: LayerPath = "1,0,1,2,0,1,1,1,1,1".parse().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut moved = false;
        for _ in 0..20 {
            let r = random_like(&like, &mut rng).unwrap();
            let c = r.counts();
            assert_eq!(r.cost(), like.cost());
            assert_eq!(c.iter().filter(|&&x| x == 0).count(), 2);
            assert_eq!(c.iter().filter(|&&x| x == 2).count(), 1);
            moved |= r != like;
        }
        assert!(moved);
        assert_ne!(control_seed(0, "piqa", 0), control_seed(0, "piqa", 1));
        assert_ne!(control_seed(0, "piqa", 0), control_seed(0, "boolq", 0));
        let t = parse_task_paths(&["a=1,0".into(), "b=1,1".into(), "a=0,1".into()]).unwrap();
        assert_eq!(t[0].1.len(), 2);
        assert!(parse_task_paths(&["a".into()]).is_err());
    }

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
