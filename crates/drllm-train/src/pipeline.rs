//! A training run as `drllm-train` performs it, from flags to the written package; the binary
//! only parses flags and dispatches.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use drllm_cli::ModelArgs;
use drllm_router::{Package, PackageManifest, CLASSES};
use drllm_runtime::LoadedModel;

use crate::features::default_cache_dir;
use crate::trainer::{evaluate, PAPER_LABELS};
use crate::{
    best_epoch, extract_features, load_examples, relabel_by_margin, split_of, train, FeatureCache,
    LabelMix, MarginCache, MarginRule, RoutedValidation, RowKind, Select, TrainConfig,
};

/// The flags of a training run (`drllm-train --data ... --out ...`).
#[derive(Args)]
pub struct TrainArgs {
    /// Paths dataset (a drllm-coordinator OUT directory); repeat for several.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// The model the datasets were searched with (the feature pass and routed validation run
    /// on --device; the routers themselves train on the CPU).
    #[command(flatten)]
    m: ModelArgs,
    /// Output package directory.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Pooling windows per prompt (every token belongs to one).
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Prompts per forward pass of the feature pass.
    #[arg(long, default_value_t = 8)]
    feature_batch: usize,
    /// Feature cache directory.
    #[arg(long, env = "DRLLM_FEATURE_CACHE")]
    feature_cache: Option<PathBuf>,
    /// Do not read or write the feature cache.
    #[arg(long)]
    no_feature_cache: bool,
    /// Fraction of samples held out for validation (by a seeded hash of the sample id).
    #[arg(long, default_value_t = 0.2, value_parser = drllm_cli::fraction_below_one())]
    val_fraction: f64,
    /// Epochs.
    #[arg(long, default_value_t = 25)]
    epochs: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3, value_parser = drllm_cli::positive_up_to(10.0))]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01, value_parser = drllm_cli::number_in(0.0, 10.0))]
    weight_decay: f64,
    /// Fraction of steps of linear warm-up before the cosine decay.
    #[arg(long, default_value_t = 0.05, value_parser = drllm_cli::number_in(0.0, 1.0))]
    warmup: f64,
    /// Focal loss gamma (0 = cross-entropy).
    #[arg(long, default_value_t = 2.0, value_parser = drllm_cli::number_in(0.0, 20.0))]
    focal_gamma: f64,
    /// Effective-number beta of the class weights.
    #[arg(long, default_value_t = 0.999, value_parser = drllm_cli::fraction_below_one())]
    class_beta: f64,
    /// Class weights come from the label proportions scaled to this many labels (the paper's
    /// 126,812), so they stay as flat as the paper's ([0.92, 0.91, 1.18]) at any dataset size;
    /// 0 uses the raw counts, which on a small dataset is inverse frequency (every router
    /// learns to skip).
    #[arg(long, default_value_t = PAPER_LABELS, value_parser = drllm_cli::number_in(0.0, 1e15))]
    class_weight_total: f64,
    /// Most improved examples (default path wrong, another right) as a share of all examples
    /// (the paper targets 0.3; with a weak model many are luck); 1 keeps them all. Which ones are
    /// kept is decided by a seeded hash of the sample id.
    #[arg(long, default_value_t = 0.3, value_parser = drllm_cli::number_in(0.0, 1.0))]
    max_improved_share: f64,
    /// Margin-aware labels (cloze rewards): a default-correct prompt is labelled with a cheaper
    /// correct path only when that path keeps at least this share of the default path's margin
    /// (the gold choice's log-likelihood minus the best other's), else with the cheapest of its
    /// other correct paths that does, else all-execute (a fragile prompt). 0 takes any correct
    /// path, as the search's 0/1 verdict does. Margins are measured once and cached next to the
    /// features.
    #[arg(long, default_value_t = 0.0, value_parser = drllm_cli::number_in(0.0, 1e3))]
    label_margin: f64,
    /// What the routers learn at each block: `cheapest` (the paper's labels: the cheapest
    /// correct path the search found) or `search` (soft targets from every correct path the
    /// search verified for the prompt, the default included when it was correct, each weighted
    /// by exp(blocks saved / --target-temperature)).
    #[arg(long, value_enum, default_value_t = Targets::Cheapest, hide_possible_values = true)]
    targets: Targets,
    /// Temperature of `--targets search`, in blocks saved: near 0 is the cheapest verified
    /// paths alone (an even mix where several tie), large values the plain share of verified
    /// paths.
    #[arg(long, default_value_t = 1.0, value_parser = drllm_cli::positive_up_to(1e6))]
    target_temperature: f64,
    /// Which epoch is shipped: routed-accuracy (the routers route the held-out prompts; best
    /// accuracy, then lowest cost) or macro-f1 (teacher-forced validation macro-F1).
    #[arg(long, default_value = "routed-accuracy")]
    select: String,
    /// Measure routed accuracy every N epochs (and at the last); 0 = never (then --select
    /// macro-f1 is used).
    #[arg(long, default_value_t = 1)]
    routed_every: usize,
    /// Task data for routed validation (the held-out prompts' questions and answers): default
    /// $DRLLM_DATA, else ../shared/data.
    #[arg(long, env = "DRLLM_DATA")]
    task_data: Option<PathBuf>,
    /// Prompts per forward pass of routed validation.
    #[arg(long, default_value_t = 16)]
    routed_batch: usize,
    /// Train on at most this many of the training examples (a seeded choice by sample id; the
    /// validation split is untouched): learning curves.
    #[arg(long)]
    max_examples: Option<usize>,
    /// Budgets at which the kept routers route the held-out prompts once more after training
    /// (comma separated): the package records each one's accuracy and cost and recommends the
    /// cheapest budget that keeps the baseline's held-out accuracy. Skipped with
    /// --routed-every 0.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-0.2,0,0.2,0.4,0.6,0.8"
    )]
    val_budgets: Vec<f64>,
    /// Dtype of the weights in the package: f32, or bf16 (half the size, e.g. to ship it).
    #[arg(long, default_value = "f32")]
    weights_dtype: String,
    /// Width of each router's hidden layer.
    #[arg(long, default_value_t = 128)]
    router_hidden: usize,
    /// Seed of the split, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The package's metrics per epoch, the kept one starred.
