//! `drllm-serve`: an OpenAI-compatible server for a model, routed by its router package or not.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use drllm_cli::{LogArgs, ModelArgs};
use drllm_infer::routing::{load_policy, open_package};
use drllm_serve::{spawn_engine, AppState, EngineConfig, Route, Routers, ServerInfo};

#[derive(Parser)]
#[command(
    name = "drllm-serve",
    version,
    about = "OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, tokenizer endpoints) for a model with or without routers.",
    after_help = "Examples:
  drllm-serve                                             # the embedded model, all blocks, 127.0.0.1:8000
  drllm-serve --routers embedded --budget -0.3 --served-model-name routed
      # model \"routed\" = routers at -0.3, \"routed@-0.5\" = at -0.5; a request's `drllm`
      # field ({\"budget\": b} or {\"routers\": false}) overrides it
  drllm-serve --host 0.0.0.0 --port 8000 --api-key $KEY   # reachable from other hosts
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{\"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}'
  lm_eval --model local-completions --model_args model=routed,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=remote \\
      --tasks arc_easy --batch_size 8

Each choice carries a `drllm` field: the layer path the request took, its cost (block
applications) and the budget. SIGTERM or Ctrl-C stops accepting connections, answers the
requests in flight, and exits."
)]
struct Cli {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Router package (a directory, or `embedded` for the embedded model's reference routers);
    /// without it every request runs the all-execute model.
    #[arg(long, env = "DRLLM_ROUTERS")]
    routers: Option<PathBuf>,
    /// Default budget of the routers, in [-1, 1] (-1 skips every block, 0 = the plain routers,
    /// 1 = every block once).
    #[arg(
        long,
        env = "DRLLM_BUDGET",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    budget: f64,
    /// The model name clients ask for (default: the model's own name).
    #[arg(long, env = "DRLLM_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Address to listen on; anything but loopback needs --api-key.
    #[arg(long, env = "DRLLM_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0 = any free port; the address is printed).
    #[arg(long, env = "DRLLM_PORT", default_value_t = 8000)]
    port: u16,
    /// Requests must send `Authorization: Bearer <key>`.
    #[arg(long, env = "DRLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most requests decoding together (each joins the running batch at a step boundary).
    #[arg(long, env = "DRLLM_MAX_BATCH", default_value_t = 32)]
    max_batch: usize,
    /// Most tokens (prompt + completion budget) of the running batch together: bounds the KV
    /// caches.
    #[arg(long, env = "DRLLM_MAX_BATCH_TOKENS", default_value_t = 65536)]
    max_batch_tokens: usize,
    /// Most requests waiting; beyond it requests get 503 with Retry-After.
    #[arg(long, env = "DRLLM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Cli::parse();
    a.log.init("info");
    let addr = SocketAddr::new(a.host, a.port);
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key (DRLLM_API_KEY) is empty: give a key, or leave it unset");
    }
    if !a.host.is_loopback() && a.api_key.is_none() {
        bail!(
            "--host {} accepts connections from other hosts: set --api-key (or DRLLM_API_KEY)",
            a.host
        );
    }
    if !(-1.0..=1.0).contains(&a.budget) {
        bail!("--budget {} is outside [-1, 1]", a.budget);
    }
    // A bad package fails before the model loads.
    if let Some(spec) = &a.routers {
        open_package(spec)?;
    }
    let lm = a.m.load()?;
    let routers = match &a.routers {
        Some(spec) => Some(Routers::new(load_policy(&lm, spec, a.budget)?)),
        None => None,
    };
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| lm.source.name());
    let info = ServerInfo {
        name: name.clone(),
        tokenizer: lm.tokenizer.clone(),
        context: lm.model.cfg.max_position_embeddings.max(1) as usize,
        vocab: lm.model.cfg.vocab_size.max(0) as usize,
        num_layers: lm.model.num_layers(),
        default_route: if routers.is_some() {
            Route::Budget(a.budget)
        } else {
            Route::AllExecute
        },
        has_routers: routers.is_some(),
        api_key: a.api_key.clone(),
    };
    let cfg = EngineConfig {
        max_batch: a.max_batch.max(1),
        max_batch_tokens: a.max_batch_tokens.max(1),
        // The count is per thread: the model thread gets this one's (measured 1.6x faster
        // prefill than libtorch's default there, docs/benchmarks.md).
        threads: Some(a.m.threads.unwrap_or_else(tch::get_num_threads)),
    };
    let (jobs, engine) =
        spawn_engine(lm, routers, cfg, a.max_queue).context("starting the model thread")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    eprintln!(
        "serving `{name}` on http://{bound}/v1 ({})",
        match &a.routers {
            Some(r) => format!(
                "routers {} at budget {}; `{name}@<budget>` for others",
                r.display(),
                a.budget
            ),
            None => "all blocks; no routers".into(),
        }
    );
    let stop = drllm_serve_stop()?;
    drllm_serve::serve(listener, AppState::new(info, jobs), stop)
        .await
        .context("serving")?;
    // Every handler has answered and the queue's last sender is gone: the engine finishes.
    engine
        .join()
        .map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
    eprintln!("stopped");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
fn drllm_serve_stop() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: answering the requests in flight");
    })
}
