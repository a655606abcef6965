//! drllm search worker: batched path evaluation on the model runtime and many concurrent MCTS
//! searches feeding it. `drllm-worker --standalone` runs it in one process; the coordinator
//! (distributed search) drives the same engine.
#![warn(missing_docs)]

pub mod config;
pub mod driver;
pub mod eval;
pub mod record;
pub mod remote;

pub use config::{RunConfig, SearchArgs};
pub use driver::{run_feed, run_searches, DriverOptions, Feed, RunStats, SampleOutcome};
pub use eval::{
    answer_batch, decision_point, evaluate_alone, evaluate_batch, grade_generation, prepare,
    score_forward, Answer, EvalError, EvalOptions, Evaluation, PathChoice, PreparedPrompt, Scoring,
};
pub use record::{path_record, question_text};
