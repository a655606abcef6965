//! The Hugging Face dataset card (`README.md`) written with every commit.

use crate::*;

/// Marks a README.md as the card drllm writes (and may rewrite).
pub(crate) const CARD_MARKER: &str =
    "<!-- dataset card written by drllm; rewritten at every commit -->";

/// The Hugging Face dataset card of a paths dataset: YAML `configs` with one config per task
/// (its parts as `data_files`, the run's split as the split name), so
/// `datasets.load_dataset(OUT, "arc_easy")` loads one task, then what the rows are. There is no
/// all-tasks config: `datasets` does not read the `task=` directory as a column, so its rows
/// could not be told apart.
pub fn dataset_card(m: &Manifest) -> String {
    let mut tasks: Vec<(&str, usize)> = vec![];
    for p in &m.parts {
        match tasks.iter_mut().find(|(t, _)| *t == p.task) {
            Some((_, n)) => *n += p.rows,
            None => tasks.push((&p.task, p.rows)),
        }
    }
    tasks.sort();
    // A split name must be a word for `datasets`; anything else is published as `train`.
    let split = m.config["split"]
        .as_str()
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or("train");
    let model = m.config["model"].as_str().unwrap_or("?");
    let mut y = String::from("---\nconfigs:\n");
    for (t, _) in &tasks {
        y += &format!(
            "- config_name: {t}\n  data_files:\n  - split: {split}\n    path: data/task={t}/*.parquet\n"
        );
    }
    y += "tags:\n- drllm\n- layer-routing\n---\n";
    y += CARD_MARKER;
    y += &format!(
        "\n\n# Layer paths of {model}\n\n\
         Accuracy-preserving layer paths found by drllm's MCTS search, one row per sample \
         ({} rows{}). Model fingerprint `{}`, drllm {}, format version {}; the run's full \
         configuration is in `_manifest.json`.\n\n\
         | task (config) | rows |\n| --- | ---: |\n",
        m.rows,
        if m.complete {
            ", run complete"
        } else {
            ", run in progress"
        },
        m.model_fingerprint,
        m.code_version,
        m.format_version,
    );
    for (t, n) in &tasks {
        y += &format!("| {t} | {n} |\n");
    }
    y += "\nColumns (the task is the `task=` directory; the `split` column names the source split):\n\n";
    for (c, what) in CARD_COLUMNS {
        y += &format!("- `{c}`: {what}\n");
    }
    y += "\n```python\nimport datasets\nds = datasets.load_dataset(\"path/to/OUT\", \"TASK\")\n```\n";
    y
}

/// What each column holds, for the dataset card.
pub(crate) const CARD_COLUMNS: [(&str, &str); 20] = [
    ("sample_id", "the sample's id in its task"),
    ("split", "the source split searched"),
    ("question", "the question as in the source data"),
    ("answer", "the reference answer"),
    ("prompt", "the prompt exactly as the model saw it"),
    ("model", "the model searched"),
    ("num_layers", "blocks of the model (length of every path)"),
    (
        "default_correct",
        "whether the all-execute path answers correctly",
    ),
    ("found", "whether a good path was found"),
    (
        "improved",
        "whether the default path was wrong and a found path is right",
    ),
    (
        "best_path",
        "the best path: per block 0 skip, 1 execute, 2 repeat",
    ),
    ("best_cost", "block applications of the best path"),
    (
        "best_layers",
        "the best path as the executed block indices in order",
    ),
    ("good_paths", "every good path found, best first"),
    ("simulations", "MCTS simulations run"),
    ("evaluations", "distinct path evaluations"),
    ("search_ms", "search wall time in milliseconds"),
    ("worker", "the worker that searched the sample"),
    ("seed", "the sample's search seed"),
    ("best_response", "the model's response along the best path"),
];
