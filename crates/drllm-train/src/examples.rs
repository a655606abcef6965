//! Training examples from paths datasets, as the paper's data generation keeps them: every
//! sample with any correct path, labelled with its cheapest correct path (the all-execute
//! default when nothing cheaper was correct), on the prompt as rendered during the search. The
//! share of improved samples (default wrong, another path right; with a weak model many are
//! luck) is capped.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use drllm_dataset::{read_manifest, read_rows, DatasetError};
use drllm_eval::RunConfig;
use drllm_path::LayerPath;
use drllm_tasks::{add_special_tokens, TaskName};

/// Why the datasets cannot be used for training.
#[derive(Debug, thiserror::Error)]
pub enum TrainDataError {
    /// A dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Datasets of different models, or of another model than `--model`.
    #[error("{path}: made with model fingerprint {theirs}, but {what} has {ours}")]
    OtherModel {
        /// The dataset directory.
        path: PathBuf,
        /// Its model fingerprint.
        theirs: String,
        /// What it is compared with.
        what: String,
        /// That fingerprint.
        ours: String,
    },
    /// A row is not usable (e.g. its path has the wrong length).
    #[error("{path}: sample {sample_id} ({task}): {msg}")]
    BadRow {
        /// The dataset directory.
        path: PathBuf,
        /// Task of the row.
        task: String,
        /// Sample id of the row.
        sample_id: String,
        /// What is wrong.
        msg: String,
    },
    /// Nothing to train on.
    #[error("{0}")]
    Empty(String),
}

/// One teacher-forced example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Sample id.
    pub sample_id: String,
    /// Task.
    pub task: String,
    /// Dataset split the sample came from.
    pub split: String,
    /// Index of the dataset (in the order given) the row came from.
    pub source: usize,
    /// What the search found for it.
    pub kind: RowKind,
    /// The prompt exactly as the search rendered it.
    pub prompt: String,
    /// Whether the prompt is tokenized with the tokenizer's special tokens (base style) or
    /// without (instruct style: the chat template already holds them).
    pub add_special: bool,
    /// The gold path: per block, 0 (skip), 1 (execute) or 2 (repeat); empty for a row with no
    /// correct path (never trained on; kept for routed validation).
    pub path: Vec<u8>,
    /// The row's other correct paths than the default, cheapest first (the search's
    /// `good_paths`): what a margin rule may label the prompt with instead of `path`.
    pub candidates: Vec<Vec<u8>>,
}

/// What a searched sample's row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    /// The default path was correct and a cheaper (or other) path too.
    Shortened,
    /// The default path was correct and nothing cheaper was found: labelled all-execute.
    DefaultOnly,
    /// The default path was correct, and cheaper ones too, but none kept the share of the
    /// default's margin a margin rule asks for: labelled all-execute.
    Fragile,
    /// The default path was wrong and another path right.
    Improved,
    /// No path evaluated was correct.
    NoCorrect,
}

/// How examples are drawn from the rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelMix {
    /// Most improved examples as a share of all examples (the paper targets 0.3); 1 keeps all.
    pub max_improved_share: f64,
    /// Seed of the deterministic choice of which improved rows to keep (by sample id).
    pub seed: u64,
}

impl Default for LabelMix {
    fn default() -> Self {
        LabelMix {
            max_improved_share: 0.3,
            seed: 0,
        }
    }
}

/// How a dataset's prompts were made (from its manifest's run configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceInfo {
    /// The dataset directory.
    pub path: PathBuf,
    /// Rows read.
    pub rows: usize,
    /// Examples kept from it.
    pub examples: usize,
    /// The run configuration the search recorded (`config.run` of the manifest), typed once
    /// here: reward, style and template decide how its prompts were rendered.
    pub config: RunConfig,
}

