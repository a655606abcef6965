//! The run configuration: everything that decides a sample's search result besides the model and
//! the sample. The coordinator hands it to every worker at registration, the dataset records it
//! in each part's metadata, and training and eval read it back from there, all as this one typed
//! struct (its JSON form is what the dataset's fingerprint hashes).
use std::path::PathBuf;

use drllm_search::SearchConfig;
use drllm_tasks::{Family, RewardMode, Style, Template};
use serde::{Deserialize, Serialize};

use crate::prompt::EvalOptions;

/// Everything that decides a sample's search result, besides the model and the sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Prompt style.
    pub style: Style,
    /// Own template file, if any.
    pub template: Option<PathBuf>,
    /// Multiple-choice reward mode.
    pub reward: RewardMode,
    /// Token budget of a decoded answer.
    pub max_new_tokens: usize,
    /// Run seed.
    pub seed: u64,
    /// MCTS parameters.
    pub search: SearchConfig,
}

impl RunConfig {
    /// How candidates are scored.
    pub fn eval(&self) -> EvalOptions {
        EvalOptions {
            mode: self.reward,
            max_new_tokens: self.max_new_tokens,
        }
    }

    /// The prompt template for a task family.
    pub fn template(&self, family: Family) -> Result<Template, drllm_tasks::Error> {
        Ok(match &self.template {
            Some(p) => Template::from_file(p, self.style)?,
            None => Template::builtin_for(family, self.style, self.reward),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datasets written before the struct was typed hold the same JSON: the enums travel by
    /// their flag names, so fingerprints and old parts read back unchanged.
    #[test]
    fn json_form_uses_the_flag_names() {
        for (name, mode) in RewardMode::ALL {
            for style in [Style::Instruct, Style::Base] {
                let rc = RunConfig {
                    style,
                    template: None,
                    reward: mode,
                    max_new_tokens: 10,
                    seed: 3,
                    search: SearchConfig::default(),
                };
                let v = serde_json::to_value(&rc).unwrap();
                assert_eq!(v["reward"], name);
                assert_eq!(v["style"], style.name());
                let back: RunConfig = serde_json::from_value(v).unwrap();
                assert_eq!(back, rc);
            }
        }
        let bad = serde_json::json!({"style": "chat", "template": null, "reward": "cloze",
            "max_new_tokens": 1, "seed": 0, "search": serde_json::to_value(SearchConfig::default()).unwrap()});
        let err = serde_json::from_value::<RunConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chat"), "{err}");
    }
}