pub fn print_epochs(m: &PackageManifest) {
    if crate::distill_run::print_distill_epochs(m) {
        return;
    }
    println!(
        "\nepoch  train loss  val macro-F1  F1 skip/exec/rep   recall skip/exec/rep  cost (gold)   routed acc  cost"
    );
    for e in &m.epochs {
        let routed = match (e.val_routed_accuracy, e.val_routed_cost) {
            (Some(a), Some(c)) => format!("{a:>10.4}  {c:.2}"),
            _ => format!("{:>10}", "-"),
        };
        println!(
            "{:>5}{} {:>10.4}  {:>11.4}  {:.3}/{:.3}/{:.3}  {:.3}/{:.3}/{:.3}    {:.2} ({:.2})  {routed}",
            e.epoch,
            if e.epoch == m.best_epoch { "*" } else { " " },
            e.train_loss,
            e.val_macro_f1,
            e.val_f1[0],
            e.val_f1[1],
            e.val_f1[2],
            e.val_recall[0],
            e.val_recall[1],
            e.val_recall[2],
            e.val_avg_cost,
            e.val_gold_cost,
        );
    }
    println!("(* = the epoch in the package; routed acc/cost: held-out prompts routed for real)");
}

/// The package's held-out routing at every budget drllm-train measured, and the recommended one.
pub fn print_sweep(m: &PackageManifest) {
    let d = &m.data;
    if let (Some(base), Some(sweep)) = (
        d["routed_val_baseline_accuracy"].as_f64(),
        d["routed_val_budgets"].as_array(),
    ) {
        println!(
            "\nheld-out prompts by budget (kept epoch; baseline accuracy {base:.4} on {} prompts):",
            d["routed_val_prompts"]
        );
        for s in sweep {
            let (b, acc, cost) = (
                s["budget"].as_f64(),
                s["accuracy"].as_f64(),
                s["cost"].as_f64(),
            );
            if let (Some(b), Some(acc), Some(cost)) = (b, acc, cost) {
                println!(
                    "  budget {b:+.2}: accuracy {acc:.4} ({:+.4}), cost {cost:.2}",
                    acc - base
                );
            }
        }
        match d["recommended_budget"].as_f64() {
            Some(b) => println!("recommended budget {b:+.2}"),
            None => println!("no budget measured keeps the baseline's accuracy"),
        }
    }
}

