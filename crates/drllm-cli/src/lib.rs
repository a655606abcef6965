//! The command-line layer every drllm binary shares, so a flag means the same thing, with the
//! same environment fallback, wherever it appears: which model to load ([`ModelArgs`]), which
//! task prompts to read ([`DataArgs`]), how to log ([`LogArgs`]), how to search and score
//! ([`SearchArgs`]), and the progress bar of long loops. Binaries flatten these and stay thin.
#![warn(missing_docs)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use drllm_runtime::{parse_dtype, resolve_device, LoadedModel, ModelSource};
use drllm_tasks::{data, LoadOptions, Loaded, Split, TaskName};

mod numbers;
mod search;

pub use numbers::{fraction_below_one, number_in, positive_up_to, threads_parser};
pub use search::{reward_parser, SearchArgs};

/// Which model to load, where, and in which dtype.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face model directory, a .gguf file, `embedded` (SmolLM2-135M-Instruct,
    /// installed by scripts/setup.sh), or a repo id `org/name[/FILE.gguf][@revision]` from the
    /// Hugging Face cache (HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME, as huggingface_hub finds
    /// it), downloaded into it from the hub (HF_ENDPOINT, HF_TOKEN) when absent unless
    /// HF_HUB_OFFLINE=1.
    #[arg(long, env = "DRLLM_MODEL", default_value = "embedded")]
    pub model: String,
    /// Revision (branch, tag or commit hash) of a repo id `--model` (default main).
    #[arg(long, env = "DRLLM_REVISION")]
    pub revision: Option<String>,
    /// cpu, cuda or cuda:N; `auto` picks the first GPU when one is visible.
    #[arg(long, env = "DRLLM_DEVICE", default_value = "auto")]
    pub device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, env = "DRLLM_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// CPU threads for libtorch (default: libtorch's choice), at most the CPUs this process
    /// may use.
    #[arg(long, env = "DRLLM_THREADS", value_parser = threads_parser())]
    pub threads: Option<i32>,
}

impl ModelArgs {
    /// The model the flags name, resolved (not loaded): for fingerprints and early checks.
    pub fn source(&self) -> Result<ModelSource> {
        Ok(ModelSource::resolve(&self.spec()?)?)
    }

    /// `--model` with `--revision` attached (`org/name@REV`): the spec other processes resolve.
    pub fn spec(&self) -> Result<String> {
        Ok(drllm_runtime::loader::with_revision(
            &self.model,
            self.revision.as_deref(),
        )?)
    }

    /// Applies the thread setting, then loads model and tokenizer on the chosen device.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_source(self.source()?)
    }

    /// The device and dtype the flags name, checked (before anything slow: a typo fails fast).
    pub fn device_and_kind(&self) -> Result<(tch::Device, tch::Kind)> {
        let device = resolve_device(&self.device)?;
        Ok((device, parse_dtype(&self.dtype, device)?))
    }

    /// [`ModelArgs::load`] of an already resolved source.
    pub fn load_source(&self, source: ModelSource) -> Result<LoadedModel> {
        drllm_runtime::set_threads(self.threads)?;
        let (device, kind) = self.device_and_kind()?;
        let t0 = Instant::now();
        let lm = LoadedModel::load(source, device, kind)
            .with_context(|| format!("loading model {}", self.model))?;
        tracing::info!(model = %self.model, layers = lm.model.num_layers(), ?device, ?kind,
            secs = t0.elapsed().as_secs_f64(), "model loaded");
        Ok(lm)
    }
}

/// The parser of task names: `--help` lists [`TaskName::NAMES`], so no help text keeps its own
/// copy of the list.
pub fn task_parser() -> impl TypedValueParser<Value = TaskName> {
    PossibleValuesParser::new(TaskName::NAMES).try_map(|s| s.parse::<TaskName>())
}

/// The parser of split names (`validation` and `val` are `dev`).
pub fn split_parser() -> impl TypedValueParser<Value = Split> {
    PossibleValuesParser::new(["train", "dev", "validation", "val", "test"])
        .try_map(|s| s.parse::<Split>())
}

/// The data directory, for commands that choose their own tasks (flattened into [`DataArgs`]).
#[derive(clap::Args, Debug, Clone)]
pub struct DataDirArgs {
    /// Data directory (default $DRLLM_DATA, else ../shared/data): AI2 ARC, MATH / DART-Math and
    /// GSM8K as jsonl or Hugging Face parquet (README, "Data, prompts and grading").
    #[arg(long, env = "DRLLM_DATA")]
    pub data: Option<PathBuf>,
}

