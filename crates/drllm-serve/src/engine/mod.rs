//! The model thread. Requests queue on a bounded channel and join the running batch at step
//! boundaries: each newcomer group is prefilled (along the all-execute path, or routed once per
//! prompt by the routers at its budget), then concatenated with the rows already decoding, each
//! row keeping its own path and KV caches. Finished rows (stop token, stop string, token budget,
//! client gone) leave the batch at once. Events stream back to each request's handler.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use drllm_router::Policy;
use drllm_runtime::{LayerPath, LoadedModel, PathBatch};
use tch::Tensor;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

mod queue;
mod row;
mod score;

use queue::Queue;
pub use row::sample;
use row::{accept_step, finish, Row};
use score::{prompt_events, score_shared, top_k};

/// How a request's path is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    /// Every block once (the unrouted model).
    AllExecute,
    /// The server's routers, at this budget (decided once per request, during prefill).
    Budget(f64),
}

impl Route {
    fn key(self) -> Option<u64> {
        match self {
            Route::AllExecute => None,
            Route::Budget(b) => Some(b.to_bits()),
        }
    }
}

/// Temperature sampling with optional nucleus (top-p) filtering; temperature 0 is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (the argmax, first on ties, as the runtime's own greedy decoding).
    pub temperature: f64,
    /// Keep the most probable tokens whose probabilities sum to at least this (1 = all).
    pub top_p: f64,
    /// Seed of this request's random stream (`None`: from the OS).
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// One prompt to complete.
#[derive(Debug)]
pub struct Job {
    /// Token ids, scored and continued exactly as given (no BOS added).
    pub prompt: Vec<u32>,
    /// Most new tokens (0: score the prompt only).
    pub max_tokens: usize,
    /// Send the prompt's tokens with their log-probabilities first ([`Event::Prompt`]).
    pub echo: bool,
    /// Log-probabilities wanted, with this many alternatives per position (`None`: none).
    pub logprobs: Option<usize>,
    /// How tokens are drawn.
    pub sampling: Sampling,
    /// Strings that end the completion (not included in its text).
    pub stop: Vec<String>,
    /// How the path is chosen.
    pub route: Route,
    /// Where this job's events go; a closed receiver (the client left) ends the job.
    pub events: mpsc::UnboundedSender<Event>,
    /// Set (for all of a request's prompts) when the server itself gives up the request (the
    /// queue was full, or another of its prompts failed): its receivers then close, but no
    /// client cancelled it, so it is not counted as cancelled.
    pub abandoned: Arc<AtomicBool>,
}

impl Job {
    /// Whether the client left before the job ended (its receiver closed while the request
    /// was still wanted).
    fn cancelled(&self) -> bool {
        self.events.is_closed() && !self.abandoned.load(Ordering::Relaxed)
    }
}

/// A token with its log-probability under the model (`None` for a prompt's first token) and
/// the most probable alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// Its log-probability.
    pub logprob: Option<f32>,
    /// The top alternatives `(id, logprob)`, most probable first.
    pub top: Vec<(u32, f32)>,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// The token budget.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a job reports, in order: the prompt (with echo), text deltas, then `Done` (or
/// `Failed`).
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's tokens; log-probabilities when the job asked for them.
    Prompt(Vec<TokenLogprob>),
    /// New text, and the tokens generated since the last delta (log-probabilities filled when
    /// asked for).
    Delta {
        /// Text (a stop string and anything after it never appear).
        text: String,
        /// The tokens.
        tokens: Vec<TokenLogprob>,
    },
    /// The end.
    Done {
        /// Why.
        finish: Finish,
        /// The path the request took.
        path: LayerPath,
        /// Tokens generated (up to a stop token, which is not counted).
        completion_tokens: usize,
    },
    /// The job could not run.
    Failed {
        /// What went wrong.
        message: String,
        /// The HTTP status it answers with: 400 (the request was at fault), 500 (the server
        /// was) or 503 (the server is shutting down and its drain deadline passed).
        status: u16,
    },
}

/// Limits of the running batch.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most rows decoding together.
    pub max_batch: usize,
    /// Most tokens (prompt + new) of all rows together: bounds the KV caches.
    pub max_batch_tokens: usize,
    /// libtorch's CPU threads for the model thread (`None`: libtorch's choice). Set on the
    /// model thread itself: the count is per thread.
    pub threads: Option<i32>,
}

/// What the model thread shares with the HTTP side.
#[derive(Clone)]
pub struct Shared {
    /// Metrics the model thread keeps current (running batch, queue, cancellations).
    pub metrics: Metrics,
    /// Set when the drain deadline passes: every job in the batch or the queue, and every
    /// later one, fails with 503 at once.
    pub abort: Arc<AtomicBool>,
}

impl Shared {
    /// Fresh metrics for a model of `num_layers` blocks, not aborted.
    pub fn new(num_layers: usize) -> Shared {
        Shared {
            metrics: Metrics::new(num_layers),
            abort: Arc::new(AtomicBool::new(false)),
        }
    }
}

const ABORTED: &str = "the server is shutting down and its drain deadline passed";

