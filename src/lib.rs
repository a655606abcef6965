//! drllm: dynamic layer routing for LLMs. The workspace crates do the work; this package holds the end-to-end tests.
pub use drllm_dataset as dataset;
pub use drllm_dist as dist;
pub use drllm_eval as eval;
pub use drllm_runtime as runtime;
pub use drllm_search as search;
pub use drllm_tasks as tasks;