/// The checks both training commands make of their output flags before loading anything: the
/// budgets in [-1, 1], the package dtype, and an `--out` that is new or a package (never another
/// directory that would be overwritten). Returns the weights' dtype.
pub(crate) fn check_output_flags(
    val_budgets: &[f64],
    weights_dtype: &str,
    out: &std::path::Path,
) -> Result<tch::Kind> {
    if let Some(b) = val_budgets.iter().find(|b| !(-1.0..=1.0).contains(*b)) {
        bail!("--val-budgets: {b} is outside [-1, 1]");
    }
    let kind = match weights_dtype {
        "f32" => tch::Kind::Float,
        "bf16" => tch::Kind::BFloat16,
        other => bail!("--weights-dtype {other:?}: expected f32 or bf16"),
    };
    if out.exists() && !out.join("manifest.json").is_file() {
        bail!(
            "{} exists and is not a router package; choose another --out",
            out.display()
        );
    }
    Ok(kind)
}

/// What the routers are trained to predict at each block (`--targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Targets {
    /// The paper's labels: the cheapest correct path found, one-hot per block.
    Cheapest,
    /// Soft targets from every correct path the search verified (see
    /// [`crate::Example::search_targets`]).
    Search,
}

/// A training run with every flag checked and parsed: what [`execute`] runs. Made from
/// [`TrainArgs`] by [`TrainPlan::from_args`]; a caller without flags fills it directly.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    /// Paths datasets (drllm-coordinator OUT directories).
    pub data: Vec<PathBuf>,
    /// The model the datasets were searched with, and where it runs.
    pub model: ModelArgs,
    /// Output package directory (new, or an existing package).
    pub out: PathBuf,
    /// Dtype of the package's weights.
    pub weights_kind: tch::Kind,
    /// How the shipped epoch is chosen.
    pub select: Select,
    /// Pooling windows per prompt.
    pub windows: usize,
    /// Prompts per forward pass of the feature pass.
    pub feature_batch: usize,
    /// Directory of the feature and margin caches; `None` reads and writes neither.
    pub cache_dir: Option<PathBuf>,
    /// Fraction of samples held out for validation.
    pub val_fraction: f64,
    /// Which improved rows are kept.
    pub mix: LabelMix,
    /// Margin-aware labels' share (0 = the search's verdict).
    pub label_margin: f64,
    /// What the routers learn at each block.
    pub targets: Targets,
    /// Temperature of [`Targets::Search`], in blocks saved.
    pub target_temperature: f64,
    /// Routed accuracy is measured every this many epochs (and at the last).
    pub routed_every: usize,
    /// Task data for routed validation and margins (`None`: $DRLLM_DATA, else ../shared/data).
    pub task_data: Option<PathBuf>,
    /// Prompts per forward pass of routed validation.
    pub routed_batch: usize,
    /// Train on at most this many training examples.
    pub max_examples: Option<usize>,
    /// Budgets of the held-out sweep after training.
    pub val_budgets: Vec<f64>,
    /// Hyper-parameters of the routers' training.
    pub config: TrainConfig,
}

