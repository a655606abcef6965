//! `drllm-train`: fits the per-block routers on the frozen model from paths datasets, and
//! `drllm-train inspect PKG` prints a router package.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use drllm_router::{Package, PackageManifest, CLASSES};
use drllm_runtime::{parse_dtype, resolve_device, LoadedModel, ModelSource};
use drllm_train::features::default_cache_dir;
use drllm_train::trainer::evaluate;
use drllm_train::{extract_features, load_examples, split_of, train, FeatureCache, TrainConfig};

#[derive(Parser)]
#[command(
    name = "drllm-train",
    version,
    about = "Train the per-block routers on the frozen model from paths datasets (drllm-coordinator output).",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  drllm-train --data runs/arc --data runs/dart --model embedded --out routers/smol
  drllm-train --data runs/arc --out routers/arc --epochs 50 --lr 5e-4 --val-fraction 0.1 --seed 1
  drllm-train inspect routers/smol

The feature pass (the frozen model once per example along its gold path) is cached under
$DRLLM_CACHE/features, keyed by model, examples and windows: a second run with other training
flags skips the model entirely. The package (routers.safetensors + manifest.json) goes to --out."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a router package: model, sizes, label counts, metrics per epoch.
    Inspect {
        /// Package directory.
        package: PathBuf,
        /// Print the manifest as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Paths dataset (a drllm-coordinator OUT directory); repeat for several.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Model the datasets were searched with: HF directory, .gguf file, `embedded`, or a cached repo id.
    #[arg(long, env = "DRLLM_MODEL", default_value = "embedded")]
    model: String,
    /// Output package directory.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (for the feature pass; routers train on the CPU).
    #[arg(long, env = "DRLLM_DEVICE", default_value = "auto")]
    device: String,
    /// Model dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, env = "DRLLM_DTYPE", default_value = "auto")]
    dtype: String,
    /// CPU threads for libtorch.
    #[arg(long, env = "DRLLM_THREADS")]
    threads: Option<i32>,
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
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Epochs.
    #[arg(long, default_value_t = 25)]
    epochs: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Fraction of steps of linear warm-up before the cosine decay.
    #[arg(long, default_value_t = 0.05)]
    warmup: f64,
    /// Focal loss gamma.
    #[arg(long, default_value_t = 2.0)]
    focal_gamma: f64,
    /// Effective-number beta of the class weights.
    #[arg(long, default_value_t = 0.999)]
    class_beta: f64,
    /// Width of each router's hidden layer.
    #[arg(long, default_value_t = 128)]
    router_hidden: usize,
    /// Seed of the split, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DRLLM_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    drllm_runtime::keep_freed_memory();
    match cli.cmd {
        Some(Cmd::Inspect { package, json }) => inspect(&package, json),
        None => run(cli.train),
    }
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let p = Package::load(dir)?;
    let m = &p.manifest;
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!("router package {}", dir.display());
    println!(
        "model        {} (fingerprint {})",
        m.model_name, m.model_fingerprint
    );
    println!(
        "routers      {} blocks, {} -> {} -> 3, {} windows",
        m.shape.num_layers, m.shape.hidden_size, m.shape.router_hidden, m.windows
    );
    println!(
        "labels       skip {}, execute {}, repeat {}",
        m.label_counts[0], m.label_counts[1], m.label_counts[2]
    );
    if let Some(d) = m.data.as_object() {
        println!(
            "examples     {} train, {} validation",
            d.get("train").unwrap_or(&0.into()),
            d.get("val").unwrap_or(&0.into())
        );
    }
    println!(
        "code         drllm {} (format {})",
        m.code_version, m.format_version
    );
    print_epochs(m);
    Ok(())
}

fn print_epochs(m: &PackageManifest) {
    println!(
        "\nepoch  train loss  val macro-F1  F1 skip/exec/rep   recall skip/exec/rep  cost (gold)"
    );
    for e in &m.epochs {
        println!(
            "{:>5}{} {:>10.4}  {:>11.4}  {:.3}/{:.3}/{:.3}  {:.3}/{:.3}/{:.3}    {:.2} ({:.2})",
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
            e.val_gold_cost
        );
    }
    println!("(* = best epoch by validation macro-F1, the one in the package)");
}

