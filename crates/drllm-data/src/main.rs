//! `drllm-data`: dataset statistics, rendered prompts, answer grading and paths-dataset
//! verification (the grader benchmark is `drllm-data-bench`).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drllm_cli::{reward_parser, split_parser, task_parser, DataDirArgs, LogArgs};
use drllm_tasks::{data, Family, Gold, LoadOptions, RewardMode, Split, Style, TaskName, Template};

#[derive(Parser)]
#[command(
    name = "drllm-data",
    version,
    about = "Inspect the datasets, prompts and answer checking drllm uses.",
    after_help = "Examples:
  drllm-data stats
  drllm-data show --task arc_challenge --split dev --limit 3 --model embedded
  drllm-data grade --task dart-3 --response 'so \\boxed{0.5}' --gold '\\frac{1}{2}'
  drllm-data verify runs/arc-paths
Run `drllm-data <command> --help` for each command's flags."
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One line per task and split with its row count.
    #[command(
        after_help = "Examples:\n  drllm-data stats\n  drllm-data stats --data /datasets/drllm"
    )]
    Stats {
        #[command(flatten)]
        d: DataDirArgs,
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
        #[arg(long, value_parser = task_parser())]
        task: TaskName,
        /// The model's response.
        #[arg(long)]
        response: String,
        /// The reference answer.
        #[arg(long)]
        gold: String,
        /// Multiple-choice reward mode of the decoded text: strict or lenient (the others grade
        /// decoded text leniently).
        #[arg(long, default_value = "lenient", value_parser = reward_parser())]
        reward: RewardMode,
        /// Style of the prompt the response answers (base math prompts open the \boxed{}).
        #[arg(long, default_value = "instruct")]
        style: String,
    },
    /// Checks a paths dataset (a coordinator's OUT) against its checksums: the manifest, every
    /// part byte for byte and value for value, unique sample ids, no unlisted parts. Exits 1
    /// naming each problem (after copying a dataset between filesystems, say).
    #[command(after_help = "Examples:
  drllm-data verify runs/arc-paths
  drllm-data verify /scratch/$USER/paths && rsync -a /scratch/$USER/paths/ ~/paths/ && drllm-data verify ~/paths")]
    Verify {
        /// The dataset directory (holding _manifest.json).
        out: PathBuf,
    },
}

/// Options of `show`.
#[derive(clap::Args)]
struct ShowArgs {
    #[command(flatten)]
    d: DataDirArgs,
    /// Task.
    #[arg(long, value_parser = task_parser())]
    task: TaskName,
    /// Split.
    #[arg(long, default_value = "train", value_parser = split_parser())]
    split: Split,
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
    #[arg(long, default_value = "cloze", value_parser = reward_parser())]
    reward: RewardMode,
    /// Own template file (minijinja; sees question, choices, id, task).
    #[arg(long)]
    template: Option<PathBuf>,
    /// Apply this model's chat template to instruct prompts (dir, .gguf or `embedded`).
    #[arg(long)]
    model: Option<String>,
    /// Count and skip malformed rows instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Keep the first of rows sharing a sample id instead of failing.
    #[arg(long)]
    skip_duplicate_ids: bool,
}

fn stats(d: DataDirArgs) -> Result<()> {
    let dir = d.dir()?;
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
    let dir = a.d.dir()?;
    let (task, mode) = (a.task, a.reward);
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
        skip_duplicate_ids: a.skip_duplicate_ids,
    };
    let loaded = data::load(&dir, task, a.split, &opts)?;
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

fn grade(task: TaskName, response: &str, gold: &str, mode: RewardMode, style: &str) -> Result<()> {
    let template = Template::builtin(task.family(), style.parse()?);
    let gold = gold_for(task, gold)?;
    let text = template.graded_text(response);
    let r = drllm_tasks::reward(task.family(), &gold, mode, &text);
    println!("{}", if r == 1 { "correct" } else { "wrong" });
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("warn");
    match cli.cmd {
        Cmd::Stats { d } => stats(d),
        Cmd::Show(a) => show(a),
        Cmd::Grade {
            task,
            response,
            gold,
            reward,
            style,
        } => grade(task, &response, &gold, reward, &style),
        Cmd::Verify { out } => verify(&out),
    }
}

fn verify(out: &std::path::Path) -> Result<()> {
    let r = drllm_dataset::verify(out).with_context(|| format!("verifying {}", out.display()))?;
    println!(
        "{}: {} parts ({} verified, {} written before checksums and readable only), {} rows",
        out.display(),
        r.parts,
        r.verified,
        r.unverified,
        r.rows
    );
    if r.problems.is_empty() {
        println!("intact");
        return Ok(());
    }
    for p in &r.problems {
        eprintln!("{p}");
    }
    anyhow::bail!("{}: {} problem(s) found", out.display(), r.problems.len())
}
