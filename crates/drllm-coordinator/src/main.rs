//! `drllm-coordinator`: loads and checks the task list, serves leases over gRPC to local workers
//! it spawns (`--workers N`) and remote ones (`--listen`), commits results to the Parquet paths
//! dataset in OUT, and shows progress. Re-running with the same OUT resumes.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use drllm_cli::{DataArgs, LogArgs, SearchArgs};
use drllm_dist::server::{bind, serve, spawn_actor, Service, ServiceConfig};
use drllm_dist::supervisor::{LocalWorkerSpec, LocalWorkers};
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
    /// Model: HF directory, .gguf file, `embedded`, or a cached repo id (workers load the same).
    #[arg(long, env = "DRLLM_MODEL", default_value = "embedded")]
    model: String,
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
    let source = ModelSource::resolve(&a.model)?;
    let fingerprint = source.fingerprint()?;
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
    let dataset = Dataset::open(&a.out, &fingerprint, config, a.force)?;
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
    let svc_cfg = ServiceConfig {
        token: a.token.clone(),
        model_fingerprint: fingerprint,
        run_config_json: serde_json::to_string(&run)?,
        heartbeat: Duration::from_secs((a.lease_timeout_s / 4).max(1)),
        lease_timeout: Duration::from_secs(a.lease_timeout_s.max(1)),
        flush_every: Duration::from_secs(a.flush_s.max(1)),
    };
    let (handle, actor) = spawn_actor(core, &svc_cfg);
    let (listener, addr) = bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = Service::new(handle.clone(), svc_cfg, samples);
    let farewell = service.farewell();
    let server = tokio::spawn(serve(service, listener, async {
        let _ = stop_rx.await;
    }));
    tracing::info!(%addr, "serving");

    // Local workers: one per GPU, else the CPU cores split between them.
    let exe = std::env::current_exe()?;
    let mut children = LocalWorkers::spawn(&LocalWorkerSpec {
        bin: exe
            .parent()
            .map(|d| d.join("drllm-worker"))
            .context("locating drllm-worker")?,
        count: workers,
        device: a.worker_device.clone(),
        addr,
        model: a.model.clone(),
        data_dir: dir.clone(),
        concurrency: a.concurrency,
        prefix_cache_mb: a.prefix_cache_mb,
        token: a.token.clone(),
        logs: a.out.join("_logs"),
        log_json: a.log.log_json,
    })?;

    // Progress until every sample has an outcome, Ctrl-C, or a fatal dataset error.
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = indicatif::MultiProgress::new();
    let bar = multi.add(
        indicatif::ProgressBar::new(total as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} samples [{elapsed} < {eta}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        ),
    );
    if !interactive {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut worker_lines: HashMap<String, indicatif::ProgressBar> = HashMap::new();
    let mut progress = handle.progress();
    let started = Instant::now();
    let base = already.committed + already.failed;
    let mut last_log = Instant::now();
    let mut interrupted = false;
    // Ctrl-C, `kill`, and SLURM's warning before preemption or the time limit all stop the run
    // the same way: accepted rows are committed, and running again resumes.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        let p = progress.borrow_and_update().clone();
        if let Some(e) = &p.fatal {
            bar.abandon();
            let _ = stop_tx.send(());
            drop(handle);
            let _ = actor.await;
            bail!("the run stopped: {e} (everything committed before is kept)");
        }
        let c = p.counts.lease;
        let done = c.committed + c.failed;
        bar.set_position(done as u64);
        let secs = started.elapsed().as_secs_f64();
        let rate = (done - base.min(done)) as f64 / secs.max(1e-9);
        let found_rate = p.counts.found as f64 / (c.committed - already.committed).max(1) as f64;
        bar.set_message(format!(
            "{rate:.2} samples/s, found {:.0}%, failed {}, leased {}, refused {}",
            100.0 * found_rate,
            c.failed,
            c.leased,
            p.counts.refused
        ));
        for (w, n) in &p.per_worker {
            let line = worker_lines.entry(w.clone()).or_insert_with(|| {
                let pb = multi.add(indicatif::ProgressBar::new_spinner());
                if !interactive {
                    pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                }
                pb
            });
            line.set_message(format!("{w}: {n} samples"));
        }
        if !interactive && last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            tracing::info!(
                done,
                total,
                failed = c.failed,
                rate = format!("{rate:.2}"),
                workers = p.workers,
                "progress"
            );
        }
        if handle.is_done().await {
            break;
        }
        for (id, status) in children.newly_exited() {
            tracing::warn!(worker = %id, %status, log = %children.log_of(&id).display(), "local worker exited");
            handle.worker_gone(&id).await;
            farewell.gone(&id);
        }
        if children.all_exited() && a.listen.ip().is_loopback() {
            bar.abandon();
            let _ = stop_tx.send(());
            drop(handle);
            let _ = actor.await;
            bail!(
                "every local worker exited before the run finished; see the logs in {}",
                children.logs().display()
            );
        }
        tokio::select! {
            _ = progress.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = sigint.recv() => {
                interrupted = true;
                break;
            }
            _ = sigterm.recv() => {
                interrupted = true;
                break;
            }
        }
    }
    bar.finish();
    if !interrupted {
        // Keep serving until every registered worker has heard that the run is over (a worker
        // busy on a lease whose samples others finished asks once it is done), then stop.
        let deadline = Instant::now() + Duration::from_secs(a.lease_timeout_s.clamp(10, 120));
        while !farewell.all_told() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        children.wait(deadline).await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    drop(handle);
    drop(children);
    let manifest = actor.await.context("the coordinator task panicked")??;
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
        started.elapsed().as_secs_f64(),
        manifest.failed.len(),
        a.out.join("data").display()
    );
    if interrupted {
        // Scripts (and SLURM requeue logic) can tell an interrupted run from a finished one.
        std::process::exit(130);
    }
    Ok(())
}
