//! Runs many searches at once so the evaluator's batches stay full. Each search still runs one
//! simulation at a time (it asks for one path, gets its reward, continues), so its result is
//! identical to running it alone. Samples come from a [`Feed`], asked for more whenever searches
//! finish, so a worker never waits for its slowest search before taking new work.
//!
//! Candidates are scored by an [`Evaluator`]: [`ModelEvaluator`] runs the model (batched, with
//! prefix sharing); tests drive the same loop with an in-process oracle, in milliseconds.
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;

use drllm_path::LayerPath;
use drllm_runtime::profile::{self, Phase, Profile};
use drllm_runtime::{LoadedModel, PrefixCache, PrefixStats};
use drllm_search::{sample_seed, PathSearch, Search, SearchConfig, SearchResult, Step};

use drllm_eval::{evaluate_batch, EvalError, EvalOptions, Evaluation, PreparedPrompt};

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
    /// How candidates are scored (by [`ModelEvaluator`]).
    pub eval: EvalOptions,
    /// Memory budget of the prefix cache in bytes (0 = no prefix sharing).
    pub prefix_cache_bytes: usize,
    /// Paths per search scored ahead of their turn, in the same batch as its pending one,
    /// where the search's order does not depend on rewards ([`PathSearch::upcoming`]): fuller
    /// batches, the same search results (0 = off).
    pub lookahead: usize,
}

impl DriverOptions {
    /// The model's evaluator for these options.
    pub fn evaluator<'a>(&self, lm: &'a LoadedModel) -> ModelEvaluator<'a> {
        ModelEvaluator::new(lm, self.eval.clone(), self.prefix_cache_bytes)
    }
}

/// Work done by a run, for throughput and FLOP accounting.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Candidates evaluated (those scored ahead included).
    pub evaluations: usize,
    /// Of those, scored ahead and never asked for (their search stopped first).
    pub ahead_unused: usize,
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
    /// Wall time of the run (model load and sample preparation excluded).
    pub wall: std::time::Duration,
    /// Where the run's time went, by phase (the rest of `wall` is the feed, scheduling and
    /// idling).
    pub profile: Profile,
}

impl RunStats {
    /// Evaluations the searches used: [`RunStats::evaluations`] less those scored ahead in vain.
    pub fn useful_evaluations(&self) -> usize {
        self.evaluations - self.ahead_unused
    }

    /// Tokens decoded over every evaluation.
    pub fn tokens_decoded(&self) -> usize {
        self.work.iter().map(|w| w.2).sum()
    }

    /// Seconds per phase (report order), then the rest of the wall time as `other`.
    pub fn phase_seconds(&self) -> Vec<(&'static str, f64)> {
        let mut v: Vec<(&'static str, f64)> = Phase::ALL
            .iter()
            .map(|&p| (p.name(), self.profile.time(p).as_secs_f64()))
            .collect();
        let rest = self.wall.saturating_sub(self.profile.total());
        v.push(("other", rest.as_secs_f64()));
        v
    }

    /// The time per evaluation by phase, one line per phase (ms and share of the wall time),
    /// for reports.
    pub fn breakdown(&self) -> String {
        let n = self.useful_evaluations().max(1) as f64;
        let wall = self.wall.as_secs_f64().max(1e-9);
        let mut out = format!(
            "time per evaluation {:.1} ms ({} evaluations used, {} scored ahead in vain, {:.2} tokens decoded each, {} decode steps in {} batches):",
            1e3 * wall / n,
            self.useful_evaluations(),
            self.ahead_unused,
            self.tokens_decoded() as f64 / self.evaluations.max(1) as f64,
            self.decode_steps,
            self.batches
        );
        for (name, s) in self.phase_seconds() {
            let name = if name == "other" {
                "other (feed, scheduling, idle)"
            } else {
                name
            };
            out += &format!(
                "\n  {name:<31} {:>8.2} ms {:>5.1}%",
                1e3 * s / n,
                100.0 * s / wall
            );
        }
        out
    }

    /// Counts one evaluator call: its candidates and their evaluations, in order.
    fn record(&mut self, items: &[(&PreparedPrompt, &LayerPath)], evals: &[Evaluation]) {
        self.batches += 1;
        self.decode_steps += evals.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        for ((p, path), e) in items.iter().zip(evals) {
            self.evaluations += 1;
            self.work
                .push((p.ids.len(), path.cost(), e.tokens.len(), e.reused_blocks));
        }
    }
}

/// Scores batches of search candidates.
pub trait Evaluator {
    /// Blocks of the model: the length of every path.
    fn num_layers(&self) -> usize;

