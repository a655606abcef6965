//! Length-aware Monte Carlo Tree Search over layer paths, for one prompt at a time.
//!
//! The search is a state machine ([`Search`]): it asks for the reward of one path at a time
//! ([`Step::Evaluate`]) and is told the answer ([`Search::provide`]). A caller may drive many
//! searches at once and evaluate their requests in one batch; each search still runs one
//! simulation at a time, so its result is identical to running it alone ([`run`]).
//!
//! Semantics (README "Searching paths"): the root is the default path; a node's untried actions are
//! generated once (skip 1 or 2 consecutive entries of the layer-index list, or repeat one entry),
//! deduplicated and without no-ops, then shuffled with the search's seeded RNG; selection is UCT
//! with a length penalty (or, with [`Selection::Chain`], the paper code's leaf-only descent);
//! rewards are cached per path; early stop when a path beats the default's reward or a correct
//! path saves enough blocks.
#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use drllm_path::LayerPath;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the tree is descended before expanding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// UCT from the root while nodes are fully expanded; expand the first node that is not.
    Uct,
    /// The paper code's descent: always down to a leaf, which gets one child (a chain).
    Chain,
    /// UCT with progressive widening: a node visited `n` times holds at most
    /// `ceil(widening * n^widening_exp)` children (one more while none of them has been correct),
    /// so correct children are descended into long before all of a node's (on a 30-block model,
    /// 89) edits are tried.
    Pw,
}

impl std::str::FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uct" => Ok(Selection::Uct),
            "chain" => Ok(Selection::Chain),
            "pw" => Ok(Selection::Pw),
            other => Err(format!(
                "unknown selection {other:?} (expected pw, uct or chain)"
            )),
        }
    }
}

/// In which order a node's untried edits are expanded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// A seeded shuffle (the paper's code).
    Shuffled,
    /// Once the default path is known correct, skips before repeats (a repeat only adds cost
    /// to a path already correct), each group shuffled, or with a skip prior
    /// ([`SearchConfig::skip_prior`]) skips of the blocks it ranks safest first; shuffled while
    /// the default is wrong.
    SkipFirst,
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shuffled" => Ok(Order::Shuffled),
            "skip-first" => Ok(Order::SkipFirst),
            other => Err(format!(
                "unknown order {other:?} (expected skip-first or shuffled)"
            )),
        }
    }
}

/// Search parameters; defaults follow the paper's code where it is sound.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SearchConfig {
    /// Simulations (select, expand, evaluate, back up) per prompt.
    pub num_simulations: usize,
    /// UCT exploration constant.
    pub c: f64,
    /// Length penalty: `lambda * cost / L` is subtracted from a child's score.
    pub length_penalty: f64,
    /// Probability of descending to a uniformly random child instead of the UCT choice.
    pub random_child_prob: f64,
    /// Numbers of consecutive layer-list entries one skip action removes.
    pub skip_sizes: Vec<usize>,
    /// Whether repeat actions (duplicate one entry in place) are generated.
    pub allow_repeat: bool,
    /// Most applications of one block.
    pub max_count: u8,
    /// Paths may cost at most `cost_cap_factor * L`.
    pub cost_cap_factor: f64,
    /// Stop once a path's reward beats the default path's.
    pub stop_on_improvement: bool,
    /// Stop once a correct path saves at least this many blocks (None: never).
    pub stop_on_saving: Option<usize>,
    /// Descent rule.
    pub selection: Selection,
    /// Progressive widening (with [`Selection::Pw`]): children allowed per `visits^exp`.
    #[serde(default = "default_widening")]
    pub widening: f64,
    /// Progressive widening exponent (with [`Selection::Pw`]), in (0, 1].
    #[serde(default = "default_widening_exp")]
    pub widening_exp: f64,
    /// Expansion order of a node's edits.
    #[serde(default = "default_order")]
    pub order: Order,
    /// Blocks ranked safest-to-skip first (e.g. by how often skipping each alone keeps train
    /// answers right, `drllm-search-bench static`): with [`Order::SkipFirst`], a skip is tried
    /// in the order of its removed blocks' worst rank, so searches of different prompts deepen
    /// along the same blocks and their labels agree where the prompts allow. Empty: no prior.
    #[serde(default)]
    pub skip_prior: Vec<usize>,
}

