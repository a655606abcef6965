//! `drllm-train`: fits the per-block routers on the frozen model from paths datasets, and
//! `drllm-train inspect PKG` prints a router package.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use drllm_cli::LogArgs;
use drllm_router::Package;
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

Examples are the rows with a correct path, labelled with the cheapest one (all-execute when
nothing cheaper was correct); improved rows (default wrong, a path right) are capped at
--max-improved-share. The feature pass (the frozen model once per example along its gold path) is
cached under $DRLLM_CACHE/features, keyed by model, examples and windows. After every epoch the
routers route the held-out prompts for real (task data from --task-data) and the epoch with the
best routed accuracy, then the lowest cost, is kept. The package (routers.safetensors +
manifest.json) goes to --out."
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("info");
    drllm_runtime::keep_freed_memory();
    match cli.cmd {
        Some(Cmd::Inspect { package, json }) => inspect(&package, json),
        None => run(cli.train),
    }
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
