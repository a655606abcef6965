//! Training examples from paths datasets: the best path of every sample whose search found one,
//! on the prompt as rendered during the search.

use std::collections::HashSet;
use std::path::PathBuf;

use drllm_dist::{read_manifest, read_rows, DatasetError};

/// Why the datasets cannot be used for training.
#[derive(Debug, thiserror::Error)]
pub enum TrainDataError {
    /// A dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Datasets of different models, or of another model than `--model`.
    #[error("{path}: made with model fingerprint {theirs}, but {what} has {ours}")]
    OtherModel {
        /// The dataset directory.
        path: PathBuf,
        /// Its model fingerprint.
        theirs: String,
        /// What it is compared with.
        what: String,
        /// That fingerprint.
        ours: String,
    },
    /// A row is not usable (e.g. its path has the wrong length).
    #[error("{path}: sample {sample_id} ({task}): {msg}")]
    BadRow {
        /// The dataset directory.
        path: PathBuf,
        /// Task of the row.
        task: String,
        /// Sample id of the row.
        sample_id: String,
        /// What is wrong.
        msg: String,
    },
    /// Nothing to train on.
    #[error("{0}")]
    Empty(String),
}

/// One teacher-forced example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Sample id.
    pub sample_id: String,
    /// Task.
    pub task: String,
    /// The prompt exactly as the search rendered it.
    pub prompt: String,
    /// Whether the prompt is tokenized with the tokenizer's special tokens (base style) or
    /// without (instruct style: the chat template already holds them).
    pub add_special: bool,
    /// The gold path: per block, 0 (skip), 1 (execute) or 2 (repeat).
    pub path: Vec<u8>,
}

/// The examples of one or more datasets.
#[derive(Debug, Clone)]
pub struct ExampleSet {
    /// Examples, sorted by (task, sample id); one per distinct prompt.
    pub examples: Vec<Example>,
    /// Blocks of the model.
    pub num_layers: usize,
    /// Model fingerprint shared by every dataset.
    pub model_fingerprint: String,
    /// Per dataset: (directory, rows, rows with a found path).
    pub sources: Vec<(PathBuf, usize, usize)>,
    /// Rows dropped because another row had the same prompt.
    pub duplicates: usize,
}

/// Reads the datasets `dirs`: all must come from the model with fingerprint `model_fingerprint`
/// and `num_layers` blocks. Keeps rows with a found path, one per prompt (the first by task and
/// sample id).
pub fn load_examples(
    dirs: &[PathBuf],
    model_fingerprint: &str,
    model_name: &str,
    num_layers: usize,
) -> Result<ExampleSet, TrainDataError> {
    let mut examples = vec![];
    let mut sources = vec![];
    for dir in dirs {
        let manifest = read_manifest(dir)?;
        if manifest.model_fingerprint != model_fingerprint {
            return Err(TrainDataError::OtherModel {
                path: dir.clone(),
                theirs: manifest.model_fingerprint,
                what: format!("--model ({model_name})"),
                ours: model_fingerprint.to_string(),
            });
        }
        let style = manifest
            .config
            .pointer("/run/style")
            .and_then(|s| s.as_str())
            .unwrap_or("instruct")
            .to_string();
        let rows = read_rows(dir)?;
        let n = rows.len();
        let mut found = 0;
        for r in rows {
            let bad = |msg: String| TrainDataError::BadRow {
                path: dir.clone(),
                task: r.task.clone(),
                sample_id: r.sample_id.clone(),
                msg,
            };
            if r.num_layers as usize != num_layers {
                return Err(bad(format!(
                    "searched on a model of {} blocks, this one has {num_layers}",
                    r.num_layers
                )));
            }
            if !r.found {
                continue;
            }
            let Some(path) = r.best_path.clone() else {
                return Err(bad("found is true but best_path is null".into()));
            };
            if path.len() != num_layers {
                return Err(bad(format!(
                    "best_path has {} entries, expected one per block ({num_layers})",
                    path.len()
                )));
            }
            if let Some(c) = path.iter().find(|&&c| c > 2) {
                return Err(bad(format!("best_path holds {c}; counts are 0, 1 or 2")));
            }
            if r.prompt.is_empty() {
                return Err(bad("the prompt is empty".into()));
            }
            found += 1;
            examples.push(Example {
                sample_id: r.sample_id,
                task: r.task,
                prompt: r.prompt,
                add_special: style == "base",
                path,
            });
        }
        sources.push((dir.clone(), n, found));
    }
    let total: usize = sources.iter().map(|s| s.1).sum();
    if examples.is_empty() {
        let listed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(TrainDataError::Empty(if total == 0 {
            format!("no rows in {}: run the search first", listed.join(", "))
        } else {
            format!(
                "none of the {total} rows in {} has a found path (every search kept the default \
                 path): nothing to train on; search more prompts or use a reward under which the \
                 model finds paths (lenient, choice-logits)",
                listed.join(", ")
            )
        }));
    }
    examples.sort_by(|a, b| (&a.task, &a.sample_id).cmp(&(&b.task, &b.sample_id)));
    let mut seen = HashSet::new();
    let before = examples.len();
    examples.retain(|e| seen.insert(e.prompt.clone()));
    Ok(ExampleSet {
        duplicates: before - examples.len(),
        examples,
        num_layers,
        model_fingerprint: model_fingerprint.to_string(),
        sources,
    })
}

/// Whether `sample_id` is in the validation split: a seeded hash of the id (stable across
/// runs, machines and dataset order) below `val_fraction`.
pub fn split_of(sample_id: &str, seed: u64, val_fraction: f64) -> bool {
    let h = drllm_search::sample_seed(seed, sample_id);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}