    /// One evaluation per `(prompt, path)` candidate, in order. An error fails the whole batch
    /// (the driver then retries the candidates one by one to find the ones at fault).
    fn evaluate(
        &mut self,
        items: &[(&PreparedPrompt, &LayerPath)],
    ) -> Result<Vec<Evaluation>, EvalError>;

    /// `prompt`'s search is over: state kept for it can go.
    fn forget(&mut self, _prompt: &PreparedPrompt) {}

    /// Prefix cache counters (zero for evaluators without a cache).
    fn prefix_stats(&self) -> PrefixStats {
        PrefixStats::default()
    }

    /// Bytes the prefix cache holds now.
    fn prefix_bytes(&self) -> usize {
        0
    }
}

/// An evaluator from a reward function of (sample id, path), without a model: for tests of the
/// driver and the distributed run, and for replaying known rewards.
pub struct RewardFn<F> {
    num_layers: usize,
    reward: F,
}

impl<F: FnMut(&str, &LayerPath) -> f64> RewardFn<F> {
    /// Paths of `num_layers` blocks rewarded by `reward`.
    pub fn new(num_layers: usize, reward: F) -> Self {
        RewardFn { num_layers, reward }
    }
}

impl<F: FnMut(&str, &LayerPath) -> f64> Evaluator for RewardFn<F> {
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    fn evaluate(
        &mut self,
        items: &[(&PreparedPrompt, &LayerPath)],
    ) -> Result<Vec<Evaluation>, EvalError> {
        Ok(items
            .iter()
            .map(|(p, path)| Evaluation {
                reward: (self.reward)(&p.sample_id, path),
                tokens: vec![],
                logliks: vec![],
                reused_blocks: 0,
            })
            .collect())
    }
}

/// The model's batched evaluator ([`evaluate_batch`]), with a prefix cache shared by the
/// candidates of every search in flight.
pub struct ModelEvaluator<'a> {
    lm: &'a LoadedModel,
    opts: EvalOptions,
    cache: PrefixCache,
}

impl<'a> ModelEvaluator<'a> {
    /// An evaluator scoring as `opts` says, with a prefix cache of `prefix_cache_bytes` (0 = no
    /// prefix sharing).
    pub fn new(lm: &'a LoadedModel, opts: EvalOptions, prefix_cache_bytes: usize) -> Self {
        ModelEvaluator {
            lm,
            opts,
            cache: PrefixCache::new(prefix_cache_bytes),
        }
    }
}

impl Evaluator for ModelEvaluator<'_> {
    fn num_layers(&self) -> usize {
        self.lm.model.num_layers()
    }

    fn evaluate(
        &mut self,
        items: &[(&PreparedPrompt, &LayerPath)],
    ) -> Result<Vec<Evaluation>, EvalError> {
        evaluate_batch(self.lm, items, &self.opts, &mut self.cache)
    }

    fn forget(&mut self, prompt: &PreparedPrompt) {
        self.cache.forget(&prompt.ids);
    }

    fn prefix_stats(&self) -> PrefixStats {
        self.cache.stats()
    }

    fn prefix_bytes(&self) -> usize {
        self.cache.used_bytes()
    }
}

