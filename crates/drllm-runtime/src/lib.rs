//! drllm model runtime: loads pretrained decoder LLMs (Hugging Face safetensors directories or
//! GGUF files) and runs them along arbitrary layer paths (skip / execute / repeat per block),
//! with batched prefill and greedy decoding over per-(block, repetition) KV caches.
#![warn(missing_docs)]

pub mod chat;
pub mod config;
pub mod error;
pub mod exec;
pub mod fingerprint;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod loader;
pub mod model;
pub mod prefix;
pub mod profile;
pub mod score;
pub mod tokenizer;
pub mod weights;

pub use chat::Message;
pub use config::{Arch, ModelConfig};
pub use drllm_path::{LayerPath, PathError};
pub use error::{Error, HubError, Result, SourceError};
pub use exec::{GateFn, GroupRouteFn, PathBatch, RouteFn};
pub use fingerprint::ModelFingerprint;
pub use generate::{
    argmax_tokens, path_order, GenerateOptions, GenerateRequest, Generated, Generation, Paths,
    UntilFn,
};
pub use loader::{parse_dtype, resolve_device, set_threads, DeviceSpec, LoadedModel, ModelSource};
pub use model::Model;
pub use prefix::{PrefixCache, PrefixStats};
pub use tch;
pub use tokenizer::Tokenizer;

/// Keeps large freed blocks in the process heap instead of returning them to the OS.
///
/// libtorch allocates a fresh buffer for every intermediate tensor; with glibc's defaults a
/// buffer over 32 MiB is `mmap`ed and `munmap`ed each time, so a loop over tens-of-MiB tensors
/// (router training batches of a 3072-wide model) spends most of its time in page faults
/// zeroing new pages. Raising the thresholds made training 1.8x faster here
/// (docs/benchmarks.md). Call once at program start; a no-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before threads allocate heavily.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
