//! A row: one sample's search outcome, and the checks it must pass.

use drllm_path::{LayerPath, PathError};
use serde::{Deserialize, Serialize};

/// Why a row cannot be committed: it does not fit the model it claims, or its fields disagree.
/// Shared by every place a row arrives from outside (a worker's report, a Parquet part).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// The row's `num_layers` is not the model's depth.
    #[error("num_layers {stored} but the model has {model}")]
    NumLayers {
        /// What the row says.
        stored: u16,
        /// Blocks of the model.
        model: usize,
    },
    /// A wire row's `num_layers` does not fit the dataset's `uint16` column.
    #[error("num_layers {0} is out of range")]
    NumLayersOutOfRange(u32),
    /// A path has another length than the model's depth.
    #[error("{what} has {got} counts, expected {want}")]
    PathLength {
        /// Which path (`best_path`, `a good path`).
        what: &'static str,
        /// Its counts.
        got: usize,
        /// Blocks of the model.
        want: usize,
    },
    /// A count does not fit a byte (wire rows carry them as `u32`).
    #[error("{what} has count {count}; counts must be 0, 1 or 2")]
    Count {
        /// Which path.
        what: &'static str,
        /// The count sent.
        count: u32,
    },
    /// A path breaks the path rules (a count above 2, an empty path).
    #[error("{what}: {source}")]
    Path {
        /// Which path.
        what: &'static str,
        /// The rule it breaks.
        source: PathError,
    },
    /// The row says a path was found but holds none.
    #[error("found or improved is true but best_path is null")]
    MissingBestPath,
    /// The stated `best_cost` disagrees with `best_path`.
    #[error("best_cost {stated:?} does not match best_path (cost {actual:?})")]
    Cost {
        /// What the row states.
        stated: Option<u32>,
        /// The cost of its best path.
        actual: Option<u32>,
    },
}

/// One sample's search outcome: a row of the dataset (columns documented in docs/dataset.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathRecord {
    /// Sample id (unique within its task).
    pub sample_id: String,
    /// Task name (also the hive partition).
    pub task: String,
    /// Split.
    pub split: String,
    /// Question text as in the source data.
    pub question: String,
    /// Reference answer.
    pub answer: String,
    /// The prompt exactly as the model saw it (template and chat template applied).
    pub prompt: String,
    /// Model name.
    pub model: String,
    /// Blocks of the model (length of every path).
    pub num_layers: u16,
    /// Whether the default path answers correctly.
    pub default_correct: bool,
    /// Whether a good path was found.
    pub found: bool,
    /// Whether the default path was wrong and a found path is right.
    pub improved: bool,
    /// Best path (stored as its count per block: 0 skip, 1 execute, 2 repeat; with its cost
    /// and executed layers as the `best_cost` and `best_layers` columns); `None` if none found.
    pub best_path: Option<LayerPath>,
    /// Every good path found, best first.
    pub good_paths: Vec<LayerPath>,
    /// Simulations run.
    pub simulations: u32,
    /// Distinct path evaluations.
    pub evaluations: u32,
    /// Search wall time.
    pub search_ms: u64,
    /// Worker that searched the sample.
    pub worker: String,
    /// The sample's search seed.
    pub seed: u64,
    /// The model's response along the best path (up to the decision point), if found.
    pub best_response: Option<String>,
}

impl PathRecord {
    /// Block applications of the best path (the `best_cost` column).
    pub fn best_cost(&self) -> Option<u32> {
        self.best_path.as_ref().map(|p| p.cost() as u32)
    }

    /// The best path as the executed layer indices in order (the `best_layers` column).
    pub fn best_layers(&self) -> Option<Vec<u16>> {
        self.best_path
            .as_ref()
            .map(|p| p.layer_list().iter().map(|&l| l as u16).collect())
    }

    /// Checks the row against the model's depth: `num_layers` equal to it, every path of that
    /// many blocks, and a best path whenever the row says one was found. (Counts are valid by
    /// construction of [`LayerPath`].)
    pub fn validate(&self, num_layers: usize) -> std::result::Result<(), RowError> {
        if self.num_layers as usize != num_layers {
            return Err(RowError::NumLayers {
                stored: self.num_layers,
                model: num_layers,
            });
        }
        let check = |what: &'static str, p: &LayerPath| {
            if p.num_layers() != num_layers {
                return Err(RowError::PathLength {
                    what,
                    got: p.num_layers(),
                    want: num_layers,
                });
            }
            Ok(())
        };
        for p in &self.good_paths {
            check("a good path", p)?;
        }
        match &self.best_path {
            Some(p) => check("best_path", p),
            None if self.found || self.improved => Err(RowError::MissingBestPath),
            None => Ok(()),
        }
    }
}
