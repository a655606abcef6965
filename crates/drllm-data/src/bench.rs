//! `drllm-data-bench`: rows parsed and answers graded per second over a whole task split.
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use drllm_cli::{split_parser, task_parser, DataDirArgs, LogArgs};
use drllm_tasks::{data, LoadOptions, Question, RewardMode, Split, TaskName};

#[derive(Parser)]
#[command(
    name = "drllm-data-bench",
    version,
    about = "Rows parsed and graded per second over a whole task split (one core).",
    after_help = "Examples:
  drllm-data-bench --task dart --split train
  drllm-data-bench --task arc --split dev --repeats 9"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    d: DataDirArgs,
    /// Task.
    #[arg(long, default_value = "dart", value_parser = task_parser())]
    task: TaskName,
    /// Split.
    #[arg(long, default_value = "train", value_parser = split_parser())]
    split: Split,
    /// Passes over the data (medians reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let Cli {
        log,
        d,
        task,
        split,
        repeats,
    } = Cli::parse();
    log.init("warn");
    let dir = d.dir()?;
    let (mut parse_rates, mut grade_rates) = (vec![], vec![]);
    let mut rows = 0;
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        let loaded = data::load(&dir, task, split, &LoadOptions::default())?;
        parse_rates.push(loaded.samples.len() as f64 / t0.elapsed().as_secs_f64());
        rows = loaded.samples.len();
        // Grade a typical instruct response for every row: its own gold, boxed.
        let responses: Vec<String> = loaded
            .samples
            .iter()
            .map(|s| match (&s.question, &s.gold) {
                (Question::MultipleChoice { .. }, g) => format!("{g}. because"),
                (_, g) => format!("The answer is \\boxed{{{g}}}."),
            })
            .collect();
        let t1 = Instant::now();
        let mut correct = 0usize;
        for (s, r) in loaded.samples.iter().zip(&responses) {
            correct +=
                drllm_tasks::reward(s.task.family(), &s.gold, RewardMode::Lenient, r) as usize;
        }
        grade_rates.push(rows as f64 / t1.elapsed().as_secs_f64());
        // Rows with an empty reference (a source defect) can never be graded correct.
        let gradable = loaded
            .samples
            .iter()
            .filter(|s| !s.gold.to_string().is_empty())
            .count();
        anyhow::ensure!(
            correct == gradable,
            "{} of {gradable} gold answers did not grade equal to themselves",
            gradable - correct
        );
    }
    println!("{task} {split}: {rows} rows; parse {:.0} rows/s, grade {:.0} grades/s (medians of {repeats}, one thread)", median(parse_rates), median(grade_rates));
    Ok(())
}
