//! The HTTP API (axum): OpenAI's `/v1/completions`, `/v1/chat/completions` (both with SSE
//! streaming) and `/v1/models`, `/health`, and the tokenizer endpoints lm-evaluation-harness's
//! remote tokenizer calls (`/tokenizer_info`, `/tokenize`, `/detokenize`), and `/metrics`
//! (Prometheus). Handlers check and tokenize requests (off the async threads, a few at a
//! time), queue one engine job per prompt, and shape the engine's events into OpenAI's
//! responses; a request's error never touches another request. Every answer is counted and
//! logged (one access line per request), and every error, axum's own included, has OpenAI's
//! shape.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use drllm_runtime::Tokenizer;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::api::{self, ApiError, Fields, Prompt};
use crate::engine::{Event, Finish, Job, Route, Sampling, Shared, TokenLogprob};

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
    /// longer than the context can hold.
    async fn encode(&self, text: String, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
        let info = &self.info;
        if text.len() > info.max_prompt_bytes {
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
        let _slot = self
            .tokenizing
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the server is stopping"))?;
        let info = self.info.clone();
        tokio::task::spawn_blocking(move || info.tokenizer.encode(&text, special))
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
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts and logs every answer, and gives the errors axum makes itself (413, 405, 415, ...)
/// OpenAI's shape.
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().chars().take(200).collect::<String>();
    // The route pattern, never the raw path, labels the metrics.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let resp = openai_shaped(&s, &method, &path, resp).await;
    let status = resp.status().as_u16();
    s.shared.metrics.request(&route, status);
    tracing::info!(
        target: "drllm_serve::access",
        %peer,
        method = %method,
        path,
        status,
        ms = (started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        "request"
    );
    resp
}

async fn openai_shaped(
    s: &AppState,
    method: &axum::http::Method,
    path: &str,
    resp: Response,
) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (message, code) = match status.as_u16() {
        413 => (
            format!(
                "The request body is larger than this server's limit of {} bytes \
                 (--max-body-bytes)",
                s.info.max_body_bytes
            ),
            Some("request_too_large"),
        ),
        405 => (
            format!("{method} is not allowed on {path}"),
            Some("method_not_allowed"),
        ),
        _ if text.is_empty() => (
            status.canonical_reason().unwrap_or("error").to_string(),
            None,
        ),
        _ => (text, None),
    };
    let e = ApiError {
        status: status.as_u16(),
        message,
        kind: if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        },
        param: None,
        code,
    };
    let mut r = e.into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

fn json_response(status: u16, v: &Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
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

async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match check_key(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check_key(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.info.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in time independent of where the strings differ.
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn not_found() -> Response {
    ApiError {
        status: 404,
        message: "Unknown endpoint: this server serves /v1/completions, /v1/chat/completions, \
                  /v1/models, /health, /tokenizer_info, /tokenize and /detokenize"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
    .into_response()
}

async fn health() -> Response {
    json_response(200, &json!({"status": "ok"}))
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.shared.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("encoding the metrics: {e}")).into_response(),
    }
}

async fn models(State(s): State<AppState>) -> Response {
    let mut ids = vec![s.info.name.clone()];
    if let Route::Budget(b) = s.info.default_route {
        ids.push(format!("{}@{b}", s.info.name));
        ids.push(format!("{}@none", s.info.name));
    }
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "drllm"}))
        .collect();
    json_response(200, &json!({"object": "list", "data": data}))
}

async fn stats(State(s): State<AppState>) -> Response {
    let stats = s.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let routes: Map<String, Value> = stats
        .into_iter()
        .map(|(label, r)| {
            let mean = r.cost as f64 / r.prompts.max(1) as f64;
            (
                label,
                json!({
                    "prompts": r.prompts,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "mean_cost": mean,
                    "num_layers": r.num_layers,
                    "blocks_saved": 1.0 - mean / r.num_layers.max(1) as f64,
                }),
            )
        })
        .collect();
    json_response(
        200,
        &json!({"routes": routes, "cancelled": s.shared.metrics.cancelled.get()}),
    )
}

