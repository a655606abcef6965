//! drllm serving: an OpenAI-compatible HTTP server for a model with or without its routers.
//! Routing is decided once per request during prefill (each request may ask for its own
//! budget), and concurrent requests share the running batch, each with its own path and KV
//! caches ([`engine`]); [`http`] speaks OpenAI's completions and chat API, the model list and
//! the tokenizer endpoints lm-evaluation-harness uses, with OpenAI-shaped errors ([`api`]).
#![warn(missing_docs)]

pub mod api;
pub mod engine;
pub mod http;

use std::future::Future;

use drllm_runtime::LoadedModel;
use tokio::sync::mpsc;

pub use engine::{EngineConfig, Job, Route, Routers, Sampling};
pub use http::{router, AppState, ServerInfo};

/// Starts the model thread; jobs beyond `max_queue` waiting ones are refused by the sender.
/// The thread ends once every sender is dropped and its batch is done.
pub fn spawn_engine(
    lm: LoadedModel,
    routers: Option<Routers>,
    cfg: EngineConfig,
    max_queue: usize,
) -> std::io::Result<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(max_queue.max(1));
    let thread = std::thread::Builder::new()
        .name("drllm-engine".into())
        .spawn(move || engine::run(lm, routers, rx, cfg))?;
    Ok((tx, thread))
}

/// Serves `state` on `listener` until `shutdown` resolves; requests in flight are answered
/// before it returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