impl TrainPlan {
    /// Checks and parses the flags; nothing is loaded yet.
    pub fn from_args(a: TrainArgs) -> Result<Self> {
        let Some(out) = a.out else {
            bail!("--out is required");
        };
        if a.windows == 0 || a.epochs == 0 || a.batch_size == 0 {
            bail!("--windows, --epochs and --batch-size must be positive");
        }
        if a.max_examples == Some(0) {
            bail!("--max-examples must be positive");
        }
        let weights_kind = check_output_flags(&a.val_budgets, &a.weights_dtype, &out)?;
        if a.targets == Targets::Search && a.label_margin > 0.0 {
            bail!(
                "--targets search weighs every verified path by its saving, --label-margin \
                 relabels by margins: use one of them"
            );
        }
        let mut select = match a.select.as_str() {
            "routed-accuracy" => Select::RoutedAccuracy,
            "macro-f1" => Select::MacroF1,
            other => bail!("--select {other:?}: expected routed-accuracy or macro-f1"),
        };
        if a.routed_every == 0 {
            select = Select::MacroF1;
            tracing::warn!(
                "--routed-every 0: the held-out prompts are never routed, so the epoch is chosen by \
                 macro-F1 and the --val-budgets sweep is skipped (the package recommends no budget)"
            );
        }
        Ok(TrainPlan {
            data: a.data,
            model: a.m,
            out,
            weights_kind,
            select,
            windows: a.windows,
            feature_batch: a.feature_batch,
            cache_dir: (!a.no_feature_cache)
                .then(|| a.feature_cache.unwrap_or_else(default_cache_dir)),
            val_fraction: a.val_fraction,
            mix: LabelMix {
                max_improved_share: a.max_improved_share,
                seed: a.seed,
            },
            label_margin: a.label_margin,
            targets: a.targets,
            target_temperature: a.target_temperature,
            routed_every: a.routed_every,
            task_data: a.task_data,
            routed_batch: a.routed_batch,
            max_examples: a.max_examples,
            val_budgets: a.val_budgets,
            config: TrainConfig {
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                weight_decay: a.weight_decay,
                warmup: a.warmup,
                focal_gamma: a.focal_gamma,
                class_beta: a.class_beta,
                class_weight_total: a.class_weight_total,
                router_hidden: a.router_hidden,
                seed: a.seed,
            },
        })
    }
}

/// What a finished training run reports: the written package's manifest and the figures its
/// summary prints.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The package directory.
    pub out: PathBuf,
    /// Its manifest (epochs, the kept one, the budget sweep).
    pub manifest: PackageManifest,
    /// Teacher-forced validation macro-F1 of the kept routers.
    pub val_macro_f1: f64,
    /// The same for predicting the majority training label everywhere.
    pub majority_macro_f1: f64,
    /// That label's class index.
    pub majority_class: usize,
    /// The epoch that macro-F1 would have chosen (1-based).
    pub epoch_by_f1: usize,
    /// Routed validation: (held-out prompts, baseline accuracy along the default path).
    pub routed_val: Option<(usize, f64)>,
    /// Seconds of training (feature pass excluded).
    pub train_secs: f64,
}

/// A training run from flags: [`TrainPlan::from_args`], [`execute`], then the summary on stdout.
pub fn run(a: TrainArgs) -> Result<()> {
    let report = execute(&TrainPlan::from_args(a)?)?;
    print_report(&report);
    Ok(())
}

/// Prints a finished run's summary (stdout): epochs, validation against the majority class,
/// routed validation and the budget sweep.
pub fn print_report(r: &TrainReport) {
    let m = &r.manifest;
    print_epochs(m);
    let kept = &m.epochs[m.best_epoch - 1];
    println!(
        "\nvalidation macro-F1 {:.4} (epoch {}) vs {:.4} for always-{}",
        r.val_macro_f1, m.best_epoch, r.majority_macro_f1, CLASSES[r.majority_class],
    );
    if let (Some((prompts, baseline)), Some(acc), Some(cost)) =
        (r.routed_val, kept.val_routed_accuracy, kept.val_routed_cost)
    {
        let f1_epoch = &m.epochs[r.epoch_by_f1 - 1];
        println!(
            "routed validation ({prompts} prompts): accuracy {acc:.4} at cost {cost:.2}/{} (baseline {baseline:.4}); the macro-F1 choice (epoch {}) routes to {}",
            m.shape.num_layers,
            r.epoch_by_f1,
            match (f1_epoch.val_routed_accuracy, f1_epoch.val_routed_cost) {
                (Some(a), Some(c)) => format!("accuracy {a:.4} at cost {c:.2}"),
                _ => "(not measured)".into(),
            }
        );
    }
    print_sweep(m);
    println!(
        "trained in {:.1}s | package {}",
        r.train_secs,
        r.out.display()
    );
}

