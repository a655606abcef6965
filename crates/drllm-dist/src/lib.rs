//! drllm distribution: the coordinator's work bookkeeping and output. The lease table decides
//! which samples each worker searches, reissues the work of silent workers, and commits each
//! sample once; it is plain state driven by explicit timestamps, so one task (the coordinator's
//! actor) can own it and its logic is tested without clocks or sockets. The dataset writes the
//! committed results as hive-partitioned Parquet with a manifest, crash-safe and resumable.
#![warn(missing_docs)]

pub mod coordinator;
pub mod dataset;
pub mod lease;
pub mod proto;
pub mod server;
pub mod supervisor;

pub use coordinator::{CoordinatorCore, CoordinatorCounts, Outcome, ReportError, WorkSample};
pub use dataset::{
    read_manifest, read_rows, Dataset, DatasetError, FailedSample, Manifest, PathRecord,
};
pub use lease::{Accept, Counts, Lease, LeaseConfig, LeaseError, LeaseTable};
