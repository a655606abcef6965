//! Runs many searches at once so the evaluator's batches stay full. Each search still runs one
//! simulation at a time (it asks for one path, gets its reward, continues), so its result is
//! identical to running it alone. Samples come from a [`Feed`], asked for more whenever searches
//! finish, so a worker never waits for its slowest search before taking new work.
use std::collections::VecDeque;
use std::convert::Infallible;

use drllm_path::LayerPath;
use drllm_runtime::{LoadedModel, PrefixCache, PrefixStats};
use drllm_search::{sample_seed, Search, SearchConfig, SearchResult, Step};

use drllm_eval::{evaluate_batch, EvalError, EvalOptions, PreparedPrompt};

/// The outcome of one sample: its search result, or why it could not be searched.
#[derive(Debug, Clone)]
pub struct SampleOutcome {
    /// Position of the sample in the order the feed gave samples (0-based over the whole run).
    pub index: usize,
    /// Sample id.
    pub sample_id: String,
    /// Search result, or the error recorded for this sample.
    pub result: Result<SearchResult, String>,
}

/// Options of a multi-search run.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// MCTS parameters (shared by all samples).
    pub search: SearchConfig,
    /// Run seed; each sample's seed derives from it and the sample id.
    pub seed: u64,
    /// Searches in flight at once (= most candidates per evaluator batch).
    pub concurrency: usize,
    /// How candidates are scored.
    pub eval: EvalOptions,
    /// Memory budget of the prefix cache in bytes (0 = no prefix sharing).
    pub prefix_cache_bytes: usize,
}

/// Work done by a run, for throughput and FLOP accounting.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Candidates evaluated.
    pub evaluations: usize,
    /// Evaluator calls (batches).
    pub batches: usize,
    /// Decoding steps run (each over every row still undecided in its batch).
    pub decode_steps: usize,
    /// Per evaluated candidate: (prompt tokens, path cost, tokens decoded, block applications
    /// of its prefill resumed from the prefix cache).
    pub work: Vec<(usize, usize, usize, usize)>,
    /// Prefix cache counters at the end of the run.
    pub prefix: PrefixStats,
    /// Most bytes the prefix cache held after any batch.
    pub prefix_peak_bytes: usize,
}

struct Active {
    index: usize,
    prompt: PreparedPrompt,
    search: Search,
}

/// Where a run's samples come from and where their outcomes go.
pub trait Feed {
    /// Why the feed cannot go on (the run stops with it).
    type Error;

    /// Up to `free` more samples (more are accepted), or `None` once no more will ever come.
    /// `idle` says no search is in flight: an empty answer then should wait a little (e.g. for
    /// work the coordinator has not handed out yet) rather than return at once.
    #[allow(clippy::type_complexity)]
    fn more(
        &mut self,
        free: usize,
        idle: bool,
    ) -> Result<Option<Vec<Result<PreparedPrompt, EvalError>>>, Self::Error>;

    /// A sample finished (in completion order).
    fn done(&mut self, outcome: SampleOutcome) -> Result<(), Self::Error>;
}

/// A fixed list of samples, outcomes handed to a closure.
struct ListFeed<F> {
    prompts: Option<Vec<Result<PreparedPrompt, EvalError>>>,
    on_done: F,
}

impl<F: FnMut(SampleOutcome)> Feed for ListFeed<F> {
    type Error = Infallible;

    fn more(
        &mut self,
        _free: usize,
        _idle: bool,
    ) -> Result<Option<Vec<Result<PreparedPrompt, EvalError>>>, Infallible> {
        Ok(self.prompts.take())
    }

    fn done(&mut self, outcome: SampleOutcome) -> Result<(), Infallible> {
        (self.on_done)(outcome);
        Ok(())
    }
}

/// Searches every prompt (errors from preparation are reported as they are), calling `on_done`
/// as each sample finishes, in completion order.
pub fn run_searches(
    lm: &LoadedModel,
    prompts: Vec<Result<PreparedPrompt, EvalError>>,
    opts: &DriverOptions,
    on_done: impl FnMut(SampleOutcome),
) -> RunStats {
    let mut feed = ListFeed {
        prompts: Some(prompts),
        on_done,
    };
    match run_feed(lm, &mut feed, opts) {
        Ok(stats) => stats,
        Err(never) => match never {},
    }
}

