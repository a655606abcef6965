//! What search, training and routed eval share about answering a task prompt along a layer
//! path: preparing the prompt ([`prepare`]), scoring candidates in batches with prefix sharing
//! and early decision ([`evaluate_batch`]), answering along one path per prompt
//! ([`answer_batch`]), and the typed [`RunConfig`] that fixes how all of it is done for a run.
//! Kept out of the search worker so inference and training link no gRPC; the search crate comes
//! along only for `SearchConfig` in the run configuration (it has no libtorch or I/O).
#![warn(missing_docs)]

pub mod config;
pub mod evaluate;
pub mod prompt;
pub mod stats;

pub use config::RunConfig;
pub use evaluate::{
    answer_batch, decision_point, evaluate_alone, evaluate_batch, grade_generation, score_forward,
    Answer, Evaluation, PathChoice,
};
pub use prompt::{prepare, EvalError, EvalOptions, PreparedPrompt, Scoring};