/// The examples of one or more datasets.
#[derive(Debug, Clone)]
pub struct ExampleSet {
    /// Examples, sorted by (task, sample id); one per distinct prompt.
    pub examples: Vec<Example>,
    /// Rows not trained on (no correct path, or improved beyond the cap), one per distinct
    /// prompt not among `examples`: with `examples`, every searched prompt once (routed
    /// validation scores all held-out prompts, not only those with a label).
    pub unlabelled: Vec<Example>,
    /// Blocks of the model.
    pub num_layers: usize,
    /// Model fingerprint shared by every dataset.
    pub model_fingerprint: String,
    /// Per dataset, in the order given.
    pub sources: Vec<SourceInfo>,
    /// Rows dropped because another row had the same prompt.
    pub duplicates: usize,
    /// Rows of each kind (distinct prompts), before the improved cap.
    pub kinds: Vec<(RowKind, usize)>,
    /// Improved rows left out by the cap.
    pub improved_dropped: usize,
}

impl ExampleSet {
    /// Labels per class (skip, execute, repeat) over `examples`.
    pub fn label_counts(&self) -> [u64; 3] {
        let mut c = [0u64; 3];
        for e in &self.examples {
            for &x in &e.path {
                c[(x as usize).min(2)] += 1;
            }
        }
        c
    }
}

