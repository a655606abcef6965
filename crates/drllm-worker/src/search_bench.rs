//! `drllm-search-bench`: questions about paths answered from rewards alone. A path's reward for
//! a prompt does not depend on who asks for it, so every reward is computed once (batched,
//! prefix-shared), shared by everything the run compares, and optionally kept in a memo file.
//! - `compare`: search configurations on the same prompts, split by whether the default path is
//!   correct: how often a path other than the default is found, the blocks the best one saves,
//!   and the evaluations each search asks for (what a real run would spend).
//! - `static`: the best fixed paths on (train) prompts: blocks ranked by how often skipping each
//!   alone keeps answers right (a skip prior for the search), then greedy skip sets of growing
//!   size (the static controls routers must beat).
//! - `predict`: the diagnostic before any new router supervision: whether the routers' inputs
//!   (the pooled hidden state entering each block along the default path) predict which single
//!   skips keep a prompt's answer better than the block's and the task's keep rate, cross-fitted
//!   over folds of prompts (`predict.rs`).
//! - `candidates`: the same question for candidate selection: whether those inputs tell which
//!   of a few skip sets of equal cost keeps a prompt's answer, better than the best set of the
//!   prompt's task (`candidates.rs`).
mod candidates;
mod predict;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use drllm_cli::{DataArgs, LogArgs, ModelArgs, SearchArgs};
use drllm_eval::{evaluate_batch, prepare, PreparedPrompt};
use drllm_path::LayerPath;
use drllm_runtime::{LoadedModel, PrefixCache};
use drllm_search::{sample_seed, Search, SearchConfig, SearchResult, Step};

#[derive(Parser)]
#[command(
    name = "drllm-search-bench",
    version,
    about = "Compare search configurations, and find the best static paths, from shared rewards.",
    after_help = "Examples:
  drllm-search-bench compare --dataset arc_easy --limit 200 --sims 50,100,200 \\
      --config uct --config chain --config pw,order=skip-first,c=0.5,stop=4 --memo memo.jsonl
  drllm-search-bench static --dataset arc_easy,arc_challenge --limit 200 --blocks 6 --memo memo.jsonl
  drllm-search-bench predict --dataset arc_easy,piqa,sciq --limit 200 --memo memo.jsonl --json predict.json
  drllm-search-bench candidates --dataset arc_easy,piqa,sciq --split train --limit 260 --select 60 \\
      --skip 3 --memo memo.jsonl --json candidates.json

Every reward is evaluated once per run (and read from --memo when present)."
)]
enum Cli {
    /// Compare search configurations on the same prompts.
    #[command(
        after_help = "A --config is a selection (uct, chain, pw) then key=value changes to the search flags given:
c, lambda, order (skip-first, shuffled), stop (blocks saved that end a search, 0 = never),
improve (true/false: stop at the first path beating a wrong default), widening, exp."
    )]
    Compare(CompareArgs),
    /// Rank blocks by single-skip accuracy and grow the best static skip set greedily.
    Static(StaticArgs),
    /// Whether the routers' inputs tell which single skips keep a prompt's answer (the
    /// diagnostic before training new routers): cross-fitted probes against the prompt-blind
    /// keep rate, per block, per task and pooled, and the one-skip routing they would give.
    #[command(
        after_help = "On the prompts whose default path is correct, each (prompt, block) pair's outcome is whether
skipping that block alone keeps the answer. The prompt-blind predictor is the keep rate of the
block within the task on the other folds; the probe starts from that same rate and adds a ridge
regression on the pooled hidden state entering the block (what a router reads, --windows
windows), cross-fitted over --folds folds of prompts with its ridge strength chosen inside the
training folds: it can only beat the blind rate with information from the prompt. Reported: AUCs with
95% bootstrap intervals over prompts and the paired difference, and the keep rate of routing one
skip per prompt by the probe against the best single skip chosen on the other folds.
A block whose skip loses few answers (column `lost`) gives noisy AUCs, and estimates fitted on the
other folds are anti-correlated with the held-out outcomes when one class is rare (an AUC well
below 0.5 there is that artifact, for both predictors): read the pooled rows."
    )]
    Predict(PredictArgs),
    /// Candidate selection's diagnostic: whether the routers' inputs tell which of a few skip
    /// sets of equal cost (chosen on other train prompts) keeps a prompt's answer, better than
    /// the best set of the prompt's task.
    #[command(
        after_help = "The first --select prompts of each task choose the candidates: the greedy skip set of --skip
