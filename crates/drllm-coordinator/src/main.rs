//! `drllm-coordinator`: loads and checks the task list, serves leases over gRPC to local workers
//! it spawns (`--workers N`) and remote ones (`--listen`), commits results to the Parquet paths
//! dataset in OUT, and shows progress. Re-running with the same OUT resumes.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use drllm_cli::{DataArgs, LogArgs, SearchArgs};
use drllm_dist::run::{stop_signals, RunSpec, Running};
use drllm_dist::server::ServiceConfig;
use drllm_dist::supervisor::LocalWorkerSpec;
use drllm_dist::{CoordinatorCore, Dataset, LeaseConfig, WorkSample};
use drllm_runtime::ModelSource;

#[derive(Parser)]
#[command(
    name = "drllm-coordinator",
    version,
    about = "Distributed path search: hands out leases to workers and writes the Parquet paths dataset.",
    after_help = "Examples:
  drllm-coordinator --workers 2 --model embedded --dataset arc_easy --split train --limit 16 \\
      --num-simulations 50 --seed 7 --out OUT
  drllm-coordinator --workers 8 --dataset arc --out runs/arc            # one worker per GPU
  drllm-coordinator --workers 0 --listen 0.0.0.0:50051 --token $DRLLM_TOKEN --dataset dart --out runs/dart
      # remote workers: drllm-worker --connect http://<host>:50051 --token $DRLLM_TOKEN