/// Reads the datasets `dirs`: all must come from the model with one of `model_fingerprints`
/// (its current fingerprint first, then what older datasets recorded) and `num_layers` blocks. Keeps one row per prompt (the first by task and sample id); rows
/// with a correct path become examples labelled with their best (cheapest correct) path,
/// improved ones up to `mix.max_improved_share` of the examples. `model_needs_bos`: the model's
/// family always takes a BOS (as the search that wrote the rows tokenized them).
pub fn load_examples(
    dirs: &[PathBuf],
    model_fingerprints: &[&str],
    model_name: &str,
    num_layers: usize,
    model_needs_bos: bool,
    mix: &LabelMix,
) -> Result<ExampleSet, TrainDataError> {
    let model_fingerprint = model_fingerprints.first().copied().unwrap_or_default();
    let mut rows_all = vec![];
    let mut sources = vec![];
    for (source, dir) in dirs.iter().enumerate() {
        let manifest = read_manifest(dir)?;
        if !model_fingerprints.contains(&manifest.model_fingerprint.as_str()) {
            return Err(TrainDataError::OtherModel {
                path: dir.clone(),
                theirs: manifest.model_fingerprint,
                what: format!("--model ({model_name})"),
                ours: model_fingerprint.to_string(),
            });
        }
        let run = manifest
            .config
            .get("run")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let config: RunConfig = serde_json::from_value(run).map_err(|e| {
            TrainDataError::Empty(format!(
                "{}: _manifest.json config.run is not a run configuration this version reads \
                 ({e}); search it again with this version",
                dir.display()
            ))
        })?;
        let (reward, style) = (config.reward, config.style);
        let rows = read_rows(dir)?;
        let n = rows.len();
        for r in rows {
            let bad = |msg: String| TrainDataError::BadRow {
                path: dir.clone(),
                task: r.task.clone(),
                sample_id: r.sample_id.clone(),
                msg,
            };
            if r.num_layers as usize != num_layers {
                return Err(bad(format!(
                    "searched on a model of {} blocks, this one has {num_layers}",
                    r.num_layers
                )));
            }
            if r.prompt.is_empty() {
                return Err(bad("the prompt is empty".into()));
            }
            let family = r
                .task
                .parse::<TaskName>()
                .map_err(|e| bad(e.to_string()))?
                .family();
            // Paths are checked where the rows are read (their counts, and one per block of
            // the row's `num_layers`, which matched this model above).
            let (kind, path) = match &r.best_path {
                None if r.found || r.default_correct => {
                    return Err(bad(
                        "found or default_correct is true but best_path is null".into(),
                    ))
                }
                None => (RowKind::NoCorrect, vec![]),
                Some(path) => {
                    let kind = match (r.default_correct, r.found) {
                        (false, _) => RowKind::Improved,
                        (true, true) => RowKind::Shortened,
                        (true, false) => RowKind::DefaultOnly,
                    };
                    (kind, path.counts().to_vec())
                }
            };
            let mut candidates: Vec<Vec<u8>> = vec![];
            let paths = r.best_path.iter().chain(&r.good_paths);
            for p in paths.map(LayerPath::counts) {
                if !p.iter().all(|&c| c == 1) && !candidates.iter().any(|c| c == p) {
                    candidates.push(p.to_vec());
                }
            }
            candidates.sort_by_key(|p| p.iter().map(|&c| c as usize).sum::<usize>());
            rows_all.push(Example {
                sample_id: r.sample_id,
                task: r.task,
                split: r.split,
                source,
                kind,
                prompt: r.prompt,
                add_special: add_special_tokens(style, reward, family, model_needs_bos),
                path,
                candidates,
            });
        }
        sources.push(SourceInfo {
            path: dir.clone(),
            rows: n,
            examples: 0,
            config,
        });
    }
    let total = rows_all.len();
    rows_all.sort_by(|a, b| (&a.task, &a.sample_id).cmp(&(&b.task, &b.sample_id)));
    // One row per prompt: of rows with the same prompt (a sample searched in several datasets),
    // the one that says the most (a correct default, then an improvement), else the first.
    let rank = |k: RowKind| match k {
        RowKind::Shortened | RowKind::DefaultOnly | RowKind::Fragile => 0,
        RowKind::Improved => 1,
        RowKind::NoCorrect => 2,
    };
    let mut kept: HashMap<&str, usize> = HashMap::new();
    for (i, e) in rows_all.iter().enumerate() {
        let slot = kept.entry(e.prompt.as_str()).or_insert(i);
        if rank(e.kind) < rank(rows_all[*slot].kind) {
            *slot = i;
        }
    }
    let keep: HashSet<usize> = kept.into_values().collect();
    let mut i = 0;
    rows_all.retain(|_| {
        i += 1;
        keep.contains(&(i - 1))
    });
    let duplicates = total - rows_all.len();
    let count = |k: RowKind| rows_all.iter().filter(|e| e.kind == k).count();
    let kinds: Vec<(RowKind, usize)> = [
        RowKind::Shortened,
        RowKind::DefaultOnly,
        RowKind::Fragile,
        RowKind::Improved,
        RowKind::NoCorrect,
    ]
    .into_iter()
    .map(|k| (k, count(k)))
    .collect();
    // The improved rows kept: those first in a seeded order of their sample ids, up to the cap.
    let kept_default = count(RowKind::Shortened) + count(RowKind::DefaultOnly);
    let improved = count(RowKind::Improved);
    let share = mix.max_improved_share.clamp(0.0, 1.0);
    let cap = if share >= 1.0 {
        improved
    } else {
        ((share / (1.0 - share)) * kept_default as f64).floor() as usize
    };
    let mut order: Vec<(u64, usize)> = rows_all
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == RowKind::Improved)
        .map(|(i, e)| {
            (
                drllm_search::sample_seed(mix.seed ^ 0x1a_b3e1, &e.sample_id),
                i,
            )
        })
        .collect();
    order.sort_unstable();
    let keep_improved: HashSet<usize> = order.iter().take(cap).map(|&(_, i)| i).collect();
    let improved_dropped = improved - keep_improved.len();
    let (mut examples, mut unlabelled) = (vec![], vec![]);
    for (i, e) in rows_all.into_iter().enumerate() {
        let train = match e.kind {
            RowKind::NoCorrect => false,
            RowKind::Improved => keep_improved.contains(&i),
            RowKind::Shortened | RowKind::DefaultOnly | RowKind::Fragile => true,
        };
        if train {
            sources[e.source].examples += 1;
            examples.push(e);
        } else {
            unlabelled.push(e);
        }
    }
    if examples.is_empty() {
        let listed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(TrainDataError::Empty(if total == 0 {
            format!("no rows in {}: run the search first", listed.join(", "))
        } else if improved_dropped > 0 {
            format!(
                "the {improved_dropped} rows with a correct path in {} are all improved ones (default \
                 path wrong), and with no default-correct row --max-improved-share {} keeps none of \
                 them: raise it (1 keeps all)",
                listed.join(", "),
                mix.max_improved_share
            )
        } else {
            format!(
                "none of the {total} rows in {} has a correct path: nothing to train on; search \
                 more prompts or use a reward the model can meet (cloze)",
                listed.join(", ")
            )
        }));
    }
    Ok(ExampleSet {
        examples,
        unlabelled,
        num_layers,
        model_fingerprint: model_fingerprint.to_string(),
        sources,
        duplicates,
        kinds,
        improved_dropped,
    })
}

