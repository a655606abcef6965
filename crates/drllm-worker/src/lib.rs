//! drllm search worker: many concurrent searches (drllm's MCTS, or any `PathSearch`) feeding
//! the batched path evaluator of `drllm-eval`. `drllm-worker --standalone` runs it in one process; the coordinator
//! (distributed search) drives the same engine through [`remote`].
#![warn(missing_docs)]

pub mod driver;
pub mod record;
pub mod remote;

pub use driver::{
    drive, drive_with, run_feed, run_searches, DriverOptions, Evaluator, Feed, ModelEvaluator,
    RewardFn, RunStats, SampleOutcome,
};
pub use record::{path_record, question_text, row, RowModel};
pub use remote::{run_remote, run_remote_with, RemoteOptions, RemoteSummary, WorkerModel};
