//! `drllm-train-bench`: how fast the two halves of training run on this machine.
//! - router training on cached features of a given model shape (synthetic features; the work
//!   does not depend on their values), with the fraction of the machine's measured f32 matmul
//!   peak it reaches;
//! - the feature pass on the embedded model over real ARC prompts, batched vs one at a time.
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use drllm_runtime::{LoadedModel, ModelSource};
use drllm_train::{extract_features, train, Example, Features, TrainConfig};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(
    name = "drllm-train-bench",
    version,
    about = "Benchmarks of router training (cached features) and of the feature pass.",
    after_help = "Examples:
  drllm-train-bench                                   # 4,000 x 28 blocks x 8 windows x 3072, 25 epochs
  drllm-train-bench --examples 500 --epochs 2         # a quick look
  drllm-train-bench --skip-training --prompts 32      # only the feature pass"
)]
struct Cli {
    #[command(flatten)]
    log: drllm_cli::LogArgs,
    /// Cached examples to train on.
    #[arg(long, default_value_t = 4000)]
    examples: usize,
    /// Blocks of the model shape.
    #[arg(long, default_value_t = 28)]
    layers: usize,
    /// Hidden size of the model shape.
    #[arg(long, default_value_t = 3072)]
    hidden: usize,
    /// Pooling windows.
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Epochs.
    #[arg(long, default_value_t = 25)]
    epochs: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Skip the training benchmark.
    #[arg(long)]
    skip_training: bool,
    /// ARC prompts for the feature pass (0 = skip it).
    #[arg(long, default_value_t = 32)]
    prompts: usize,
    #[command(flatten)]
    d: drllm_cli::DataDirArgs,
}

/// Median GFLOP/s of an f32 matmul of the router's shape class (large, square-ish).
fn matmul_peak() -> f64 {
    let a = Tensor::randn([2048, 3072], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([3072, 1024], (Kind::Float, Device::Cpu));
    let _ = a.matmul(&b);
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = a.matmul(&b);
            let _ = c.sum(Kind::Float).double_value(&[]);
            2.0 * 2048.0 * 3072.0 * 1024.0 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}

fn main() -> Result<()> {
    let a = Cli::parse();
    a.log.init("warn");
    drllm_runtime::keep_freed_memory();
    let peak = matmul_peak();
    println!("f32 matmul rate (median of 5, 2048x3072x1024): {peak:.0} GFLOP/s");
    if !a.skip_training {
        let (n, l, w, h) = (a.examples, a.layers, a.windows, a.hidden);
        // bf16 storage halves the memory of the cache (5.5 GB at the default shape); the routers
        // compute in f32 either way.
        tch::manual_seed(0);
        let features = |n: usize| Features {
            x: Tensor::randn(
                [l as i64, n as i64, w as i64, h as i64],
                (Kind::BFloat16, Device::Cpu),
            ),
            labels: Tensor::randint(3, [n as i64, l as i64], (Kind::Int64, Device::Cpu)),
            targets: None,
        };
        let tr = features(n);
        // A held-out tenth, scored after every epoch as in a real run.
        let va = features(n / 10);
        let cfg = TrainConfig {
            epochs: a.epochs,
            batch_size: a.batch_size,
            ..TrainConfig::default()
        };
        let t = Instant::now();
        let trained = train(
            &tr,
            &va,
            &cfg,
            drllm_train::Select::MacroF1,
            |_, _| Ok(None),
            |_, _| {},
            |m| {
                eprintln!(
                    "epoch {} loss {:.4} ({:.1}s)",
                    m.epoch, m.train_loss, m.secs
                );
            },
        )?;
        let secs = t.elapsed().as_secs_f64();
        let d = cfg.router_hidden as f64;
        let per_example = (w * l) as f64 * (h as f64 * d + d * 3.0) * 2.0;
        let flops = per_example * 3.0 * n as f64 * a.epochs as f64;
        let mut epoch_secs: Vec<f64> = trained.epochs.iter().map(|e| e.secs).collect();
        epoch_secs.sort_by(f64::total_cmp);
        let median = epoch_secs[epoch_secs.len() / 2];
        println!(
            "training: {n} examples x {l} blocks x {w} windows x {h}, {} epochs, batch {}: {secs:.1}s \
             ({:.1} min; median epoch {median:.2}s incl. scoring {} held-out examples); \
             {:.1} TFLOP of router matmuls = {:.0} GFLOP/s = {:.0}% of the matmul rate",
            a.epochs,
            a.batch_size,
            secs / 60.0,
            n / 10,
            flops / 1e12,
            flops / secs / 1e9,
            100.0 * flops / secs / 1e9 / peak
        );
    }
    if a.prompts > 0 {
        let dir = a.d.dir()?;
        let lm = LoadedModel::load(ModelSource::resolve("embedded")?, Device::Cpu, Kind::Float)?;
        let examples = arc_examples(&lm, &dir, a.prompts)?;
        let mut rates = vec![];
        for batch in [8usize, 1] {
            let t = Instant::now();
            let _ = extract_features(&lm, &examples, a.windows, batch, |_| {})?;
            let r = examples.len() as f64 / t.elapsed().as_secs_f64();
            println!("feature pass, batch {batch}: {r:.2} examples/s ({} ARC prompts, embedded model, f32)", examples.len());
            rates.push(r);
        }
        println!("batched / one at a time: {:.2}x", rates[0] / rates[1]);
    }
    Ok(())
}

/// ARC-Easy train prompts, rendered as the search renders them (instruct style), with seeded
/// varied gold paths (skips and repeats).
fn arc_examples(lm: &LoadedModel, dir: &std::path::Path, n: usize) -> Result<Vec<Example>> {
    use drllm_tasks::{data, Family, LoadOptions, Split, Style, TaskName, Template};
    let loaded = data::load(
        dir,
        TaskName::ArcEasy,
        Split::Train,
        &LoadOptions {
            limit: Some(n),
            ..Default::default()
        },
    )?;
    let template = Template::builtin(Family::MultipleChoice, Style::Instruct);
    let layers = lm.model.num_layers();
    let mut out = vec![];
    for (i, s) in loaded.samples.iter().enumerate() {
        let text = template.render(s)?;
        let chat = lm
            .tokenizer
            .apply_chat_template(&[drllm_runtime::Message::user(text)])?;
        let path = (0..layers)
            .map(|l| ((i * 7 + l * 3) % 5).min(2) as u8)
            .collect();
        out.push(Example {
            sample_id: s.id.clone(),
            task: "arc_easy".into(),
            split: "train".into(),
            source: 0,
            kind: drllm_train::RowKind::Shortened,
            prompt: chat,
            add_special: false,
            path,
            candidates: vec![],
        });
    }
    Ok(out)
}