impl Example {
    /// Soft per-block targets from the whole search rather than its first verified path: over
    /// every correct path the search verified for this prompt (its `good_paths`, and the
    /// default when the default was correct), weighted by `exp(blocks saved / temperature)`,
    /// the share of weight on each action (skip, execute, repeat) at each block. A temperature
    /// near 0 puts the weight on the cheapest verified paths (the paper's one-hot label when one
    /// path is cheapest, an even mix of those that tie); a large one gives the plain share of
    /// verified paths. Rows with no correct path (never trained on) get their label's
    /// one-hot, as an empty path gives an empty target.
    pub fn search_targets(&self, temperature: f64) -> Vec<[f32; 3]> {
        let default_correct = matches!(
            self.kind,
            RowKind::Shortened | RowKind::DefaultOnly | RowKind::Fragile
        );
        let default = vec![1u8; self.path.len()];
        let mut paths: Vec<&[u8]> = self.candidates.iter().map(Vec::as_slice).collect();
        if default_correct {
            paths.push(&default);
        }
        if !paths.contains(&self.path.as_slice()) {
            paths.push(&self.path);
        }
        let saved = |p: &[u8]| p.len() as f64 - p.iter().map(|&c| c as f64).sum::<f64>();
        let t = temperature.max(1e-6);
        // Softmax over the paths' savings, shifted by the largest for stability.
        let top = paths.iter().map(|p| saved(p)).fold(f64::MIN, f64::max);
        let weights: Vec<f64> = paths.iter().map(|p| ((saved(p) - top) / t).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut out = vec![[0f32; 3]; self.path.len()];
        for (p, w) in paths.iter().zip(&weights) {
            for (block, &c) in out.iter_mut().zip(p.iter()) {
                block[(c as usize).min(2)] += (w / total) as f32;
            }
        }
        out
    }
}

/// Whether `sample_id` is in the validation split: a seeded hash of the id (stable across
/// runs, machines and dataset order) below `val_fraction`.
pub fn split_of(sample_id: &str, seed: u64, val_fraction: f64) -> bool {
    let h = drllm_search::sample_seed(seed, sample_id);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

#[cfg(test)]
mod tests {
    use super::*;
    use drllm_dataset::{Dataset, PathRecord};

    /// A row of a 4-block model: `default` = the default path's reward, `best` = the cheapest
    /// correct path (None: nothing correct).
    fn row(id: &str, default: bool, best: Option<Vec<u8>>) -> PathRecord {
        let found = best.as_ref().is_some_and(|b| b != &vec![1u8; 4]);
        let best = best.map(|b| LayerPath::from_counts(b).unwrap());
        PathRecord {
            sample_id: id.into(),
            task: "arc_easy".into(),
            split: "train".into(),
            question: "q".into(),
            answer: "A".into(),
            prompt: format!("Question: {id}\nAnswer:"),
            model: "m".into(),
            num_layers: 4,
            default_correct: default,
            found,
            improved: !default && best.is_some(),
            good_paths: best.iter().cloned().collect(),
            best_path: best,
            simulations: 10,
            evaluations: 10,
            search_ms: 1,
            worker: "w".into(),
            seed: 0,
            best_response: None,
        }
    }

    /// The run configuration of a cloze search with base prompts.
    fn run_config() -> RunConfig {
        RunConfig {
            style: drllm_tasks::Style::Base,
            template: None,
            reward: drllm_tasks::RewardMode::Cloze,
            max_new_tokens: 10,
            seed: 0,
            search: drllm_search::SearchConfig::default(),
        }
    }

    fn dataset(dir: &std::path::Path) {
        let mut rows = vec![];
        for i in 0..5 {
            rows.push(row(&format!("short{i}"), true, Some(vec![1, 0, 1, 1])));
            rows.push(row(&format!("default{i}"), true, Some(vec![1; 4])));
        }
        for i in 0..10 {
            rows.push(row(&format!("improved{i}"), false, Some(vec![1, 1, 2, 0])));
        }
        for i in 0..5 {
            rows.push(row(&format!("wrong{i}"), false, None));
        }
        let cfg = serde_json::json!({ "run": run_config() });
        let mut ds = Dataset::open(dir, "fp", cfg, false).unwrap();
        ds.commit("arc_easy", &rows).unwrap();
    }

    #[test]
    fn every_row_with_a_correct_path_is_kept_and_improved_ones_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path());
        let dirs = [dir.path().to_path_buf()];
        let mix = LabelMix {
            max_improved_share: 0.3,
            seed: 1,
        };
        let set = load_examples(&dirs, &["fp"], "m", 4, false, &mix).unwrap();
        // 10 default-correct rows, and improved ones up to 30% of the examples: 4 of 10.
        let kind = |k: RowKind| set.examples.iter().filter(|e| e.kind == k).count();
        assert_eq!(kind(RowKind::Shortened), 5);
        assert_eq!(kind(RowKind::DefaultOnly), 5);
        assert_eq!(kind(RowKind::Improved), 4);
        assert_eq!(set.improved_dropped, 6);
        assert_eq!(set.unlabelled.len(), 6 + 5);
        assert!(set
            .unlabelled
            .iter()
            .filter(|e| e.kind == RowKind::NoCorrect)
            .all(|e| e.path.is_empty()));
        // Default-only rows say "run every block": 5 rows x 4 execute labels among the rest.
        assert_eq!(set.label_counts(), [5 + 4, 15 + 20 + 8, 4]);
        assert!(
            set.examples.iter().all(|e| !e.add_special),
            "cloze prompts carry no BOS"
        );
        assert_eq!(
            set.kinds,
            vec![
                (RowKind::Shortened, 5),
                (RowKind::DefaultOnly, 5),
                (RowKind::Fragile, 0),
                (RowKind::Improved, 10),
                (RowKind::NoCorrect, 5)
            ]
        );
        // Candidates: the correct paths other than the default, cheapest first.
        for e in &set.examples {
            match e.kind {
                RowKind::DefaultOnly => assert!(e.candidates.is_empty()),
                _ => assert_eq!(e.candidates, vec![e.path.clone()]),
            }
        }
        // Deterministic by sample id: the same rows again; another seed picks others.
        let again = load_examples(&dirs, &["fp"], "m", 4, false, &mix).unwrap();
        assert_eq!(again.examples, set.examples);
        let ids = |s: &ExampleSet| -> Vec<String> {
            s.examples
                .iter()
                .filter(|e| e.kind == RowKind::Improved)
                .map(|e| e.sample_id.clone())
                .collect()
        };
        let other =
            load_examples(&dirs, &["fp"], "m", 4, false, &LabelMix { seed: 2, ..mix }).unwrap();
        assert_eq!(ids(&other).len(), 4);
        assert_ne!(ids(&other), ids(&set));
        // No cap keeps all of them; a zero cap none.
        let all = LabelMix {
            max_improved_share: 1.0,
            seed: 1,
        };
        assert_eq!(
            load_examples(&dirs, &["fp"], "m", 4, false, &all)
                .unwrap()
                .examples
                .len(),
            20
        );
        let none = LabelMix {
            max_improved_share: 0.0,
            seed: 1,
        };
        assert_eq!(
            load_examples(&dirs, &["fp"], "m", 4, false, &none)
                .unwrap()
                .examples
                .len(),
            10
        );
    }