async fn tokenizer_info(State(s): State<AppState>) -> Response {
    let t = &s.info.tokenizer;
    let eos = t.eos.as_ref().map(|e| e.0.clone());
    json_response(
        200,
        &json!({
            "tokenizer_class": "drllm",
            "eos_token": eos,
            "bos_token": t.bos.as_ref().map(|b| b.0.clone()),
            // No pad token of its own: padding is never seen by the model here.
            "pad_token": eos,
            "chat_template": t.chat_template,
            "model_max_length": s.info.context,
        }),
    )
}

async fn tokenize(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let text = f
        .str("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "'prompt' (a string) is required"))?;
    let special = f.bool("add_special_tokens")?.unwrap_or(true);
    let ids = s.encode(text.to_string(), special, "prompt").await?;
    let v = json!({"tokens": ids, "count": ids.len(), "max_model_len": s.info.context});
    Ok(json_response(200, &v))
}

async fn detokenize(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let obj = api::object(&body)?;
    let bad = || ApiError::invalid("tokens", "'tokens' must be a list of token ids");
    let ids = match api::prompts(Fields(&obj).value("tokens"))
        .map_err(|_| bad())?
        .as_slice()
    {
        [Prompt::Ids(ids)] => ids.clone(),
        _ => return Err(bad()),
    };
    check_ids(&s.info, &ids, "tokens")?;
    let text = s
        .info
        .tokenizer
        .decode_keep_special(&ids)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(200, &json!({"prompt": text})))
}

fn check_ids(info: &ServerInfo, ids: &[u32], param: &str) -> Result<(), ApiError> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= info.vocab) {
        return Err(ApiError::invalid(
            param,
            format!(
                "token id {bad} is outside the vocabulary (ids are 0..{})",
                info.vocab
            ),
        ));
    }
    Ok(())
}

/// The route a request asks for: `model` = the served name (the server's default route) or
/// `<name>@<budget>`; the `drllm` extension field (`{"budget": b}` or `{"routers": false}`)
/// overrides it.
fn route(info: &ServerInfo, f: &Fields<'_>) -> Result<Route, ApiError> {
    let mut route = match f.str("model")? {
        None => info.default_route,
        Some(m) if m == info.name => info.default_route,
        Some(m) => match m.rsplit_once('@') {
            Some((name, "none")) if name == info.name => Route::AllExecute,
            Some((name, b)) if name == info.name => {
                let budget: f64 = b.parse().map_err(|_| {
                    ApiError::invalid(
                        "model",
                        format!(
                            "`{m}`: after @ comes a budget in [-1, 1], or `none` for the \
                             all-execute model"
                        ),
                    )
                })?;
                Route::Budget(budget)
            }
            _ => return Err(ApiError::unknown_model(m, &info.name)),
        },
    };
    if let Some(ext) = f.value("drllm") {
        let Value::Object(ext) = ext else {
            return Err(ApiError::invalid("drllm", "'drllm' must be an object"));
        };
        let e = Fields(ext);
        if let Some(b) = e.f64("budget").map_err(|_| {
            ApiError::invalid("drllm.budget", "'drllm.budget' must be a number in [-1, 1]")
        })? {
            route = Route::Budget(b);
        }
        if e.bool("routers").ok().flatten() == Some(false) {
            route = Route::AllExecute;
        }
    }
    if let Route::Budget(b) = route {
        if !info.has_routers {
            return Err(ApiError::invalid(
                "model",
                "this server has no routers (start it with --routers) so it serves the \
                 all-execute model only",
            ));
        }
        if !(-1.0..=1.0).contains(&b) {
            return Err(ApiError::invalid(
                "model",
                format!("budget {b} is outside [-1, 1]"),
            ));
        }
    }
    Ok(route)
}

/// Most stop strings per request, and bytes per stop string (every decode step searches them).
const MAX_STOP: usize = 32;
const MAX_STOP_BYTES: usize = 512;

/// Sampling and length fields shared by both endpoints.
struct Common {
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    route: Route,
}