blocks over all tasks, and one per task (as `static` grows them). On the other prompts, every
candidate's cloze margin (the gold choice's score minus the best other choice's, in the reward's
units) is computed, and a ridge probe on the pooled hidden state entering the first block any
candidate skips (what a router reads before it must choose) predicts each candidate's margin,
cross-fitted over --folds folds with the task's mean margin as its intercept. Each prompt then
runs the candidate of highest predicted margin (routed), compared on the same prompts with the
candidate most accurate on the other folds over all tasks (global) and in the prompt's task
(per-task), all at the same cost; the oracle is any candidate right. Needs --reward cloze or
cloze-norm on multiple-choice tasks."
    )]
    Candidates(CandidatesArgs),
}

#[derive(clap::Args)]
struct CandidatesArgs {
    #[command(flatten)]
    common: Common,
    /// Blocks each candidate skips (all candidates cost the same).
    #[arg(long, default_value_t = 3)]
    skip: usize,
    /// Prompts at the start of each task that choose the candidates (the rest are the
    /// diagnostic's).
    #[arg(long, default_value_t = 60)]
    select: usize,
    /// Blocks tried at each greedy step: the best by single-skip accuracy not yet skipped (0 =
    /// every block).
    #[arg(long, default_value_t = 10)]
    shortlist: usize,
    #[command(flatten)]
    probe: ProbeArgs,
}

/// What the two probe diagnostics (`predict`, `candidates`) share.
#[derive(clap::Args)]
struct ProbeArgs {
    /// Windows the hidden state is pooled over (as the routers read it).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    windows: u16,
    /// Folds of prompts for cross-fitting.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=50))]
    folds: u16,
    /// Bootstrap resamples for the intervals.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CompareArgs {
    #[command(flatten)]
    common: Common,
    /// Simulation budgets, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "50")]
    sims: Vec<usize>,
    /// A configuration to compare (repeat the flag).
    #[arg(long = "config", required = true)]
    configs: Vec<String>,
    /// Write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct StaticArgs {
    #[command(flatten)]
    common: Common,
    /// Largest skip set grown.
    #[arg(long, default_value_t = 6)]
    blocks: usize,
    /// Candidates tried at each greedy step: the best blocks by single-skip accuracy not yet
    /// skipped (0 = every block).
    #[arg(long, default_value_t = 10)]
    shortlist: usize,
    /// Write the ranking and the paths as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PredictArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    probe: ProbeArgs,
}

/// What both commands share: model, prompts, search flags (prompting and reward), evaluator.
#[derive(clap::Args)]
#[command(
    mut_arg("dataset", |a| a.default_value("arc_easy")),
    mut_arg("limit", |a| a.default_value("20"))
)]
struct Common {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    d: DataArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Prompting and reward flags (and, for compare, the base every configuration starts from).
    #[command(flatten)]
    search: SearchArgs,
    /// Candidates per evaluator batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Memory for cached path prefixes, in MiB.
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// Rewards already computed (JSON lines), read first and extended as new ones come.
    #[arg(long)]
    memo: Option<PathBuf>,
}

/// A search configuration parsed from `--config`.
fn parse_config(spec: &str, base: &SearchConfig) -> Result<SearchConfig> {
    let mut parts = spec.split(',');
    let mut cfg = base.clone();
    cfg.selection = parts
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--config {spec}"))?;
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--config {spec}: {kv:?} is not key=value"))?;
        let num = || -> Result<f64> {
            v.parse()
                .with_context(|| format!("--config {spec}: {k}={v} is not a number"))
        };
        match k {
            "c" => cfg.c = num()?,
            "lambda" => cfg.length_penalty = num()?,
            "order" => cfg.order = v.parse().map_err(anyhow::Error::msg)?,
            "stop" => cfg.stop_on_saving = (num()? as usize > 0).then_some(num()? as usize),
            "improve" => cfg.stop_on_improvement = v == "true",
            "widening" => cfg.widening = num()?,
            "exp" => cfg.widening_exp = num()?,
            other => bail!("--config {spec}: unknown key {other:?} (c, lambda, order, stop, improve, widening, exp)"),
        }
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("--config {spec}: {e}"))?;
    Ok(cfg)
}

/// One (configuration, budget) row of the table.
struct Row {
    spec: String,
    sims: usize,
    results: Vec<SearchResult>,
}

/// Summary of a group of results: (count, found-rate, mean blocks saved where found, mean
/// evaluations).
fn summarize(rs: &[&SearchResult], n_layers: usize) -> (usize, f64, f64, f64) {
    let n = rs.len();
    if n == 0 {
        return (0, 0.0, 0.0, 0.0);
    }
    let found: Vec<&&SearchResult> = rs.iter().filter(|r| r.found).collect();
    let saved = found
        .iter()
        .map(|r| n_layers as f64 - r.best_cost.unwrap_or(n_layers) as f64)
        .sum::<f64>()
        / found.len().max(1) as f64;
    let evals = rs.iter().map(|r| r.evaluations as f64).sum::<f64>() / n as f64;
    (n, found.len() as f64 / n as f64, saved, evals)
}

