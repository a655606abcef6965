//! The HTTP API (axum): OpenAI's `/v1/completions`, `/v1/chat/completions` (both with SSE
//! streaming) and `/v1/models`, `/health`, and the tokenizer endpoints lm-evaluation-harness's
//! remote tokenizer calls (`/tokenizer_info`, `/tokenize`, `/detokenize`), and `/metrics`
//! (Prometheus). Handlers check and tokenize requests (off the async threads, a few at a
//! time), queue one engine job per prompt, and shape the engine's events into OpenAI's
//! responses; a request's error never touches another request. Every answer is counted and
//! logged (one access line per request), and every error, axum's own included, has OpenAI's
//! shape.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use drllm_runtime::Tokenizer;
use tokio::sync::{mpsc, Semaphore};

use crate::api::ApiError;
use crate::engine::{Event, Finish, Job, Route, Shared, TokenLogprob};
use crate::openai::PathInfo;

mod endpoints;
mod layers;
mod stream;
mod validate;

use endpoints::*;
use layers::{body_in_time, observe, require_key};
use validate::Common;

/// What the handlers know about the model and the server.
pub struct ServerInfo {
    /// The name clients ask for (`model`); `<name>@<budget>` selects a routing budget.
    pub name: String,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Context length (prompt + completion tokens).
    pub context: usize,
    /// Token ids must be below this (the embedding's rows).
    pub vocab: usize,
    /// Blocks of the model.
    pub num_layers: usize,
    /// The route of a request naming just `name`.
    pub default_route: Route,
    /// Whether routers are loaded (else every request runs the all-execute model).
    pub has_routers: bool,
    /// Requests must carry `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Most bytes of a request body.
    pub max_body_bytes: usize,
    /// Time a request's body may take to arrive, from the end of its headers.
    pub body_timeout: std::time::Duration,
    /// Most bytes of one prompt's text: longer text is more tokens than the context holds,
    /// whatever it says, and is refused before it is tokenized.
    pub max_prompt_bytes: usize,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    info: Arc<ServerInfo>,
    jobs: mpsc::Sender<Job>,
    ids: Arc<AtomicU64>,
    stats: Arc<Mutex<BTreeMap<String, RouteStats>>>,
    shared: Shared,
    /// Tokenizations running at once (each on a blocking thread).
    tokenizing: Arc<Semaphore>,
}

/// What one route served so far (`GET /drllm/stats`): lm-evaluation-harness and other clients
/// never read the per-choice `drllm` field, so a run's cost is read here.
#[derive(Debug, Clone, Default)]
struct RouteStats {
    prompts: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Sum over prompts of their path's block applications.
    cost: u64,
    num_layers: usize,
}

fn route_label(route: Route) -> String {
    match route {
        Route::AllExecute => "all-execute".into(),
        Route::Budget(b) => format!("budget {b}"),
    }
}

impl AppState {
    /// State over the engine's job queue, sharing `shared` with the engine.
    pub fn new(info: ServerInfo, jobs: mpsc::Sender<Job>, shared: Shared) -> AppState {
        AppState {
            info: Arc::new(info),
            jobs,
            ids: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(Mutex::new(BTreeMap::new())),
            shared,
            tokenizing: Arc::new(Semaphore::new(TOKENIZING)),
        }
    }

    /// The flag that fails every request in flight (set at the drain deadline).
    pub fn abort(&self) -> &Arc<AtomicBool> {
        &self.shared.abort
    }

    /// Counts one prompt answered on `route`, which arrived at `arrived`.
    fn record(&self, route: Route, prompt_tokens: usize, o: &Outcome, arrived: Instant) {
        let Some(path) = &o.path else { return };
        let m = &self.shared.metrics;
        m.prompt_tokens.inc_by(prompt_tokens as u64);
        m.generation_tokens.inc_by(o.completion_tokens as u64);
        m.routing_cost.observe(path.cost() as f64);
        let now = Instant::now();
        let first = o.first.unwrap_or(now);
        m.timings(
            first.saturating_duration_since(arrived),
            now.saturating_duration_since(arrived),
            o.completion_tokens,
        );
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let s = stats.entry(route_label(route)).or_default();
        s.prompts += 1;
        s.prompt_tokens += prompt_tokens as u64;
        s.completion_tokens += o.completion_tokens as u64;
        s.cost += path.cost() as u64;
        s.num_layers = path.num_layers();
    }

    /// Tokenizes `text` on a blocking thread (a few at a time, so that long prompts never
    /// hold the async threads that answer `/health` and the others), after refusing text
    /// longer than the context can hold when it is a prompt (`/tokenize` takes any text the
    /// body limit lets through: lm-eval's rolling log-likelihoods tokenize whole documents).
    async fn encode(&self, text: String, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
        self.encode_bounded(text, special, param, true).await
    }