struct Active<S> {
    index: usize,
    prompt: PreparedPrompt,
    search: S,
    /// Rewards of paths scored ahead of their turn, until the search asks for them.
    ahead: HashMap<LayerPath, f64>,
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

/// Searches the samples of `feed` with the model's evaluator (see [`drive`]).
pub fn run_feed<F: Feed>(
    lm: &LoadedModel,
    feed: &mut F,
    opts: &DriverOptions,
) -> Result<RunStats, F::Error> {
    drive(&mut opts.evaluator(lm), feed, opts)
}

/// Searches the samples of `feed` with drllm's search ([`Search`] with `opts.search`), scoring
/// their candidates with `evaluator` (see [`drive_with`]).
pub fn drive<E: Evaluator, F: Feed>(
    evaluator: &mut E,
    feed: &mut F,
    opts: &DriverOptions,
) -> Result<RunStats, F::Error> {
    drive_with(evaluator, feed, opts, |n_layers, seed| {
        Search::new(n_layers, opts.search.clone(), seed)
    })
}

/// Searches the samples of `feed` until it has no more and every search has finished, keeping
/// up to `opts.concurrency` searches in flight, each made by `new_search(num_layers, seed)`
/// (the seed derives from `opts.seed` and the sample id), and scoring their candidates with
/// `evaluator` (`opts.search`, `opts.eval` and `opts.prefix_cache_bytes` are not read here).
pub fn drive_with<E: Evaluator, F: Feed, S: PathSearch>(
    evaluator: &mut E,
    feed: &mut F,
    opts: &DriverOptions,
    mut new_search: impl FnMut(usize, u64) -> S,
) -> Result<RunStats, F::Error> {
    let mut stats = RunStats::default();
    let started = std::time::Instant::now();
    profile::start();
    let n_layers = evaluator.num_layers();
    let concurrency = opts.concurrency.max(1);
    let mut queue: VecDeque<(usize, Result<PreparedPrompt, EvalError>)> = VecDeque::new();
    let mut received = 0usize;
    let mut exhausted = false;
    let mut active: Vec<Active<S>> = vec![];
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
                    let search = new_search(n_layers, seed);
                    active.push(Active {
                        index,
                        prompt,
                        search,
                        ahead: HashMap::new(),
                    });
                }
            }
        }
        if active.is_empty() {
            if exhausted && queue.is_empty() {
                stats.prefix = evaluator.prefix_stats();
                stats.profile = profile::stop();
                stats.wall = started.elapsed();
                return Ok(stats);
            }
            continue;
        }
        // Advance every search to its next request not scored ahead (`requests[i]` is
        // `active[i]`'s), and list the paths to score ahead with it (`ahead`: search, path);
        // finished searches leave.
        let mut requests: Vec<LayerPath> = Vec::with_capacity(active.len());
        let mut ahead: Vec<(usize, LayerPath)> = vec![];
        let mut i = 0;
        while i < active.len() {
            let step = {
                let _s = profile::span(Phase::Search);
                let a = &mut active[i];
                loop {
                    match a.search.next_step() {
                        Step::Evaluate(p) => match a.ahead.remove(&p) {
                            Some(r) => a.search.provide(r),
                            None => break Step::Evaluate(p),
                        },
                        done => break done,
                    }
                }
            };
            match step {
                Step::Evaluate(p) => {
                    if opts.lookahead > 0 {
                        let a = &active[i];
                        let _s = profile::span(Phase::Search);
                        for q in a.search.upcoming(opts.lookahead) {
                            if !a.ahead.contains_key(&q) {
                                ahead.push((i, q));
                            }
                        }
                    }
                    requests.push(p);
                    i += 1;
                }
                Step::Done(r) => {
                    let a = active.swap_remove(i);
                    stats.ahead_unused += a.ahead.len();
                    evaluator.forget(&a.prompt);
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
        let mut items: Vec<(&PreparedPrompt, &LayerPath)> =
            active.iter().map(|a| &a.prompt).zip(&requests).collect();
        items.extend(ahead.iter().map(|(i, p)| (&active[*i].prompt, p)));
        let result = evaluator.evaluate(&items);
        stats.prefix_peak_bytes = stats.prefix_peak_bytes.max(evaluator.prefix_bytes());
        match result {
            Ok(evals) => {
                stats.record(&items, &evals);
                let _s = profile::span(Phase::Search);
                let mut evals = evals.into_iter();
                for (a, e) in active.iter_mut().zip(evals.by_ref()) {
                    a.search.provide(e.reward);
                }
                for ((i, p), e) in ahead.into_iter().zip(evals) {
                    active[i].ahead.insert(p, e.reward);
                }
            }
            Err(batch_err) => {
                // Find the candidates at fault: evaluate each alone; only those searches fail.
                // Paths meant to be scored ahead are left to their turn.
                tracing::warn!(error = %batch_err, "batched evaluation failed; retrying candidates one by one");
                let mut k = 0;
                while k < active.len() {
                    let one = [(&active[k].prompt, &requests[k])];
                    match evaluator.evaluate(&one) {
                        Ok(e) => {
                            stats.record(&one, &e);
                            active[k].search.provide(e[0].reward);
                            k += 1;
                        }
                        Err(e) => {
                            requests.swap_remove(k);
                            let a = active.swap_remove(k);
                            stats.ahead_unused += a.ahead.len();
                            evaluator.forget(&a.prompt);
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

#[cfg(test)]
mod tests {
    use super::*;
    use drllm_eval::Scoring;
    use drllm_tasks::{Family, Gold, RewardMode, Style, Template};

    const LAYERS: usize = 12;

    fn prompt(id: &str) -> PreparedPrompt {
        PreparedPrompt {
            sample_id: id.into(),
            family: Family::MultipleChoice,
            gold: Gold::Letter('A'),
            text: id.into(),
            add_special: false,
            ids: vec![1, 2, 3],
            template: Template::builtin(Family::MultipleChoice, Style::Base),
            scoring: Scoring::Generate,
        }
    }

    /// Reward 1 iff every skipped block is one of the sample's own skippable blocks (derived
    /// from its id) and nothing is repeated.
    fn reward(id: &str, p: &LayerPath) -> f64 {
        let h: usize = id.bytes().map(usize::from).sum();
        let skippable = [h % LAYERS, (h * 7 + 3) % LAYERS, (h * 13 + 5) % LAYERS];
        let ok = p
            .counts()
            .iter()
            .enumerate()
            .all(|(l, &c)| c == 1 || (c == 0 && skippable.contains(&l)));
        ok as u8 as f64
    }

    /// The reward oracle as an evaluator that records its batches and releases; any batch
    /// holding the sample `poison` fails.
    struct Oracle {
        rewards: RewardFn<fn(&str, &LayerPath) -> f64>,
        batches: Vec<usize>,
        forgotten: Vec<String>,
    }

    impl Default for Oracle {
        fn default() -> Self {
            Oracle {
                rewards: RewardFn::new(LAYERS, reward),
                batches: vec![],
                forgotten: vec![],
            }
        }
    }

    impl Evaluator for Oracle {
        fn num_layers(&self) -> usize {
            self.rewards.num_layers()
        }

        fn evaluate(
            &mut self,
            items: &[(&PreparedPrompt, &LayerPath)],
        ) -> Result<Vec<Evaluation>, EvalError> {
            self.batches.push(items.len());
            if items.iter().any(|(p, _)| p.sample_id == "poison") {
                return Err(EvalError::Aborted("poisoned batch".into()));
            }
            self.rewards.evaluate(items)
        }

        fn forget(&mut self, p: &PreparedPrompt) {
            self.forgotten.push(p.sample_id.clone());
        }
    }

    fn opts(concurrency: usize) -> DriverOptions {
        DriverOptions {
            search: SearchConfig {
                num_simulations: 30,
                ..SearchConfig::default()
            },
            seed: 7,
            concurrency,
            eval: EvalOptions {
                mode: RewardMode::Strict,
                max_new_tokens: 4,
            },
            prefix_cache_bytes: 0,
            lookahead: 0,
        }
    }

    /// What a search found, without its wall time.
    type Key = (
        f64,
        bool,
        bool,
        Option<LayerPath>,
        Vec<LayerPath>,
        usize,
        usize,
    );

    fn key(r: &SearchResult) -> Key {
        (
            r.default_reward,
            r.found,
            r.improved,
            r.best_path.clone(),
            r.good_paths.clone(),
            r.simulations,
            r.evaluations,
        )
    }

    /// Runs the driver over `prompts`; outcomes in feed order.
    fn run(
        prompts: Vec<Result<PreparedPrompt, EvalError>>,
        concurrency: usize,
    ) -> (Vec<SampleOutcome>, RunStats, Oracle) {
        run_ahead(prompts, concurrency, 0)
    }

    /// [`run`], scoring up to `lookahead` paths per search ahead.
    fn run_ahead(
        prompts: Vec<Result<PreparedPrompt, EvalError>>,
        concurrency: usize,
        lookahead: usize,
    ) -> (Vec<SampleOutcome>, RunStats, Oracle) {
        let mut oracle = Oracle::default();
        let mut out = vec![];
        let mut feed = ListFeed {
            prompts: Some(prompts),
            on_done: |o| out.push(o),
        };
        let o = DriverOptions {
            lookahead,
            ..opts(concurrency)
        };
        let stats = match drive(&mut oracle, &mut feed, &o) {
            Ok(s) => s,
            Err(never) => match never {},
        };
        out.sort_by_key(|o| o.index);
        (out, stats, oracle)
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("arc-{i}")).collect()
    }

    #[test]
    fn every_search_ends_as_it_would_alone_at_any_concurrency() {
        let ids = ids(10);
        let prompts = || ids.iter().map(|id| Ok(prompt(id))).collect();
        let (one, ..) = run(prompts(), 1);
        for concurrency in [3, 16] {
            let (many, stats, oracle) = run(prompts(), concurrency);
            assert_eq!(many.len(), ids.len());
            let mut found = 0;
            for (i, (a, b)) in one.iter().zip(&many).enumerate() {
                assert_eq!((a.index, &a.sample_id), (i, &ids[i]));
                assert_eq!((b.index, &b.sample_id), (i, &ids[i]));
                let (a, b) = (a.result.as_ref().unwrap(), b.result.as_ref().unwrap());
                assert_eq!(key(a), key(b), "sample {i} at concurrency {concurrency}");
                // The same search run alone with a sequential evaluator.
                let alone = Search::new(LAYERS, opts(1).search, sample_seed(7, &ids[i]));
                let alone = drllm_search::run(alone, |p| Ok::<_, ()>(reward(&ids[i], p))).unwrap();
                assert_eq!(key(&alone), key(b), "sample {i} alone");
                found += b.found as usize;
            }
            assert!(found > 0, "the oracle leaves blocks to skip");
            // One evaluator call per round, never more candidates than searches in flight.
            assert_eq!(stats.batches, oracle.batches.len());
            assert!(oracle
                .batches
                .iter()
                .all(|&b| (1..=concurrency).contains(&b)));
            assert_eq!(oracle.batches[0], concurrency.min(ids.len()));
            let evaluations: usize = many
                .iter()
                .map(|o| o.result.as_ref().unwrap().evaluations)
                .sum();
            assert_eq!(stats.evaluations, evaluations);
            assert_eq!(stats.work.len(), evaluations);
            // The oracle runs no model: of the phases only the search's own is entered, and
            // the phases never add up to more than the run's wall time.
            assert!(stats.profile.entries(Phase::Search) >= evaluations as u64);
            assert_eq!(stats.profile.entries(Phase::Prefill), 0);
            assert!(stats.profile.total() <= stats.wall);
            let rest = stats.phase_seconds().last().copied().unwrap();
            assert_eq!(rest.0, "other");
            assert!(rest.1 >= 0.0);
            // Each finished search releases its state once.
            let mut forgotten = oracle.forgotten.clone();
            forgotten.sort();
            let mut want = ids.clone();
            want.sort();
            assert_eq!(forgotten, want);
        }
    }

    #[test]
    fn scoring_ahead_changes_no_result_and_fills_batches() {
        let ids = ids(6);
        let prompts = || ids.iter().map(|id| Ok(prompt(id))).collect();
        let (base, base_stats, base_oracle) = run(prompts(), 3);
        for lookahead in [1, 4] {
            let (ahead, stats, oracle) = run_ahead(prompts(), 3, lookahead);
            for (a, b) in base.iter().zip(&ahead) {
                assert_eq!(a.sample_id, b.sample_id);
                let (a, b) = (a.result.as_ref().unwrap(), b.result.as_ref().unwrap());
                assert_eq!(key(a), key(b), "{lookahead} ahead");
            }
            // The searches used what they used before; the rest was scored in vain.
            assert_eq!(stats.useful_evaluations(), base_stats.evaluations);
            assert_eq!(stats.work.len(), stats.evaluations);
            assert!(stats.evaluations >= base_stats.evaluations);
            assert!(stats.ahead_unused <= ids.len() * lookahead);
            // Fewer, fuller batches, each at most (1 + lookahead) paths per search.
            assert!(
                oracle.batches.len() < base_oracle.batches.len(),
                "{} vs {} batches",
                oracle.batches.len(),
                base_oracle.batches.len()
            );
            assert!(oracle.batches.iter().all(|&b| b <= 3 * (1 + lookahead)));
        }
    }

    #[test]
    fn a_failed_preparation_is_reported_and_the_others_go_on() {
        let bad = EvalError::Prompt {
            sample_id: "arc-bad".into(),
            msg: "prompt has 9000 tokens; the model's context is 8192".into(),
        };
        let (out, ..) = run(vec![Ok(prompt("arc-0")), Err(bad), Ok(prompt("arc-1"))], 2);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].sample_id, "arc-bad");
        let err = out[1].result.as_ref().unwrap_err();
        assert!(err.contains("9000 tokens"), "{err}");
        assert!(out[0].result.is_ok() && out[2].result.is_ok());
    }

    #[test]
    fn a_failing_candidate_fails_its_own_search_only() {
        let clean: Vec<_> = ["arc-0", "arc-1", "arc-2"]
            .iter()
            .map(|id| Ok(prompt(id)))
            .collect();
        let (want, ..) = run(clean, 4);
        let mixed = ["arc-0", "poison", "arc-1", "arc-2"]
            .iter()
            .map(|id| Ok(prompt(id)))
            .collect();
        let (got, _, oracle) = run(mixed, 4);
        let err = got[1].result.as_ref().unwrap_err();
        assert!(err.contains("poisoned batch"), "{err}");
        for (w, g) in want.iter().zip([&got[0], &got[2], &got[3]]) {
            assert_eq!(w.sample_id, g.sample_id);
            let (w, g) = (w.result.as_ref().unwrap(), g.result.as_ref().unwrap());
            assert_eq!(key(w), key(g), "{}", g.best_path.is_some());
        }
        // The failed batch was retried one candidate at a time.
        assert!(oracle.batches.contains(&1));
        assert!(oracle.forgotten.contains(&"poison".to_string()));
    }

    /// A policy outside drllm-search: skip each block alone, in order, and keep the first
    /// correct one.
    struct EachSkip {
        n: usize,
        next: usize,
        asked: Option<LayerPath>,
        evaluations: usize,
        best: Option<LayerPath>,
    }

    impl PathSearch for EachSkip {
        fn next_step(&mut self) -> Step {
            if let Some(p) = &self.asked {
                return Step::Evaluate(p.clone());
            }
            if self.best.is_some() || self.next == self.n {
                return Step::Done(SearchResult {
                    default_reward: 1.0,
                    found: self.best.is_some(),
                    improved: false,
                    best_cost: self.best.as_ref().map(LayerPath::cost),
                    good_paths: self.best.iter().cloned().collect(),
                    best_path: self.best.clone(),
                    simulations: self.evaluations,
                    evaluations: self.evaluations,
                    wall_ms: 0,
                });
            }
            let mut counts = vec![1u8; self.n];
            counts[self.next] = 0;
            self.next += 1;
            let p = LayerPath::from_counts(counts).unwrap();
            self.asked = Some(p.clone());
            Step::Evaluate(p)
        }

        fn provide(&mut self, reward: f64) {
            self.evaluations += 1;
            let p = self.asked.take();
            if reward >= 1.0 {
                self.best = p;
            }
        }
    }

    #[test]
    fn any_search_policy_runs_batched_across_prompts() {
        let ids = ids(6);
        let mut oracle = Oracle::default();
        let mut out = vec![];
        let mut feed = ListFeed {
            prompts: Some(ids.iter().map(|id| Ok(prompt(id))).collect()),
            on_done: |o| out.push(o),
        };
        let new = |n, _seed| EachSkip {
            n,
            next: 0,
            asked: None,
            evaluations: 0,
            best: None,
        };
        let stats = match drive_with(&mut oracle, &mut feed, &opts(4), new) {
            Ok(s) => s,
            Err(never) => match never {},
        };
        assert_eq!(out.len(), ids.len());
        for o in &out {
            let r = o.result.as_ref().unwrap();
            // The first block whose skip the oracle accepts, found after that many evaluations.
            let first = (0..LAYERS)
                .find(|&l| {
                    let mut c = vec![1u8; LAYERS];
                    c[l] = 0;
                    reward(&o.sample_id, &LayerPath::from_counts(c).unwrap()) >= 1.0
                })
                .unwrap();
            assert_eq!(r.best_path.as_ref().unwrap().counts()[first], 0);
            assert_eq!(r.evaluations, first + 1);
        }
        assert!(oracle.batches.iter().all(|&b| b <= 4));
        assert_eq!(oracle.batches[0], 4);
        assert_eq!(
            stats.evaluations,
            out.iter()
                .map(|o| o.result.as_ref().unwrap().evaluations)
                .sum::<usize>()
        );
    }

    /// A feed that answers from a script, then ends; records what the driver asked.
    struct Scripted {
        answers: VecDeque<Vec<&'static str>>,
        asked: Vec<(usize, bool)>,
        done: Vec<String>,
        fail_after: Option<usize>,
    }

    impl Feed for Scripted {
        type Error = String;

        fn more(
            &mut self,
            free: usize,
            idle: bool,
        ) -> Result<Option<Vec<Result<PreparedPrompt, EvalError>>>, String> {
            self.asked.push((free, idle));
            Ok(self
                .answers
                .pop_front()
                .map(|ids| ids.into_iter().map(|id| Ok(prompt(id))).collect()))
        }

        fn done(&mut self, o: SampleOutcome) -> Result<(), String> {
            self.done.push(o.sample_id);
            match self.fail_after {
                Some(n) if self.done.len() >= n => Err("coordinator gone".into()),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn the_feed_is_asked_for_free_slots_and_empty_answers_wait() {
        let mut feed = Scripted {
            answers: VecDeque::from(vec![vec![], vec!["arc-0", "arc-1"], vec![], vec!["arc-2"]]),
            asked: vec![],
            done: vec![],
            fail_after: None,
        };
        let stats = drive(&mut Oracle::default(), &mut feed, &opts(2)).unwrap();
        let mut done = feed.done.clone();
        done.sort();
        assert_eq!(done, ["arc-0", "arc-1", "arc-2"]);
        assert!(stats.evaluations > 0);
        // Asked while idle first; never for more than the free slots; asked again once the
        // script ran out (None ends the run).
        assert_eq!(feed.asked[0], (2, true));
        assert!(feed.asked.iter().all(|&(free, _)| (1..=2).contains(&free)));
        assert_eq!(feed.asked.len(), 5);
    }

    #[test]
    fn a_feed_error_stops_the_run() {
        let mut feed = Scripted {
            answers: VecDeque::from(vec![vec!["arc-0", "arc-1", "arc-2"]]),
            asked: vec![],
            done: vec![],
            fail_after: Some(1),
        };
        let err = drive(&mut Oracle::default(), &mut feed, &opts(1)).unwrap_err();
        assert_eq!(err, "coordinator gone");
        assert_eq!(feed.done.len(), 1);
    }
}