fn common(
    info: &ServerInfo,
    f: &Fields<'_>,
    max_tokens_default: usize,
) -> Result<Common, ApiError> {
    if let Some(n) = f.usize("n")? {
        if n != 1 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    let temperature = f.f64("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("'temperature' must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = f.f64("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("'top_p' must be in (0, 1], got {top_p}"),
        ));
    }
    let seed = match f.value("seed") {
        None => None,
        Some(v) => Some(v.as_i64().map(|x| x as u64).ok_or_else(|| {
            ApiError::invalid("seed", format!("'seed' must be an integer, got {v}"))
        })?),
    };
    let max_tokens = f
        .usize("max_completion_tokens")?
        .or(f.usize("max_tokens")?)
        .unwrap_or(max_tokens_default);
    if max_tokens > info.context {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "'max_tokens' is {max_tokens}, more than the model's context of {} tokens",
                info.context
            ),
        ));
    }
    let stop = f.stop()?;
    if stop.len() > MAX_STOP || stop.iter().any(|x| x.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!("'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(Common {
        max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        stop,
        stream: f.bool("stream")?.unwrap_or(false),
        route: route(info, f)?,
    })
}

fn check_context(info: &ServerInfo, len: usize, max_tokens: usize) -> Result<(), ApiError> {
    if len == 0 {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if len.saturating_add(max_tokens) > info.context {
        return Err(ApiError::invalid(
            if len > info.context {
                "prompt"
            } else {
                "max_tokens"
            },
            format!(
                "This model's maximum context length is {} tokens, however you requested {} \
                 tokens ({len} in the prompt, {max_tokens} for the completion)",
                info.context,
                len + max_tokens
            ),
        ));
    }
    Ok(())
}

/// Queues one job per prompt (all or none: a full queue refuses the request).
fn submit(
    s: &AppState,
    prompts: Vec<Vec<u32>>,
    c: &Common,
    echo: bool,
    logprobs: Option<usize>,
) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
    let mut rxs = vec![];
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
        };
        match s.jobs.try_send(job) {
            Ok(()) => rxs.push(rx),
            // Receivers already made are dropped here, so the engine skips their jobs.
            Err(mpsc::error::TrySendError::Full(_)) => return Err(ApiError::overloaded()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(ApiError::internal("the model is shutting down"))
            }
        }
    }
    Ok(rxs)
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
fn path_ext(path: Option<&drllm_runtime::LayerPath>, route: Route) -> Value {
    match path {
        Some(p) => json!({
            "path": p.to_string(),
            "cost": p.cost(),
            "num_layers": p.num_layers(),
            "budget": match route { Route::Budget(b) => Some(b), Route::AllExecute => None },
        }),
        None => Value::Null,
    }
}