/// What can fail in the model thread; the requests it fails get it as text.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The runtime refused or failed a batch operation (prefill, decode, joining, shrinking).
    #[error(transparent)]
    Runtime(#[from] drllm_runtime::Error),
    /// A tensor could not be read back.
    #[error("reading a tensor: {0}")]
    Tensor(#[from] tch::TchError),
    /// The routers could not be set at a budget a request asked for.
    #[error(transparent)]
    Budget(#[from] drllm_router::BudgetError),
}

/// Budgets besides the default whose policies are kept at once.
const MAX_BUDGETS: usize = 16;

/// The server's routers: the package's policy at the default budget, and one per other budget
/// asked for (made on first use; they share the router weights).
pub struct Routers {
    default: Policy,
    others: HashMap<u64, Policy>,
}

impl Routers {
    /// Routers from a policy loaded (and checked against the model) at the default budget.
    pub fn new(default: Policy) -> Routers {
        Routers {
            default,
            others: HashMap::new(),
        }
    }

    /// The default budget.
    pub fn default_budget(&self) -> f64 {
        self.default.budget()
    }

    fn policy(&mut self, budget: f64) -> Result<&Policy, EngineError> {
        if budget.to_bits() == self.default.budget().to_bits() {
            return Ok(&self.default);
        }
        // Each budget holds a copy of the router weights: keep a few.
        if self.others.len() >= MAX_BUDGETS && !self.others.contains_key(&budget.to_bits()) {
            self.others.clear();
        }
        match self.others.entry(budget.to_bits()) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let p = Policy::new(
                    self.default.routers.snapshot(),
                    self.default.windows,
                    budget,
                )?;
                Ok(e.insert(p))
            }
        }
    }
}

/// Runs the model thread until every sender of `jobs` is dropped and the batch is empty.
pub fn run(
    lm: LoadedModel,
    mut routers: Option<Routers>,
    jobs: mpsc::Receiver<Job>,
    cfg: EngineConfig,
    shared: Shared,
) {
    let m = &shared.metrics;
    let _g = tch::no_grad_guard();
    tracing::debug!(
        default_threads = tch::get_num_threads(),
        "model thread started"
    );
    if let Some(n) = cfg.threads.filter(|&n| n >= 1) {
        tch::set_num_threads(n);
    }
    let stop_ids = lm.stop_ids();
    let mut batch: Option<PathBatch<'_>> = None;
    let mut rows: Vec<Row> = vec![];
    let mut queue = Queue::new(jobs);
    loop {
        // A panic (a libtorch error surfacing as one) fails the requests in the batch, not
        // the server.
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> bool {
            if shared.abort.load(Ordering::Relaxed) {
                for r in &mut rows {
                    fail(r, ABORTED, 503);
                }
                rows.clear();
                batch = None;
                for j in queue.drain() {
                    fail_job(j, ABORTED, 503);
                }
                m.running.set(0);
                m.waiting.set(0);
                return match queue.next() {
                    Some(j) => {
                        fail_job(j, ABORTED, 503);
                        true
                    }
                    None => false,
                };
            }
            // Rows that ended at the last step (or whose client left) leave first.
            batch = retire(&lm, batch.take(), &mut rows, m);
            m.running.set(rows.len() as i64);
            m.waiting.set(queue.len() as i64);
            // Admit: block when idle, else take what is queued, up to the limits.
            if rows.is_empty() && queue.wait().is_none() {
                return false;
            }
            let held: usize = rows.iter().map(Row::tokens_held).sum();
            let new = queue.take(rows.len(), held, &cfg, m);
            if !new.is_empty() {
                match admit(&lm, routers.as_mut(), new, &stop_ids) {
                    Ok(Some((b, mut new_rows))) => {
                        // Rows that ended at prefill never join the running batch.
                        let b = retire(&lm, Some(b), &mut new_rows, m);
                        let joined = match (batch.take(), b) {
                            (Some(running), Some(b)) => PathBatch::concat(vec![running, b]),
                            (Some(only), None) | (None, Some(only)) => Ok(only),
                            (None, None) => return true,
                        };
                        match joined {
                            Ok(j) => {
                                batch = Some(j);
                                rows.extend(new_rows);
                            }
                            Err(e) => {
                                let msg = format!("joining the batch: {e}");
                                fail_all(&mut rows, &msg);
                                fail_all(&mut new_rows, &msg);
                                rows.clear();
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("prefill failed: {e}"),
                }
            }
            m.running.set(rows.len() as i64);
            m.waiting.set(queue.len() as i64);
            let Some(b) = batch.as_mut() else {
                return true;
            };
            // One decode step for every row (all unfinished here).
            let feed: Vec<u32> = rows
                .iter()
                .map(|r| r.tokens.last().copied().unwrap_or(0))
                .collect();
            let logits = match b.decode_step(&feed) {
                Ok(l) => l,
                Err(e) => {
                    fail_all(&mut rows, &format!("decoding: {e}"));
                    rows.clear();
                    batch = None;
                    return true;
                }
            };
            if let Err(e) = accept_step(&lm, &mut rows, &logits, &stop_ids) {
                fail_all(&mut rows, &e.to_string());
                rows.clear();
                batch = None;
            }
            true
        }));
        match step {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                fail_all(
                    &mut rows,
                    "internal error in the model thread (see the server log)",
                );
                rows.clear();
                batch = None;
            }
        }
    }
}

