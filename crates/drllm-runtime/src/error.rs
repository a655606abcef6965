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
    /// A `--model` directory (given, or a snapshot of the Hugging Face cache) that holds no
    /// usable model. The message is one sentence with the reason in it, so the reason is a
    /// field, not a `source` (printed chains would repeat it).
    #[error("model {spec:?}: {reason}")]
    ModelSource {
        /// What the user passed.
        spec: String,
        /// What was looked for.
        reason: Box<SourceError>,
    },
    /// A repo id absent from the cache whose download failed.
    #[error(
        "model {spec:?}: {cached}, and downloading it failed: {download} (HF_HUB_OFFLINE=1 keeps \
         drllm to the cache)"
    )]
    ModelDownload {
        /// What the user passed.
        spec: String,
        /// Why the cache did not have it.
        cached: Box<SourceError>,
        /// Why the download failed (with the client's error as its source).
        download: Box<HubError>,
    },
    /// A repo id absent from the cache while `HF_HUB_OFFLINE` forbids the download.
    #[error(
        "model {spec:?}: {reason}; HF_HUB_OFFLINE is set, so drllm reads the cache only: download \
         it where the hub is reachable, `hf download {repo} --revision {revision}` \
         (huggingface_hub; HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME choose the cache)"
    )]
    ModelOffline {
        /// What the user passed.
        spec: String,
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// Why the cache did not have it.
        reason: Box<SourceError>,
    },
    /// A bad generation request (empty prompt, batch mismatch, ...).
    #[error("generation request: {0}")]
    Request(String),
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Why a model directory or the Hugging Face cache holds no model for a `--model` argument.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The repo has no folder in the cache.
    #[error("{repo} is not in the Hugging Face cache {}", .cache.display())]
    NotCached {
        /// The repo id.
        repo: String,
        /// The hub cache.
        cache: PathBuf,
    },
    /// The cache knows the repo but not the branch or tag.
    #[error(
        "{repo} has no revision {revision} in the Hugging Face cache {} (cached refs: {})",
        .cache.display(),
        list_or_none(.known)
    )]
    NoRevision {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The hub cache.
        cache: PathBuf,
        /// The refs the cache holds.
        known: Vec<String>,
    },
    /// The revision resolves to a commit with no snapshot directory.
    #[error(
        "{repo}@{revision} (commit {commit}) has no snapshot in the Hugging Face cache {}",
        .cache.display()
    )]
    NoSnapshot {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The commit it names.
        commit: String,
        /// The hub cache.
        cache: PathBuf,
    },
    /// The snapshot lacks the GGUF file named in the repo id.
    #[error("{repo}@{revision} in the Hugging Face cache {} has no {file}", .cache.display())]
    NoFileInSnapshot {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The hub cache.
        cache: PathBuf,
        /// The file named.
        file: String,
    },
    /// A model directory that cannot be listed.
    #[error("cannot read {}: {source}", .dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A directory with neither layout.
    #[error("{} has neither config.json (Hugging Face layout) nor a .gguf file", .dir.display())]
    NoModelFiles {
        /// The directory.
        dir: PathBuf,
    },
    /// A directory with several GGUF files and no way to choose.
    #[error("{} holds {count} .gguf files; name one", .dir.display())]
    SeveralGguf {
        /// The directory.
        dir: PathBuf,
        /// How many it holds.
        count: usize,
    },
}

/// Why downloading a model from the hub failed; each names the hub, and all but the client's
/// set-up the repo and revision.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The HTTP client could not be made.
    #[error("cannot set up a client for {hub}: {source}")]
    Client {
        /// The hub.
        hub: String,
        /// The client's error.
        source: hf_hub::api::sync::ApiError,
    },
    /// The repo's files could not be listed (absent, private or gated).
    #[error(
        "cannot list {repo} at revision {revision} on {hub}: {source} (a private or gated repo \
         needs HF_TOKEN)"
    )]
    List {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub.
        hub: String,
        /// The client's error.
        source: hf_hub::api::sync::ApiError,
    },
    /// The repo has no file of the name given.
    #[error("{repo}@{revision} on {hub} has no file {file} (its .gguf files: {})", list_or_none(.ggufs))]
    NoFile {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub.
        hub: String,
        /// The file named.
        file: String,
        /// The repo's GGUF files.
        ggufs: Vec<String>,
    },
    /// The repo holds no model in either layout.
    #[error(
        "{repo}@{revision} on {hub} holds neither config.json (Hugging Face layout) nor a .gguf file"
    )]
    NoModelFiles {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub.
        hub: String,
    },
    /// The repo holds several GGUF files and none was named.
    #[error(
        "{repo}@{revision} on {hub} holds {} .gguf files; name one as {repo}/FILE.gguf ({})",
        .ggufs.len(),
        .ggufs.join(", ")
    )]
    SeveralGguf {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub.
        hub: String,
        /// The repo's GGUF files.
        ggufs: Vec<String>,
    },
    /// A file's download failed.
    #[error("downloading {file} of {repo}@{revision} from {hub}: {source}")]
    Download {
        /// The file.
        file: String,
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub.
        hub: String,
        /// The client's error.
        source: hf_hub::api::sync::ApiError,
    },
    /// Nothing was fetched.
    #[error("{repo}@{revision} on {hub}: nothing to download")]
    Nothing {
        /// The repo id.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub.
        hub: String,
    },
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
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
