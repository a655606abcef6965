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
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

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

    fn policy(&mut self, budget: f64) -> Result<&Policy, String> {
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
                )
                .map_err(|e| e.to_string())?;
                Ok(e.insert(p))
            }
        }
    }
}

/// A row of the running batch.
struct Row {
    job: Job,
    path: LayerPath,
    rng: rand::rngs::StdRng,
    /// Tokens generated so far, and their log-probabilities when asked for.
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    /// The text of `tokens[..read_offset]`, decoded incrementally: each step decodes only the
    /// tokens since `prefix_offset` (a window that starts a few tokens back, so that merges
    /// and multi-byte characters across the boundary come out as a whole decode gives them).
    text: String,
    prefix_offset: usize,
    read_offset: usize,
    /// Bytes of `text` already searched for stop strings.
    searched: usize,
    /// Bytes of the decoded text and tokens already sent.
    sent_text: usize,
    sent_tokens: usize,
    /// Set once the row has ended.
    finish: Option<Finish>,
    /// It ended at a stop string (its text is cut there; nothing held back is sent).
    at_stop_string: bool,
}

impl Row {
    fn new(job: Job, path: LayerPath) -> Row {
        let rng = match job.sampling.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Row {
            job,
            path,
            rng,
            tokens: vec![],
            logprobs: vec![],
            text: String::new(),
            prefix_offset: 0,
            read_offset: 0,
            searched: 0,
            sent_text: 0,
            sent_tokens: 0,
            finish: None,
            at_stop_string: false,
        }
    }

