//! `drllm-worker`: runs path searches. `--standalone` searches a dataset in this process and
//! writes one JSON line per sample; `--connect` works for a `drllm-coordinator`.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use drllm_cli::{DataArgs, LogArgs, ModelArgs, SearchArgs};
use drllm_eval::prepare;
use drllm_worker::remote::{run_remote, RemoteOptions};
use drllm_worker::{run_searches, DriverOptions};

#[derive(Parser)]
#[command(
    name = "drllm-worker",
    version,
    about = "Search accuracy-preserving shorter layer paths (MCTS) for dataset prompts.",
    after_help = "Examples:
  drllm-worker --standalone --model embedded --dataset arc_easy --split train --limit 20 \\
      --num-simulations 50 --seed 7 --out paths.jsonl
  drllm-worker --standalone --dataset arc_easy --reward cloze --limit 100 --out p.jsonl
  drllm-worker --standalone --dataset arc_easy --reward lenient --style instruct --out g.jsonl
  drllm-worker --standalone --dataset dart-1 --style instruct --max-new-tokens 32 --out m.jsonl
  drllm-worker --connect http://node17:50051 --token $DRLLM_TOKEN --device cuda:0

With --connect the search flags come from the coordinator; only model, device and resource
flags apply."
)]
struct Cli {
    /// Search the dataset in this process (no coordinator).
    #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
    standalone: bool,
    /// Work for the coordinator at this address (e.g. http://127.0.0.1:50051).
    #[arg(long, env = "DRLLM_COORDINATOR")]
    connect: Option<String>,
    /// Shared secret of the run (with --connect).
    #[arg(long, env = "DRLLM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Worker id (default host:pid).
    #[arg(long, env = "DRLLM_WORKER_ID")]
    worker_id: Option<String>,
    #[command(flatten)]
    m: ModelArgs,
    /// Task prompts (--standalone; one task per run).
    #[command(flatten)]
    d: DataArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    search: SearchArgs,
    /// Searches in flight at once (candidates per evaluator batch).
    #[arg(long, env = "DRLLM_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Memory for cached path prefixes (hidden states and KV shared by candidates of one prompt),
    /// in MiB; least recently used entries are evicted. 0 turns prefix sharing off.
    #[arg(long, env = "DRLLM_PREFIX_CACHE_MB", default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// Paths per search scored ahead of their turn, batched with its pending one, where the
    /// search's order does not depend on rewards (UCT expanding the root): fuller batches, the
    /// same results; an early stop can leave a few unused. 0 turns it off.
    #[arg(long, env = "DRLLM_LOOKAHEAD", default_value_t = 4)]
    lookahead: usize,
    /// Output JSON-lines file (one line per sample; with --standalone).
    #[arg(long, required_unless_present = "connect")]
    out: Option<PathBuf>,
    /// Also write the run's throughput and its time by phase (prefill, cache copies, decode,
    /// grading, search, other) as JSON (with --standalone).
    #[arg(long, conflicts_with = "connect")]
    stats: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Cli::parse();
    a.log.init("info");
    let dir = a.d.dir()?;
    if let Some(addr) = &a.connect {
        let lm = a.m.load()?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let o = RemoteOptions {
            addr: addr.clone(),
            token: a.token.clone(),
            worker_id: a
                .worker_id
                .clone()
                .unwrap_or_else(|| format!("{host}:{}", std::process::id())),
            device: format!(
                "{:?} ({} threads)",
                lm.model.device(),
                tch::get_num_threads()
            ),
            data_dir: dir,
            concurrency: a.concurrency.max(1),
            prefix_cache_bytes: a.prefix_cache_mb << 20,
            lookahead: a.lookahead,
            connect_timeout: std::time::Duration::from_secs(120),
        };
        let s = run_remote(&lm, &o)?;
        eprintln!(
            "worker {}: {} leases, {} samples searched, {} failed",
            o.worker_id, s.leases, s.searched, s.failed
        );
        return Ok(());
    }
    let Some(out_path) = &a.out else {
        anyhow::bail!("--standalone needs --out");
    };
    let mut tasks = a.d.load(&dir)?;
    let (Some((task, loaded)), 0) = (tasks.pop(), tasks.len()) else {
        anyhow::bail!(
            "--standalone searches one task per run (got {}): run drllm-coordinator for several",
            a.d.dataset.len()
        );
    };
    let cfg = a.search.run_config()?;
    let template = cfg.template(task.family())?;
    let search = cfg.search.clone();
    let lm = a.m.load()?;
    let n_layers = lm.model.num_layers();
    if let Some(b) = search.skip_prior.iter().find(|&&b| b >= n_layers) {
        anyhow::bail!(
            "--skip-prior names block {b}, the model has {n_layers} blocks (0..{n_layers})"
        );
    }
    let eval = cfg.eval();
    let prompts: Vec<_> = loaded
        .samples
        .iter()
        .map(|s| prepare(&lm, s, &template, &eval))
        .collect();
    let opts = DriverOptions {
        search,
        seed: cfg.seed,
        concurrency: a.concurrency.max(1),
        eval,
        prefix_cache_bytes: a.prefix_cache_mb << 20,
        lookahead: a.lookahead,
    };
    let file = std::fs::File::create(out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let n = prompts.len();
    let bar = drllm_cli::progress_bar(n as u64, "samples");
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (mut found, mut failed) = (0usize, 0usize);
    let mut write_err = None;
    let started = std::time::Instant::now();
    let stats = run_searches(&lm, prompts, &opts, |o| {
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
        return Err(e).with_context(|| format!("writing {}", out_path.display()));
    }
    out.flush()
        .with_context(|| format!("writing {}", out_path.display()))?;
    eprintln!(
        "{n} samples in {:.1}s: {found} with a shorter or better path, {failed} failed; results in {}",
        started.elapsed().as_secs_f64(),
        out_path.display()
    );
    eprintln!("{}", stats.breakdown());
    if let Some(path) = &a.stats {
        let phases: serde_json::Map<String, serde_json::Value> = stats
            .phase_seconds()
            .into_iter()
            .filter(|(name, _)| *name != "other")
            .map(|(name, s)| (name.to_string(), s.into()))
            .collect();
        let v = serde_json::json!({
            "samples": n,
            "found": found,
            "failed": failed,
            "evaluations": stats.useful_evaluations(),
            "evaluations_scored": stats.evaluations,
            "evaluated_ahead_unused": stats.ahead_unused,
            "lookahead": a.lookahead,
            "batches": stats.batches,
            "decode_steps": stats.decode_steps,
            "tokens_decoded": stats.tokens_decoded(),
            "wall_s": stats.wall.as_secs_f64(),
            "phases_s": phases,
            "prefix_blocks_reused": stats.prefix.blocks_reused,
            "prefix_blocks_requested": stats.prefix.blocks_requested,
            "prefix_peak_bytes": stats.prefix_peak_bytes,
            "threads": tch::get_num_threads(),
            "device": format!("{:?}", lm.model.device()),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
