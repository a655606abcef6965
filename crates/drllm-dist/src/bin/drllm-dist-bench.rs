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

/// A row shaped like a real ARC search outcome on a 30-block model.
fn record(s: &WorkSample, i: usize) -> PathRecord {
    let found = !i.is_multiple_of(3);
    let mut best = vec![1u8; 30];
    best[i % 30] = 0;
    best[(i + 7) % 30] = 0;
    let layers: Vec<u16> = best
        .iter()
        .enumerate()
        .flat_map(|(l, &c)| std::iter::repeat_n(l as u16, c as usize))
        .collect();
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
        best_path: found.then(|| best.clone()),
        best_cost: found.then_some(28),
        best_layers: found.then_some(layers),
        good_paths: if found { vec![best.clone()] } else { vec![] },
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
    let samples: Vec<WorkSample> = (0..a.samples)
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
        .collect();
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
    println!(
        "| simulated workers | committed samples/s (median of {}) |",
        a.repeats
    );
    println!("| ---: | ---: |");
    for &w in &a.workers {
        let mut rates: Vec<f64> = (0..a.repeats.max(1))
            .map(|_| run(&a, w))
            .collect::<Result<_>>()?;
        rates.sort_by(|x, y| x.total_cmp(y));
        println!("| {w} | {:.0} |", rates[rates.len() / 2]);
    }
    Ok(())
}