fn default_widening() -> f64 {
    1.0
}
fn default_widening_exp() -> f64 {
    0.5
}
fn default_order() -> Order {
    Order::Shuffled
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            num_simulations: 50,
            c: 1.8,
            length_penalty: 3.0,
            random_child_prob: 0.1,
            skip_sizes: vec![1, 2],
            allow_repeat: true,
            max_count: 2,
            cost_cap_factor: 2.0,
            stop_on_improvement: true,
            stop_on_saving: Some(2),
            selection: Selection::Uct,
            widening: default_widening(),
            widening_exp: default_widening_exp(),
            order: default_order(),
            skip_prior: vec![],
        }
    }
}

impl SearchConfig {
    /// Checks the parameters can be met; the error names the flag and what is expected.
    pub fn validate(&self) -> Result<(), String> {
        if !self.c.is_finite() || self.c < 0.0 {
            return Err(format!("c = {}: expected a finite number >= 0", self.c));
        }
        if !(0.0..=1.0).contains(&self.random_child_prob) {
            return Err(format!(
                "random-child-prob = {}: expected 0..=1",
                self.random_child_prob
            ));
        }
        if self.skip_sizes.contains(&0) {
            return Err("skip-sizes: a skip removes at least one entry".into());
        }
        if !(1..=2).contains(&self.max_count) {
            return Err(format!("max-count = {}: expected 1 or 2", self.max_count));
        }
        if !(self.widening > 0.0 && self.widening.is_finite()) {
            return Err(format!(
                "widening = {}: expected a number > 0",
                self.widening
            ));
        }
        if !(self.widening_exp > 0.0 && self.widening_exp <= 1.0) {
            return Err(format!(
                "widening-exp = {}: expected a number in (0, 1]",
                self.widening_exp
            ));
        }
        let mut seen = HashSet::new();
        if let Some(&b) = self.skip_prior.iter().find(|&&b| !seen.insert(b)) {
            return Err(format!("skip-prior: block {b} is listed twice"));
        }
        if self.cost_cap_factor.is_nan() || self.cost_cap_factor < 1.0 {
            return Err(format!(
                "cost-cap = {}: the budget cannot be met, the default path alone costs L (expected >= 1)",
                self.cost_cap_factor
            ));
        }
        Ok(())
    }
}

/// The seed of one prompt's search: a stable mix of the run seed and the sample id, so a
/// retried or resumed sample reproduces its result on any worker.
pub fn sample_seed(run_seed: u64, sample_id: &str) -> u64 {
    // FNV-1a over the id, then SplitMix64 with the run seed: stable across platforms and
    // versions (std's hashers make no such promise).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sample_id.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ run_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The distinct, valid paths one edit away from `path` (no no-ops), in a fixed order.
pub fn actions(path: &LayerPath, cfg: &SearchConfig) -> Vec<LayerPath> {
    let n = path.num_layers();
    let list = path.layer_list();
    let cap = (cfg.cost_cap_factor * n as f64).floor() as usize;
    let mut seen = HashSet::new();
    let mut out = vec![];
    let mut push = |layers: Vec<usize>| {
        if layers.is_empty() || layers.len() > cap {
            return;
        }
        let Ok(p) = LayerPath::from_layer_list(&layers, n) else {
            return;
        };
        if p.counts().iter().any(|&c| c > cfg.max_count) || &p == path {
            return;
        }
        if seen.insert(p.clone()) {
            out.push(p);
        }
    };
    for &k in &cfg.skip_sizes {
        if k == 0 || k > list.len() {
            continue;
        }
        for i in 0..=list.len() - k {
            let mut v = list.clone();
            v.drain(i..i + k);
            push(v);
        }
    }
    if cfg.allow_repeat {
        for i in 0..list.len() {
            let mut v = list.clone();
            v.insert(i, list[i]);
            push(v);
        }
    }
    out
}

#[derive(Clone)]
struct Node {
    path: LayerPath,
    parent: Option<usize>,
    children: Vec<usize>,
    untried: Vec<LayerPath>,
    visits: u32,
    reward_sum: f64,
}

/// What a search needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The reward (0..=1) of this path is needed; answer with [`Search::provide`].
    Evaluate(LayerPath),
    /// The search is over.
    Done(SearchResult),
}

/// The outcome of one prompt's search.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SearchResult {
    /// Reward of the default path.
    pub default_reward: f64,
    /// A correct path other than the default one was found.
    pub found: bool,
    /// The default path was wrong and a correct path was found.
    pub improved: bool,
    /// Best correct path: lowest cost, then fewest distinct layers.
    pub best_path: Option<LayerPath>,
    /// Its cost.
    pub best_cost: Option<usize>,
    /// Every correct path evaluated, best first.
    pub good_paths: Vec<LayerPath>,
    /// Simulations run.
    pub simulations: usize,
    /// Distinct paths evaluated (the evaluator's work).
    pub evaluations: usize,
    /// Wall time of the search, milliseconds (includes waiting for batched evaluations).
    pub wall_ms: u64,
}

