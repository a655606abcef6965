//! What can go wrong with a dataset, each error naming its file.
use std::path::{Path, PathBuf};

/// Errors of reading or writing a dataset; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A filesystem operation failed (disk full, permissions, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A Parquet file could not be written or read.
    #[error("{path}: {msg}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// The manifest is unreadable or from a newer format.
    #[error("{path}: {msg}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Another process (a coordinator) holds OUT.
    #[error("{path}: the output directory is in use by {holder}; wait for it to finish, stop it, or use another output directory")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as it wrote itself into the lock file (pid, host, start time).
        holder: String,
    },
    /// A committed part the manifest does not list cannot belong to this run.
    #[error("{path}: a part the manifest does not list, {why}; move it out of the output directory to resume")]
    StrayPart {
        /// The part.
        path: PathBuf,
        /// Why it is not adopted.
        why: String,
    },
    /// A committed part differs from what was committed (a flipped bit, a truncated or edited
    /// file): named and refused, never read or searched around.
    #[error("{path}: damaged part: {what}; nothing was read from it. Restore the file from a copy of the dataset, or move it out of the output directory to search its samples again")]
    Damaged {
        /// The part.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// OUT holds a run made with another configuration or model.
    #[error("{path} was made by a different run: {what}; use another output directory, or --force to continue it under the new configuration")]
    ConfigMismatch {
        /// The manifest file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
}

pub(crate) type Result<T> = std::result::Result<T, DatasetError>;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}
