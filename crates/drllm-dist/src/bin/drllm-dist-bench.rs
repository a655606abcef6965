//! `drllm-dist-bench`: coordinator overhead. Simulated workers that return instantly drive the
//! coordinator core (leases, validation, Parquet commits with fsync, manifest updates); the rate
//! of committed samples per second is what a cluster of real workers could never exceed.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use drllm_dist::{CoordinatorCore, Dataset, LeaseConfig, Outcome, PathRecord, WorkSample};

#[derive(Parser)]
#[command(
    name = "drllm-dist-bench",
    version,
    about = "Coordinator overhead: committed samples/s with instant simulated workers.",
    after_help = "Examples:
  drllm-dist-bench                                  # 1, 8 and 64 workers, 100k samples
  drllm-dist-bench --workers 8 --samples 20000 --part-rows 1000"
)]
struct Cli {
    /// Samples in the simulated run.
    #[arg(long, default_value_t = 100_000)]
    samples: usize,
    /// Simulated worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    workers: Vec<usize>,
    /// Samples per lease.
    #[arg(long, default_value_t = 8)]
    lease_samples: usize,
    /// Rows per Parquet part.
    #[arg(long, default_value_t = 2000)]
    part_rows: usize,
    /// Repeats per worker count (median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// The same run through the real gRPC service on loopback: every simulated worker is a client
/// task that registers, leases, and reports its rows in one RPC per lease.
fn run_grpc(a: &Cli, workers: usize) -> Result<f64> {
    use drllm_dist::proto::coordinator_client::CoordinatorClient;
    use drllm_dist::proto::{
        sample_result, LeaseRequest, RegisterRequest, ReportRequest, SampleResult, SearchRecord,
        PROTOCOL_VERSION,
    };
    use drllm_dist::run::{RunSpec, Running};
    use drllm_dist::server::ServiceConfig;
    use drllm_dist::supervisor::LocalWorkerSpec;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let ds = Dataset::open(dir.path(), "bench", serde_json::json!({}), false)?;
        let samples = work(a.samples);
        let rows: Vec<SearchRecord> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| SearchRecord::from(&record(s, i)))
            .collect();
        let rows = std::sync::Arc::new(rows);
        let cfg = LeaseConfig {
            samples_per_lease: a.lease_samples,
            timeout: Duration::from_secs(60),
            max_attempts: 3,
        };
        let core = CoordinatorCore::new(samples.clone(), ds, 30, cfg, a.part_rows);
        let scfg = ServiceConfig {
            token: None,
            model_fingerprint: "bench".into(),
            run_config_json: "{}".into(),
            heartbeat: Duration::from_secs(30),
            lease_timeout: Duration::from_secs(60),
            flush_every: Duration::from_secs(30),
        };
        let running = Running::start(RunSpec {
            core,
            samples,
            service: scfg,
            listen: "127.0.0.1:0".parse()?,
            workers: LocalWorkerSpec::default(),
            remote_workers: true,
        })
        .await?;
        let addr = running.addr();
        let start = Instant::now();
        let mut tasks = vec![];
        for w in 0..workers {
            let rows = rows.clone();
            let per = a.lease_samples as u32;
            tasks.push(tokio::spawn(async move {
                let mut c = CoordinatorClient::connect(format!("http://{addr}")).await?;
                let id = format!("w{w}");
                c.register(RegisterRequest {
                    worker_id: id.clone(),
                    device: "sim".into(),
                    model_fingerprint: "bench".into(),
                    code_version: String::new(),
                    protocol_version: PROTOCOL_VERSION,
                })
                .await?;
                loop {
                    let l = c
                        .lease(LeaseRequest {
                            worker_id: id.clone(),
                            max_samples: per,
                        })
                        .await?
                        .into_inner();
                    if l.done {
                        return anyhow::Ok(());
                    }
                    if l.items.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let results = l
                        .items
                        .iter()
                        .map(|it| SampleResult {
                            index: it.index,
                            outcome: Some(sample_result::Outcome::Record(
                                rows[it.index as usize].clone(),
                            )),
                        })
                        .collect();
                    c.report(ReportRequest {
                        worker_id: id.clone(),
                        lease_id: l.lease_id,
                        results,
                    })
                    .await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let secs = start.elapsed().as_secs_f64();
        let m = running.finish(std::future::pending()).await?.manifest;
        anyhow::ensure!(
            m.rows == a.samples && m.complete,
            "not every sample committed"
        );
        Ok(a.samples as f64 / secs)
    })
}

fn work(n: usize) -> Vec<WorkSample> {
    (0..n)
        .map(|i| WorkSample {
            task: if i.is_multiple_of(2) {
                "arc_easy"
            } else {
                "dart-1"
            }
            .into(),
            split: "train".into(),
            sample_id: format!("s{i:07}"),
        })
        .collect()
}

/// A row shaped like a real ARC search outcome on a 30-block model.
fn record(s: &WorkSample, i: usize) -> PathRecord {
    let found = !i.is_multiple_of(3);
    let mut counts = vec![1u8; 30];
    counts[i % 30] = 0;
    counts[(i + 7) % 30] = 0;
    let best = drllm_path::LayerPath::from_counts(counts).expect("counts 0 and 1");
    PathRecord {
        sample_id: s.sample_id.clone(),
        task: s.task.clone(),
        split: "train".into(),
        question: "Which of these is a renewable resource? (A) coal (B) wind (C) oil (D) gas".into(),
        answer: "B".into(),
        prompt: "<|im_start|>user\nAnswer with the letter of the correct choice...<|im_end|>\n<|im_start|>assistant\n".repeat(3),
        model: "SmolLM2-135M-Instruct".into(),
        num_layers: 30,
        default_correct: i.is_multiple_of(2),
        found,
        improved: false,
        good_paths: if found { vec![best.clone()] } else { vec![] },
        best_path: found.then_some(best),
        simulations: 50,
        evaluations: 40,
        search_ms: 5000,
        worker: "sim".into(),
        seed: i as u64,
        best_response: found.then(|| "B".into()),
    }
}

fn run(a: &Cli, workers: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let ds = Dataset::open(dir.path(), "bench", serde_json::json!({}), false)?;
    let samples = work(a.samples);
    let rows: Vec<PathRecord> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| record(s, i))
        .collect();
    let cfg = LeaseConfig {
        samples_per_lease: a.lease_samples,
        timeout: Duration::from_secs(60),
        max_attempts: 3,
    };
    let mut core = CoordinatorCore::new(samples, ds, 30, cfg, a.part_rows);
    let names: Vec<String> = (0..workers).map(|w| format!("w{w}")).collect();
    let start = Instant::now();
    // Every worker holds one lease at a time; they take turns (as the actor serializes them).
    let mut held: Vec<Option<drllm_dist::Lease>> = vec![None; workers];
    let mut rows = rows.into_iter().map(Some).collect::<Vec<_>>();
    while !core.is_done() {
        for (w, name) in names.iter().enumerate() {
            let now = start.elapsed();
            if let Some(l) = held[w].take() {
                for &i in &l.samples {
                    let r = rows[i].take().context("sample leased twice")?;
                    core.report(name, l.id, i, Outcome::Record(Box::new(r)))?;
                }
            }
            held[w] = core.lease(name, a.lease_samples, now);
        }
    }
    let m = core.finish()?;
    anyhow::ensure!(
        m.rows == a.samples && m.complete,
        "not every sample committed"
    );
    Ok(a.samples as f64 / start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let a = Cli::parse();
    println!(
        "{} samples, {} per lease, {} rows per part (zstd, fsync'd, manifest rewritten per part)",
        a.samples, a.lease_samples, a.part_rows
    );
    println!("| simulated workers | core only: samples/s | through gRPC on loopback: samples/s |");
    println!("| ---: | ---: | ---: |");
    let median = |f: &dyn Fn() -> Result<f64>| -> Result<f64> {
        let mut r: Vec<f64> = (0..a.repeats.max(1)).map(|_| f()).collect::<Result<_>>()?;
        r.sort_by(|x, y| x.total_cmp(y));
        Ok(r[r.len() / 2])
    };
    for &w in &a.workers {
        let core = median(&|| run(&a, w))?;
        let grpc = median(&|| run_grpc(&a, w))?;
        println!("| {w} | {core:.0} | {grpc:.0} |");
    }
    Ok(())
}
