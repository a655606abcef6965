//! `drllm-data`: dataset statistics, rendered prompts, answer grading and the grader benchmark.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drllm_tasks::{
    data, Family, Gold, LoadOptions, Question, RewardMode, Split, Style, TaskName, Template,
};

#[derive(Parser)]
#[command(
    name = "drllm-data",
    version,
    about = "Inspect the datasets, prompts and answer checking drllm uses.",
    after_help = "Examples:
  drllm-data stats
  drllm-data show --task arc_challenge --split dev --limit 3 --model embedded
  drllm-data grade --task dart-3 --response 'so \\boxed{0.5}' --gold '\\frac{1}{2}'
Run `drllm-data <command> --help` for each command's flags."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the data is.
#[derive(clap::Args)]
struct DataArg {
    /// Data directory (default: $DRLLM_DATA, else ../shared/data when present).
    #[arg(long, env = "DRLLM_DATA")]
    data: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// One line per task and split with its row count.
    #[command(
        after_help = "Examples:\n  drllm-data stats\n  drllm-data stats --data /datasets/drllm"
    )]
    Stats {
        #[command(flatten)]
        d: DataArg,
    },
    /// Rendered prompts and gold answers of a few samples.
    #[command(after_help = "Examples:
  drllm-data show --task arc_challenge --split dev --limit 3
  drllm-data show --task dart-3 --style base --limit 2
  drllm-data show --task arc_easy --model embedded        # with the model's chat template")]
    Show(ShowArgs),
    /// Grades one response against a gold answer.
    #[command(after_help = "Examples:
  drllm-data grade --task dart-3 --response 'so \\boxed{0.5}' --gold '\\frac{1}{2}'
  drllm-data grade --task arc_easy --response 'B. steam' --gold B --reward lenient
  drllm-data grade --task gsm8k --response 'She pays 1,200 dollars.' --gold 1200")]
    Grade {
        /// Task (decides the answer family).
        #[arg(long)]
        task: String,
        /// The model's response.
        #[arg(long)]
        response: String,
        /// The reference answer.
        #[arg(long)]
        gold: String,
        /// Multiple-choice reward mode: strict, lenient (choice-logits grades decoded text leniently).
        #[arg(long, default_value = "lenient")]
        reward: String,
        /// Style of the prompt the response answers (base math prompts open the \boxed{}).
        #[arg(long, default_value = "instruct")]
        style: String,
    },
    /// Rows parsed and graded per second over a whole task split (one core).
    #[command(after_help = "Examples:\n  drllm-data bench --task dart --split train")]
    Bench {
        #[command(flatten)]
        d: DataArg,
        /// Task.
        #[arg(long, default_value = "dart")]
        task: String,
        /// Split.
        #[arg(long, default_value = "train")]
        split: String,
        /// Passes over the data (medians reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
}

/// Options of `show`.
#[derive(clap::Args)]
struct ShowArgs {
    #[command(flatten)]
    d: DataArg,
    /// Task: arc_easy, arc_challenge, arc, dart-1..dart-5, dart, gsm8k.
    #[arg(long)]
    task: String,
    /// Split: train, dev (= validation), test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Samples to show.
    #[arg(long, default_value_t = 3)]
    limit: usize,
    /// Skip this many samples first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Shuffle with this seed before offset/limit.
    #[arg(long)]
    seed: Option<u64>,
    /// Prompt style: instruct, base, or auto (base for the cloze rewards, else instruct).
    #[arg(long, default_value = "auto")]
    style: String,
    /// Reward mode the prompts are rendered for: cloze and cloze-norm render the question alone
    /// (the choices are scored as its continuations, shown after it).
    #[arg(long, default_value = "cloze")]
    reward: String,
    /// Own template file (minijinja; sees question, choices, id, task).
    #[arg(long)]
    template: Option<PathBuf>,
    /// Apply this model's chat template to instruct prompts (dir, .gguf or `embedded`).
    #[arg(long)]
    model: Option<String>,
    /// Count and skip malformed rows instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
}