    #[test]
    fn a_prompt_searched_twice_keeps_the_row_that_says_the_most() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cfg = serde_json::json!({ "run": run_config() });
        let mut ds = Dataset::open(a.path(), "fp", cfg.clone(), false).unwrap();
        ds.commit("arc_easy", &[row("x", false, None)]).unwrap();
        let mut ds = Dataset::open(b.path(), "fp", cfg.clone(), false).unwrap();
        ds.commit("arc_easy", &[row("x", true, Some(vec![1, 0, 1, 1]))])
            .unwrap();
        let dirs = [a.path().to_path_buf(), b.path().to_path_buf()];
        let set = load_examples(&dirs, &["fp"], "m", 4, false, &LabelMix::default()).unwrap();
        assert_eq!(set.duplicates, 1);
        assert_eq!(set.examples.len(), 1);
        assert_eq!(set.examples[0].source, 1);
        assert!(set.unlabelled.is_empty());
        // Only improved rows, and a cap that keeps none of them: the error says why.
        let c = tempfile::tempdir().unwrap();
        let mut ds = Dataset::open(c.path(), "fp", cfg, false).unwrap();
        ds.commit("arc_easy", &[row("y", false, Some(vec![1, 1, 2, 0]))])
            .unwrap();
        let e = load_examples(
            &[c.path().to_path_buf()],
            &["fp"],
            "m",
            4,
            false,
            &LabelMix::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--max-improved-share"), "{e}");
    }

