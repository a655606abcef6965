//! `drllm-serve`: an OpenAI-compatible server for a model, routed by its router package or not.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use drllm_cli::{LogArgs, ModelArgs};
use drllm_infer::routing::{load_policy, open_package};
use drllm_serve::{
    spawn_engine, AppState, ConnLimits, EngineConfig, Route, Routers, ServerInfo, Shared,
};

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
  DRLLM_API_KEY=$KEY drllm-serve --host 0.0.0.0          # reachable from other hosts (the key
      # from the environment or --api-key-file, not --api-key, which `ps` shows to every user)
  curl -s localhost:8000/metrics                          # Prometheus (OpenMetrics text)
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{\"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}'
  lm_eval --model local-completions --model_args model=routed,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=remote \\
      --tasks arc_easy --batch_size 8

Each choice carries a `drllm` field: the layer path the request took, its cost (block
applications) and the budget. SIGTERM or Ctrl-C stops accepting connections, answers the
requests in flight for up to --drain-timeout seconds (then they get 503), and exits; a second
signal exits at once. /health and /metrics need no key. Every request is logged on one line
(target drllm_serve::access; JSON with --log-json)."
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
    /// Requests must send `Authorization: Bearer <key>`. Prefer DRLLM_API_KEY or
    /// --api-key-file: a key on the command line shows in `ps`.
    #[arg(long, env = "DRLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file holding the API key (its first line).
    #[arg(long, env = "DRLLM_API_KEY_FILE", conflicts_with = "api_key")]
    api_key_file: Option<PathBuf>,
    /// Most bytes of a request body (default: room for --max-batch prompts of the model's
    /// full context at 8 bytes a token, at least 1 MiB).
    #[arg(long, env = "DRLLM_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Seconds a connection may take to send a request's headers, counted from its opening
    /// and, on a kept-alive connection, from the last answer (so also the idle timeout).
    #[arg(long, env = "DRLLM_HEADER_TIMEOUT", default_value_t = 30.0)]
    header_timeout: f64,
    /// Seconds a request's body may take to arrive after its headers (then 408): a client
    /// that trickles a body cannot hold a connection longer.
    #[arg(long, env = "DRLLM_BODY_TIMEOUT", default_value_t = 60.0)]
    body_timeout: f64,
    /// Seconds a write to a client may make no progress (a client that stopped reading its
    /// answer or its event stream) before its connection is closed and its request cancelled (0: no limit).
    #[arg(long, env = "DRLLM_WRITE_TIMEOUT", default_value_t = 60.0)]
    write_timeout: f64,
    /// Most open connections; more wait in the listen backlog until one closes (keep it
    /// under the process's open-file limit, `ulimit -n`).
    #[arg(long, env = "DRLLM_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
    /// Seconds the requests in flight get to finish after SIGTERM or Ctrl-C; then they get
    /// 503 and the server exits.
    #[arg(long, env = "DRLLM_DRAIN_TIMEOUT", default_value_t = 30.0)]
    drain_timeout: f64,
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
    let api_key = match &a.api_key_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the API key file {}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
        None => a.api_key.clone(),
    };
    if api_key.as_deref() == Some("") {
        bail!("the API key (--api-key, DRLLM_API_KEY or --api-key-file) is empty: give a key, or leave it unset");
    }
    for (name, v) in [
        ("--header-timeout", a.header_timeout),
        ("--body-timeout", a.body_timeout),
        ("--write-timeout", a.write_timeout),
        ("--drain-timeout", a.drain_timeout),
    ] {
        if !(0.0..=86_400.0).contains(&v) {
            bail!("{name} {v} is not a number of seconds in [0, 86400]");
        }
    }
    if !a.host.is_loopback() && api_key.is_none() {
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
    let context = lm.model.cfg.max_position_embeddings.max(1) as usize;
    let max_batch = a.max_batch.max(1);
    let max_body_bytes = a
        .max_body_bytes
        .unwrap_or_else(|| (max_batch * context * 8).max(1 << 20));
    // Text over this many bytes is more tokens than the context, whatever it says.
    let max_prompt_bytes = context
        .saturating_mul(lm.tokenizer.max_bytes_per_token())
        .min(max_body_bytes);
    tracing::debug!(max_body_bytes, max_prompt_bytes, "request bounds");
    let num_layers = lm.model.num_layers();
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| lm.source.name());
    let info = ServerInfo {
        name: name.clone(),
        tokenizer: lm.tokenizer.clone(),
        context,
        vocab: lm.model.cfg.vocab_size.max(0) as usize,
        num_layers,
        default_route: if routers.is_some() {
            Route::Budget(a.budget)
        } else {
            Route::AllExecute
        },
        has_routers: routers.is_some(),
        api_key,
        max_body_bytes,
        body_timeout: std::time::Duration::from_secs_f64(a.body_timeout),
        max_prompt_bytes,
    };
    let cfg = EngineConfig {
        max_batch,
        max_batch_tokens: a.max_batch_tokens.max(1),
        // The count is per thread: the model thread gets this one's (measured 1.6x faster
        // prefill than libtorch's default there, docs/benchmarks.md).
        threads: Some(a.m.threads.unwrap_or_else(tch::get_num_threads)),
    };
    let shared = Shared::new(num_layers);
    let (jobs, engine) = spawn_engine(lm, routers, cfg, a.max_queue, shared.clone())
        .context("starting the model thread")?;
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
    let limits = ConnLimits {
        header_timeout: std::time::Duration::from_secs_f64(a.header_timeout),
        write_timeout: std::time::Duration::from_secs_f64(a.write_timeout),
        max_connections: a.max_connections.max(1),
        drain_timeout: std::time::Duration::from_secs_f64(a.drain_timeout),
    };
    drllm_serve::serve(
        listener,
        AppState::new(info, jobs, shared.clone()),
        limits,
        stop,
    )
    .await
    .context("serving")?;
    // Every handler has answered and the queue's last sender is gone: the engine finishes. A
    // connection that outlived the drain deadline may still hold a sender: then it is not
    // waited for.
    let waited = std::time::Instant::now();
    while !engine.is_finished() {
        if shared.abort.load(std::sync::atomic::Ordering::Relaxed)
            && waited.elapsed() > std::time::Duration::from_secs(5)
        {
            eprintln!("stopped (the model thread was still busy)");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    engine
        .join()
        .map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
    eprintln!("stopped");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits the process at once.
fn drllm_serve_stop() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::warn!("second signal: exiting without waiting for the requests in flight");
            eprintln!("stopped (second signal)");
            std::process::exit(130);
        });
    })
}
