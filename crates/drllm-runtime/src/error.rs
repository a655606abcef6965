//! Typed errors of the model runtime. Every variant names the file, key or tensor at fault and
//! what was expected, so a user can fix their input without reading our code.
use std::path::PathBuf;

/// Errors raised while loading or running a model.
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
    /// A file that is not what its name or role says it is.
    #[error("{path}: {msg}")]
    BadFile {
        /// The file at fault.
        path: PathBuf,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// A GGUF file that ends before the structure it announces.
    #[error("{path}: truncated GGUF: needed {needed} bytes at offset {offset} for {what}, file has {len}")]
    Truncated {
        /// The file at fault.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes needed.
        needed: u64,
        /// File length.
        len: u64,
    },
    /// A tensor stored in a type we do not decode.
    #[error("{path}: tensor {tensor} has type {type_name} (id {type_id}); supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K")]
    UnsupportedTensorType {
        /// The file at fault.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// GGML type id.
        type_id: u32,
        /// GGML type name, when known.
        type_name: String,
    },
    /// A required configuration or metadata key is absent or has the wrong type.
    #[error("{source_name}: key {key}: {msg}")]
    Config {
        /// File (or file + section) the key was looked up in.
        source_name: String,
        /// The key.
        key: String,
        /// What was expected.
        msg: String,
    },
    /// An architecture or tokenizer kind we refuse to guess about.
    #[error("{source_name}: {key} = {value:?} is not supported (supported: {supported})")]
    Unsupported {
        /// File the value came from.
        source_name: String,
        /// The key holding the value.
        key: String,
        /// The value found.
        value: String,
        /// The values we support.
        supported: String,
    },
    /// A tensor the model needs is not in the weights.
    #[error("{source_name}: tensor {tensor} is missing")]
    MissingTensor {
        /// Weight source description.
        source_name: String,
        /// HF-style tensor name.
        tensor: String,
    },
    /// A tensor with an unexpected shape.
    #[error("{source_name}: tensor {tensor} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Weight source description.
        source_name: String,
        /// Tensor name.
        tensor: String,
        /// Expected shape.
        expected: Vec<i64>,
        /// Shape found.
        got: Vec<i64>,
    },
    /// A layer path that does not fit the model.
    #[error(transparent)]
    Path(#[from] drllm_path::PathError),
    /// A tokenizer that cannot be built or used.
    #[error("tokenizer ({source_name}): {msg}")]
    Tokenizer {
        /// Where the tokenizer came from.
        source_name: String,
        /// What went wrong.
        msg: String,
    },
    /// A chat template that does not render.
    #[error("chat template: {0}")]
    Template(String),
    /// A device that cannot be used.
    #[error("device {device:?}: {msg}")]
    Device {
        /// The device spec given.
        device: String,
        /// Why it cannot be used.
        msg: String,
    },
    /// A `--model` argument that resolves to nothing loadable.
    #[error("model {spec:?}: {msg}")]
    ModelSpec {
        /// What the user passed.
        spec: String,
        /// What was looked for and what is expected.
        msg: String,
    },
    /// A bad generation request (empty prompt, batch mismatch, ...).
    #[error("generation request: {0}")]
    Request(String),
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn config(
        source: impl Into<String>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            source_name: source.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}