/// Orders correct paths best first: lowest cost, then fewest distinct layers, then counts.
pub fn best_first(a: &LayerPath, b: &LayerPath) -> std::cmp::Ordering {
    (a.cost(), a.distinct_layers(), a.counts()).cmp(&(b.cost(), b.distinct_layers(), b.counts()))
}

/// One prompt's search.
#[derive(Clone)]
pub struct Search {
    cfg: SearchConfig,
    n_layers: usize,
    rng: ChaCha8Rng,
    nodes: Vec<Node>,
    cache: HashMap<LayerPath, f64>,
    /// Evaluation order of distinct paths (deterministic output order).
    evaluated: Vec<LayerPath>,
    default_reward: Option<f64>,
    simulations: usize,
    /// Node whose path awaits a reward (None: the root's, before any simulation).
    pending: Option<Pending>,
    started: Instant,
    done: bool,
}

#[derive(Clone, Copy)]
enum Pending {
    Root,
    Leaf(usize),
}

impl Search {
    /// A search over paths of a `num_layers`-block model with the given seed (see
    /// [`sample_seed`]).
    pub fn new(num_layers: usize, cfg: SearchConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let root_path = LayerPath::all_ones(num_layers);
        let mut untried = actions(&root_path, &cfg);
        untried.shuffle(&mut rng);
        let root = Node {
            path: root_path,
            parent: None,
            children: vec![],
            untried,
            visits: 0,
            reward_sum: 0.0,
        };
        Search {
            cfg,
            n_layers: num_layers,
            rng,
            nodes: vec![root],
            cache: HashMap::new(),
            evaluated: vec![],
            default_reward: None,
            simulations: 0,
            pending: None,
            started: Instant::now(),
            done: false,
        }
    }

    fn uct_child(&mut self, node: usize) -> usize {
        let kids = &self.nodes[node].children;
        if self.rng.random::<f64>() < self.cfg.random_child_prob {
            return kids[self.rng.random_range(0..kids.len())];
        }
        let parent_visits = self.nodes[node].visits.max(1) as f64;
        let l = self.n_layers as f64;
        let mut best = (f64::NEG_INFINITY, kids[0]);
        for &k in kids {
            let c = &self.nodes[k];
            let v = c.visits.max(1) as f64;
            let score = c.reward_sum / v + self.cfg.c * (parent_visits.ln() / v).sqrt()
                - self.cfg.length_penalty * c.path.cost() as f64 / l;
            if score > best.0 {
                best = (score, k);
            }
        }
        best.1
    }

    /// Whether progressive widening lets `node` take one more child now: while none of its
    /// children has been correct (the next edit in order is tried, as a depth-first search
    /// would), or when its visits allow more.
    fn may_widen(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        if n.untried.is_empty() {
            return false;
        }
        if n.children.iter().all(|&c| self.nodes[c].reward_sum <= 0.0) {
            return true;
        }
        let allowed = (self.cfg.widening * (n.visits.max(1) as f64).powf(self.cfg.widening_exp))
            .ceil()
            .max(1.0) as usize;
        n.children.len() < allowed
    }

    /// A node's untried edits in expansion order: `pop` takes the next one.
    fn order_untried(&mut self, parent: &LayerPath, mut untried: Vec<LayerPath>) -> Vec<LayerPath> {
        untried.shuffle(&mut self.rng);
        if self.cfg.order == Order::SkipFirst && self.default_reward.is_some_and(|r| r >= 1.0) {
            self.skip_first(parent, &mut untried);
        }
        untried
    }

    /// Reorders `untried` (children of `parent`) so skips pop first, by the skip prior's rank
    /// when there is one; stable, so ties keep their shuffled order.
    fn skip_first(&self, parent: &LayerPath, untried: &mut [LayerPath]) {
        let n = self.n_layers;
        let rank: Vec<usize> = (0..n)
            .map(|b| {
                self.cfg
                    .skip_prior
                    .iter()
                    .position(|&x| x == b)
                    .unwrap_or(n)
            })
            .collect();
        let key = |p: &LayerPath| -> (bool, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
            let removed: Vec<usize> = (0..n)
                .filter(|&l| p.counts()[l] < parent.counts()[l])
                .collect();
            let worst = removed.iter().map(|&l| rank[l]).max().unwrap_or(n);
            // Sorted ascending, popped from the end: skips last, best rank last, fewer blocks
            // removed last.
            (
                p.cost() < parent.cost(),
                std::cmp::Reverse(worst),
                std::cmp::Reverse(removed.len()),
            )
        };
        untried.sort_by_cached_key(key);
    }

