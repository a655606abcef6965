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