/// Sends `Done` to the rows that ended (or whose client left) and drops them from `batch`
/// (and the cache positions only they needed); `None` once no row is left.
fn retire<'m>(
    lm: &LoadedModel,
    batch: Option<PathBatch<'m>>,
    rows: &mut Vec<Row>,
    m: &Metrics,
) -> Option<PathBatch<'m>> {
    let keep: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].finish.is_none() && !rows[i].job.events.is_closed())
        .collect();
    if keep.len() == rows.len() {
        return batch;
    }
    let old = std::mem::take(rows);
    for (i, mut r) in old.into_iter().enumerate() {
        if keep.binary_search(&i).is_ok() {
            rows.push(r);
        } else {
            if r.finish.is_none() && r.job.cancelled() {
                m.cancelled.inc();
            }
            finish(&mut r, lm);
        }
    }
    let mut b = batch?;
    if keep.is_empty() {
        return None;
    }
    match b.retain(&keep) {
        Ok(()) => {
            b.trim_padding();
            Some(b)
        }
        Err(e) => {
            fail_all(rows, &format!("shrinking the batch: {e}"));
            rows.clear();
            None
        }
    }
}

/// Prefills `jobs` in groups of one route each; returns their joined batch and rows, each row
/// with its first token accepted (or finished already).
fn admit<'m>(
    lm: &'m LoadedModel,
    mut routers: Option<&mut Routers>,
    jobs: Vec<Job>,
    stop_ids: &[u32],
) -> Result<Option<(PathBatch<'m>, Vec<Row>)>, EngineError> {
    let mut groups: Vec<(Route, Vec<Job>)> = vec![];
    for j in jobs {
        match groups.iter_mut().find(|(r, _)| r.key() == j.route.key()) {
            Some((_, g)) => g.push(j),
            None => groups.push((j.route, vec![j])),
        }
    }
    let n = lm.model.num_layers();
    let (mut parts, mut all_rows) = (vec![], vec![]);
    for (route, mut group) in groups {
        if route == Route::AllExecute {
            group = score_shared(lm, group, stop_ids);
            if group.is_empty() {
                continue;
            }
        }
        let prompts: Vec<Vec<u32>> = group.iter().map(|j| j.prompt.clone()).collect();
        let started = std::time::Instant::now();
        let prefilled = match route {
            Route::AllExecute => {
                let paths = vec![LayerPath::all_ones(n); group.len()];
                PathBatch::new(&lm.model, &paths)
                    .and_then(|mut b| b.prefill(&prompts).map(|h| (b, h)))
                    .map_err(|e| (e.to_string(), 500))
            }
            Route::Budget(budget) => match routers.as_deref_mut() {
                None => Err(("this server has no routers".to_string(), 400)),
                Some(r) => match r.policy(budget) {
                    Err(e) => Err((e.to_string(), 400)),
                    Ok(policy) => {
                        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
                        let mut b = PathBatch::new_routed(&lm.model, group.len());
                        let mut route = |l: usize, h: &Tensor| policy.decide(l, h, &lens);
                        b.prefill_routed(&prompts, &mut route)
                            .map(|h| (b, h))
                            .map_err(|e| (e.to_string(), 500))
                    }
                },
            },
        };
        let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        let (b, h) = match prefilled {
            Ok(x) => x,
            Err((msg, status)) => {
                for j in group {
                    fail_job(j, &msg, status);
                }
                continue;
            }
        };
        let mut rows: Vec<Row> = group
            .into_iter()
            .zip(b.paths().to_vec())
            .map(|(j, p)| Row::new(j, p))
            .collect();
        if let Err(e) = prompt_events(lm, &mut rows, &h) {
            let e = e.to_string();
            for r in &mut rows {
                fail(r, &e, 500);
            }
            continue;
        }
        let t = h.size()[1];
        let last = lm.model.logits(&h.select(1, t - 1));
        // Rows that only score their prompt take no token.
        for r in rows.iter_mut().filter(|r| r.job.max_tokens == 0) {
            r.finish = Some(Finish::Length);
        }
        accept_step(lm, &mut rows, &last, stop_ids)?;
        tracing::debug!(
            rows = rows.len(),
            positions = t,
            ?route,
            prefill_ms,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "admitted"
        );
        parts.push(b);
        all_rows.extend(rows);
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let joined = PathBatch::concat(parts)?;
    Ok(Some((joined, all_rows)))
}

fn fail(r: &mut Row, msg: &str, status: u16) {
    r.finish = Some(Finish::Stop);
    let _ = r.job.events.send(Event::Failed {
        message: msg.to_string(),
        status,
    });
}

fn fail_job(j: Job, msg: &str, status: u16) {
    let _ = j.events.send(Event::Failed {
        message: msg.to_string(),
        status,
    });
}

fn fail_all(rows: &mut [Row], msg: &str) {
    tracing::error!("{msg}");
    for r in rows {
        fail(r, msg, 500);
    }
}