/// The legacy completions `logprobs` object over `toks` (text offsets from `start`), and the
/// offset after them.
fn completion_logprobs(t: &Tokenizer, toks: &[TokenLogprob], start: usize) -> (Value, usize) {
    let mut offset = start;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for tok in toks {
        let text = t.token_text(tok.id);
        offsets.push(offset);
        offset += text.chars().count();
        tokens.push(text);
        lps.push(tok.logprob);
        tops.push(match tok.logprob {
            None => Value::Null,
            Some(_) => {
                let mut m = Map::new();
                for &(id, lp) in &tok.top {
                    m.entry(t.token_text(id)).or_insert(json!(lp));
                }
                Value::Object(m)
            }
        });
    }
    (
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}),
        offset,
    )
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let s = &s;
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let info = &s.info;
    let c = common(info, &f, 16)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = f.usize("logprobs")?;
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::invalid(
            "logprobs",
            "'logprobs' must be at most 20",
        ));
    }
    let mut ids = vec![];
    let mut texts = vec![];
    for p in api::prompts(f.value("prompt"))? {
        let (p_ids, text) = match p {
            Prompt::Text(t) => {
                let ids = s.encode(t.clone(), true, "prompt").await?;
                check_ids(info, &ids, "prompt")?;
                (ids, t)
            }
            Prompt::Ids(p_ids) => {
                check_ids(info, &p_ids, "prompt")?;
                let text = info
                    .tokenizer
                    .decode_keep_special(&p_ids)
                    .unwrap_or_default();
                (p_ids, text)
            }
        };
        check_context(info, p_ids.len(), c.max_tokens)?;
        ids.push(p_ids);
        texts.push(text);
    }
    let model = f.str("model")?.unwrap_or(&info.name).to_string();
    let id = format!("cmpl-{}", s.ids.fetch_add(1, Ordering::Relaxed));
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let prompt_tokens: usize = lens.iter().sum();
    let rxs = submit(s, ids, &c, echo, logprobs)?;
    if c.stream {
        return Ok(stream(
            s,
            lens.clone(),
            rxs,
            id,
            model,
            c.route,
            Kind::Completion,
            texts,
            echo,
            logprobs.is_some(),
            arrived,
        ));
    }
    let mut choices = vec![];
    let mut completion_tokens = 0;
    for (i, rx) in rxs.into_iter().enumerate() {
        let o = gather(rx).await?;
        s.record(c.route, lens[i], &o, arrived);
        let prefix = if echo {
            texts[i].clone()
        } else {
            String::new()
        };
        let lp = logprobs.map(|_| {
            let all: Vec<TokenLogprob> = o.prompt.iter().chain(&o.tokens).cloned().collect();
            completion_logprobs(&info.tokenizer, &all, 0).0
        });
        completion_tokens += o.completion_tokens;
        choices.push(json!({
            "index": i,
            "text": prefix + &o.text,
            "logprobs": lp,
            "finish_reason": o.finish.map(Finish::as_str),
            "drllm": path_ext(o.path.as_ref(), c.route),
        }));
    }
    Ok(json_response(
        200,
        &json!({
            "id": id,
            "object": "text_completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }),
    ))
}

async fn chat_completions(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let s = &s;
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let info = &s.info;
    let c = common(info, &f, info.context)?;
    let msgs = api::messages(f.value("messages"))?;
    let logprobs = match f.bool("logprobs")?.unwrap_or(false) {
        true => match f.usize("top_logprobs")?.unwrap_or(0) {
            k if k > 20 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "'top_logprobs' must be at most 20",
                ))
            }
            k => Some(k),
        },
        false => None,
    };
    let rendered = info
        .tokenizer
        .apply_chat_template(&msgs)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = s.encode(rendered, false, "messages").await?;
    check_ids(info, &ids, "messages")?;
    // Without max_tokens, the completion may fill the context.
    let max_tokens =
        if f.value("max_tokens").is_none() && f.value("max_completion_tokens").is_none() {
            info.context.saturating_sub(ids.len())
        } else {
            c.max_tokens
        };
    let c = Common { max_tokens, ..c };
    check_context(info, ids.len(), c.max_tokens)?;
    let prompt_len = ids.len();
    let model = f.str("model")?.unwrap_or(&info.name).to_string();
    let id = format!("chatcmpl-{}", s.ids.fetch_add(1, Ordering::Relaxed));
    let rxs = submit(s, vec![ids], &c, false, logprobs)?;
    if c.stream {
        return Ok(stream(
            s,
            vec![prompt_len],
            rxs,
            id,
            model,
            c.route,
            Kind::Chat,
            vec![],
            false,
            logprobs.is_some(),
            arrived,
        ));
    }
    let Some(rx) = rxs.into_iter().next() else {
        return Err(ApiError::internal("no job was queued"));
    };
    let o = gather(rx).await?;
    s.record(c.route, prompt_len, &o, arrived);
    let lp = logprobs.map(|_| chat_logprobs(&info.tokenizer, &o.tokens));
    Ok(json_response(
        200,
        &json!({
            "id": id,
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
                "finish_reason": o.finish.map(Finish::as_str),
                "drllm": path_ext(o.path.as_ref(), c.route),
            }],
            "usage": {
                "prompt_tokens": prompt_len,
                "completion_tokens": o.completion_tokens,
                "total_tokens": prompt_len + o.completion_tokens,
            },
        }),
    ))
}

