//! The search flags: prompting, reward and MCTS, one clap group flattened into
//! `drllm-worker --standalone`, `drllm-coordinator` and `drllm-search-bench`, checked once into a
//! typed [`RunConfig`].
use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use drllm_eval::RunConfig;
use drllm_search::{SearchConfig, Selection};
use drllm_tasks::{RewardMode, Style};

/// The parser of reward names: `--help` lists them from [`RewardMode::ALL`].
pub fn reward_parser() -> impl TypedValueParser<Value = RewardMode> {
    PossibleValuesParser::new(RewardMode::ALL.map(|(n, _)| n)).try_map(|s| s.parse::<RewardMode>())
}

/// Prompting, reward and MCTS flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SearchArgs {
    /// Prompt style: instruct (chat template applied), base (plain text), or auto: base for the
    /// cloze rewards (lm-evaluation-harness's formulation), instruct otherwise.
    #[arg(long, default_value = "auto")]
    pub style: String,
    /// Own prompt template file (minijinja; workers must see the same path).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Multiple-choice reward: cloze (the gold choice's text is the most likely continuation of
    /// the question, lm-eval's `acc`), cloze-norm (per character, lm-eval's `acc_norm`), strict
    /// (the paper's letter rule on decoded text), lenient (a leading letter), choice-logits (the
    /// letter's logit after "Answer:"). Math and GSM8K always decode.
    #[arg(long, env = "DRLLM_REWARD", default_value = "cloze", value_parser = reward_parser())]
    pub reward: RewardMode,
    /// Token budget of a decoded answer.
    #[arg(long, default_value_t = 10)]
    pub max_new_tokens: usize,
    /// Run seed; each sample's search seed derives from it and the sample id.
    #[arg(long, env = "DRLLM_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Simulations per prompt.
    #[arg(long, env = "DRLLM_NUM_SIMULATIONS", default_value_t = 50)]
    pub num_simulations: usize,
    /// UCT exploration constant (the paper's code uses 1.8).
    #[arg(long, default_value_t = 0.5, value_parser = crate::number_in(0.0, 1e6))]
    pub c: f64,
    /// Length penalty lambda (score -= lambda * cost / L).
    #[arg(long, default_value_t = 3.0, value_parser = crate::number_in(0.0, 1e6))]
    pub length_penalty: f64,
    /// Probability of descending to a random child.
    #[arg(long, default_value_t = 0.1, value_parser = crate::number_in(0.0, 1.0))]
    pub random_child_prob: f64,
    /// Skip sizes (consecutive layer-list entries removed by one action).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub skip_sizes: Vec<usize>,
    /// Disable repeat actions.
    #[arg(long)]
    pub no_repeat: bool,
    /// Most applications of one block (at most 2).
    #[arg(long, default_value_t = 2)]
    pub max_count: u8,
    /// Path cost cap as a multiple of L.
    #[arg(long, default_value_t = 2.0)]
    pub cost_cap: f64,
    /// Do not stop when a path beats the default path's reward.
    #[arg(long)]
    pub no_stop_on_improvement: bool,
    /// Stop once a correct path saves this many blocks (0: never; the paper's code uses 2).
    #[arg(long, default_value_t = 4)]
    pub stop_on_saving: usize,
    /// Selection: pw (UCT with progressive widening: a node visited n times has at most
    /// ceil(widening * n^widening-exp) children, one more while none of them was correct), uct
    /// (every child of a node tried before descending: at 50 simulations no path saves more than
    /// 2 blocks), or chain (the paper code's leaf-only descent).
    #[arg(long, default_value = "pw")]
    pub selection: String,
    /// Progressive widening factor (with --selection pw).
    #[arg(long, default_value_t = 0.5, value_parser = crate::positive_up_to(1e6))]
    pub widening: f64,
    /// Progressive widening exponent (with --selection pw), in (0, 1].
    #[arg(long, default_value_t = 0.5, value_parser = crate::positive_up_to(1.0))]
    pub widening_exp: f64,
    /// Expansion order of a node's edits: skip-first (once the default path is known correct,
    /// skips before repeats) or shuffled (the paper's).
    #[arg(long, default_value = "skip-first")]
    pub order: String,
    /// Blocks ranked safest-to-skip first, comma separated (with --order skip-first): skips
    /// are tried in this order, so labels of different prompts agree (from
    /// `drllm-search-bench static`).
    #[arg(long, value_delimiter = ',')]
    pub skip_prior: Vec<usize>,
}

impl SearchArgs {
    /// The checked run configuration of these flags.
    pub fn run_config(&self) -> anyhow::Result<RunConfig> {
        let selection: Selection = self.selection.parse().map_err(anyhow::Error::msg)?;
        let search = SearchConfig {
            num_simulations: self.num_simulations,
            c: self.c,
            length_penalty: self.length_penalty,
            random_child_prob: self.random_child_prob,
            skip_sizes: self.skip_sizes.clone(),
            allow_repeat: !self.no_repeat,
            max_count: self.max_count,
            cost_cap_factor: self.cost_cap,
            stop_on_improvement: !self.no_stop_on_improvement,
            stop_on_saving: (self.stop_on_saving > 0).then_some(self.stop_on_saving),
            selection,
            widening: self.widening,
            widening_exp: self.widening_exp,
            order: self.order.parse().map_err(anyhow::Error::msg)?,
            skip_prior: self.skip_prior.clone(),
        };
        search.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
        Ok(RunConfig {
            style: Style::resolve(&self.style, self.reward)?,
            template: self.template.clone(),
            reward: self.reward,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            search,
        })
    }
}