fn stats(d: DataArg) -> Result<()> {
    let dir = data::resolve_data_dir(d.data.as_deref())?;
    let mut found = 0;
    for split in [Split::Train, Split::Dev, Split::Test] {
        for task in TaskName::ALL.iter().copied().chain([TaskName::Dart(None)]) {
            match data::load(&dir, task, split, &LoadOptions::default()) {
                Ok(l) => {
                    found += 1;
                    println!("{task} {split} {}", l.samples.len())
                }
                Err(drllm_tasks::Error::MissingData(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if found == 0 {
        anyhow::bail!(
            "{}: no task data found. {}",
            dir.display(),
            data::DATA_LAYOUT
        );
    }
    Ok(())
}

fn gold_for(task: TaskName, gold: &str) -> Result<Gold> {
    Ok(match task.family() {
        Family::MultipleChoice => Gold::Letter(
            data::normalize_label(gold)
                .with_context(|| format!("--gold {gold:?}: expected a letter A-E or 1-5"))?,
        ),
        Family::Math => Gold::Math(gold.to_string()),
        Family::Gsm8k => Gold::Number(gold.replace(',', "")),
    })
}

fn show(a: ShowArgs) -> Result<()> {
    let dir = data::resolve_data_dir(a.d.data.as_deref())?;
    let task: TaskName = a.task.parse()?;
    let mode: RewardMode = a.reward.parse()?;
    let style = Style::resolve(&a.style, mode)?;
    let template = match &a.template {
        Some(p) => Template::from_file(p, style)?,
        None => Template::builtin_for(task.family(), style, mode),
    };
    let opts = LoadOptions {
        offset: a.offset,
        limit: Some(a.limit),
        shuffle_seed: a.seed,
        skip_bad_rows: a.skip_bad_rows,
    };
    let loaded = data::load(&dir, task, a.split.parse()?, &opts)?;
    let tokenizer = match &a.model {
        Some(m) => {
            let source = drllm_runtime::ModelSource::resolve(m)?;
            Some(match &source {
                drllm_runtime::ModelSource::HfDir(p) => drllm_runtime::Tokenizer::from_hf_dir(p)?,
                drllm_runtime::ModelSource::Gguf(p) => {
                    drllm_runtime::Tokenizer::from_gguf(&drllm_runtime::gguf::GgufFile::open(p)?)?
                }
            })
        }
        None => None,
    };
    for s in &loaded.samples {
        let mut prompt = template.render(s)?;
        if let (Some(tok), Style::Instruct) = (&tokenizer, style) {
            prompt = tok.apply_chat_template(&[drllm_runtime::Message::user(prompt)])?;
        }
        println!(
            "=== {} ({}{})",
            s.id,
            s.task,
            s.level.map(|l| format!(", level {l}")).unwrap_or_default()
        );
        println!("{prompt}");
        if let (true, drllm_tasks::Question::MultipleChoice { choices, .. }) =
            (mode.is_cloze(), &s.question)
        {
            for c in choices {
                println!(
                    "--- continuation {}: {:?}",
                    c.label,
                    template.cloze_continuation(c)
                );
            }
        }
        println!("--- gold: {}", s.gold);
    }
    if !loaded.bad_rows.is_empty() {
        eprintln!(
            "skipped {} malformed rows; first: {}",
            loaded.bad_rows.len(),
            loaded.bad_rows[0]
        );
    }
    Ok(())
}

fn grade(task: &str, response: &str, gold: &str, reward: &str, style: &str) -> Result<()> {
    let task: TaskName = task.parse()?;
    let mode: RewardMode = reward.parse()?;
    let template = Template::builtin(task.family(), style.parse()?);
    let gold = gold_for(task, gold)?;
    let text = template.graded_text(response);
    let r = drllm_tasks::reward(task.family(), &gold, mode, &text);
    println!("{}", if r == 1 { "correct" } else { "wrong" });
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(d: DataArg, task: &str, split: &str, repeats: usize) -> Result<()> {
    let dir = data::resolve_data_dir(d.data.as_deref())?;
    let task: TaskName = task.parse()?;
    let split: Split = split.parse()?;
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

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Stats { d } => stats(d),
        Cmd::Show(a) => show(a),
        Cmd::Grade {
            task,
            response,
            gold,
            reward,
            style,
        } => grade(&task, &response, &gold, &reward, &style),
        Cmd::Bench {
            d,
            task,
            split,
            repeats,
        } => bench(d, &task, &split, repeats),
    }
}
