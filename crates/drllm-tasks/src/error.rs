//! Typed errors of the task crate; each names the file, line and field at fault.
use std::path::PathBuf;

/// Errors raised while reading datasets, rendering prompts or grading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file that cannot be read as the format its name says.
    #[error("{path}: {msg}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A row that does not have the expected shape.
    #[error("{path}:{line}: field {field}: {msg}")]
    BadRow {
        /// File being read.
        path: PathBuf,
        /// 1-based line (or row) number.
        line: usize,
        /// The field at fault (`-` for the whole row).
        field: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// A task name we do not know.
    #[error("unknown task {0:?} (expected one of {names})", names = crate::data::TaskName::NAMES.join(", "))]
    UnknownTask(String),
    /// A split name we do not know.
    #[error("unknown split {0:?} (expected train, dev (= validation) or test)")]
    UnknownSplit(String),
    /// Two rows of a task share a sample id (ids name samples in the paths dataset).
    #[error("duplicate sample id {id:?} in {task}: rows {first} and {second}; sample ids must be unique within a task (remove one, or pass --skip-duplicate-ids to keep the first)")]
    DuplicateId {
        /// The task.
        task: String,
        /// The repeated id.
        id: String,
        /// `file:row` of the first row with it.
        first: String,
        /// `file:row` of the repeat.
        second: String,
    },
    /// The data directory lacks the files of a task/split.
    #[error("{0}")]
    MissingData(String),
    /// A prompt template that does not parse or render.
    #[error("template {name}: {msg}")]
    Template {
        /// Template name or file.
        name: String,
        /// What went wrong.
        msg: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn bad_row(
        path: &std::path::Path,
        line: usize,
        field: &str,
        msg: impl Into<String>,
    ) -> Self {
        Error::BadRow {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}