/// The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(t: &Tokenizer, toks: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let text = t.token_text(id);
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    let content: Vec<Value> = toks
        .iter()
        .map(|tok| {
            let mut e = entry(tok.id, tok.logprob.unwrap_or(f32::NAN));
            e["top_logprobs"] = tok.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// Server-sent events: one chunk per text delta of any prompt, a last chunk per prompt with its
/// finish reason and path, then `[DONE]`. An error mid-stream is sent as an `error` chunk.
#[allow(clippy::too_many_arguments)]
fn stream(
    state: &AppState,
    lens: Vec<usize>,
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
    id: String,
    model: String,
    route: Route,
    kind: Kind,
    texts: Vec<String>,
    echo: bool,
    logprobs: bool,
    arrived: Instant,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let created = now();
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let chunk = move |index: usize, delta: Value, lp: Value, finish: Option<&str>, ext: Value| {
        let choice = match kind {
            Kind::Completion => json!({"index": index, "text": delta, "logprobs": lp,
                "finish_reason": finish, "drllm": ext}),
            Kind::Chat => json!({"index": index, "delta": delta, "logprobs": lp,
                "finish_reason": finish, "drllm": ext}),
        };
        let v = json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [choice]});
        Bytes::from(format!("data: {v}\n\n"))
    };
    let n = rxs.len();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    for (index, mut events) in rxs.into_iter().enumerate() {
        let (tx, chunk, done_tx) = (tx.clone(), chunk.clone(), done_tx.clone());
        let (state, lens) = (state.clone(), lens.clone());
        let prefix = (echo && kind == Kind::Completion).then(|| texts[index].clone());
        tokio::spawn(async move {
            if kind == Kind::Chat {
                let _ = tx.send(chunk(
                    index,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                    Value::Null,
                ));
            }
            let tok = &state.info.tokenizer;
            // With log-probabilities, the echoed prompt goes out with its own (from the
            // prompt's event); without, at once.
            let mut prefix = prefix;
            if !logprobs {
                if let Some(p) = prefix.take() {
                    let _ = tx.send(chunk(index, json!(p), Value::Null, None, Value::Null));
                }
            }
            // Text offset of the next token (completions' `text_offset`).
            let mut offset = 0;
            let mut first = None;
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Prompt(p) => {
                        if let Some(text) = prefix.take() {
                            let (lp, next) = completion_logprobs(tok, &p, offset);
                            offset = next;
                            let _ = tx.send(chunk(index, json!(text), lp, None, Value::Null));
                        }
                    }
                    Event::Delta { text, tokens } => {
                        first.get_or_insert_with(Instant::now);
                        let delta = match kind {
                            Kind::Completion => json!(text),
                            Kind::Chat => json!({"content": text}),
                        };
                        let lp = match (logprobs, kind) {
                            (false, _) => Value::Null,
                            (true, Kind::Completion) => {
                                let (lp, next) = completion_logprobs(tok, &tokens, offset);
                                offset = next;
                                lp
                            }
                            (true, Kind::Chat) => chat_logprobs(tok, &tokens),
                        };
                        if tx.send(chunk(index, delta, lp, None, Value::Null)).is_err() {
                            return; // The client left: dropping `events` ends the job.
                        }
                    }
                    Event::Done {
                        finish,
                        path,
                        completion_tokens,
                    } => {
                        let o = Outcome {
                            path: Some(path.clone()),
                            completion_tokens,
                            first,
                            ..Outcome::default()
                        };
                        state.record(route, lens[index], &o, arrived);
                        let empty = match kind {
                            Kind::Completion => json!(""),
                            Kind::Chat => json!({}),
                        };
                        let _ = tx.send(chunk(
                            index,
                            empty,
                            Value::Null,
                            Some(finish.as_str()),
                            path_ext(Some(&path), route),
                        ));
                        break;
                    }
                    Event::Failed { message, status } => {
                        let e = ApiError::from_status(status, message);
                        let _ = tx.send(Bytes::from(format!("data: {}\n\n", e.body())));
                        break;
                    }
                }
            }
            let _ = done_tx.send(());
        });
    }
    drop(done_tx);
    tokio::spawn(async move {
        for _ in 0..n {
            if done_rx.recv().await.is_none() {
                break;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| ApiError::internal("building the stream").into_response())
}
