//! The routers of dynamic layer routing: one small MLP per transformer block that reads the
//! windowed mean-pooled hidden state entering its block and chooses skip (0), execute (1) or
//! repeat (2). Training (`drllm-train`) and inference (`drllm-infer`) share this crate, so the
//! features a router sees at inference are pooled exactly as in training, and a package written
//! by one is read by the other.
#![warn(missing_docs)]

pub mod embedded;
pub mod package;
pub mod pool;
pub mod router;

pub use package::{
    EpochMetrics, Package, PackageError, PackageManifest, PromptSpec, TemplateSpec, FORMAT_VERSION,
};
pub use pool::{pool_weights, pool_windows, window_bounds};
pub use router::{budget_bias, budget_shift, BudgetError, Policy, RouterShape, Routers, CLASSES};
