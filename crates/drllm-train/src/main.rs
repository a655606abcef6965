//! `drllm-train`: fits the per-block routers on the frozen model from paths datasets, and
//! `drllm-train inspect PKG` prints a router package.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drllm_cli::LogArgs;
use drllm_router::Package;
use drllm_train::distill_run::{run_distill, DistillArgs};
use drllm_train::pipeline::{print_epochs, print_sweep, run, TrainArgs};

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
  drllm-train distill --dataset arc_easy,piqa,sciq --limit 400 --penalty 2 --out routers/distill
  drllm-train export routers/smol --format dr-llm --out smol-dr-llm.safetensors

Examples are the rows with a correct path, labelled with the cheapest one (all-execute when
nothing cheaper was correct); improved rows (default wrong, a path right) are capped at
--max-improved-share. The feature pass (the frozen model once per example along its gold path) is
cached under $DRLLM_CACHE/features, keyed by model, examples and windows. After every epoch the
routers route the held-out prompts for real (task data from --task-data) and the epoch with the
best routed accuracy, then the lowest cost, is kept. The package (routers.safetensors +
manifest.json, with the per-epoch metrics also as metrics.csv) goes to --out."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    log: LogArgs,
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
    /// Distillation gates: routers trained so that the routed model keeps the full model's
    /// next-token distribution on task prompts (KL) under a compute penalty; needs no paths
    /// dataset and no answers.
    #[command(after_help = "Examples:
  drllm-train distill --dataset arc_easy,piqa,sciq --split train --limit 400 --penalty 2 --out routers/distill
  drllm-train distill --dataset arc_easy,gsm8k --limit 200 --epochs 2 --out routers/d --model qwen2.5-coder-1.5b-instruct

The prompts are rendered as drllm-infer eval renders them (--reward, --style), so the package
routes the same text there. --val-fraction of them (by a seeded hash of task and sample id) are
held out; those of multiple-choice tasks are routed for real after each epoch and at
--val-budgets, and the package recommends the cheapest budget that keeps their baseline accuracy.
The last epoch is kept: --penalty, not the epoch, sets the trade-off.")]
    Distill(Box<DistillArgs>),
    /// Write a package's routers in another implementation's layout.
    Export {
        /// Package directory (or `embedded`).
        package: PathBuf,
        /// Target layout: `dr-llm`, the paper's code (parameterlab/dr-llm): tensors
        /// `model.routers.{i}.linear1/linear2.{weight,bias}` for its modified model classes.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Output file (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// The paper's code.
    DrLlm,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("info");
    drllm_runtime::keep_freed_memory();
    match cli.cmd {
        Some(Cmd::Inspect { package, json }) => inspect(&package, json),
        Some(Cmd::Export {
            package,
            format: ExportFormat::DrLlm,
            out,
        }) => export_dr_llm(&package, &out),
        Some(Cmd::Distill(a)) => run_distill(*a),
        None => run(cli.train),
    }
}

fn export_dr_llm(spec: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let dir = drllm_router::embedded::resolve(spec)?;
    let p = Package::load(&dir)?;
    p.export_dr_llm(&dir, out)
        .with_context(|| format!("exporting {}", spec.display()))?;
    println!(
        "wrote {} ({} routers, {} -> {} -> 3) in the layout of parameterlab/dr-llm",
        out.display(),
        p.manifest.shape.num_layers,
        p.manifest.shape.hidden_size,
        p.manifest.shape.router_hidden
    );
    println!(
        "load into their model with model.load_state_dict(safetensors.torch.load_file(FILE), strict=False).\n\
         Differences to keep in mind: their windows pool T // 8 tokens each and drop the last T % 8 \
         (drllm spreads them), so logits match exactly only for prompts whose length is a multiple of 8; \
         their router_penalty p interpolates probabilities, drllm's --budget shifts log-probabilities: \
         the routers' plain argmax is budget 0 here and router_penalty -0.5 there; other values are not the same knob."
    );
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let p = Package::load(&drllm_router::embedded::resolve(dir)?)?;
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
    if let Some(p) = &m.prompts {
        println!("prompts      reward {}, style {}", p.reward, p.style);
    }
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
    print_sweep(m);
    Ok(())
}