/// Rewards of (prompt, path) pairs, each computed once: batched and prefix-shared, kept in
/// memory and in the memo file.
struct Oracle {
    lm: LoadedModel,
    prompts: Vec<PreparedPrompt>,
    /// Each prompt's memo key, `task/sample_id` (ids alone repeat across tasks).
    keys: Vec<String>,
    eval: drllm_eval::EvalOptions,
    run: drllm_eval::RunConfig,
    memo: HashMap<(String, LayerPath), f64>,
    /// Cloze margins (the gold choice's score minus the best other's), where computed.
    margins: HashMap<(String, LayerPath), f64>,
    memo_out: Option<std::fs::File>,
    from_memo: usize,
    computed: usize,
    cache: PrefixCache,
    batch: usize,
    started: std::time::Instant,
}

impl Oracle {
    fn open(a: &Common) -> Result<Oracle> {
        let run = a.search.run_config()?;
        let dir = a.d.dir()?;
        let source = a.m.source()?;
        let fingerprints = source.fingerprints()?;
        let lm = a.m.load_source(source)?;
        let eval = run.eval();
        let n_layers = lm.model.num_layers();
        if let Some(b) = run.search.skip_prior.iter().find(|&&b| b >= n_layers) {
            bail!("--skip-prior names block {b}, the model has {n_layers} blocks (0..{n_layers})");
        }
        let (mut prompts, mut keys) = (vec![], vec![]);
        for (task, loaded) in a.d.load(&dir)? {
            let template = run.template(task.family())?;
            for s in &loaded.samples {
                prompts.push(prepare(&lm, s, &template, &eval)?);
                keys.push(format!("{task}/{}", s.id));
            }
        }
        // The memo holds rewards of one model, dtype and prompting only (a memo begun before
        // drllm hashed whole model files names the model by its older fingerprint).
        let header_for = |fp: &str| {
            serde_json::json!({
                "model": fp, "reward": run.reward, "style": run.style,
                "template": run.template, "max_new_tokens": run.max_new_tokens,
                "dtype": format!("{:?}", lm.model.kind()),
            })
        };
        let header = header_for(&fingerprints.current);
        let legacy_header = header_for(&fingerprints.legacy);
        let mut memo: HashMap<(String, LayerPath), f64> = HashMap::new();
        let mut margins: HashMap<(String, LayerPath), f64> = HashMap::new();
        let mut memo_out = None;
        if let Some(path) = &a.memo {
            if path.exists() {
                let f = std::fs::File::open(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                    let line = line.with_context(|| format!("reading {}", path.display()))?;
                    let at = || format!("{}:{}", path.display(), i + 1);
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .with_context(|| format!("{}: not JSON", at()))?;
                    if i == 0 {
                        if v != header && v != legacy_header {
                            bail!(
                                "{}: made for {v}, this run is {header}: use another --memo",
                                at()
                            );
                        }
                        continue;
                    }
                    let (Some(id), Some(p), Some(r)) =
                        (v["key"].as_str(), v["path"].as_str(), v["reward"].as_f64())
                    else {
                        bail!("{}: expected key, path and reward", at());
                    };
                    let p: LayerPath = p.parse().with_context(|| format!("{}: path", at()))?;
                    if let Some(m) = v["margin"].as_f64() {
                        margins.insert((id.to_string(), p.clone()), m);
                    }
                    memo.insert((id.to_string(), p), r);
                }
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            if f.metadata()?.len() == 0 {
                writeln!(f, "{header}")?;
            }
            memo_out = Some(f);
        }
        Ok(Oracle {
            lm,
            prompts,
            keys,
            eval,
            run,
            from_memo: memo.len(),
            memo,
            margins,
            memo_out,
            computed: 0,
            cache: PrefixCache::new(a.prefix_cache_mb << 20),
            batch: a.batch.max(1),
            started: std::time::Instant::now(),
        })
    }

    fn get(&self, i: usize, p: &LayerPath) -> Option<f64> {
        self.memo.get(&(self.keys[i].clone(), p.clone())).copied()
    }

    /// The cloze margin of prompt `i` along `p`, when computed.
    fn margin(&self, i: usize, p: &LayerPath) -> Option<f64> {
        self.margins
            .get(&(self.keys[i].clone(), p.clone()))
            .copied()
    }

    /// Computes the rewards of `wanted` (prompt index, path) not known yet, and their cloze
    /// margins too when `margins` (a memo line written before margins were kept has none).
    fn fill(
        &mut self,
        mut wanted: Vec<(usize, LayerPath)>,
        margins: bool,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        wanted.retain(|(i, p)| {
            self.get(*i, p).is_none() || (margins && self.margin(*i, p).is_none())
        });
        wanted.sort_by(|x, y| (x.0, x.1.counts()).cmp(&(y.0, y.1.counts())));
        wanted.dedup();
        for chunk in wanted.chunks(self.batch) {
            let items: Vec<(&PreparedPrompt, &LayerPath)> =
                chunk.iter().map(|(i, p)| (&self.prompts[*i], p)).collect();
            let evals = evaluate_batch(&self.lm, &items, &self.eval, &mut self.cache)?;
            for ((i, p), e) in chunk.iter().zip(evals) {
                let id = self.keys[*i].clone();
                let margin = match &self.prompts[*i].scoring {
                    drllm_eval::Scoring::Cloze {
                        chars, gold, norm, ..
                    } => drllm_tasks::cloze_margin(&e.logliks, chars, *norm, *gold),
                    _ => None,
                }
                // A choice of zero probability makes an infinite margin, which JSON cannot
                // hold: kept as a very large one of the same sign.
                .map(|m| m.clamp(-1e9, 1e9));
                if let Some(f) = self.memo_out.as_mut() {
                    let mut line =
                        serde_json::json!({"key": id, "path": p.to_string(), "reward": e.reward});
                    if let Some(m) = margin {
                        line["margin"] = m.into();
                    }
                    writeln!(f, "{line}")?;
                }
                if let Some(m) = margin {
                    self.margins.insert((id.clone(), p.clone()), m);
                }
                self.memo.insert((id, p.clone()), e.reward);
            }
            self.computed += chunk.len();
            bar.set_message(format!(
                "{} rewards computed ({:.1}/s), {} from the memo",
                self.computed,
                self.computed as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
                self.from_memo
            ));
        }
        Ok(())
    }

    /// The tasks of the prompts, sorted by name, and each prompt's index among them.
    fn tasks(&self) -> (Vec<String>, Vec<usize>) {
        let tasks: Vec<&str> = self
            .keys
            .iter()
            .map(|k| k.split('/').next().unwrap_or_default())
            .collect();
        let mut names: Vec<String> = tasks.iter().map(|t| t.to_string()).collect();
        names.sort();
        names.dedup();
        let of = tasks
            .iter()
            .map(|t| names.iter().position(|x| x == t).unwrap_or(0))
            .collect();
        (names, of)
    }

    fn header(&self, d: &DataArgs) -> String {
        let (split, datasets) = (
            d.split,
            d.dataset
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        );
        format!(
            "{} {split} prompts of {} ({}), reward {}, style {}, seed {} | {} rewards computed in {:.0}s, {} from the memo",
            self.prompts.len(),
            datasets.join(", "),
            self.lm.source.name(),
            self.run.reward,
            self.run.style,
            self.run.seed,
            self.computed,
            self.started.elapsed().as_secs_f64(),
            self.from_memo
        )
    }
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Compare(a) => {
            a.common.log.init("warn");
            compare(a)
        }
        Cli::Static(a) => {
            a.common.log.init("warn");
            static_paths(a)
        }
        Cli::Candidates(a) => {
            a.common.log.init("warn");
            candidates::candidates(a)
        }
        Cli::Predict(a) => {
            a.common.log.init("warn");
            predict_keeps(a)
        }
    }
}

