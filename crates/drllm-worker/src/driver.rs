//! Runs many searches at once so the evaluator's batches stay full. Each search still runs one
//! simulation at a time (it asks for one path, gets its reward, continues), so its result is
//! identical to running it alone.
use std::collections::VecDeque;

use drllm_path::LayerPath;
use drllm_runtime::{LoadedModel, PrefixCache, PrefixStats};
use drllm_search::{sample_seed, Search, SearchConfig, SearchResult, Step};

use crate::eval::{evaluate_batch, EvalError, EvalOptions, PreparedPrompt};

/// The outcome of one sample: its search result, or why it could not be searched.
#[derive(Debug, Clone)]
pub struct SampleOutcome {
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
    prompt: PreparedPrompt,
    search: Search,
}

/// Searches every prompt (errors from preparation are reported as they are), calling `on_done`
/// as each sample finishes, in completion order.
pub fn run_searches(
    lm: &LoadedModel,
    prompts: Vec<Result<PreparedPrompt, EvalError>>,
    opts: &DriverOptions,
    mut on_done: impl FnMut(SampleOutcome),
) -> RunStats {
    let mut stats = RunStats::default();
    let mut cache = PrefixCache::new(opts.prefix_cache_bytes);
    let n_layers = lm.model.num_layers();
    let mut queue: VecDeque<Result<PreparedPrompt, EvalError>> = prompts.into();
    let mut active: Vec<Active> = vec![];
    loop {
        while active.len() < opts.concurrency.max(1) {
            match queue.pop_front() {
                None => break,
                Some(Err(e)) => {
                    let sample_id = match &e {
                        EvalError::Prompt { sample_id, .. } => sample_id.clone(),
                        _ => String::new(),
                    };
                    on_done(SampleOutcome {
                        sample_id,
                        result: Err(e.to_string()),
                    });
                }
                Some(Ok(prompt)) => {
                    let seed = sample_seed(opts.seed, &prompt.sample_id);
                    let search = Search::new(n_layers, opts.search.clone(), seed);
                    active.push(Active { prompt, search });
                }
            }
        }
        if active.is_empty() {
            stats.prefix = cache.stats();
            return stats;
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
                    on_done(SampleOutcome {
                        sample_id: a.prompt.sample_id,
                        result: Ok(r),
                    });
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
                            on_done(SampleOutcome {
                                sample_id: a.prompt.sample_id,
                                result: Err(e.to_string()),
                            });
                        }
                    }
                }
            }
        }
    }
}