    fn example(kind: RowKind, path: Vec<u8>, candidates: Vec<Vec<u8>>) -> Example {
        Example {
            sample_id: "s".into(),
            task: "arc_easy".into(),
            split: "train".into(),
            source: 0,
            kind,
            prompt: "p".into(),
            add_special: true,
            path,
            candidates,
        }
    }

    #[test]
    fn search_targets_weigh_every_verified_path_by_its_saving() {
        // Default correct; the search verified one skip (block 1) and two skips (1 and 2).
        let e = example(
            RowKind::Shortened,
            vec![1, 0, 0, 1],
            vec![vec![1, 0, 0, 1], vec![1, 0, 1, 1]],
        );
        let t = e.search_targets(1.0);
        // Weights e^2, e^1, e^0 for savings 2, 1, 0 (the default).
        let z = (2f64.exp() + 1f64.exp() + 1.0) as f32;
        let close = |a: f32, b: f32| (a - b).abs() < 1e-5;
        assert!(close(t[0][1], 1.0) && close(t[3][1], 1.0));
        assert!(close(t[1][0], (2f64.exp() + 1f64.exp()) as f32 / z));
        assert!(close(t[2][0], 2f64.exp() as f32 / z));
        for b in &t {
            assert!(close(b.iter().sum(), 1.0), "{t:?}");
        }
        // A cold temperature is the cheapest path's one-hot label (the paper's).
        let cold = e.search_targets(1e-3);
        for (b, &c) in cold.iter().zip(&e.path) {
            assert!(close(b[c as usize], 1.0), "{cold:?}");
        }
        // A hot one is the plain share of the three verified paths.
        let hot = e.search_targets(1e6);
        assert!(
            close(hot[1][0], 2.0 / 3.0) && close(hot[2][0], 1.0 / 3.0),
            "{hot:?}"
        );
        // An improved row's default was wrong: it is not among the targets.
        let imp = example(RowKind::Improved, vec![1, 2, 1, 1], vec![vec![1, 2, 1, 1]]);
        assert_eq!(imp.search_targets(1.0)[1], [0.0, 0.0, 1.0]);
        // A default-only row: every block executes.
        let only = example(RowKind::DefaultOnly, vec![1; 4], vec![]);
        assert!(only
            .search_targets(1.0)
            .iter()
            .all(|b| b == &[0.0, 1.0, 0.0]));
    }
}
