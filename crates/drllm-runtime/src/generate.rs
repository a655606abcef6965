//! Greedy generation on top of the path executor ([`PathBatch`]): one request type for every
//! way a prompt's path is chosen (given, given with prefix sharing, routed during prefill in one
//! batch, or routed in batches and decoded in groups of similar paths), with optional early
//! stopping per row. Candidate evaluation (`drllm-eval`, hence the search workers) and
//! `drllm-infer` call [`Model::generate`]; the server steps a [`PathBatch`] itself, since its
//! batch changes between steps as requests join and leave.
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::exec::{GroupRouteFn, PathBatch, RouteFn};
use crate::model::Model;
use crate::prefix::PrefixCache;
use crate::profile::{span, Phase};
use drllm_path::LayerPath;

/// Options of greedy generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most new tokens per sequence.
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (not included in the output).
    pub stop_ids: Vec<u32>,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New token ids (stop token excluded).
    pub tokens: Vec<u32>,
    /// Whether a stop id ended the sequence (else the token budget or `until` did).
    pub stopped: bool,
    /// Block applications of the prefill resumed from a prefix cache instead of computed.
    pub reused_blocks: usize,
}

/// How each prompt's path is chosen.
pub enum Paths<'a> {
    /// Prompt `i` along `paths[i]`, all prompts in one batch.
    Fixed(&'a [LayerPath]),
    /// Prompt `i` along `paths[i]`, prefilled in groups of similar length (little padding), each
    /// row resuming from the longest prefix of its path cached for its prompt and storing its
    /// new prefixes (see [`PathBatch::prefill_cached`]); the groups then decode as one batch.
    /// What search workers use for many candidates of few prompts.
    Cached {
        /// One path per prompt.
        paths: &'a [LayerPath],
        /// Shared prefix states (a zero budget disables sharing).
        cache: &'a mut PrefixCache,
    },
    /// Routed once per prompt during prefill, all prompts in one batch (see
    /// [`PathBatch::prefill_routed`]); decoding follows the chosen paths.
    Routed(&'a mut RouteFn<'a>),
    /// Routed and prefilled in batches of `batch` prompts, then decoded in batches of `batch`
    /// rows with similar paths (sorted by their counts, [`path_order`]). A decode step applies
    /// a block when any row of the batch uses it, so mixing paths spends the blocks one prompt
    /// skips on another; grouping them lets the saved blocks save time. The router is told
    /// which prompts (indices into the request's list) its rows are.
    RoutedGrouped {
        /// Each row's count for a block from the hidden state entering it.
        route: &'a mut GroupRouteFn<'a>,
        /// Rows per prefill and per decode batch (at least 1).
        batch: usize,
    },
}

/// Ends a row once it returns true for `(prompt index, tokens so far)`.
pub type UntilFn<'a> = dyn FnMut(usize, &[u32]) -> bool + 'a;

/// A greedy generation request: the prompts (token ids), how their paths are chosen, and when
/// each row ends.
pub struct GenerateRequest<'a> {
    /// Token ids of each prompt (non-empty, inside the vocabulary and the context).
    pub prompts: &'a [Vec<u32>],
    /// How each prompt's path is chosen.
    pub paths: Paths<'a>,
    /// Token budget and stop ids.
    pub options: GenerateOptions,
    /// Ends a row as soon as `until(prompt, tokens_so_far)` says its outcome is known (e.g. its
    /// reward is decided). Ended rows leave the batch, so they stop costing compute; the
    /// others continue exactly as they would have.
    pub until: Option<&'a mut UntilFn<'a>>,
}

impl<'a> GenerateRequest<'a> {
    /// A request that ends rows at a stop id or the token budget only.
    pub fn new(prompts: &'a [Vec<u32>], paths: Paths<'a>, options: GenerateOptions) -> Self {
        GenerateRequest {
            prompts,
            paths,
            options,
            until: None,
        }
    }

