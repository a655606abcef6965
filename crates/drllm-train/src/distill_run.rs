//! `drllm-train distill`: distillation gates trained on task prompts read straight from the task
//! data (no paths dataset, no answers needed for training), validated by routing held-out
//! prompts for real, and written as an ordinary router package.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use drllm_cli::{DataArgs, ModelArgs};
use drllm_eval::{prepare, EvalOptions, PreparedPrompt};
use drllm_router::{EpochMetrics, Package, PackageManifest, PromptSpec, TemplateSpec};
use drllm_tasks::{Family, RewardMode, Style, Template};

use crate::distill::{distill, DistillConfig, DistillEpoch};
use crate::{split_of, RoutedValidation};

/// The flags of `drllm-train distill`.
#[derive(Args)]
pub struct DistillArgs {
    /// The model (the gated passes run on --device).
    #[command(flatten)]
    m: ModelArgs,
    /// Task prompts to train on (any task: answers are not used for training; held-out prompts
    /// of multiple-choice tasks measure routed accuracy).
    #[command(flatten)]
    data: DataArgs,
    /// Multiple-choice reward the routers will be evaluated with: it decides the prompt's form
    /// (cloze prompts end before the answer text).
    #[arg(long, default_value = "cloze", value_parser = drllm_cli::reward_parser())]
    reward: RewardMode,
    /// Prompt style: instruct (chat template), base, or auto (base for cloze, else instruct).
    #[arg(long, default_value = "auto")]
    style: String,
    /// Output package directory.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of prompts held out for routed validation (by a seeded hash of task and sample id).
    #[arg(long, default_value_t = 0.2, value_parser = drllm_cli::fraction_below_one())]
    val_fraction: f64,
    /// Epochs.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Most prompts per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Most tokens (prompts x longest prompt) per step; a longer prompt goes alone.
    #[arg(long, default_value_t = 1024)]
    batch_tokens: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3, value_parser = drllm_cli::positive_up_to(10.0))]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01, value_parser = drllm_cli::number_in(0.0, 10.0))]
    weight_decay: f64,
    /// Fraction of steps of linear warm-up before the cosine decay.
    #[arg(long, default_value_t = 0.05, value_parser = drllm_cli::number_in(0.0, 1.0))]
    warmup: f64,
    /// Compute penalty: the loss is KL(full || routed), in nats per prompt position, + PENALTY x
    /// the executed share of blocks; for prompts of equal length a block is skipped when the KL
    /// it adds is below PENALTY / blocks.
    #[arg(long, default_value_t = 1.0, value_parser = drllm_cli::number_in(0.0, 1e6))]
    penalty: f64,
    /// Scale of the logistic noise on the gate logits during training (0 = none).
    #[arg(long, default_value_t = 1.0, value_parser = drllm_cli::number_in(0.0, 100.0))]
    noise: f64,
    /// Initial execute-minus-skip logit of every router (gates start open).
    #[arg(long, default_value_t = 3.0, allow_hyphen_values = true, value_parser = drllm_cli::number_in(-30.0, 30.0))]
    init_execute: f64,
    /// Pooling windows per prompt.
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Width of each router's hidden layer.
    #[arg(long, default_value_t = 128)]
    router_hidden: usize,
    /// Measure routed accuracy on the held-out prompts every N epochs (and at the last); 0 = only
    /// after training.
    #[arg(long, default_value_t = 1)]
    routed_every: usize,
    /// Prompts per forward pass of routed validation.
    #[arg(long, default_value_t = 16)]
    routed_batch: usize,
    /// Budgets at which the routers route the held-out prompts after training (comma
    /// separated); the package recommends the cheapest that keeps the baseline's accuracy.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-0.2,0,0.2,0.4,0.6,0.8"
    )]
    val_budgets: Vec<f64>,
    /// Dtype of the weights in the package: f32 or bf16.
    #[arg(long, default_value = "f32")]
    weights_dtype: String,
    /// Seed of the split, initialisation, batch order and gate noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Prints a distilled package's epochs (from its training record).