impl DataDirArgs {
    /// The data directory the flag (or `DRLLM_DATA`, or the default) names; refused when missing.
    pub fn dir(&self) -> Result<PathBuf> {
        Ok(data::resolve_data_dir(self.data.as_deref())?)
    }
}

/// Which task prompts to read: data directory, tasks, split and the slice of each task. Binaries
/// change a default with `#[command(mut_arg("split", |a| a.default_value("dev")))]`.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// The data directory.
    #[command(flatten)]
    pub data_dir: DataDirArgs,
    /// Tasks, comma separated (`arc` = both ARC sets, `dart` = every MATH level).
    #[arg(long, env = "DRLLM_DATASET", value_delimiter = ',', value_parser = task_parser())]
    pub dataset: Vec<TaskName>,
    /// Split.
    #[arg(long, env = "DRLLM_SPLIT", default_value = "train", value_parser = split_parser())]
    pub split: Split,
    /// Samples per task (after --offset); a composite task (`arc`, `dart`) takes this many of
    /// each of its parts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Keep the first of task-data rows that share a sample id (and warn) instead of refusing
    /// the data: ids name samples in the paths dataset, so each must be unique per task.
    #[arg(long, env = "DRLLM_SKIP_DUPLICATE_IDS")]
    pub skip_duplicate_ids: bool,
    /// Skip this many samples of each task (of each part of a composite) first.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
}

impl DataArgs {
    /// The data directory the flags (or `DRLLM_DATA`, or the default) name; refused when missing.
    pub fn dir(&self) -> Result<PathBuf> {
        self.data_dir.dir()
    }

    /// Reads every named task's slice from `dir`, in the order named; an unreadable row stops
    /// here, naming its file and line.
    pub fn load(&self, dir: &std::path::Path) -> Result<Vec<(TaskName, Loaded)>> {
        anyhow::ensure!(
            !self.dataset.is_empty(),
            "--dataset: name at least one task"
        );
        self.dataset
            .iter()
            .map(|&task| {
                let opts = LoadOptions {
                    offset: self.offset,
                    limit: self.limit,
                    skip_duplicate_ids: self.skip_duplicate_ids,
                    ..Default::default()
                };
                let loaded = data::load(dir, task, self.split, &opts)
                    .with_context(|| format!("loading {task}/{}", self.split))?;
                for d in &loaded.duplicates {
                    tracing::warn!("{d}: skipped (--skip-duplicate-ids)");
                }
                Ok((task, loaded))
            })
            .collect()
    }
}

/// Logging: human-readable lines on stderr, or JSON lines for cluster log scrapers.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log as JSON lines (for SLURM log scraping). The filter comes from DRLLM_LOG, else
    /// RUST_LOG (e.g. `info`, `drllm_worker=debug`).
    #[arg(long, global = true, env = "DRLLM_LOG_JSON")]
    pub log_json: bool,
}

impl LogArgs {
    /// Installs the global subscriber; `default` is the filter when neither variable is set.
    pub fn init(&self, default: &str) {
        let filter = ["DRLLM_LOG", "RUST_LOG"]
            .iter()
            .find_map(|v| tracing_subscriber::EnvFilter::try_from_env(v).ok())
            .unwrap_or_else(|| default.into());
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        if self.log_json {
            b.json().init();
        } else {
            b.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
        }
    }
}

/// The progress bar of the long loops in drllm's binaries (bar, count, elapsed < ETA, message),
/// drawn only when stderr is a terminal so logs and tests stay clean.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}] {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    #[command(mut_arg("split", |a| a.default_value("dev")))]
    struct Eval {
        #[command(flatten)]
        d: DataArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn tasks_and_splits_parse_to_their_types() {
        let e =
            Eval::try_parse_from(["x", "--dataset", "arc_easy,dart-3", "--split", "validation"])
                .unwrap();
        assert_eq!(e.d.dataset, [TaskName::ArcEasy, TaskName::Dart(Some(3))]);
        assert_eq!(e.d.split, Split::Dev);
        let err = Eval::try_parse_from(["x", "--dataset", "arc_hard"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("arc_hard") && err.contains("arc_challenge"),
            "{err}"
        );
    }

    #[test]
    fn a_binary_changes_a_default_with_mut_arg() {
        let e = Eval::try_parse_from(["x", "--dataset", "gsm8k"]).unwrap();
        assert_eq!(e.d.split, Split::Dev);
        assert!(!e.log.log_json);
    }

    #[test]
    fn loading_needs_a_task() {
        let e = Eval::try_parse_from(["x"]).unwrap();
        let err = e.d.load(std::path::Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("--dataset"), "{err}");
    }
}
