//! drllm distribution: the coordinator's work bookkeeping and output. The lease table decides
//! which samples each worker searches, reissues the work of silent workers, and commits each
//! sample once; it is plain state driven by explicit timestamps, so one task (the coordinator's
//! actor) can own it and its logic is tested without clocks or sockets. Committed results go to
//! the paths dataset (crate `drllm-dataset`); the gRPC service and the local worker supervisor
//! live here, and [`run`] ties them into one coordinator run.
#![warn(missing_docs)]

pub mod coordinator;
pub mod lease;
pub mod proto;
pub mod run;
pub mod server;
pub mod supervisor;

pub use coordinator::{CoordinatorCore, CoordinatorCounts, Outcome, ReportError, WorkSample};
/// The paths dataset (its own crate, so readers of Parquet need no gRPC).
pub use drllm_dataset as dataset;
pub use drllm_dataset::{
    read_manifest, read_rows, Dataset, DatasetError, FailedSample, Manifest, PathRecord,
};
pub use lease::{Accept, Counts, Lease, LeaseConfig, LeaseError, LeaseTable};