pub fn print_distill_epochs(m: &PackageManifest) -> bool {
    let Some(epochs) = m
        .training
        .get("distill_epochs")
        .and_then(|e| serde_json::from_value::<Vec<DistillEpoch>>(e.clone()).ok())
    else {
        return false;
    };
    println!("\nepoch  loss     KL (nats/pos)  executed  routed acc  cost");
    for e in &epochs {
        let routed = match (e.routed_accuracy, e.routed_cost) {
            (Some(a), Some(c)) => format!("{a:>10.4}  {c:.2}"),
            _ => format!("{:>10}", "-"),
        };
        println!(
            "{:>5}{} {:.4}   {:.4}         {:.3}    {routed}",
            e.epoch,
            if e.epoch == m.best_epoch { "*" } else { " " },
            e.loss,
            e.kl,
            e.executed,
        );
    }
    println!("(distillation gates; * = the epoch in the package, the last; training KL and executed share with gate noise)");
    true
}

/// A distillation run: prompts from the task data, the held-out split routed for real after
/// each epoch, the budget sweep, and the package written to `--out`.
pub fn run_distill(a: DistillArgs) -> Result<()> {
    if a.windows == 0 || a.epochs == 0 || a.batch_size == 0 || a.batch_tokens == 0 {
        bail!("--windows, --epochs, --batch-size and --batch-tokens must be positive");
    }
    let weights_kind =
        crate::pipeline::check_output_flags(&a.val_budgets, &a.weights_dtype, &a.out)?;
    let style = Style::resolve(&a.style, a.reward).context("--style")?;
    let dir = a.data.dir()?;
    let loaded = a.data.load(&dir)?;
    let source = a.m.source()?;
    let fingerprint = source.fingerprints()?.current;
    let name = source.name();
    let lm = a.m.load_source(source)?;
    let opts = EvalOptions {
        mode: a.reward,
        max_new_tokens: 64,
    };
    let (mut train_ids, mut held_out): (Vec<Vec<u32>>, Vec<PreparedPrompt>) = (vec![], vec![]);
    let mut per_task = vec![];
    for (task, l) in &loaded {
        let template = Template::builtin_for(task.family(), style, a.reward);
        let (mut tr, mut va, mut skipped) = (0, 0, 0);
        for s in &l.samples {
            // A prompt that does not fit the context (with its answer) is left out, as eval
            // leaves it out.
            let p = match prepare(&lm, s, &template, &opts) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(task = %task, sample = %s.id, error = %e, "sample left out");
                    skipped += 1;
                    continue;
                }
            };
            // Routed validation grades by one forward pass: held-out prompts whose answers are
            // decoded (GSM8K, MATH) are trained on instead.
            if !p.decodes() && split_of(&format!("{task}/{}", s.id), a.seed, a.val_fraction) {
                held_out.push(p);
                va += 1;
            } else {
                train_ids.push(p.ids);
                tr += 1;
            }
        }
        eprintln!(
            "{task}/{}: {tr} train prompts, {va} held out, {skipped} left out",
            a.data.split
        );
        per_task.push(serde_json::json!({"task": task.to_string(), "train": tr, "held_out": va, "left_out": skipped}));
    }
    if train_ids.is_empty() {
        bail!("no training prompts: raise --limit or lower --val-fraction");
    }
    let routed_val = if held_out.is_empty() {
        tracing::warn!("no held-out multiple-choice prompts: no routed validation");
        None
    } else {
        let t = std::time::Instant::now();
        let v = RoutedValidation::from_prompts(&lm, held_out, opts, a.windows, a.routed_batch)?;
        eprintln!(
            "routed validation: {} held-out prompts, baseline accuracy {:.4} ({:.1}s)",
            v.len(),
            v.baseline_accuracy,
            t.elapsed().as_secs_f64()
        );
        Some(v)
    };
    let cfg = DistillConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        batch_tokens: a.batch_tokens,
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup: a.warmup,
        penalty: a.penalty,
        noise: a.noise,
        init_execute: a.init_execute,
        windows: a.windows,
        router_hidden: a.router_hidden,
        seed: a.seed,
    };
    let steps = drllm_cli::progress_bar(0, "steps");
    let t1 = std::time::Instant::now();
    let every = a.routed_every;
    let out = distill(
        &lm,
        &train_ids,
        &cfg,
        |epoch, routers| match &routed_val {
            Some(v) if every > 0 && (epoch % every == 0 || epoch == a.epochs) => {
                v.measure(&lm, routers, 0.0).map(Some)
            }
            _ => Ok(None),
        },
        |s, total| {
            steps.set_length(total as u64);
            steps.set_position(s as u64);
            if steps.is_hidden() && s % 50 == 0 {
                tracing::info!(step = s, total, "distillation steps");
            }
        },
        |m| {
            steps.suspend(|| {
                tracing::info!(
                    epoch = m.epoch,
                    loss = format!("{:.4}", m.loss),
                    kl = format!("{:.4}", m.kl),
                    executed = format!("{:.3}", m.executed),
                    routed_accuracy = m.routed_accuracy.map(|x| format!("{x:.4}")),
                    routed_cost = m.routed_cost.map(|x| format!("{x:.2}")),
                    "epoch"
                )
            });
        },
    )?;
    steps.finish_and_clear();
    let train_secs = t1.elapsed().as_secs_f64();
    let n_layers = lm.model.num_layers();
    let last = out.epochs.last().context("at least one epoch")?;

    let (sweep, recommended) = match &routed_val {
        Some(v) => {
            let at_zero = last.routed_accuracy.zip(last.routed_cost);
            v.sweep(&lm, &out.routers, &a.val_budgets, at_zero)?
        }
        None => (vec![], None),
    };

    let mut manifest = PackageManifest::new(fingerprint, name, out.routers.shape, a.windows);
    manifest.prompts = Some(PromptSpec {
        reward: a.reward.to_string(),
        style: style.to_string(),
        templates: Family::ALL
            .into_iter()
            .map(|family| {
                let t = Template::builtin_for(family, style, a.reward);
                TemplateSpec {
                    family: family.name().into(),
                    name: t.name().into(),
                    source: t.source().into(),
                }
            })
            .collect(),
    });
    manifest.training = serde_json::json!({
        "supervision": "distill",
        "config": cfg,
        "val_fraction": a.val_fraction,
        "train_secs": train_secs,
        "distill_epochs": out.epochs,
    });
    manifest.data = serde_json::json!({
        "source": "task data",
        "dir": dir.display().to_string(),
        "split": a.data.split.to_string(),
        "limit": a.data.limit,
        "offset": a.data.offset,
        "tasks": per_task,
        "train": train_ids.len(),
        "val": routed_val.as_ref().map_or(0, |v| v.len()),
        "routed_val_prompts": routed_val.as_ref().map(|v| v.len()),
        "routed_val_baseline_accuracy": routed_val.as_ref().map(|v| v.baseline_accuracy),
        "routed_val_budgets": sweep.iter().map(|(b, acc, cost)| serde_json::json!({
            "budget": b, "accuracy": acc, "cost": cost})).collect::<Vec<_>>(),
        "recommended_budget": recommended,
    });
    // The package's epoch table in the shared layout: no labels, so no F1; the cost columns
    // hold the routed cost and the all-execute teacher's.
    manifest.epochs = out
        .epochs
        .iter()
        .map(|e| EpochMetrics {
            epoch: e.epoch,
            train_loss: e.loss,
            val_macro_f1: 0.0,
            val_f1: [0.0; 3],
            val_recall: [0.0; 3],
            val_avg_cost: e.routed_cost.unwrap_or(e.executed * n_layers as f64),
            val_gold_cost: n_layers as f64,
            val_routed_accuracy: e.routed_accuracy,
            val_routed_cost: e.routed_cost,
            lr: e.lr,
            secs: e.secs,
        })
        .collect();
    manifest.best_epoch = last.epoch;
    let pkg = Package {
        manifest,
        routers: out.routers,
    };
    pkg.save_as(&a.out, weights_kind)
        .with_context(|| format!("writing the router package {}", a.out.display()))?;
    print_distill_epochs(&pkg.manifest);
    if let Some(v) = &routed_val {
        println!(
            "\nrouted validation: {} held-out prompts, baseline accuracy {:.4}",
            v.len(),
            v.baseline_accuracy
        );
    }
    crate::pipeline::print_sweep(&pkg.manifest);
    println!("trained in {train_secs:.1}s | package {}", a.out.display());
    Ok(())
}
