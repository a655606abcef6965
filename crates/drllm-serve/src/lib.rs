//! drllm serving: an OpenAI-compatible HTTP server for a model with or without its routers.
//! Routing is decided once per request during prefill (each request may ask for its own
//! budget), and concurrent requests share the running batch, each with its own path and KV
//! caches ([`engine`]); [`http`] speaks OpenAI's completions and chat API, the model list and
//! the tokenizer endpoints lm-evaluation-harness uses, with OpenAI-shaped errors ([`api`]).
#![warn(missing_docs)]

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod openai;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use drllm_runtime::LoadedModel;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::{mpsc, Semaphore};

pub use engine::{EngineConfig, Job, Route, Routers, Sampling, Shared};
pub use http::{router, AppState, ServerInfo};
pub use metrics::Metrics;

/// Starts the model thread; jobs beyond `max_queue` waiting ones are refused by the sender.
/// The thread ends once every sender is dropped and its batch is done.
pub fn spawn_engine(
    lm: LoadedModel,
    routers: Option<Routers>,
    cfg: EngineConfig,
    max_queue: usize,
    shared: Shared,
) -> std::io::Result<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(max_queue.max(1));
    let thread = std::thread::Builder::new()
        .name("drllm-engine".into())
        .spawn(move || engine::run(lm, routers, rx, cfg, shared))?;
    Ok((tx, thread))
}

/// Bounds on connections, which `axum::serve` leaves open.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A connection must send a request's headers within this time of opening, and the next
    /// request's within this time of the last answer (hyper's header-read timeout, which is
    /// also the idle timeout of a kept-alive connection); else it is closed.
    pub header_timeout: Duration,
    /// A write to a connection that makes no progress for this long (a client that stopped
    /// reading its answer or its event stream) closes it, which cancels the request; zero: none.
    pub write_timeout: Duration,
    /// Most open connections; beyond it new ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// After `shutdown`, the requests in flight get this long to finish; then they fail with
    /// 503 and the server stops.
    pub drain_timeout: Duration,
}

/// Whether a connection ended because a write made no progress within the write timeout.
fn stalled_writes(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

/// Serves `state` on `listener` until `shutdown` resolves, within `limits`; requests in flight
/// are answered (up to the drain deadline) before it returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut full = false;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => {
                full = false;
                p
            }
            Err(_) => {
                if !full {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection cap reached: new connections wait until one closes \
                         (idle ones close after --header-timeout)"
                    );
                    full = true;
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: say so, and let connections close.
                    tracing::error!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // A write progress deadline: hyper has a header-read timeout but none for writes.
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout((!limits.write_timeout.is_zero()).then_some(limits.write_timeout));
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(Box::pin(stream)), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if stalled_writes(&e) {
                    tracing::warn!(
                        %peer,
                        "connection closed: a write to the client made no progress for \
                         --write-timeout (it stopped reading its answer); its request is cancelled"
                    );
                } else {
                    tracing::debug!(%peer, "connection closed: {e}");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        drain_timeout_s = limits.drain_timeout.as_secs_f64(),
        "stopping: no new connections; answering the requests in flight"
    );
    let drained = graceful.shutdown();
    let mut drained = std::pin::pin!(drained);
    tokio::select! {
        _ = &mut drained => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("drain deadline passed: the requests in flight get 503");
            state.abort().store(true, Ordering::Relaxed);
            // Their answers are errors now; a connection that still holds on is dropped.
            if tokio::time::timeout(Duration::from_secs(5), &mut drained).await.is_err() {
                tracing::warn!("connections still open after the drain deadline: closing them");
            }
        }
    }
    Ok(())
}