    /// Selection and expansion: the node whose path is evaluated in this simulation.
    fn select_and_expand(&mut self) -> usize {
        let mut node = 0;
        match self.cfg.selection {
            Selection::Uct => {
                while self.nodes[node].untried.is_empty() && !self.nodes[node].children.is_empty() {
                    node = self.uct_child(node);
                }
            }
            Selection::Chain => {
                while !self.nodes[node].children.is_empty() {
                    node = self.uct_child(node);
                }
            }
            Selection::Pw => {
                while !self.may_widen(node) && !self.nodes[node].children.is_empty() {
                    node = self.uct_child(node);
                }
            }
        }
        let Some(path) = self.nodes[node].untried.pop() else {
            return node;
        };
        let untried = self.order_untried(&path, actions(&path, &self.cfg));
        let id = self.nodes.len();
        self.nodes.push(Node {
            path,
            parent: Some(node),
            children: vec![],
            untried,
            visits: 0,
            reward_sum: 0.0,
        });
        self.nodes[node].children.push(id);
        id
    }

    fn backup(&mut self, mut node: usize, reward: f64) {
        loop {
            let n = &mut self.nodes[node];
            n.visits += 1;
            n.reward_sum += reward;
            match n.parent {
                Some(p) => node = p,
                None => break,
            }
        }
    }

    fn should_stop(&self) -> bool {
        if self.simulations >= self.cfg.num_simulations {
            return true;
        }
        let default = self.default_reward.unwrap_or(0.0);
        self.cache.iter().any(|(p, &r)| {
            (self.cfg.stop_on_improvement && r > default)
                || self
                    .cfg
                    .stop_on_saving
                    .is_some_and(|s| r >= 1.0 && p.cost() + s <= self.n_layers)
        })
    }

    /// Advances to the next path that needs a reward, or to the end.
    pub fn next_step(&mut self) -> Step {
        loop {
            if self.done {
                return Step::Done(self.result());
            }
            if self.pending.is_some() {
                // Asked twice without an answer: ask for the same path again.
                return Step::Evaluate(self.pending_path());
            }
            if self.default_reward.is_none() {
                self.pending = Some(Pending::Root);
                return Step::Evaluate(self.nodes[0].path.clone());
            }
            if self.should_stop() {
                self.done = true;
                continue;
            }
            let leaf = self.select_and_expand();
            self.simulations += 1;
            let path = self.nodes[leaf].path.clone();
            if let Some(&r) = self.cache.get(&path) {
                self.backup(leaf, r);
                continue;
            }
            self.pending = Some(Pending::Leaf(leaf));
            return Step::Evaluate(path);
        }
    }

