//! drllm tasks: dataset readers (ARC, DART/MATH, GSM8K), prompt templates and answer checking
//! that turns model output into a 0/1 reward, with early decisions on partial output. No
//! libtorch dependency: usable by the coordinator, the search and tools alike.
#![warn(missing_docs)]

pub mod answer;
pub mod data;
pub mod error;
pub mod grade;
pub mod prompt;

pub use data::{
    load, resolve_data_dir, Choice, Family, Gold, LoadOptions, Loaded, Question, Sample, Split,
    TaskName,
};
pub use error::{Error, Result};
pub use grade::{
    choice_logits_correct, cloze_margin, cloze_pick, decide, reward, RewardMode, Verdict,
};
pub use prompt::{add_special_tokens, Style, Template};