fn compare(a: CompareArgs) -> Result<()> {
    let mut o = Oracle::open(&a.common)?;
    let mut combos = vec![];
    for spec in &a.configs {
        for &sims in &a.sims {
            let mut cfg = parse_config(spec, &o.run.search)?;
            cfg.num_simulations = sims;
            combos.push((spec.clone(), sims, cfg));
        }
    }
    let n_layers = o.lm.model.num_layers();
    // Every (configuration, prompt) search, driven together.
    let mut searches: Vec<(usize, usize, Search)> = vec![];
    for (c, (_, _, cfg)) in combos.iter().enumerate() {
        for (i, p) in o.prompts.iter().enumerate() {
            let seed = sample_seed(o.run.seed, &p.sample_id);
            searches.push((c, i, Search::new(n_layers, cfg.clone(), seed)));
        }
    }
    let mut results: Vec<Option<SearchResult>> = vec![None; searches.len()];
    let bar = drllm_cli::progress_bar(searches.len() as u64, "searches");
    loop {
        // Advance every search until it needs a reward not known yet.
        let mut wanted: Vec<(usize, LayerPath)> = vec![];
        for (k, (_, i, s)) in searches.iter_mut().enumerate() {
            if results[k].is_some() {
                continue;
            }
            loop {
                match s.next_step() {
                    Step::Done(r) => {
                        results[k] = Some(r);
                        bar.inc(1);
                        break;
                    }
                    Step::Evaluate(p) => match o.get(*i, &p) {
                        Some(r) => s.provide(r),
                        None => {
                            wanted.push((*i, p));
                            break;
                        }
                    },
                }
            }
        }
        if wanted.is_empty() {
            break;
        }
        o.fill(wanted, false, &bar)?;
    }
    bar.finish_and_clear();
    let mut rows: Vec<Row> = combos
        .iter()
        .map(|(spec, sims, _)| Row {
            spec: spec.clone(),
            sims: *sims,
            results: vec![],
        })
        .collect();
    for ((c, _, _), r) in searches.iter().zip(results) {
        rows[*c].results.extend(r);
    }
    println!("{}", o.header(&a.common.d));
    println!(
        "{:<40} {:>5} | {:>10} {:>7} {:>6} {:>6} | {:>11} {:>7} {:>6} {:>6} | {:>6}",
        "config",
        "sims",
        "default ok",
        "found",
        "saved",
        "evals",
        "default bad",
        "found",
        "saved",
        "evals",
        "evals"
    );
    let mut json = vec![];
    for r in &rows {
        let ok: Vec<&SearchResult> = r
            .results
            .iter()
            .filter(|x| x.default_reward >= 1.0)
            .collect();
        let bad: Vec<&SearchResult> = r
            .results
            .iter()
            .filter(|x| x.default_reward < 1.0)
            .collect();
        let all: Vec<&SearchResult> = r.results.iter().collect();
        let (n1, f1, s1, e1) = summarize(&ok, n_layers);
        let (n0, f0, s0, e0) = summarize(&bad, n_layers);
        let (_, _, _, e) = summarize(&all, n_layers);
        println!(
            "{:<40} {:>5} | {:>10} {:>6.1}% {:>6.2} {:>6.1} | {:>11} {:>6.1}% {:>6.2} {:>6.1} | {:>6.1}",
            r.spec, r.sims, n1, 100.0 * f1, s1, e1, n0, 100.0 * f0, s0, e0, e
        );
        json.push(serde_json::json!({
            "config": r.spec, "sims": r.sims,
            "default_correct": {"prompts": n1, "found_rate": f1, "mean_saved_where_found": s1, "evaluations": e1},
            "default_wrong": {"prompts": n0, "found_rate": f0, "mean_saved_where_found": s0, "evaluations": e0},
            "evaluations": e,
        }));
    }
    println!("found = a correct path other than the default; saved = blocks the best one saves (mean where found); evals = distinct paths evaluated per search");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The path skipping `blocks` (every other block once).
fn skipping(n_layers: usize, blocks: &[usize]) -> Result<LayerPath> {
    let mut counts = vec![1u8; n_layers];
    for &b in blocks {
        counts[b] = 0;
    }
    Ok(LayerPath::from_counts(counts)?)
}

/// Accuracy of a path over the prompts `idx` (rewards must be known).
fn accuracy(o: &Oracle, idx: &[usize], p: &LayerPath) -> f64 {
    idx.iter().map(|&i| o.get(i, p).unwrap_or(0.0)).sum::<f64>() / idx.len().max(1) as f64
}

/// Every `(prompt, path)` pair of the prompts `idx` and the paths `paths`.
fn pairs_of(idx: &[usize], paths: &[LayerPath]) -> Vec<(usize, LayerPath)> {
    paths
        .iter()
        .flat_map(|p| idx.iter().map(move |&i| (i, p.clone())))
        .collect()
}

/// Blocks ranked by the accuracy of skipping each alone over the prompts `idx`, safest first
/// (highest accuracy, then the lower block): the skip prior.
fn rank_single_skips(
    o: &mut Oracle,
    idx: &[usize],
    bar: &indicatif::ProgressBar,
) -> Result<Vec<(usize, f64)>> {
    let n = o.lm.model.num_layers();
    let singles: Vec<LayerPath> = (0..n).map(|b| skipping(n, &[b])).collect::<Result<_>>()?;
    o.fill(pairs_of(idx, &singles), false, bar)?;
    let mut ranked: Vec<(usize, f64)> =
        (0..n).map(|b| (b, accuracy(o, idx, &singles[b]))).collect();
    ranked.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    Ok(ranked)
}

/// One greedy skip set per size up to `k`, over the prompts `idx`: each grows the last by the
/// block that keeps accuracy highest among the first `shortlist` blocks of `prior` not yet
/// skipped (0 = every block). Returns (skipped blocks, sorted; path; accuracy) per size.
fn greedy_sets(
    o: &mut Oracle,
    idx: &[usize],
    prior: &[usize],
    k: usize,
    shortlist: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<(Vec<usize>, LayerPath, f64)>> {
    let n = o.lm.model.num_layers();
    let mut chosen: Vec<usize> = vec![];
    let mut steps = vec![];
    for _ in 0..k {
        let shortlist: Vec<usize> = prior
            .iter()
            .copied()
            .filter(|b| !chosen.contains(b))
            .take(if shortlist == 0 { n } else { shortlist })
            .collect();
        let paths: Vec<LayerPath> = shortlist
            .iter()
            .map(|&b| skipping(n, &[&chosen[..], &[b]].concat()))
            .collect::<Result<_>>()?;
        o.fill(pairs_of(idx, &paths), false, bar)?;
        let (best, acc) = shortlist
            .iter()
            .zip(&paths)
            .map(|(&b, p)| (b, accuracy(o, idx, p)))
            .fold(None, |m: Option<(usize, f64)>, x| match m {
                Some(m) if m.1 >= x.1 => Some(m),
                _ => Some(x),
            })
            .context("no candidate block")?;
        chosen.push(best);
        let mut sorted = chosen.clone();
        sorted.sort_unstable();
        steps.push((sorted, skipping(n, &chosen)?, acc));
    }
    Ok(steps)
}

fn static_paths(a: StaticArgs) -> Result<()> {
    let mut o = Oracle::open(&a.common)?;
    let n = o.lm.model.num_layers();
    let np = o.prompts.len();
    if a.blocks >= n {
        bail!("--blocks {} leaves nothing of a {n}-block model", a.blocks);
    }
    let bar = drllm_cli::progress_bar(0, "paths");
    let all: Vec<usize> = (0..np).collect();
    let base = LayerPath::all_ones(n);
    bar.set_length(1 + n as u64);
    o.fill(pairs_of(&all, std::slice::from_ref(&base)), false, &bar)?;
    let base_acc = accuracy(&o, &all, &base);
    let single_acc = rank_single_skips(&mut o, &all, &bar)?;
    let prior: Vec<usize> = single_acc.iter().map(|&(b, _)| b).collect();
    let steps = greedy_sets(&mut o, &all, &prior, a.blocks, a.shortlist, &bar)?;
    bar.finish_and_clear();
    println!("{}", o.header(&a.common.d));
    println!("baseline accuracy {base_acc:.4}");
    println!(
        "single skips, safest first (block: accuracy): {}",
        single_acc
            .iter()
            .map(|(b, x)| format!("{b}: {x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "skip prior (--order skip-first --skip-prior): {}",
        prior
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "\nblocks saved  skipped            accuracy  - baseline  path (drllm-infer eval --path)"
    );
    for (k, (set, path, acc)) in steps.iter().enumerate() {
        println!(
            "{:>12}  {:<18} {acc:>8.4}  {:>+10.4}  {path}",
            k + 1,
            format!("{set:?}"),
            acc - base_acc
        );
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "prompts": np, "baseline_accuracy": base_acc,
            "single_skip_accuracy": single_acc.iter().map(|(b, x)| serde_json::json!({"block": b, "accuracy": x})).collect::<Vec<_>>(),
            "skip_prior": prior,
            "greedy": steps.iter().enumerate().map(|(k, (set, path, acc))| serde_json::json!({
                "blocks_saved": k + 1, "skipped": set, "path": path.to_string(), "accuracy": acc,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The pooled hidden state entering every block along the default path, of the prompts `idx`:
/// per block `[idx.len(), W * H]`, row `r` for prompt `idx[r]`.
fn block_features(
    o: &Oracle,
    idx: &[usize],
    windows: usize,
    batch: usize,
) -> Result<Vec<tch::Tensor>> {
    let n_layers = o.lm.model.num_layers();
    let np = idx.len() as i64;
    // Rows of `idx`, shortest prompts first (less padding per batch).
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.sort_by_key(|&r| o.prompts[idx[r]].ids.len());
    let mut out: Vec<tch::Tensor> = vec![];
    let bar = drllm_cli::progress_bar(order.len() as u64, "features");
    let _g = tch::no_grad_guard();
    for chunk in order.chunks(batch.max(1)) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&r| o.prompts[idx[r]].ids.clone())
            .collect();
        let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let paths = vec![LayerPath::all_ones(n_layers); chunk.len()];
        let mut b = drllm_runtime::PathBatch::new(&o.lm.model, &paths)?;
        let inputs = b.prefill_block_inputs(&ids)?;
        let idx = tch::Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
        for (l, h) in inputs.iter().enumerate() {
            let pooled = drllm_router::pool_windows(h, &lens, windows)
                .to_device(tch::Device::Cpu)
                .flatten(1, -1);
            if out.len() <= l {
                out.push(tch::Tensor::zeros(
                    [np, pooled.size()[1]],
                    (tch::Kind::Float, tch::Device::Cpu),
                ));
            }
            let _ = out[l].index_copy_(0, &idx, &pooled);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn predict_keeps(a: PredictArgs) -> Result<()> {
    use predict::{compare_auc, fold_ids, group_rate, mean_ci, Kernel};
    let mut o = Oracle::open(&a.common)?;
    let n = o.lm.model.num_layers();
    let np = o.prompts.len();
    let base = LayerPath::all_ones(n);
    let singles: Vec<LayerPath> = (0..n).map(|b| skipping(n, &[b])).collect::<Result<_>>()?;
    let bar = drllm_cli::progress_bar(0, "paths");
    let wanted: Vec<(usize, LayerPath)> = std::iter::once(&base)
        .chain(&singles)
        .flat_map(|p| (0..np).map(move |i| (i, p.clone())))
        .collect();
    o.fill(wanted, false, &bar)?;
    bar.finish_and_clear();
    // The prompts whose default is correct: the routing question is which skips keep them.
    let kept: Vec<usize> = (0..np)
        .filter(|&i| o.get(i, &base).unwrap_or(0.0) >= 1.0)
        .collect();
    if kept.len() < 2 * a.probe.folds as usize {
        bail!(
            "{} of {np} prompts have a correct default path: too few for {} folds (raise --limit)",
            kept.len(),
            a.probe.folds
        );
    }
    let (task_names, task_of) = o.tasks();
    let all: Vec<usize> = (0..np).collect();
    let feats = block_features(&o, &all, a.probe.windows as usize, o.batch)?;
    let fold = fold_ids(np, a.probe.folds as usize, o.run.seed);
    let lambdas = [0.01, 0.1, 1.0, 10.0, 100.0];
    // Per block: outcome, probe score and prompt-blind score of every kept prompt.
    let mut y = vec![vec![0.0; np]; n];
    let mut probe = vec![vec![0.0; np]; n];
    let mut blind = vec![vec![0.0; np]; n];
    let bar = drllm_cli::progress_bar(n as u64, "probes");
    for b in 0..n {
        for &i in &kept {
            y[b][i] = o.get(i, &singles[b]).unwrap_or(0.0).min(1.0);
        }
        let k = Kernel::new(&feats[b]);
        probe[b] = k.cross_fit(&kept, &y[b], 0.5, &fold, &task_of, &lambdas);
        blind[b] = group_rate(&kept, &y[b], &fold, &task_of);
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(feats);
    println!("{}", o.header(&a.common.d));
    println!(
        "{} of {np} prompts answered correctly along the default path; outcome: the answer kept when one block is skipped",
        kept.len()
    );
    let pairs = |sel: &dyn Fn(usize) -> bool, blocks: &[usize]| {
        let (mut s1, mut s2, mut l, mut p) = (vec![], vec![], vec![], vec![]);
        for &b in blocks {
            for &i in kept.iter().filter(|&&i| sel(i)) {
                s1.push(probe[b][i]);
                s2.push(blind[b][i]);
                l.push(y[b][i] > 0.5);
                p.push(i);
            }
        }
        (s1, s2, l, p)
    };
    let fmt = |c: (f64, f64, f64)| format!("{:.3} [{:.3}, {:.3}]", c.0, c.1, c.2);
    println!(
        "\nper block (kept prompts, pooled over tasks): AUC of the probe and of the prompt-blind rate"
    );
    println!(
        "{:>5} {:>6} {:>5} {:>22} {:>22} {:>25}",
        "block", "keep", "lost", "probe AUC", "blind AUC", "probe - blind"
    );
    let mut json_blocks = vec![];
    for b in 0..n {
        let (s1, s2, l, p) = pairs(&|_| true, &[b]);
        let lost = l.iter().filter(|&&x| !x).count();
        let keep = 1.0 - lost as f64 / l.len().max(1) as f64;
        match compare_auc(&s1, &s2, &l, &p, np, a.probe.bootstrap) {
            Some(c) => {
                println!(
                    "{b:>5} {keep:>6.3} {lost:>5} {:>22} {:>22} {:>25}",
                    fmt(c.a),
                    fmt(c.b),
                    fmt(c.diff)
                );
                json_blocks.push(
                    serde_json::json!({"block": b, "keep_rate": keep, "lost": lost,
                    "probe_auc": c.a, "blind_auc": c.b, "difference": c.diff}),
                );
            }
            None => {
                println!("{b:>5} {keep:>6.3} {lost:>5} {:>22}", "(one class only)");
                json_blocks.push(serde_json::json!({"block": b, "keep_rate": keep, "lost": lost}));
            }
        }
    }
    // Pooled over blocks: the probe against the block's (and task's) keep rate, which is
    // what a static ranking (the skip prior) knows.
    let all: Vec<usize> = (0..n).collect();
    let mut json_tasks = vec![];
    println!("\npooled over (prompt, block) pairs");
    println!(
        "{:<14} {:>7} {:>22} {:>22} {:>25}",
        "task", "prompts", "probe AUC", "blind AUC", "probe - blind"
    );
    // Each task, then all of them (a task index, or None for the pooled row).
    let mut groups: Vec<(String, Option<usize>)> = task_names
        .iter()
        .enumerate()
        .map(|(t, name)| (name.clone(), Some(t)))
        .collect();
    if task_names.len() > 1 {
        groups.push(("pooled".into(), None));
    }
    // One skip per prompt: the probe's highest-scored block against the block with the highest
    // keep rate on the other folds (per fold, pooled over tasks), on the same prompts.
    let rates: Vec<Vec<f64>> = (0..a.probe.folds as usize)
        .map(|f| {
            (0..n)
                .map(|b| rate_outside(&kept, &y[b], &fold, f))
                .collect()
        })
        .collect();
    let static_choice: Vec<usize> = (0..np)
        .map(|i| {
            let r = &rates[fold[i]];
            (0..n)
                .max_by(|&x, &z| r[x].total_cmp(&r[z]).then(z.cmp(&x)))
                .unwrap_or(0)
        })
        .collect();
    let routed_choice: Vec<usize> = (0..np)
        .map(|i| {
            (0..n)
                .max_by(|&x, &z| probe[x][i].total_cmp(&probe[z][i]).then(z.cmp(&x)))
                .unwrap_or(0)
        })
        .collect();
    for (name, task) in &groups {
        let sel = |i: usize| task.is_none_or(|t| task_of[i] == t);
        let (s1, s2, l, p) = pairs(&sel, &all);
        let prompts = kept.iter().filter(|&&i| sel(i)).count();
        let c = compare_auc(&s1, &s2, &l, &p, np, a.probe.bootstrap);
        let ids: Vec<usize> = kept.iter().copied().filter(|&i| sel(i)).collect();
        let routed: Vec<f64> = ids.iter().map(|&i| y[routed_choice[i]][i]).collect();
        let fixed: Vec<f64> = ids.iter().map(|&i| y[static_choice[i]][i]).collect();
        let diff: Vec<f64> = routed.iter().zip(&fixed).map(|(r, f)| r - f).collect();
        let (r, f, d) = (
            mean_ci(&routed, a.probe.bootstrap),
            mean_ci(&fixed, a.probe.bootstrap),
            mean_ci(&diff, a.probe.bootstrap),
        );
        match &c {
            Some(c) => println!(
                "{name:<14} {prompts:>7} {:>22} {:>22} {:>25}",
                fmt(c.a),
                fmt(c.b),
                fmt(c.diff)
            ),
            None => println!("{name:<14} {prompts:>7} (one class only)"),
        }
        println!(
            "{:<14} {:>7} one skip per prompt keeps: probe's choice {}, best static skip {}, paired {}",
            "", "", fmt(r), fmt(f), fmt(d)
        );
        json_tasks.push(serde_json::json!({
            "task": name, "prompts": prompts,
            "probe_auc": c.as_ref().map(|c| c.a), "blind_auc": c.as_ref().map(|c| c.b),
            "difference": c.as_ref().map(|c| c.diff),
            "one_skip_keep": {"probe": r, "static": f, "probe_minus_static": d},
        }));
    }
    println!("intervals: 95% percentile bootstrap over prompts ({} resamples); probe - blind and the one-skip difference are paired", a.probe.bootstrap);
    if let Some(p) = &a.probe.json {
        let v = serde_json::json!({
            "prompts": np, "default_correct": kept.len(), "windows": a.probe.windows, "folds": a.probe.folds,
            "model": o.lm.source.name(), "reward": o.run.reward.to_string(), "style": o.run.style.to_string(),
            "blocks": json_blocks, "groups": json_tasks,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The keep rate of a block (outcomes `y`) over the kept prompts outside fold `f`.
fn rate_outside(kept: &[usize], y: &[f64], fold: &[usize], f: usize) -> f64 {
    let (mut s, mut n) = (0.0, 0.0);
    for &j in kept {
        if fold[j] != f {
            s += y[j];
            n += 1.0;
        }
    }
    if n > 0.0 {
        s / n
    } else {
        0.0
    }
}
