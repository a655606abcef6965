//! drllm model runtime: loads pretrained decoder LLMs (Hugging Face safetensors directories or
//! GGUF files) and runs them along arbitrary layer paths (skip / execute / repeat per block),
//! with batched prefill and greedy decoding over per-(block, repetition) KV caches.
#![warn(missing_docs)]

pub mod chat;
pub mod config;
pub mod error;
pub mod exec;
pub mod gguf;
pub mod loader;
pub mod model;
pub mod prefix;
pub mod tokenizer;
pub mod weights;

pub use chat::Message;
pub use config::{Arch, ModelConfig};
pub use drllm_path::{LayerPath, PathError};
pub use error::{Error, Result};
pub use exec::{argmax_tokens, GenerateOptions, Generated, PathBatch};
pub use loader::{parse_dtype, resolve_device, DeviceSpec, LoadedModel, ModelSource};
pub use model::Model;
pub use prefix::{PrefixCache, PrefixStats};
pub use tch;
pub use tokenizer::Tokenizer;