/// A training run: examples from the paths datasets (label mix, optional margin labels), the
/// feature pass (cached), training with routed validation, the budget sweep, and the package
/// written to the plan's `out`; progress on stderr.
pub fn execute(plan: &TrainPlan) -> Result<TrainReport> {
    plan.model.device_and_kind()?;
    let source = plan.model.source()?;
    let fingerprints = source.fingerprints()?;
    let name = source.name();
    let model_cfg = source.config()?;
    let n_layers = model_cfg.num_layers;
    let mut set = load_examples(
        &plan.data,
        &[&fingerprints.current, &fingerprints.legacy],
        &name,
        n_layers,
        model_cfg.arch.family().needs_bos,
        &plan.mix,
    )?;

    // The model is needed for margin labels, routed validation, or the feature pass on a cache
    // miss.
    let load_model = || -> Result<LoadedModel> { plan.model.load_source(source.clone()) };
    let mut lm = None;
    if plan.select == Select::RoutedAccuracy || plan.label_margin > 0.0 {
        lm = Some(load_model()?);
    }
    let relabelled = match &lm {
        Some(lm) if plan.label_margin > 0.0 => Some(margin_labels(plan, lm, &mut set)?),
        _ => None,
    };
    describe(plan, &set);
    let (train_idx, val_idx) = split(plan, &set)?;
    let n = set.examples.len();
    eprintln!(
        "{n} examples ({} duplicate prompts dropped): {} train, {} validation | model {name}, {n_layers} blocks",
        set.duplicates,
        train_idx.len(),
        val_idx.len()
    );
    if val_idx.is_empty() {
        tracing::warn!("no validation examples: metrics are computed on the training set");
    }

    // Feature pass (skipped when the cache has it).
    let t0 = std::time::Instant::now();
    let key = FeatureCache::key(&fingerprints.current, plan.windows, &set.examples);
    let cache = plan.cache_dir.clone().map(|dir| FeatureCache { dir });
    let hidden = model_cfg.hidden_size as usize;
    let cached = cache
        .as_ref()
        .and_then(|c| c.get(&key, n, n_layers, plan.windows, hidden));
    let mut features = match cached {
        Some(f) => {
            eprintln!(
                "features: {n} examples from the cache ({})",
                cache
                    .as_ref()
                    .map(|c| c.file(&key).display().to_string())
                    .unwrap_or_default()
            );
            f
        }
        None => {
            if lm.is_none() {
                lm = Some(load_model()?);
            }
            let lm = lm.as_ref().context("model loaded")?;
            let fbar = drllm_cli::progress_bar(n as u64, "features");
            let f = extract_features(lm, &set.examples, plan.windows, plan.feature_batch, |d| {
                fbar.set_position(d as u64)
            })?;
            fbar.finish_and_clear();
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "features: {n} examples in {secs:.1}s ({:.2} examples/s)",
                n as f64 / secs.max(1e-9)
            );
            if let Some(c) = &cache {
                c.put(&key, &f)?;
            }
            f
        }
    };
    let feat_secs = t0.elapsed().as_secs_f64();
    if plan.targets == Targets::Search {
        features.targets = Some(search_targets(plan, &set));
    }
    let tr = features.select(&train_idx);
    let va = features.select(&val_idx);

    let routed_val = match (&lm, plan.select) {
        (Some(lm), Select::RoutedAccuracy) => Some(routed_validation(plan, lm, &set)?),
        _ => None,
    };
    let t1 = std::time::Instant::now();
    let trained = fit(plan, &tr, &va, routed_val.as_ref().zip(lm.as_ref()))?;
    let train_secs = t1.elapsed().as_secs_f64();

    // The majority-class baseline on the same validation examples: every block predicts the
    // most frequent training label.
    let scored = if va.is_empty() { &tr } else { &va };
    let majority = (0..3).max_by_key(|&c| trained.label_counts[c]).unwrap_or(1);
    let gold: Vec<i64> = Vec::try_from(scored.labels.flatten(0, -1)).unwrap_or_default();
    let base = crate::Confusion::from_pairs(&gold, &vec![majority as i64; gold.len()]);
    let (best_conf, _, _) = evaluate(&trained.routers, scored);
    let epoch_by_f1 = best_epoch(&trained.epochs, Select::MacroF1);

    // The kept routers at several budgets on the held-out prompts: the operating point is chosen
    // here, on training data, never on the evaluation split.
    let (sweep, recommended) = match (&routed_val, &lm) {
        (Some(v), Some(lm)) => {
            // Budget 0 was measured during training.
            let kept = &trained.epochs[trained.best_epoch - 1];
            let at_zero = kept.val_routed_accuracy.zip(kept.val_routed_cost);
            v.sweep(lm, &trained.routers, &plan.val_budgets, at_zero)?
        }
        _ => (vec![], None),
    };

    let mut manifest = PackageManifest::new(
        fingerprints.current.clone(),
        name,
        trained.routers.shape,
        plan.windows,
    );
    manifest.label_counts = trained.label_counts;
    let first = &set.sources[0];
    manifest.prompts = Some(drllm_router::PromptSpec {
        reward: first.config.reward.to_string(),
        style: first.config.style.to_string(),
        templates: templates_of(first),
    });
    if let Some(s) = set
        .sources
        .iter()
        .find(|s| s.config.reward != first.config.reward || s.config.style != first.config.style)
    {
        tracing::warn!(
            "{} was searched with reward {} and style {}, {} with {} and {}: the package records the first",
            s.path.display(), s.config.reward, s.config.style, first.path.display(), first.config.reward, first.config.style
        );
    }
    manifest.training = serde_json::json!({
        "config": plan.config,
        "class_weights": trained.class_weights,
        "val_fraction": plan.val_fraction,
        "select": plan.select,
        "targets": plan.targets,
        "target_temperature": (plan.targets == Targets::Search).then_some(plan.target_temperature),
        "feature_secs": feat_secs,
        "train_secs": train_secs,
    });
    manifest.data = serde_json::json!({
        "sources": set.sources.iter().map(|s| serde_json::json!({
            "path": s.path.display().to_string(), "rows": s.rows, "examples": s.examples,
            "reward": s.config.reward.name(), "style": s.config.style.name()})).collect::<Vec<_>>(),
        "rows_by_outcome": set.kinds.iter().map(|(k, n)| (kind_name(*k).to_string(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
        "max_improved_share": plan.mix.max_improved_share,
        "improved_left_out": set.improved_dropped,
        "label_margin": plan.label_margin,
        "margin_labels": relabelled,
        "examples": n,
        "duplicates": set.duplicates,
        "train": tr.len(),
        "max_examples": plan.max_examples,
        "val": va.len(),
        "routed_val_prompts": routed_val.as_ref().map(|v| v.len()),
        "routed_val_baseline_accuracy": routed_val.as_ref().map(|v| v.baseline_accuracy),
        "routed_val_budgets": sweep.iter().map(|(b, acc, cost)| serde_json::json!({
            "budget": b, "accuracy": acc, "cost": cost})).collect::<Vec<_>>(),
        "recommended_budget": recommended,
        "majority_class": CLASSES[majority],
        "majority_baseline_macro_f1": base.macro_f1(),
    });
    manifest.epochs = trained.epochs.clone();
    manifest.best_epoch = trained.best_epoch;
    let pkg = Package {
        manifest,
        routers: trained.routers,
    };
    pkg.save_as(&plan.out, plan.weights_kind)
        .with_context(|| format!("writing the router package {}", plan.out.display()))?;
    Ok(TrainReport {
        out: plan.out.clone(),
        manifest: pkg.manifest,
        val_macro_f1: best_conf.macro_f1(),
        majority_macro_f1: base.macro_f1(),
        majority_class: majority,
        epoch_by_f1,
        routed_val: routed_val.map(|v| (v.len(), v.baseline_accuracy)),
        train_secs,
    })
}

/// Margin-aware labels: measures (or reads from the cache) each candidate path's margin and
/// relabels the default-correct rows by the plan's rule.
fn margin_labels(
    plan: &TrainPlan,
    lm: &LoadedModel,
    set: &mut crate::ExampleSet,
) -> Result<crate::Relabelled> {
    let dir = drllm_tasks::data::resolve_data_dir(plan.task_data.as_deref())?;
    let mut cache = MarginCache::open(plan.cache_dir.as_ref().map(|d| d.join("margins.jsonl")))?;
    let bar = drllm_cli::progress_bar(0, "margins");
    let t = std::time::Instant::now();
    let batch = plan.routed_batch;
    let r = relabel_by_margin(
        lm,
        set,
        &dir,
        &MarginRule {
            share: plan.label_margin,
        },
        batch,
        &mut cache,
        |done, planned| {
            bar.set_length(planned as u64);
            bar.set_position(done as u64);
            // The bar is hidden in logs (nohup, SLURM): a line every 512 margins.
            if bar.is_hidden() && done % 512 < batch.max(1) * 8 {
                tracing::info!(done, planned, "margins measured");
            }
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "--label-margin {}: of {} default-correct rows with a cheaper correct path, {} keep \
         the cheapest, {} a dearer one, {} are fragile (all-execute); median default \
         margin {:.2}; {} margins measured in {:.1}s",
        plan.label_margin,
        r.rows,
        r.cheapest,
        r.dearer,
        r.fragile,
        r.median_baseline_margin,
        r.computed,
        t.elapsed().as_secs_f64()
    );
    Ok(r)
}

/// The examples' sources, outcomes and labels, on stderr.
fn describe(plan: &TrainPlan, set: &crate::ExampleSet) {
    for s in &set.sources {
        eprintln!(
            "{}: {} rows, {} examples (reward {}, style {})",
            s.path.display(),
            s.rows,
            s.examples,
            s.config.reward,
            s.config.style
        );
    }
    let kinds: Vec<String> = set
        .kinds
        .iter()
        .map(|(k, n)| format!("{} {n}", kind_name(*k)))
        .collect();
    let labels = set.label_counts();
    eprintln!(
        "rows by outcome: {}; improved left out by --max-improved-share {}: {}",
        kinds.join(", "),
        plan.mix.max_improved_share,
        set.improved_dropped
    );
    let total_labels = labels.iter().sum::<u64>().max(1) as f64;
    eprintln!(
        "labels: skip {} ({:.1}%), execute {} ({:.1}%), repeat {} ({:.1}%)",
        labels[0],
        100.0 * labels[0] as f64 / total_labels,
        labels[1],
        100.0 * labels[1] as f64 / total_labels,
        labels[2],
        100.0 * labels[2] as f64 / total_labels
    );
}

/// The soft targets of every example, `[N, L, 3]`, and their mass per class on stderr.
fn search_targets(plan: &TrainPlan, set: &crate::ExampleSet) -> tch::Tensor {
    let rows: Vec<f32> = set
        .examples
        .iter()
        .flat_map(|e| e.search_targets(plan.target_temperature))
        .flatten()
        .collect();
    let mut mass = [0f64; 3];
    for (i, x) in rows.iter().enumerate() {
        mass[i % 3] += *x as f64;
    }
    let total = mass.iter().sum::<f64>().max(1e-9);
    eprintln!(
        "--targets search (temperature {}): target mass skip {:.1}%, execute {:.1}%, repeat {:.1}%",
        plan.target_temperature,
        100.0 * mass[0] / total,
        100.0 * mass[1] / total,
        100.0 * mass[2] / total
    );
    tch::Tensor::from_slice(&rows).view([set.examples.len() as i64, set.num_layers as i64, 3])
}

/// Training and validation example indices: the seeded hash split, then `max_examples` of the
/// training side (a seeded choice by sample id).
fn split(plan: &TrainPlan, set: &crate::ExampleSet) -> Result<(Vec<usize>, Vec<usize>)> {
    let seed = plan.config.seed;
    let n = set.examples.len();
    let (val_idx, mut train_idx): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|&i| split_of(&set.examples[i].sample_id, seed, plan.val_fraction));
    if let Some(m) = plan.max_examples.filter(|&m| m < train_idx.len()) {
        let dropped = train_idx.len() - m;
        train_idx
            .sort_by_key(|&i| drllm_search::sample_seed(seed ^ 0x5eed, &set.examples[i].sample_id));
        train_idx.truncate(m);
        train_idx.sort_unstable();
        eprintln!("--max-examples {m}: {dropped} training examples left out");
    }
    if train_idx.is_empty() {
        bail!("all {n} examples fell into the validation split; lower --val-fraction");
    }
    Ok((train_idx, val_idx))
}

/// Routed validation: every held-out prompt (labelled or not), answered along the routers'
/// paths.
fn routed_validation(
    plan: &TrainPlan,
    lm: &LoadedModel,
    set: &crate::ExampleSet,
) -> Result<RoutedValidation> {
    let held_out: Vec<&crate::Example> = set
        .examples
        .iter()
        .chain(&set.unlabelled)
        .filter(|e| split_of(&e.sample_id, plan.config.seed, plan.val_fraction))
        .collect();
    if held_out.is_empty() {
        bail!("no held-out prompts for routed validation: raise --val-fraction or use --select macro-f1");
    }
    let dir = drllm_tasks::data::resolve_data_dir(plan.task_data.as_deref())?;
    let t = std::time::Instant::now();
    let v = RoutedValidation::new(lm, set, &held_out, &dir, plan.windows, plan.routed_batch)?;
    eprintln!(
        "routed validation: {} held-out prompts, baseline accuracy {:.4} ({:.1}s)",
        v.len(),
        v.baseline_accuracy,
        t.elapsed().as_secs_f64()
    );
    Ok(v)
}

/// Trains the routers on `tr`, scoring `va` each epoch and routing the held-out prompts every
/// `routed_every` epochs (and at the last) when `routed` is given; a progress bar of steps.
fn fit(
    plan: &TrainPlan,
    tr: &crate::Features,
    va: &crate::Features,
    routed: Option<(&RoutedValidation, &LoadedModel)>,
) -> Result<crate::Trained> {
    let steps = drllm_cli::progress_bar(0, "steps");
    let every = plan.routed_every.max(1);
    let last = plan.config.epochs;
    let trained = train(
        tr,
        va,
        &plan.config,
        plan.select,
        |epoch, routers| match routed {
            Some((v, lm)) if epoch % every == 0 || epoch == last => {
                v.measure(lm, routers, 0.0).map(Some)
            }
            _ => Ok(None),
        },
        |s, total| {
            steps.set_length(total as u64);
            steps.set_position(s as u64);
        },
        |m| {
            steps.suspend(|| {
                tracing::info!(
                    epoch = m.epoch,
                    loss = format!("{:.4}", m.train_loss),
                    val_macro_f1 = format!("{:.4}", m.val_macro_f1),
                    val_cost = format!("{:.2}", m.val_avg_cost),
                    routed_accuracy = m.val_routed_accuracy.map(|x| format!("{x:.4}")),
                    routed_cost = m.val_routed_cost.map(|x| format!("{x:.2}")),
                    "epoch"
                )
            });
        },
    )?;
    steps.finish_and_clear();
    Ok(trained)
}

fn kind_name(k: RowKind) -> &'static str {
    match k {
        RowKind::Shortened => "shortened",
        RowKind::DefaultOnly => "default-only",
        RowKind::Fragile => "fragile",
        RowKind::Improved => "improved",
        RowKind::NoCorrect => "no-correct",
    }
}

/// The template of every answer family as the search of `source` rendered its prompts, for the
/// package (eval refuses routers whose prompts it would render otherwise). A template file the
/// search named but this machine cannot read is left out, with a warning.
fn templates_of(source: &crate::SourceInfo) -> Vec<drllm_router::TemplateSpec> {
    drllm_tasks::Family::ALL
        .into_iter()
        .filter_map(|family| match source.config.template(family) {
            Ok(t) => Some(drllm_router::TemplateSpec {
                family: family.name().into(),
                name: t.name().into(),
                source: t.source().into(),
            }),
            Err(e) => {
                tracing::warn!(family = family.name(), error = %e, "template not recorded in the package");
                None
            }
        })
        .collect()
}