    /// Also ends a row when `until(prompt, tokens_so_far)` returns true.
    pub fn until(mut self, until: &'a mut UntilFn<'a>) -> Self {
        self.until = Some(until);
        self
    }
}

/// The result of a [`GenerateRequest`], in prompt order.
#[derive(Debug)]
pub struct Generation {
    /// Each prompt's generated sequence.
    pub outputs: Vec<Generated>,
    /// Each prompt's path (for routed requests: the one its routers chose).
    pub paths: Vec<LayerPath>,
}

/// Row indices ordered so that rows with similar paths sit together (by their counts, block 0
/// first; ties in row order): consecutive chunks of it are the decode batches of
/// [`Paths::RoutedGrouped`].
pub fn path_order(paths: &[LayerPath]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..paths.len()).collect();
    order.sort_by(|&a, &b| paths[a].counts().cmp(paths[b].counts()));
    order
}

/// Greedy choice per row of `[B, V]` logits.
pub fn argmax_tokens(logits: &Tensor) -> Result<Vec<u32>> {
    let ids = logits.argmax(-1, false).to_device(Device::Cpu);
    let v: Vec<i64> = Vec::<i64>::try_from(&ids)?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

impl Model {
    /// Refuses prompts that with `new_tokens` generated tokens would not fit the model's
    /// context (positions past it are not what the model was trained on: its output there is
    /// meaningless, not an error libtorch would raise).
    pub fn check_context(&self, prompts: &[Vec<u32>], new_tokens: usize) -> Result<()> {
        let ctx = self.cfg.max_position_embeddings.max(0) as usize;
        match prompts.iter().position(|p| p.len() + new_tokens > ctx) {
            Some(i) => Err(Error::Request(format!(
                "prompt {i} has {} tokens{}; the model's context is {ctx} tokens",
                prompts[i].len(),
                if new_tokens > 0 {
                    format!(" and {new_tokens} new tokens are asked for")
                } else {
                    String::new()
                }
            ))),
            None => Ok(()),
        }
    }

    /// Greedy generation for a batch of prompts, each along the path `req.paths` chooses for it.
    pub fn generate(&self, req: GenerateRequest<'_>) -> Result<Generation> {
        let _g = tch::no_grad_guard();
        let GenerateRequest {
            prompts,
            paths,
            options: opts,
            until,
        } = req;
        self.check_context(prompts, opts.max_new_tokens)?;
        let mut never = |_: usize, _: &[u32]| false;
        let until: &mut UntilFn<'_> = match until {
            Some(u) => u,
            None => &mut never,
        };
        let in_order = (0..prompts.len()).collect();
        match paths {
            Paths::Fixed(paths) => {
                let mut batch = PathBatch::new(self, paths)?;
                let h = batch.prefill(prompts)?;
                let first = self.next_tokens(&h)?;
                let outputs = self.decode_prefilled(batch, first, in_order, &opts, until)?;
                Ok(Generation {
                    outputs,
                    paths: paths.to_vec(),
                })
            }
            Paths::Cached { paths, cache } => {
                let (batch, logits, order) = self.prefill_grouped(prompts, paths, cache)?;
                let first = {
                    let _p = span(Phase::Prefill);
                    argmax_tokens(&logits)?
                };
                let outputs = self.decode_prefilled(batch, first, order, &opts, until)?;
                Ok(Generation {
                    outputs,
                    paths: paths.to_vec(),
                })
            }
            Paths::Routed(route) => {
                let mut batch = PathBatch::new_routed(self, prompts.len());
                let h = batch.prefill_routed(prompts, route)?;
                let paths = batch.paths().to_vec();
                let first = self.next_tokens(&h)?;
                let outputs = self.decode_prefilled(batch, first, in_order, &opts, until)?;
                Ok(Generation { outputs, paths })
            }
            Paths::RoutedGrouped { route, batch } => {
                self.routed_grouped(prompts, route, batch, &opts, until)
            }
        }
    }

    /// Greedy next token of each row of final-normed hidden states `[B, T, H]`.
    fn next_tokens(&self, h: &Tensor) -> Result<Vec<u32>> {
        let t = h.size()[1];
        argmax_tokens(&self.logits(&h.select(1, t - 1)))
    }

    /// [`Paths::RoutedGrouped`].
    fn routed_grouped(
        &self,
        prompts: &[Vec<u32>],
        route: &mut GroupRouteFn<'_>,
        batch: usize,
        opts: &GenerateOptions,
        until: &mut UntilFn<'_>,
    ) -> Result<Generation> {
        let batch = batch.max(1);
        let (mut parts, mut first) = (vec![], vec![]);
        for (c, chunk) in prompts.chunks(batch).enumerate() {
            let rows: Vec<usize> = (c * batch..c * batch + chunk.len()).collect();
            let mut b = PathBatch::new_routed(self, chunk.len());
            let h = b.prefill_routed(chunk, &mut |l, h| route(&rows, l, h))?;
            first.extend(self.next_tokens(&h)?);
            parts.push(b);
        }
        if parts.is_empty() {
            return Ok(Generation {
                outputs: vec![],
                paths: vec![],
            });
        }
        let pool = PathBatch::concat(parts)?;
        let paths = pool.paths().to_vec();
        let order = path_order(&paths);
        let mut out: Vec<Option<Generated>> = vec![None; prompts.len()];
        for group in order.chunks(batch) {
            let mut rows = group.to_vec();
            rows.sort_unstable();
            let b = pool.select_rows(&rows)?;
            let firsts = rows.iter().map(|&r| first[r]).collect();
            let mut group_until = |i: usize, t: &[u32]| until(rows[i], t);
            let gens = self.decode_prefilled(
                b,
                firsts,
                (0..rows.len()).collect(),
                opts,
                &mut group_until,
            )?;
            for (&r, g) in rows.iter().zip(gens) {
                out[r] = Some(g);
            }
        }
        let outputs = out
            .into_iter()
            .map(|g| g.ok_or_else(|| Error::Request("a prompt was left undecoded".into())))
            .collect::<Result<_>>()?;
        Ok(Generation { outputs, paths })
    }

    /// Greedy decoding of a prefilled batch: `first` = each row's first token, `order` = each
    /// row's index in the output.
    fn decode_prefilled(
        &self,
        mut batch: PathBatch<'_>,
        first: Vec<u32>,
        order: Vec<usize>,
        opts: &GenerateOptions,
        until: &mut UntilFn<'_>,
    ) -> Result<Vec<Generated>> {
        let mut out: Vec<Generated> = (0..batch.len())
            .map(|_| Generated {
                tokens: vec![],
                stopped: false,
                reused_blocks: 0,
            })
            .collect();
        for (row, &i) in order.iter().enumerate() {
            out[i].reused_blocks = batch.reused_blocks()[row];
        }
        // Output index of each batch row still decoding.
        let mut active = order;
        let mut next = first;
        for step in 0..opts.max_new_tokens {
            let mut keep = Vec::with_capacity(active.len());
            for (row, (&i, &tok)) in active.iter().zip(&next).enumerate() {
                let g = &mut out[i];
                if opts.stop_ids.contains(&tok) {
                    g.stopped = true;
                    continue;
                }
                g.tokens.push(tok);
                if !until(i, &g.tokens) {
                    keep.push(row);
                }
            }
            if keep.is_empty() || step + 1 == opts.max_new_tokens {
                break;
            }
            batch.retain(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
            let feed: Vec<u32> = keep.iter().map(|&r| next[r]).collect();
            let _d = span(Phase::Decode);
            next = argmax_tokens(&batch.decode_step(&feed)?)?;
        }
        Ok(out)
    }
}