    /// Up to `k` paths the simulations after the pending one are likely to ask for, in the
    /// order they would: those a copy of the search asks for when each reward is guessed to
    /// equal its parent path's (the default path's for the root's edits). Exact whatever the
    /// rewards under UCT while the root still has untried edits, and whenever the guesses hold.
    /// Scoring them ahead, in the same batch as the pending path, fills batches without
    /// changing the search (rewards are a function of prompt and path); a wrong guess or an
    /// early stop leaves some unused.
    pub fn upcoming(&self, k: usize) -> Vec<LayerPath> {
        if k == 0 || self.done || self.pending.is_none() {
            return vec![];
        }
        let mut s = self.clone();
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            let guess = s.guessed_reward();
            s.provide(guess);
            match s.next_step() {
                Step::Evaluate(p) => out.push(p),
                Step::Done(_) => break,
            }
        }
        out
    }

    /// The pending path's reward guessed from its parent's (0 for the root's own).
    fn guessed_reward(&self) -> f64 {
        match self.pending {
            Some(Pending::Leaf(n)) => self.nodes[n]
                .parent
                .and_then(|p| self.cache.get(&self.nodes[p].path).copied())
                .unwrap_or(0.0),
            _ => 0.0,
        }
    }

    fn pending_path(&self) -> LayerPath {
        match self.pending {
            Some(Pending::Leaf(n)) => self.nodes[n].path.clone(),
            _ => self.nodes[0].path.clone(),
        }
    }

    /// Answers the last [`Step::Evaluate`] with the path's reward (0 or 1).
    pub fn provide(&mut self, reward: f64) {
        let Some(p) = self.pending.take() else { return };
        let path = self.pending_path_of(p);
        if self.cache.insert(path.clone(), reward).is_none() {
            self.evaluated.push(path);
        }
        match p {
            Pending::Root => {
                self.default_reward = Some(reward);
                // The root's edits were ordered before its reward was known.
                if self.cfg.order == Order::SkipFirst && reward >= 1.0 {
                    let mut untried = std::mem::take(&mut self.nodes[0].untried);
                    let root = self.nodes[0].path.clone();
                    self.skip_first(&root, &mut untried);
                    self.nodes[0].untried = untried;
                }
            }
            Pending::Leaf(n) => self.backup(n, reward),
        }
    }

    fn pending_path_of(&self, p: Pending) -> LayerPath {
        match p {
            Pending::Root => self.nodes[0].path.clone(),
            Pending::Leaf(n) => self.nodes[n].path.clone(),
        }
    }

    /// The result so far (final once [`Step::Done`] was returned).
    pub fn result(&self) -> SearchResult {
        let default_reward = self.default_reward.unwrap_or(0.0);
        let mut good: Vec<LayerPath> = self
            .evaluated
            .iter()
            .filter(|p| self.cache[*p] >= 1.0)
            .cloned()
            .collect();
        good.sort_by(best_first);
        let best = good.first().cloned();
        let default_path = LayerPath::all_ones(self.n_layers);
        let found = best.as_ref().is_some_and(|b| *b != default_path);
        SearchResult {
            default_reward,
            found,
            improved: default_reward < 1.0 && best.is_some(),
            best_cost: best.as_ref().map(LayerPath::cost),
            best_path: best,
            good_paths: good,
            simulations: self.simulations,
            evaluations: self.evaluated.len(),
            wall_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// Paths of the children of every node (for invariant checks).
    pub fn tree_children(&self) -> Vec<Vec<LayerPath>> {
        self.nodes
            .iter()
            .map(|n| {
                n.children
                    .iter()
                    .map(|&c| self.nodes[c].path.clone())
                    .collect()
            })
            .collect()
    }
}

/// One prompt's search as a driver runs it: it asks for the reward of one path at a time and
/// ends with a result. [`Search`] (MCTS, UCT or chain) is the one drllm ships; a driver generic
/// over this trait runs any other policy the same way, batched across prompts.
pub trait PathSearch {
    /// Advances to the next path that needs a reward, or to the end.
    fn next_step(&mut self) -> Step;
    /// Answers the last [`Step::Evaluate`] with the path's reward.
    fn provide(&mut self, reward: f64);
    /// Up to `k` paths later steps will ask for whatever the pending reward is (see
    /// [`Search::upcoming`]); none by default.
    fn upcoming(&self, _k: usize) -> Vec<LayerPath> {
        vec![]
    }
}

impl PathSearch for Search {
    fn next_step(&mut self) -> Step {
        Search::next_step(self)
    }

    fn provide(&mut self, reward: f64) {
        Search::provide(self, reward)
    }

    fn upcoming(&self, k: usize) -> Vec<LayerPath> {
        Search::upcoming(self, k)
    }
}

/// Runs one search to the end with a sequential evaluator.
pub fn run<E>(
    mut search: impl PathSearch,
    mut evaluate: impl FnMut(&LayerPath) -> Result<f64, E>,
) -> Result<SearchResult, E> {
    loop {
        match search.next_step() {
            Step::Evaluate(p) => {
                let r = evaluate(&p)?;
                search.provide(r);
            }
            Step::Done(r) => return Ok(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid(p: &LayerPath, n: usize) -> bool {
        p.num_layers() == n
            && p.counts().iter().all(|&c| c <= 2)
            && (1..=2 * n).contains(&p.cost())
            && LayerPath::from_layer_list(&p.layer_list(), n).as_ref() == Ok(p)
    }

    /// Reward 1 iff every skipped block is in `skippable` and nothing is repeated.
    fn hidden_skips(skippable: &[usize]) -> impl Fn(&LayerPath) -> Result<f64, ()> + '_ {
        move |p: &LayerPath| {
            let ok = p
                .counts()
                .iter()
                .enumerate()
                .all(|(l, &c)| c == 1 || (c == 0 && skippable.contains(&l)));
            Ok(ok as u8 as f64)
        }
    }

    #[test]
    fn actions_are_valid_distinct_and_never_no_ops() {
        let cfg = SearchConfig::default();
        let p = LayerPath::from_counts(vec![1, 2, 0, 1, 1, 2]).unwrap();
        let a = actions(&p, &cfg);
        let set: HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        assert!(!a.contains(&p));
        assert!(a.iter().all(|x| valid(x, 6)));
        // Repeating a block already at 2 is never generated.
        assert!(a.iter().all(|x| x.counts()[1] <= 2 && x.counts()[5] <= 2));
        // Root of a 4-block model: 4 single skips + 3 double skips + 4 repeats.
        assert_eq!(actions(&LayerPath::all_ones(4), &cfg).len(), 11);
    }

    #[test]
    fn early_stop_rules() {
        // Saving two blocks stops the search right after that evaluation.
        let cfg = SearchConfig {
            num_simulations: 500,
            ..Default::default()
        };
        let r = run(Search::new(12, cfg.clone(), 3), hidden_skips(&[2, 5, 9])).unwrap();
        assert!(r.found && r.best_cost.unwrap() <= 10, "{r:?}");
        assert!(r.simulations < 500);
        // An improvement over a wrong default stops too.
        let any_skip = |p: &LayerPath| -> Result<f64, ()> { Ok((p.cost() < 12) as u8 as f64) };
        let cfg2 = SearchConfig {
            stop_on_saving: None,
            ..cfg.clone()
        };
        let r = run(Search::new(12, cfg2, 3), any_skip).unwrap();
        assert!(r.improved && r.default_reward == 0.0);
        assert_eq!(
            r.good_paths.len(),
            1,
            "stops at the first improvement: {r:?}"
        );
        assert_eq!(
            r.evaluations,
            r.simulations + 1,
            "root plus one distinct path per simulation"
        );
        // With both rules off the budget is spent.
        let cfg3 = SearchConfig {
            stop_on_saving: None,
            stop_on_improvement: false,
            num_simulations: 40,
            ..cfg
        };
        let r = run(Search::new(12, cfg3, 3), hidden_skips(&[2, 5, 9])).unwrap();
        assert_eq!(r.simulations, 40);
    }

    #[test]
    fn impossible_configurations_are_named() {
        let bad = |f: fn(&mut SearchConfig)| {
            let mut c = SearchConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.cost_cap_factor = 0.5).contains("cannot be met"));
        assert!(bad(|c| c.max_count = 3).contains("max-count"));
        assert!(bad(|c| c.random_child_prob = 1.5).contains("random-child-prob"));
        assert!(bad(|c| c.skip_sizes = vec![0]).contains("skip-sizes"));
        assert!(bad(|c| c.c = f64::NAN).contains("c = NaN"));
        assert!(SearchConfig::default().validate().is_ok());
    }

    #[test]
    fn best_path_rule() {
        let a = LayerPath::from_counts(vec![0, 2, 1, 1]).unwrap(); // cost 4, 3 distinct
        let b = LayerPath::from_counts(vec![1, 1, 1, 1]).unwrap(); // cost 4, 4 distinct
        let c = LayerPath::from_counts(vec![1, 0, 1, 1]).unwrap(); // cost 3
        let mut v = vec![b.clone(), a.clone(), c.clone()];
        v.sort_by(best_first);
        assert_eq!(v, vec![c, a, b]);
    }

    const BUDGET: usize = 1500;

    /// Evaluations until a path of the optimal cost is first evaluated correct.
    fn evals_to_optimum(selection: Selection, seed: u64, n: usize, skippable: &[usize]) -> usize {
        let cfg = SearchConfig {
            num_simulations: BUDGET,
            stop_on_improvement: false,
            stop_on_saving: Some(skippable.len()),
            selection,
            ..Default::default()
        };
        let r = run(Search::new(n, cfg, seed), hidden_skips(skippable)).unwrap();
        if r.best_cost == Some(n - skippable.len()) {
            r.evaluations
        } else {
            usize::MAX
        }
    }

    #[test]
    fn uct_finds_a_hidden_optimum_and_beats_chain() {
        let (n, skippable) = (12, [2usize, 6]);
        let (mut uct, mut chain) = (vec![], vec![]);
        for seed in 0..100 {
            uct.push(evals_to_optimum(Selection::Uct, seed, n, &skippable));
            chain.push(evals_to_optimum(Selection::Chain, seed, n, &skippable));
        }
        let found = uct.iter().filter(|&&e| e <= BUDGET).count();
        eprintln!("uct found {found}/100: {uct:?}");
        assert!(
            uct.iter().all(|&e| e <= BUDGET),
            "UCT must find the optimum within the budget: {uct:?}"
        );
        let cap =
            |v: &[usize]| v.iter().map(|&e| e.min(BUDGET + 1) as f64).sum::<f64>() / v.len() as f64;
        let (mu, mc) = (cap(&uct), cap(&chain));
        let chain_found = chain.iter().filter(|&&e| e <= BUDGET).count();
        eprintln!("mean evaluations to the optimum: uct {mu:.1}, chain {mc:.1} (chain found it in {chain_found}/100)");
        assert!(mu < mc, "uct {mu} vs chain {mc}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every path a search creates is valid; no node has duplicate children; the same seed
        /// gives the same result; the best path is the minimum of the good paths.
        #[test]
        fn search_invariants(seed in 0u64..1000, n in 3usize..14, sims in 1usize..60, selection in 0usize..3,
                             skip_first in proptest::bool::ANY, prior_seed in 0u64..100,
                             mask in proptest::collection::vec(0u8..3, 14)) {
            let mut prior: Vec<usize> = (0..n).collect();
            prior.shuffle(&mut ChaCha8Rng::seed_from_u64(prior_seed));
            let cfg = SearchConfig {
                num_simulations: sims,
                selection: [Selection::Uct, Selection::Chain, Selection::Pw][selection],
                order: if skip_first { Order::SkipFirst } else { Order::Shuffled },
                skip_prior: prior,
                c: 0.5,
                widening: 0.5,
                ..Default::default()
            };
            // A reward that depends on the path in an arbitrary but fixed way.
            let eval = |p: &LayerPath| -> Result<f64, ()> {
                Ok(p.counts().iter().zip(&mask).all(|(&c, &m)| c == 1 || m == c) as u8 as f64)
            };
            let mut s = Search::new(n, cfg.clone(), seed);
            while let Step::Evaluate(p) = s.next_step() {
                prop_assert!(valid(&p, n));
                s.provide(eval(&p).unwrap());
            }
            for kids in s.tree_children() {
                let set: HashSet<_> = kids.iter().collect();
                prop_assert_eq!(set.len(), kids.len());
                prop_assert!(kids.iter().all(|k| valid(k, n)));
            }
            let a = s.result();
            let mut b = run(Search::new(n, cfg, seed), eval).unwrap();
            b.wall_ms = a.wall_ms;
            prop_assert_eq!(&a, &b);
            prop_assert!(a.simulations <= sims);
            if let Some(best) = &a.best_path {
                prop_assert!(a.good_paths.iter().all(|g| best_first(best, g) != std::cmp::Ordering::Greater));
            }
        }
    }

    /// Runs a search to the end, recording at each request what `upcoming(k)` predicted then;
    /// returns (requests, [(index of the next request, prediction)]).
    fn requests_and_predictions(
        mut s: Search,
        k: usize,
        eval: impl Fn(&LayerPath) -> f64,
    ) -> (Vec<LayerPath>, Vec<(usize, Vec<LayerPath>)>) {
        let (mut requests, mut predicted) = (vec![], vec![]);
        while let Step::Evaluate(p) = s.next_step() {
            let up = s.upcoming(k);
            assert!(up.len() <= k && !up.contains(&p));
            predicted.push((requests.len() + 1, up));
            s.provide(eval(&p));
            requests.push(p);
        }
        (requests, predicted)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Under UCT, while the root has untried edits, the paths `upcoming` names are the very
        /// next requests whatever the rewards (unless the search stops first; and once the
        /// root's reward is known, which reorders its edits under skip-first); under every
        /// selection they are when the rewards are the guessed ones (here: constant, after the
        /// root's).
        #[test]
        fn upcoming_paths_are_the_next_requests(seed in 0u64..1000, n in 3usize..14, sims in 1usize..120,
                                                selection in 0usize..3, skip_first in proptest::bool::ANY,
                                                stops in proptest::bool::ANY, k in 1usize..6,
                                                constant in proptest::option::of(0u8..2),
                                                mask in proptest::collection::vec(0u8..3, 14)) {
            let selection = [Selection::Uct, Selection::Chain, Selection::Pw][selection];
            let cfg = SearchConfig {
                num_simulations: sims,
                selection,
                order: if skip_first { Order::SkipFirst } else { Order::Shuffled },
                stop_on_improvement: stops,
                stop_on_saving: stops.then_some(2),
                ..Default::default()
            };
            let eval = |p: &LayerPath| -> f64 {
                match constant {
                    Some(c) => c as f64,
                    None => p.counts().iter().zip(&mask).all(|(&c, &m)| c == 1 || m == c) as u8 as f64,
                }
            };
            let s = Search::new(n, cfg.clone(), seed);
            let root_edits = actions(&LayerPath::all_ones(n), &cfg).len();
            let (requests, predicted) = requests_and_predictions(s, k, eval);
            for (from, up) in predicted {
                // The root's own reward is guessed 0 (it reorders the root's edits under
                // skip-first); every later guess is a parent's known reward.
                let exact = (constant.is_some() && (from > 1 || constant == Some(0)))
                    || (selection == Selection::Uct
                        && from + up.len() <= root_edits + 1
                        && (from > 1 || !skip_first));
                if !exact {
                    continue;
                }
                let next = &requests[from.min(requests.len())..];
                let m = up.len().min(next.len());
                prop_assert_eq!(&up[..m], &next[..m]);
                // Fewer requests than predicted only when the search stopped early.
                if next.len() < up.len() {
                    prop_assert!(stops, "predicted {:?}, asked {:?}", up, next);
                }
            }
        }
    }

    /// With the default path correct and a skip prior, the first edits tried are the prior's
    /// skips in order, and progressive widening descends along correct children: when the
    /// prior's first k blocks can all be skipped, a path saving k blocks costs k evaluations.
    #[test]
    fn skip_first_with_a_prior_descends_along_the_prior() {
        let n = 12;
        let prior = vec![5, 9, 2, 7, 0, 11, 3, 8, 1, 4, 6, 10];
        let cfg = SearchConfig {
            num_simulations: 50,
            selection: Selection::Pw,
            order: Order::SkipFirst,
            skip_prior: prior.clone(),
            c: 0.5,
            widening: 0.5,
            stop_on_saving: Some(4),
            ..Default::default()
        };
        let skippable = [5, 9, 2, 7];
        let mut asked = vec![];
        let r = run(Search::new(n, cfg.clone(), 3), |p: &LayerPath| {
            asked.push(p.clone());
            hidden_skips(&skippable)(p)
        })
        .unwrap();
        assert_eq!(r.best_cost, Some(n - 4), "{r:?}");
        // The default, then one more prior block skipped at each step.
        assert_eq!(asked.len(), 5, "{asked:?}");
        for (k, p) in asked.iter().enumerate() {
            let skipped: Vec<usize> = (0..n).filter(|&l| p.counts()[l] == 0).collect();
            let mut want = prior[..k].to_vec();
            want.sort_unstable();
            assert_eq!(skipped, want, "evaluation {k}");
        }
        // A block the prior ranks early that cannot be skipped costs one evaluation, then the
        // next is tried at the same depth.
        let mut asked = vec![];
        let r = run(Search::new(n, cfg.clone(), 3), |p: &LayerPath| {
            asked.push(p.clone());
            hidden_skips(&[5, 2, 7, 0])(p)
        })
        .unwrap();
        assert_eq!(r.best_cost, Some(n - 4), "{r:?}");
        assert!(asked.len() <= 10, "{} evaluations: {asked:?}", asked.len());
        // A wrong default gets no prior order: the first edits are the shuffled ones, as UCT's.
        let uct = SearchConfig {
            selection: Selection::Uct,
            ..cfg.clone()
        };
        let wrong = |p: &LayerPath| -> Result<f64, ()> { Ok((p.cost() == n + 1) as u8 as f64) };
        let (mut a, mut b) = (vec![], vec![]);
        run(Search::new(n, cfg, 9), |p: &LayerPath| {
            a.push(p.clone());
            wrong(p)
        })
        .unwrap();
        run(Search::new(n, uct, 9), |p: &LayerPath| {
            b.push(p.clone());
            wrong(p)
        })
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_priors_and_widening_are_named() {
        let bad = |f: fn(&mut SearchConfig)| {
            let mut c = SearchConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.skip_prior = vec![3, 1, 3]).contains("block 3 is listed twice"));
        assert!(bad(|c| c.widening = 0.0).contains("widening"));
        assert!(bad(|c| c.widening_exp = 1.5).contains("widening-exp"));
        assert_eq!("pw".parse::<Selection>(), Ok(Selection::Pw));
        assert!("bfs"
            .parse::<Selection>()
            .unwrap_err()
            .contains("pw, uct or chain"));
        assert_eq!("skip-first".parse::<Order>(), Ok(Order::SkipFirst));
    }

    const PINNED: u64 = 14396215654857862097;

    #[test]
    fn sample_seeds_are_stable() {
        assert_eq!(
            sample_seed(7, "Mercury_SC_407695"),
            sample_seed(7, "Mercury_SC_407695")
        );
        assert_ne!(sample_seed(7, "a"), sample_seed(8, "a"));
        assert_ne!(sample_seed(7, "a"), sample_seed(7, "b"));
        // Pinned: a change here changes every dataset produced so far.
        assert_eq!(sample_seed(7, "Mercury_SC_407695"), PINNED);
    }
}
