//! `drllm-worker`: runs path searches. `--standalone` searches a dataset in this process and
//! writes one JSON line per sample.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use drllm_runtime::{parse_dtype, resolve_device, LoadedModel, ModelSource};
use drllm_search::{SearchConfig, Selection};
use drllm_tasks::{data, LoadOptions, RewardMode, Style, TaskName, Template};
use drllm_worker::{prepare, run_searches, DriverOptions, EvalOptions};

#[derive(Parser)]
#[command(
    name = "drllm-worker",
    version,
    about = "Search accuracy-preserving shorter layer paths (MCTS) for dataset prompts.",
    after_help = "Examples:
  drllm-worker --standalone --model embedded --dataset arc_easy --split train --limit 20 \\
      --num-simulations 50 --seed 7 --out paths.jsonl
  drllm-worker --standalone --dataset arc_easy --reward choice-logits --limit 100 --out p.jsonl
  drllm-worker --standalone --dataset dart-1 --style instruct --max-new-tokens 32 --out m.jsonl

Currently only --standalone runs (the coordinator-driven mode comes with drllm-coordinator)."
)]
struct Cli {
    /// Search the dataset in this process (no coordinator).
    #[arg(long, required = true)]
    standalone: bool,
    /// Model: HF directory, .gguf file, `embedded`, or a cached repo id.
    #[arg(long, env = "DRLLM_MODEL", default_value = "embedded")]
    model: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "DRLLM_DEVICE", default_value = "auto")]
    device: String,
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, env = "DRLLM_DTYPE", default_value = "auto")]
    dtype: String,
    /// CPU threads for libtorch.
    #[arg(long, env = "DRLLM_THREADS")]
    threads: Option<i32>,
    /// Data directory (default $DRLLM_DATA, else ../shared/data).
    #[arg(long, env = "DRLLM_DATA")]
    data: Option<PathBuf>,
    /// Task: arc_easy, arc_challenge, arc, dart-1..dart-5, dart, gsm8k.
    #[arg(long)]
    dataset: String,
    /// Split: train, dev, test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Samples to search (after offset).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip this many samples first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Prompt style: instruct (chat template applied) or base.
    #[arg(long, default_value = "instruct")]
    style: String,
    /// Own prompt template file (minijinja).
    #[arg(long)]
    template: Option<PathBuf>,
    /// Multiple-choice reward: strict (the paper's), lenient, choice-logits (no decoding).
    #[arg(long, default_value = "lenient")]
    reward: String,
    /// Token budget of a decoded answer.
    #[arg(long, default_value_t = 10)]
    max_new_tokens: usize,
    /// Run seed; each sample's search seed derives from it and the sample id.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Simulations per prompt.
    #[arg(long, default_value_t = 50)]
    num_simulations: usize,
    /// UCT exploration constant.
    #[arg(long, default_value_t = 1.8)]
    c: f64,
    /// Length penalty lambda (score -= lambda * cost / L).
    #[arg(long, default_value_t = 3.0)]
    length_penalty: f64,
    /// Probability of descending to a random child.
    #[arg(long, default_value_t = 0.1)]
    random_child_prob: f64,
    /// Skip sizes (consecutive layer-list entries removed by one action).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    skip_sizes: Vec<usize>,
    /// Disable repeat actions.
    #[arg(long)]
    no_repeat: bool,
    /// Most applications of one block (at most 2).
    #[arg(long, default_value_t = 2)]
    max_count: u8,
    /// Path cost cap as a multiple of L.
    #[arg(long, default_value_t = 2.0)]
    cost_cap: f64,
    /// Do not stop when a path beats the default path's reward.
    #[arg(long)]
    no_stop_on_improvement: bool,
    /// Stop once a correct path saves this many blocks (0: never).
    #[arg(long, default_value_t = 2)]
    stop_on_saving: usize,
    /// Selection: uct, or chain (the paper code's leaf-only descent).
    #[arg(long, default_value = "uct")]
    selection: String,
    /// Searches in flight at once (candidates per evaluator batch).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Memory for cached path prefixes (hidden states and KV shared by candidates of one prompt),
    /// in MiB; least recently used entries are evicted. 0 turns prefix sharing off.
    #[arg(long, env = "DRLLM_PREFIX_CACHE_MB", default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// Output JSON-lines file (one line per sample).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DRLLM_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let a = Cli::parse();
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    let device = resolve_device(&a.device)?;
    let kind = parse_dtype(&a.dtype, device)?;
    let task: TaskName = a.dataset.parse()?;
    let style: Style = a.style.parse()?;
    let mode: RewardMode = a.reward.parse()?;
    let selection: Selection = a.selection.parse().map_err(anyhow::Error::msg)?;
    let template = match &a.template {
        Some(p) => Template::from_file(p, style)?,
        None => Template::builtin(task.family(), style),
    };
    let search = SearchConfig {
        num_simulations: a.num_simulations,
        c: a.c,
        length_penalty: a.length_penalty,
        random_child_prob: a.random_child_prob,
        skip_sizes: a.skip_sizes.clone(),
        allow_repeat: !a.no_repeat,
        max_count: a.max_count,
        cost_cap_factor: a.cost_cap,
        stop_on_improvement: !a.no_stop_on_improvement,
        stop_on_saving: (a.stop_on_saving > 0).then_some(a.stop_on_saving),
        selection,
    };
    search.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let dir = data::resolve_data_dir(a.data.as_deref())?;
    let loaded = data::load(
        &dir,
        task,
        a.split.parse()?,
        &LoadOptions {
            offset: a.offset,
            limit: a.limit,
            ..Default::default()
        },
    )?;
    let lm = LoadedModel::load(ModelSource::resolve(&a.model)?, device, kind)
        .with_context(|| format!("loading {}", a.model))?;
    let eval = EvalOptions {
        mode,
        max_new_tokens: a.max_new_tokens,
    };
    let prompts: Vec<_> = loaded
        .samples
        .iter()
        .map(|s| prepare(&lm, s, &template, &eval))
        .collect();
    let opts = DriverOptions {
        search,
        seed: a.seed,
        concurrency: a.concurrency.max(1),
        eval,
        prefix_cache_bytes: a.prefix_cache_mb << 20,
    };
    let file =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let n = prompts.len();
    let bar = indicatif::ProgressBar::new(n as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} samples [{elapsed} < {eta}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (mut found, mut failed) = (0usize, 0usize);
    let mut write_err = None;
    let started = std::time::Instant::now();
    run_searches(&lm, prompts, &opts, |o| {
        let line = match &o.result {
            Ok(r) => {
                found += r.found as usize;
                serde_json::json!({
                    "sample_id": o.sample_id,
                    "default_correct": r.default_reward >= 1.0,
                    "found": r.found,
                    "improved": r.improved,
                    "best_path": r.best_path.as_ref().map(|p| p.counts().to_vec()),
                    "best_cost": r.best_cost,
                    "good_paths": r.good_paths.iter().map(|p| p.counts().to_vec()).collect::<Vec<_>>(),
                    "simulations": r.simulations,
                    "evaluations": r.evaluations,
                    "search_ms": r.wall_ms,
                })
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(sample_id = %o.sample_id, error = %e, "search failed");
                serde_json::json!({"sample_id": o.sample_id, "error": e})
            }
        };
        // Each finished sample reaches the file at once: a crash loses no finished work.
        if write_err.is_none() {
            if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
        bar.inc(1);
        bar.set_message(format!("found {found}, failed {failed}"));
        // Without a terminal (SLURM logs, pipes) the bar is hidden: log progress lines instead.
        let done = bar.position() as usize;
        if !interactive && (done.is_multiple_of(10) || done == n) {
            let secs = started.elapsed().as_secs_f64();
            let eta = secs / done as f64 * (n - done) as f64;
            tracing::info!(
                done,
                total = n,
                found,
                failed,
                elapsed_s = secs.round(),
                eta_s = eta.round(),
                "progress"
            );
        }
    });
    bar.finish();
    if let Some(e) = write_err {
        return Err(e).with_context(|| format!("writing {}", a.out.display()));
    }
    out.flush()
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "{n} samples in {:.1}s: {found} with a shorter or better path, {failed} failed; results in {}",
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}