    async fn encode_bounded(
        &self,
        text: String,
        special: bool,
        param: &str,
        prompt: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let info = &self.info;
        if prompt && text.len() > info.max_prompt_bytes {
            return Err(ApiError::invalid(
                param,
                format!(
                    "the text is {} bytes, more than this model's context of {} tokens can hold \
                     (at most {} bytes)",
                    text.len(),
                    info.context,
                    info.max_prompt_bytes
                ),
            ));
        }
        // The slot goes with the work: a client that leaves does not free it while its text is
        // still being tokenized.
        let slot = self
            .tokenizing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unavailable("the server is stopping"))?;
        let info = self.info.clone();
        tokio::task::spawn_blocking(move || {
            let ids = info.tokenizer.encode(&text, special);
            drop(slot);
            ids
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))
    }
}

/// Tokenizations at once: the model thread holds the cores, so more would only add memory.
const TOKENIZING: usize = 2;

/// The routes; every one but `/health` needs the API key when the server has one.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/drllm/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.info.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), body_in_time))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

fn json_response(status: u16, v: &impl serde::Serialize) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        to_json(v),
    )
        .into_response()
}

/// `v` as JSON text. The bodies of [`crate::openai`] always serialize (string keys, no
/// fallible `Serialize`); were one not to, the client still gets an error in OpenAI's shape.
fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        let body = ApiError::internal(format!("encoding the response: {e}")).body();
        serde_json::to_string(&body).unwrap_or_default()
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if self.status == 503 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request's queued jobs: their event receivers, and the flag that tells the engine the
/// server itself gave the request up (so that closing the receivers is not a cancellation).
struct Submitted {
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
    abandoned: Arc<AtomicBool>,
}

impl Submitted {
    /// Gives the request up for `e` (another prompt's failure, a full queue): its other jobs
    /// end without counting as cancelled.
    fn abandon(&self, e: ApiError) -> ApiError {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
        e
    }
}

/// Queues one job per prompt (all or none: a full queue refuses the request).
fn submit(
    s: &AppState,
    prompts: Vec<Vec<u32>>,
    c: &Common,
    echo: bool,
    logprobs: Option<usize>,
) -> Result<Submitted, ApiError> {
    let mut sub = Submitted {
        rxs: vec![],
        abandoned: Arc::new(AtomicBool::new(false)),
    };
    for prompt in prompts {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            prompt,
            max_tokens: c.max_tokens,
            echo,
            logprobs,
            sampling: c.sampling,
            stop: c.stop.clone(),
            route: c.route,
            events: tx,
            abandoned: sub.abandoned.clone(),
        };
        match s.jobs.try_send(job) {
            Ok(()) => sub.rxs.push(rx),
            // Receivers already made are dropped here, so the engine skips their jobs.
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(sub.abandon(ApiError::overloaded()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(sub.abandon(ApiError::internal("the model is shutting down")))
            }
        }
    }
    Ok(sub)
}

/// One prompt's result, gathered from its events.
#[derive(Default)]
struct Outcome {
    prompt: Vec<TokenLogprob>,
    text: String,
    tokens: Vec<TokenLogprob>,
    finish: Option<Finish>,
    path: Option<drllm_runtime::LayerPath>,
    completion_tokens: usize,
    /// When the first generated token arrived.
    first: Option<Instant>,
}

async fn gather(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Outcome, ApiError> {
    let mut o = Outcome::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prompt(p) => o.prompt = p,
            Event::Delta { text, tokens } => {
                o.first.get_or_insert_with(Instant::now);
                o.text.push_str(&text);
                o.tokens.extend(tokens);
            }
            Event::Done {
                finish,
                path,
                completion_tokens,
            } => {
                o.finish = Some(finish);
                o.path = Some(path);
                o.completion_tokens = completion_tokens;
                return Ok(o);
            }
            Event::Failed { message, status } => {
                return Err(ApiError::from_status(status, message))
            }
        }
    }
    Err(ApiError::internal("the model stopped before answering"))
}

/// The `drllm` extension of a choice: the path taken and its cost.
fn path_info(path: Option<&drllm_runtime::LayerPath>, route: Route) -> Option<PathInfo> {
    path.map(|p| PathInfo {
        path: p.to_string(),
        cost: p.cost(),
        num_layers: p.num_layers(),
        budget: match route {
            Route::Budget(b) => Some(b),
            Route::AllExecute => None,
        },
    })
}