/// Searches the samples of `feed` until it has no more and every search has finished, keeping
/// up to `opts.concurrency` searches in flight.
pub fn run_feed<F: Feed>(
    lm: &LoadedModel,
    feed: &mut F,
    opts: &DriverOptions,
) -> Result<RunStats, F::Error> {
    let mut stats = RunStats::default();
    let mut cache = PrefixCache::new(opts.prefix_cache_bytes);
    let n_layers = lm.model.num_layers();
    let concurrency = opts.concurrency.max(1);
    let mut queue: VecDeque<(usize, Result<PreparedPrompt, EvalError>)> = VecDeque::new();
    let mut received = 0usize;
    let mut exhausted = false;
    let mut active: Vec<Active> = vec![];
    loop {
        if !exhausted && active.len() + queue.len() < concurrency {
            let free = concurrency - active.len() - queue.len();
            match feed.more(free, active.is_empty() && queue.is_empty())? {
                None => exhausted = true,
                Some(more) => {
                    for p in more {
                        queue.push_back((received, p));
                        received += 1;
                    }
                }
            }
        }
        while active.len() < concurrency {
            match queue.pop_front() {
                None => break,
                Some((index, Err(e))) => {
                    let sample_id = match &e {
                        EvalError::Prompt { sample_id, .. } => sample_id.clone(),
                        _ => String::new(),
                    };
                    feed.done(SampleOutcome {
                        index,
                        sample_id,
                        result: Err(e.to_string()),
                    })?;
                }
                Some((index, Ok(prompt))) => {
                    let seed = sample_seed(opts.seed, &prompt.sample_id);
                    let search = Search::new(n_layers, opts.search.clone(), seed);
                    active.push(Active {
                        index,
                        prompt,
                        search,
                    });
                }
            }
        }
        if active.is_empty() {
            if exhausted && queue.is_empty() {
                stats.prefix = cache.stats();
                return Ok(stats);
            }
            continue;
        }
        // Advance every search to its next request (`requests[i]` is `active[i]`'s); finished
        // ones leave.
        let mut requests: Vec<LayerPath> = Vec::with_capacity(active.len());
        let mut i = 0;
        while i < active.len() {
            match active[i].search.next_step() {
                Step::Evaluate(p) => {
                    requests.push(p);
                    i += 1;
                }
                Step::Done(r) => {
                    let a = active.swap_remove(i);
                    cache.forget(&a.prompt.ids);
                    feed.done(SampleOutcome {
                        index: a.index,
                        sample_id: a.prompt.sample_id,
                        result: Ok(r),
                    })?;
                }
            }
        }
        if active.is_empty() {
            continue;
        }
        let items: Vec<(&PreparedPrompt, &LayerPath)> =
            active.iter().map(|a| &a.prompt).zip(&requests).collect();
        let result = evaluate_batch(lm, &items, &opts.eval, &mut cache);
        stats.prefix_peak_bytes = stats.prefix_peak_bytes.max(cache.used_bytes());
        match result {
            Ok(evals) => {
                stats.batches += 1;
                stats.decode_steps += evals.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
                for ((a, path), e) in active.iter_mut().zip(&requests).zip(evals) {
                    stats.evaluations += 1;
                    stats.work.push((
                        a.prompt.ids.len(),
                        path.cost(),
                        e.tokens.len(),
                        e.reused_blocks,
                    ));
                    a.search.provide(e.reward);
                }
            }
            Err(batch_err) => {
                // Find the candidates at fault: evaluate each alone; only those searches fail.
                tracing::warn!(error = %batch_err, "batched evaluation failed; retrying candidates one by one");
                let mut k = 0;
                while k < active.len() {
                    let one = [(&active[k].prompt, &requests[k])];
                    match evaluate_batch(lm, &one, &opts.eval, &mut cache) {
                        Ok(e) => {
                            active[k].search.provide(e[0].reward);
                            k += 1;
                        }
                        Err(e) => {
                            requests.swap_remove(k);
                            let a = active.swap_remove(k);
                            cache.forget(&a.prompt.ids);
                            feed.done(SampleOutcome {
                                index: a.index,
                                sample_id: a.prompt.sample_id,
                                result: Err(e.to_string()),
                            })?;
                        }
                    }
                }
            }
        }
    }
}