fn run(a: TrainArgs) -> Result<()> {
    let Some(out) = a.out.clone() else {
        bail!("--out is required");
    };
    if !(0.0..1.0).contains(&a.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", a.val_fraction);
    }
    if a.windows == 0 || a.epochs == 0 || a.batch_size == 0 {
        bail!("--windows, --epochs and --batch-size must be positive");
    }
    if out.exists() && !out.join("manifest.json").is_file() {
        bail!(
            "{} exists and is not a router package; choose another --out",
            out.display()
        );
    }
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    let device = resolve_device(&a.device)?;
    let kind = parse_dtype(&a.dtype, device)?;
    let source = ModelSource::resolve(&a.model)?;
    let fingerprint = source.fingerprint()?;
    let name = source.name();
    let model_cfg = source.config()?;
    let n_layers = model_cfg.num_layers;
    let set = load_examples(&a.data, &fingerprint, &name, n_layers)?;
    for (dir, rows, found) in &set.sources {
        eprintln!("{}: {rows} rows, {found} with a found path", dir.display());
    }
    let n = set.examples.len();
    let (val_idx, train_idx): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|&i| split_of(&set.examples[i].sample_id, a.seed, a.val_fraction));
    if train_idx.is_empty() {
        bail!("all {n} examples fell into the validation split; lower --val-fraction");
    }
    eprintln!(
        "{n} examples ({} duplicate prompts dropped): {} train, {} validation | model {name}, {n_layers} blocks",
        set.duplicates,
        train_idx.len(),
        val_idx.len()
    );
    if val_idx.is_empty() {
        tracing::warn!("no validation examples: metrics are computed on the training set");
    }

    // Feature pass (skipped, with the model, when the cache has it).
    let cache = (!a.no_feature_cache).then(|| FeatureCache {
        dir: a.feature_cache.clone().unwrap_or_else(default_cache_dir),
    });
    let key = FeatureCache::key(&fingerprint, a.windows, &set.examples);
    let hidden = model_cfg.hidden_size as usize;
    let t0 = std::time::Instant::now();
    let cached = cache
        .as_ref()
        .and_then(|c| c.get(&key, n, n_layers, a.windows, hidden));
    let features = match cached {
        Some(f) => {
            eprintln!(
                "features: {n} examples from the cache ({}); the model is not loaded",
                cache
                    .as_ref()
                    .map(|c| c.file(&key).display().to_string())
                    .unwrap_or_default()
            );
            f
        }
        None => {
            let lm = LoadedModel::load(source, device, kind)
                .with_context(|| format!("loading model {}", a.model))?;
            let fbar = bar(n as u64, "features");
            let f = extract_features(&lm, &set.examples, a.windows, a.feature_batch, |d| {
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
    let tr = features.select(&train_idx);
    let va = features.select(&val_idx);

    // Training.
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup: a.warmup,
        focal_gamma: a.focal_gamma,
        class_beta: a.class_beta,
        router_hidden: a.router_hidden,
        seed: a.seed,
    };
    let steps = bar(0, "steps");
    let t1 = std::time::Instant::now();
    let trained = train(
        &tr,
        &va,
        &cfg,
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
                    "epoch"
                )
            });
        },
    )?;
    steps.finish_and_clear();
    let train_secs = t1.elapsed().as_secs_f64();

    // The majority-class baseline on the same validation examples: every block predicts the
    // most frequent training label.
    let scored = if va.is_empty() { &tr } else { &va };
    let majority = (0..3).max_by_key(|&c| trained.label_counts[c]).unwrap_or(1) as i64;
    let gold: Vec<i64> = Vec::try_from(scored.labels.flatten(0, -1)).unwrap_or_default();
    let base = drllm_train::Confusion::from_pairs(&gold, &vec![majority; gold.len()]);
    let (best_conf, _, _) = evaluate(&trained.routers, scored);

    let mut manifest = PackageManifest::new(fingerprint, name, trained.routers.shape, a.windows);
    manifest.label_counts = trained.label_counts;
    manifest.training = serde_json::json!({
        "config": cfg,
        "class_weights": trained.class_weights,
        "val_fraction": a.val_fraction,
        "feature_secs": feat_secs,
        "train_secs": train_secs,
    });
    manifest.data = serde_json::json!({
        "sources": set.sources.iter().map(|(d, rows, found)| serde_json::json!({
            "path": d.display().to_string(), "rows": rows, "found": found})).collect::<Vec<_>>(),
        "examples": n,
        "duplicates": set.duplicates,
        "train": tr.len(),
        "val": va.len(),
        "majority_class": CLASSES[majority as usize],
        "majority_baseline_macro_f1": base.macro_f1(),
    });
    manifest.epochs = trained.epochs.clone();
    manifest.best_epoch = trained.best_epoch;
    let pkg = Package {
        manifest,
        routers: trained.routers,
    };
    pkg.save(&out)
        .with_context(|| format!("writing the router package {}", out.display()))?;
    print_epochs(&pkg.manifest);
    println!(
        "\nvalidation macro-F1 {:.4} (best epoch {}) vs {:.4} for always-{} | trained in {train_secs:.1}s | package {}",
        best_conf.macro_f1(),
        pkg.manifest.best_epoch,
        base.macro_f1(),
        CLASSES[majority as usize],
        out.display()
    );
    Ok(())
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    b
}
