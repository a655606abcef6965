//! The run configuration shared by `drllm-worker --standalone`, `drllm-coordinator` and the
//! workers it drives: the search flags (one clap group, flattened into each binary) and the
//! serializable [`RunConfig`] the coordinator hands to every worker at registration.
use std::path::PathBuf;

use drllm_search::{SearchConfig, Selection};
use drllm_tasks::{Family, RewardMode, Style, Template};
use serde::{Deserialize, Serialize};

use crate::eval::EvalOptions;

/// Prompting, reward and MCTS flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SearchArgs {
    /// Prompt style: instruct (chat template applied) or base.
    #[arg(long, default_value = "instruct")]
    pub style: String,
    /// Own prompt template file (minijinja; workers must see the same path).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Multiple-choice reward: strict (the paper's), lenient, choice-logits (no decoding).
    #[arg(long, default_value = "lenient")]
    pub reward: String,
    /// Token budget of a decoded answer.
    #[arg(long, default_value_t = 10)]
    pub max_new_tokens: usize,
    /// Run seed; each sample's search seed derives from it and the sample id.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Simulations per prompt.
    #[arg(long, default_value_t = 50)]
    pub num_simulations: usize,
    /// UCT exploration constant.
    #[arg(long, default_value_t = 1.8)]
    pub c: f64,
    /// Length penalty lambda (score -= lambda * cost / L).
    #[arg(long, default_value_t = 3.0)]
    pub length_penalty: f64,
    /// Probability of descending to a random child.
    #[arg(long, default_value_t = 0.1)]
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
    /// Stop once a correct path saves this many blocks (0: never).
    #[arg(long, default_value_t = 2)]
    pub stop_on_saving: usize,
    /// Selection: uct, or chain (the paper code's leaf-only descent).
    #[arg(long, default_value = "uct")]
    pub selection: String,
}

/// Everything that decides a sample's search result, besides the model and the sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Prompt style (`instruct` or `base`).
    pub style: String,
    /// Own template file, if any.
    pub template: Option<PathBuf>,
    /// Multiple-choice reward mode.
    pub reward: String,
    /// Token budget of a decoded answer.
    pub max_new_tokens: usize,
    /// Run seed.
    pub seed: u64,
    /// MCTS parameters.
    pub search: SearchConfig,
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
        };
        search.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
        let rc = RunConfig {
            style: self.style.clone(),
            template: self.template.clone(),
            reward: self.reward.clone(),
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            search,
        };
        rc.eval()?;
        rc.style()?;
        Ok(rc)
    }
}

impl RunConfig {
    /// Prompt style.
    pub fn style(&self) -> anyhow::Result<Style> {
        Ok(self.style.parse()?)
    }

    /// How candidates are scored.
    pub fn eval(&self) -> anyhow::Result<EvalOptions> {
        let mode: RewardMode = self.reward.parse()?;
        Ok(EvalOptions {
            mode,
            max_new_tokens: self.max_new_tokens,
        })
    }

    /// The prompt template for a task family.
    pub fn template(&self, family: Family) -> anyhow::Result<Template> {
        let style = self.style()?;
        Ok(match &self.template {
            Some(p) => Template::from_file(p, style)?,
            None => Template::builtin(family, style),
        })
    }
}