    /// Appends the text of the tokens since the last call to `text`, once it is whole (not
    /// ending in an unfinished character), or in any case with `last`. Decoding only the
    /// window keeps a step's cost independent of the length generated so far.
    fn decode_new(&mut self, lm: &LoadedModel, last: bool) {
        if self.read_offset >= self.tokens.len() {
            return;
        }
        let t = &lm.tokenizer;
        let before = t
            .decode(&self.tokens[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let after = t
            .decode(&self.tokens[self.prefix_offset..])
            .unwrap_or_default();
        // (byte-fallback tokenizers decode each byte of an unfinished character to U+FFFD)
        if (last || !after.ends_with('\u{FFFD}'))
            && after.len() >= before.len()
            && after.is_char_boundary(before.len())
        {
            self.text.push_str(&after[before.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
    }

    /// What the row may come to hold: its prompt and its whole token budget.
    fn tokens_held(&self) -> usize {
        self.job.prompt.len().saturating_add(self.job.max_tokens)
    }
}

/// Runs the model thread until every sender of `jobs` is dropped and the batch is empty.
pub fn run(
    lm: LoadedModel,
    mut routers: Option<Routers>,
    mut jobs: mpsc::Receiver<Job>,
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
    // A job that did not fit the token bound waits here for the next step.
    let mut waiting: Option<Job> = None;
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
                for j in waiting
                    .take()
                    .into_iter()
                    .chain(std::iter::from_fn(|| jobs.try_recv().ok()))
                {
                    fail_job(j, ABORTED, 503);
                }
                m.running.set(0);
                m.waiting.set(0);
                return match jobs.blocking_recv() {
                    Some(j) => {
                        fail_job(j, ABORTED, 503);
                        true
                    }
                    None => false,
                };
            }
            // Rows that ended at the last step (or whose client left) leave first.
            batch = retire(&lm, batch.take(), &mut rows, m);
            // Admit: block when idle, else take what is queued, up to the limits.
            let mut new: Vec<Job> = vec![];
            let mut held: usize = rows.iter().map(Row::tokens_held).sum();
            if rows.is_empty() && waiting.is_none() {
                match jobs.blocking_recv() {
                    Some(j) => waiting = Some(j),
                    None => return false,
                }
            }
            while rows.len() + new.len() < cfg.max_batch.max(1) {
                let Some(j) = waiting.take().or_else(|| jobs.try_recv().ok()) else {
                    break;
                };
                if j.events.is_closed() {
                    m.cancelled.inc();
                    continue;
                }
                let need = j.prompt.len().saturating_add(j.max_tokens);
                // A job alone over the bound still runs (the bound would otherwise starve it).
                if held.saturating_add(need) > cfg.max_batch_tokens
                    && !(rows.is_empty() && new.is_empty())
                {
                    waiting = Some(j);
                    break;
                }
                held = held.saturating_add(need);
                new.push(j);
            }
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
            m.waiting
                .set((jobs.len() + usize::from(waiting.is_some())) as i64);
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
                fail_all(&mut rows, &e);
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
            if r.finish.is_none() {
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
) -> Result<Option<(PathBatch<'m>, Vec<Row>)>, String> {
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
                    Err(e) => Err((e, 400)),
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
    let joined = PathBatch::concat(parts).map_err(|e| e.to_string())?;
    Ok(Some((joined, all_rows)))
}

/// Prompt positions whose log-probabilities are computed at once.
const ECHO_CHUNK: i64 = 512;

/// Shortest prefix worth sharing between prompts (a second forward pass costs more than a
/// few positions).
const MIN_SHARED: usize = 8;

/// Answers the jobs of `jobs` that only score their prompt (at most one token, lm-eval's
/// log-likelihood requests) and share a prefix of at least [`MIN_SHARED`] tokens with another,
/// all along every block: each shared prefix is prefilled, and its log-probabilities computed,
/// once, and every prompt resumes from it with its own rest. lm-eval sends a question with each
/// of its answer choices, so this prefills and scores the question once instead of once per
/// choice. Returns the jobs it did not take.
fn score_shared(lm: &LoadedModel, jobs: Vec<Job>, stop_ids: &[u32]) -> Vec<Job> {
    let (scoring, mut rest): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| j.max_tokens <= 1 && j.prompt.len() > MIN_SHARED);
    // Clusters of prompts, sorted so that prompts sharing a prefix are neighbours; a cluster's
    // prefix leaves every member at least one token of its own.
    let mut scoring: Vec<Option<Job>> = scoring.into_iter().map(Some).collect();
    let mut order: Vec<usize> = (0..scoring.len()).collect();
    let prompt = |i: usize, s: &[Option<Job>]| s[i].as_ref().map_or(vec![], |j| j.prompt.clone());
    order.sort_by_key(|&i| prompt(i, &scoring));
    let mut clusters: Vec<(usize, Vec<usize>)> = vec![];
    for &i in &order {
        let p = prompt(i, &scoring);
        if let Some((plen, members)) = clusters.last_mut() {
            let first = prompt(members[0], &scoring);
            let lcp = first.iter().zip(&p).take_while(|(a, b)| a == b).count();
            let shared = lcp.min(*plen).min(p.len() - 1);
            if shared >= MIN_SHARED {
                *plen = shared;
                members.push(i);
                continue;
            }
        }
        clusters.push((p.len() - 1, vec![i]));
    }
    let (shared, single): (Vec<_>, Vec<_>) = clusters.into_iter().partition(|c| c.1.len() > 1);
    for (_, members) in single {
        rest.extend(members.into_iter().filter_map(|i| scoring[i].take()));
    }
    if shared.is_empty() {
        return rest;
    }
    let jobs: Vec<(usize, Job)> = shared
        .iter()
        .enumerate()
        .flat_map(|(c, (_, members))| members.iter().map(move |&i| (c, i)))
        .filter_map(|(c, i)| scoring[i].take().map(|j| (c, j)))
        .collect();
    let plens: Vec<usize> = shared.iter().map(|c| c.0).collect();
    let started = std::time::Instant::now();
    let n = lm.model.num_layers();
    let result = score_shared_rows(lm, &jobs, &plens);
    let mut rows: Vec<Row> = jobs
        .into_iter()
        .map(|(_, j)| Row::new(j, LayerPath::all_ones(n)))
        .collect();
    match result {
        Ok((prompts, last)) => {
            for (r, p) in rows.iter_mut().zip(prompts) {
                if let Some(p) = p {
                    let _ = r.job.events.send(Event::Prompt(p));
                }
            }
            for r in rows.iter_mut().filter(|r| r.job.max_tokens == 0) {
                r.finish = Some(Finish::Length);
            }
            if let Err(e) = accept_step(lm, &mut rows, &last, stop_ids) {
                for r in &mut rows {
                    fail(r, &e, 500);
                }
            }
            for r in &mut rows {
                r.finish.get_or_insert(Finish::Length);
                finish(r, lm);
            }
            tracing::debug!(
                rows = rows.len(),
                prefixes = plens.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "scored with shared prefixes"
            );
        }
        Err(e) => {
            tracing::error!("scoring with shared prefixes: {e}");
            for r in &mut rows {
                fail(r, &e, 500);
            }
        }
    }
    rest
}

/// The prompt events (for the rows that echo) and the next-token logits `[B, V]` of `jobs`,
/// each `(cluster, job)`, whose cluster `c` shares its first `plens[c]` tokens.
#[allow(clippy::type_complexity)]
fn score_shared_rows(
    lm: &LoadedModel,
    jobs: &[(usize, Job)],
    plens: &[usize],
) -> Result<(Vec<Option<Vec<TokenLogprob>>>, Tensor), String> {
    let n = lm.model.num_layers();
    let first = |c: usize| jobs.iter().find(|(cc, _)| *cc == c).map(|(_, j)| j);
    let prefixes: Vec<Vec<u32>> = (0..plens.len())
        .map(|c| first(c).map_or(vec![], |j| j.prompt[..plens[c]].to_vec()))
        .collect();
    let mut pb = PathBatch::new(&lm.model, &vec![LayerPath::all_ones(n); prefixes.len()])
        .map_err(|e| e.to_string())?;
    let hp = pb.prefill(&prefixes).map_err(|e| e.to_string())?;
    let rows: Vec<usize> = jobs.iter().map(|(c, _)| *c).collect();
    let mut rb = pb.select_rows(&rows).map_err(|e| e.to_string())?;
    let rests: Vec<Vec<u32>> = jobs
        .iter()
        .map(|(c, j)| j.prompt[plens[*c]..].to_vec())
        .collect();
    let hs = rb.extend(&rests).map_err(|e| e.to_string())?;
    // Per cluster, once: the log-probabilities of the prefix's own tokens, and the
    // distribution after it (each member's first own token is scored from it).
    let tp = hp.size()[1];
    let k_max = jobs
        .iter()
        .filter(|(_, j)| j.echo)
        .filter_map(|(_, j)| j.logprobs)
        .max();
    let mut shared: Vec<Option<(Vec<f32>, Vec<Vec<(u32, f32)>>, Tensor, Vec<(u32, f32)>)>> =
        (0..plens.len()).map(|_| None).collect();
    if let Some(k) = k_max {
        for (c, &plen) in plens.iter().enumerate() {
            if !jobs
                .iter()
                .any(|(cc, j)| *cc == c && j.echo && j.logprobs.is_some())
            {
                continue;
            }
            let h = hp.get(c as i64).narrow(0, tp - plen as i64, plen as i64);
            let (chosen, tops) =
                position_logprobs(lm, &h.narrow(0, 0, plen as i64 - 1), &prefixes[c][1..], k)?;
            let after = lm
                .model
                .logits(&h.narrow(0, plen as i64 - 1, 1))
                .log_softmax(-1, Kind::Float);
            let top_after = top_k(&after, k)?.pop().unwrap_or_default();
            shared[c] = Some((chosen, tops, after, top_after));
        }
    }
    let mut events = vec![];
    let mut last_h = vec![];
    for (r, (c, job)) in jobs.iter().enumerate() {
        let plen = plens[*c];
        let own = job.prompt.len() - plen;
        let h = hs.get(r as i64);
        last_h.push(h.get(own as i64 - 1));
        if !job.echo {
            events.push(None);
            continue;
        }
        let mut out: Vec<TokenLogprob> = job
            .prompt
            .iter()
            .map(|&id| TokenLogprob {
                id,
                logprob: None,
                top: vec![],
            })
            .collect();
        if let (Some(k), Some((chosen, tops, after, top_after))) = (job.logprobs, &shared[*c]) {
            // Tokens 1..plen from the prefix, token plen from the distribution after it, the
            // rest from the row's own positions.
            for (j, (v, top)) in chosen.iter().zip(tops).enumerate() {
                out[1 + j].logprob = Some(*v);
                out[1 + j].top = top.iter().take(k).copied().collect();
            }
            out[plen].logprob = Some(after.double_value(&[0, job.prompt[plen] as i64]) as f32);
            out[plen].top = top_after.iter().take(k).copied().collect();
            if own > 1 {
                let (chosen, tops) = position_logprobs(
                    lm,
                    &h.narrow(0, 0, own as i64 - 1),
                    &job.prompt[plen + 1..],
                    k,
                )?;
                for (j, (v, top)) in chosen.into_iter().zip(tops).enumerate() {
                    out[plen + 1 + j].logprob = Some(v);
                    out[plen + 1 + j].top = top;
                }
            }
        }
        events.push(Some(out));
    }
    Ok((events, lm.model.logits(&Tensor::stack(&last_h, 0))))
}

/// Each position's log-probability of its target, and its top tokens.
type PositionLogprobs = (Vec<f32>, Vec<Vec<(u32, f32)>>);

/// Log-probabilities of `targets[i]` after position `i` of `h` `[N, H]` (final-normed hidden
/// states), and the `k` most probable tokens there, in chunks of positions.
fn position_logprobs(
    lm: &LoadedModel,
    h: &Tensor,
    targets: &[u32],
    k: usize,
) -> Result<PositionLogprobs, String> {
    let len = targets.len() as i64;
    let (mut chosen, mut tops) = (vec![], vec![]);
    let mut from = 0i64;
    while from < len {
        let n = ECHO_CHUNK.min(len - from);
        let lp = lm
            .model
            .logits(&h.narrow(0, from, n))
            .log_softmax(-1, Kind::Float);
        let ids: Vec<i64> = targets[from as usize..(from + n) as usize]
            .iter()
            .map(|&x| x as i64)
            .collect();
        let idx = Tensor::from_slice(&ids).to_device(lp.device()).unsqueeze(1);
        chosen.extend(
            Vec::<f32>::try_from(
                lp.gather(1, &idx, false)
                    .squeeze_dim(1)
                    .to_device(tch::Device::Cpu),
            )
            .map_err(|e| e.to_string())?,
        );
        tops.extend(top_k(&lp, k)?);
        from += n;
    }
    Ok((chosen, tops))
}

/// Sends each echo row its prompt's tokens (with log-probabilities when asked for), from the
/// prefill's final hidden states `h` `[B, T, H]` (left-padded).
fn prompt_events(lm: &LoadedModel, rows: &mut [Row], h: &Tensor) -> Result<(), String> {
    let t = h.size()[1];
    for (i, r) in rows.iter_mut().enumerate() {
        if !r.job.echo {
            continue;
        }
        let p = &r.job.prompt;
        let mut out: Vec<TokenLogprob> = p
            .iter()
            .map(|&id| TokenLogprob {
                id,
                logprob: None,
                top: vec![],
            })
            .collect();
        if let (Some(k), true) = (r.job.logprobs, p.len() > 1) {
            let len = p.len() as i64;
            let row = h.get(i as i64).narrow(0, t - len, len - 1);
            // In chunks of positions: [positions, vocab] logits of a long prompt are large.
            let mut from = 0i64;
            while from < len - 1 {
                let n = ECHO_CHUNK.min(len - 1 - from);
                let lp = lm
                    .model
                    .logits(&row.narrow(0, from, n))
                    .log_softmax(-1, Kind::Float);
                let ids: Vec<i64> = p[1 + from as usize..1 + (from + n) as usize]
                    .iter()
                    .map(|&x| x as i64)
                    .collect();
                let idx = Tensor::from_slice(&ids).to_device(lp.device()).unsqueeze(1);
                let chosen = Vec::<f32>::try_from(
                    lp.gather(1, &idx, false)
                        .squeeze_dim(1)
                        .to_device(tch::Device::Cpu),
                )
                .map_err(|e| e.to_string())?;
                let tops = top_k(&lp, k)?;
                for (j, (c, top)) in chosen.into_iter().zip(tops).enumerate() {
                    let pos = 1 + from as usize + j;
                    out[pos].logprob = Some(c);
                    out[pos].top = top;
                }
                from += n;
            }
        }
        let _ = r.job.events.send(Event::Prompt(out));
    }
    Ok(())
}

/// The `k` most probable `(id, logprob)` of each row of `lp` `[N, V]`.
fn top_k(lp: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>, String> {
    let n = lp.size()[0] as usize;
    if k == 0 {
        return Ok(vec![vec![]; n]);
    }
    let (v, i) = lp.topk(k as i64, -1, true, true);
    let v = Vec::<f32>::try_from(v.to_device(tch::Device::Cpu).reshape([-1]))
        .map_err(|e| e.to_string())?;
    let i = Vec::<i64>::try_from(i.to_device(tch::Device::Cpu).reshape([-1]))
        .map_err(|e| e.to_string())?;
    Ok((0..n)
        .map(|r| {
            (0..k)
                .map(|j| (i[r * k + j] as u32, v[r * k + j]))
                .collect()
        })
        .collect())
}

/// Draws each unfinished row's next token from `logits` `[B, V]` (rows in batch order) and
/// applies it: stop token, text, stop strings, token budget.
fn accept_step(
    lm: &LoadedModel,
    rows: &mut [Row],
    logits: &Tensor,
    stop_ids: &[u32],
) -> Result<(), String> {
    let greedy = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))
        .map_err(|e| e.to_string())?;
    let want_lp = rows.iter().any(|r| r.job.logprobs.is_some());
    let lp = want_lp.then(|| logits.log_softmax(-1, Kind::Float));
    for (i, r) in rows.iter_mut().enumerate() {
        if r.finish.is_some() {
            continue;
        }
        let s = r.job.sampling;
        let tok = if s.temperature <= 0.0 {
            greedy[i] as u32
        } else {
            let row = Vec::<f32>::try_from(logits.get(i as i64).to_device(tch::Device::Cpu))
                .map_err(|e| e.to_string())?;
            sample(&row, &s, &mut r.rng)
        };
        if let (Some(k), Some(lp)) = (r.job.logprobs, &lp) {
            let row = lp.get(i as i64);
            let logprob = row.double_value(&[tok as i64]) as f32;
            let top = top_k(&row.unsqueeze(0), k)?.pop().unwrap_or_default();
            r.logprobs.push(TokenLogprob {
                id: tok,
                logprob: Some(logprob),
                top,
            });
        }
        if stop_ids.contains(&tok) {
            // Not part of the text, but its log-probability is reported (an echo request
            // scoring a continuation reads one generated token's entry after the prompt's).
            r.finish = Some(Finish::Stop);
            continue;
        }
        r.tokens.push(tok);
        emit(r, lm);
        if r.finish.is_none() && r.tokens.len() >= r.job.max_tokens {
            r.finish = Some(Finish::Length);
        }
    }
    Ok(())
}

/// Sends the row's new text (holding back what could be the start of a stop string), or ends
/// it at a stop string.
fn emit(r: &mut Row, lm: &LoadedModel) {
    r.decode_new(lm, false);
    let text = &r.text;
    let mut end = text.len();
    // Only where a stop string can newly appear: no match ends before what was searched.
    let longest = r.job.stop.iter().map(String::len).max().unwrap_or(0);
    let mut from = r.searched.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    r.searched = text.len();
    if let Some(pos) = r
        .job
        .stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[from..].find(s.as_str()).map(|p| p + from))
        .min()
    {
        end = pos;
        r.finish = Some(Finish::Stop);
        r.at_stop_string = true;
    } else {
        // A suffix that may grow into a stop string waits.
        let held = r
            .job
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && text[..end].ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        end -= held;
    }
    if end > r.sent_text && text.is_char_boundary(end) && text.is_char_boundary(r.sent_text) {
        let delta = r.text[r.sent_text..end].to_string();
        let tokens = new_tokens(r);
        r.sent_text = end;
        let _ = r.job.events.send(Event::Delta {
            text: delta,
            tokens,
        });
    }
}

/// Tokens not sent yet (with a stop token's log-probability entry last, once it ended the
/// row).
fn new_tokens(r: &mut Row) -> Vec<TokenLogprob> {
    let from = r.sent_tokens;
    let end = r.tokens.len().max(r.logprobs.len());
    r.sent_tokens = end;
    (from..end)
        .map(|i| {
            r.logprobs.get(i).cloned().unwrap_or_else(|| TokenLogprob {
                id: r.tokens[i],
                logprob: None,
                top: vec![],
            })
        })
        .collect()
}

/// Sends what a finished row still holds back, then `Done`.
fn finish(r: &mut Row, lm: &LoadedModel) {
    // A stop token or the budget ended it: text held back for a possible stop string is
    // final now (at a stop string, the text ends where it starts).
    let text = if r.at_stop_string {
        String::new()
    } else {
        r.decode_new(lm, true);
        let from = r.sent_text.min(r.text.len());
        if r.text.is_char_boundary(from) {
            r.sent_text = r.text.len();
            r.text[from..].to_string()
        } else {
            String::new()
        }
    };
    let tokens = new_tokens(r);
    if !text.is_empty() || !tokens.is_empty() {
        let _ = r.job.events.send(Event::Delta { text, tokens });
    }
    let _ = r.job.events.send(Event::Done {
        finish: r.finish.unwrap_or(Finish::Stop),
        path: r.path.clone(),
        completion_tokens: r.tokens.len(),
    });
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

/// A token drawn from `logits / temperature`, restricted to the top-p nucleus.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let t = s.temperature.max(1e-6);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / t).exp()))
        .collect();
    let total: f64 = p.iter().map(|x| x.1).sum();
    if s.top_p < 1.0 {
        p.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut acc = 0.0;
        let mut keep = p.len();
        for (n, x) in p.iter().enumerate() {
            acc += x.1 / total;
            if acc >= s.top_p {
                keep = n + 1;
                break;
            }
        }
        p.truncate(keep.max(1));
    }
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f64>() * total;
    for &(i, w) in &p {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    p.last().map_or(0, |x| x.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_temperature_and_top_p() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
        };
        let mut counts = [0usize; 4];
        for _ in 0..20000 {
            counts[sample(&logits, &s, &mut rng) as usize] += 1;
        }
        // softmax(2, 1, 0, -1) = 0.644, 0.237, 0.087, 0.032
        let share = |i: usize| counts[i] as f64 / 20000.0;
        assert!((share(0) - 0.644).abs() < 0.02, "{counts:?}");
        assert!((share(3) - 0.032).abs() < 0.01, "{counts:?}");
        // top_p 0.7 keeps the two most probable tokens only.
        let s = Sampling { top_p: 0.7, ..s };
        for _ in 0..2000 {
            assert!(sample(&logits, &s, &mut rng) < 2);
        }
        // A tiny temperature is the argmax.
        let s = Sampling {
            temperature: 1e-4,
            top_p: 1.0,
            seed: None,
        };
        assert_eq!(sample(&logits, &s, &mut rng), 0);
    }
}
