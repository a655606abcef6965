//! Router training (stage 2 of drllm): the paths datasets written by `drllm-coordinator` become
//! teacher-forced examples; the frozen model runs once per example to pool the hidden state
//! entering every block (cached on disk); the routers are then fitted on those cached features
//! alone, and written as a router package (`drllm-router`).
#![warn(missing_docs)]

pub mod distill;
pub mod distill_run;
pub mod examples;
pub mod features;
pub mod margin;
pub mod metrics;
pub mod pipeline;
pub mod trainer;
pub mod validate;

pub use distill::{distill, DistillConfig, DistillEpoch, Distilled};
pub use examples::{
    load_examples, split_of, Example, ExampleSet, LabelMix, RowKind, SourceInfo, TrainDataError,
};
pub use features::{extract_features, FeatureCache, Features};
pub use margin::{relabel_by_margin, MarginCache, MarginRule, Relabelled};
pub use metrics::Confusion;
pub use trainer::{best_epoch, train, Select, TrainConfig, TrainError, Trained};
pub use validate::{prepare_examples, RoutedValidation};