Output: OUT/data/task=<task>/part-*.parquet, OUT/_manifest.json, OUT/_SUCCESS (docs/dataset.md).
Running again with the same OUT resumes; another configuration is refused unless --force.
Exit status: 0 when every sample has an outcome; 130 when stopped by SIGINT/SIGTERM (accepted
rows are committed first; run again to resume); 1 on an error (disk full, bad input, ...).",
    mut_arg("dataset", |a| a.required(true))
)]
struct Cli {
    /// Model: HF directory, .gguf file, `embedded`, or a repo id `org/name[/FILE.gguf][@revision]`
    /// (from the Hugging Face cache, downloaded into it when absent unless HF_HUB_OFFLINE=1;
    /// workers load the same).
    #[arg(long, env = "DRLLM_MODEL", default_value = "embedded")]
    model: String,
    /// Revision (branch, tag or commit hash) of a repo id `--model` (default main).
    #[arg(long, env = "DRLLM_REVISION")]
    revision: Option<String>,
    /// Task prompts to search (local workers read the same data directory).
    #[command(flatten)]
    d: DataArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    search: SearchArgs,
    /// Output directory.
    #[arg(long, env = "DRLLM_OUT")]
    out: PathBuf,
    /// Continue an OUT made with another configuration (committed rows are kept).
    #[arg(long)]
    force: bool,
    /// Local workers to spawn (one per GPU when CUDA is available, else the CPU cores split).
    #[arg(long, env = "DRLLM_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Address to serve on; remote workers need a non-loopback one (and a token).
    #[arg(long, env = "DRLLM_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Shared secret workers must present.
    #[arg(long, env = "DRLLM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Device of local workers: auto (cuda:i for worker i when GPUs exist, else cpu), cpu, cuda.
    #[arg(long, env = "DRLLM_WORKER_DEVICE", default_value = "auto")]
    worker_device: String,
    /// Concurrent searches per worker (= most samples per lease).
    #[arg(long, env = "DRLLM_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Prefix cache per worker, MiB.
    #[arg(long, env = "DRLLM_PREFIX_CACHE_MB", default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// A lease expires after this many seconds without a heartbeat.
    #[arg(long, env = "DRLLM_LEASE_TIMEOUT_S", default_value_t = 120)]
    lease_timeout_s: u64,
    /// Rows per Parquet part (buffered rows are also written every --flush-s seconds).
    #[arg(long, default_value_t = 256)]
    part_rows: usize,
    /// Accepted rows wait at most this many seconds before they are written as a part.
    #[arg(long, default_value_t = 30)]
    flush_s: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Cli::parse();
    a.log.init("info");
    let run = a.search.run_config()?;
    if a.workers == 0 && a.listen.ip().is_loopback() {
        bail!("no workers could ever connect: use --workers N, or --listen on a reachable address for remote workers");
    }
    if !a.listen.ip().is_loopback() && a.token.is_none() {
        bail!(
            "--listen {} accepts remote workers: set --token (or DRLLM_TOKEN)",
            a.listen
        );
    }
    let split = a.d.split;
    let dir = a.d.dir()?;
    let dir =
        std::fs::canonicalize(&dir).with_context(|| format!("data directory {}", dir.display()))?;
    // The task list, checked up front: an unreadable row stops the run before any work.
    let mut samples = vec![];
    for (_, loaded) in a.d.load(&dir)? {
        samples.extend(loaded.samples.iter().map(|s| WorkSample {
            task: s.task.to_string(),
            split: split.to_string(),
            sample_id: s.id.clone(),
        }));
    }
    let model = drllm_runtime::loader::with_revision(&a.model, a.revision.as_deref())?;
    let source = ModelSource::resolve(&model)?;
    let fingerprints = source.fingerprints()?;
    let fingerprint = fingerprints.current.clone();
    let num_layers = source.config()?.num_layers;
    if let Some(b) = run.search.skip_prior.iter().find(|&&b| b >= num_layers) {
        bail!("--skip-prior names block {b}, the model has {num_layers} blocks (0..{num_layers})");
    }
    let tasks: Vec<String> = a.d.dataset.iter().map(ToString::to_string).collect();
    let config = serde_json::json!({
        "datasets": tasks,
        "split": split.to_string(),
        "model": source.name(),
        "run": run,
    });
    let dataset = Dataset::open_with_aliases(
        &a.out,
        &fingerprint,
        std::slice::from_ref(&fingerprints.legacy),
        config,
        a.force,
    )?;
    let total = samples.len();
    let lease = LeaseConfig {
        samples_per_lease: a.concurrency.max(1),
        timeout: Duration::from_secs(a.lease_timeout_s.max(1)),
        max_attempts: 3,
    };
    let core = CoordinatorCore::new(samples.clone(), dataset, num_layers, lease, a.part_rows);
    let already = core.counts().lease;
    eprintln!(
        "{total} samples ({} already committed, {} failed before) | model {} ({num_layers} blocks, fingerprint {fingerprint}) | out {}",
        already.committed,
        already.failed,
        source.name(),
        a.out.display()
    );
    if total == 0 {
        tracing::warn!(
            "no samples selected (--dataset {}, --split {}, --offset {}, --limit {:?}): nothing to search",
            tasks.join(","),
            split,
            a.d.offset,
            a.d.limit
        );
    }
    // Nothing left to search: no worker is started (a model load each, for nothing).
    let workers = if already.committed >= total {
        0
    } else {
        a.workers
    };
    let service = ServiceConfig {
        token: a.token.clone(),
        model_fingerprint: fingerprint,
        run_config_json: serde_json::to_string(&run)?,
        heartbeat: Duration::from_secs((a.lease_timeout_s / 4).max(1)),
        lease_timeout: Duration::from_secs(a.lease_timeout_s.max(1)),
        flush_every: Duration::from_secs(a.flush_s.max(1)),
    };
    let exe = std::env::current_exe()?;
    let spec = RunSpec {
        core,
        samples,
        service,
        listen: a.listen,
        workers: LocalWorkerSpec {
            bin: exe
                .parent()
                .map(|d| d.join("drllm-worker"))
                .context("locating drllm-worker")?,
            count: workers,
            device: a.worker_device.clone(),
            model,
            data_dir: dir.clone(),
            concurrency: a.concurrency,
            prefix_cache_mb: a.prefix_cache_mb,
            token: a.token.clone(),
            logs: a.out.join("_logs"),
            log_json: a.log.log_json,
        },
        remote_workers: !a.listen.ip().is_loopback(),
    };
    let stop = stop_signals()?;
    let outcome = Running::start(spec).await?.finish(stop).await?;
    let (manifest, interrupted) = (outcome.manifest, outcome.interrupted);
    let c = manifest.rows;
    eprintln!(
        "{} in {:.1}s: {c} rows committed, {} samples failed; dataset in {}",
        if interrupted {
            "interrupted (committed rows kept; run again to resume)"
        } else if manifest.complete {
            "done"
        } else {
            "stopped"
        },
        outcome.elapsed.as_secs_f64(),
        manifest.failed.len(),
        a.out.join("data").display()
    );
    if interrupted {
        // Scripts (and SLURM requeue logic) can tell an interrupted run from a finished one.
        std::process::exit(130);
    }
    Ok(())
}
