//! Merging the `--json` summaries of several `drllm-infer eval` runs (e.g. one per task and
//! budget of a SLURM array job) into one table, CSV and plot.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `drllm-infer merge` flags.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Summaries written by `drllm-infer eval --json` (one per array task, say).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Write the merged table as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw routing pattern, cost histogram (first budget) and accuracy vs cost (.png or .svg).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One row of the merged table: a mode (baseline, static path or routed budget) on one task.
#[derive(Debug, Clone)]
struct Row {
    model: String,
    routers: String,
    task: String,
    mode: String,
    budget: Option<f64>,
    prompts: u64,
    accuracy: f64,
    ci95: (f64, f64),
    minus_baseline: Option<(f64, f64, f64)>,
    cost: f64,
    file: String,
    /// Routed modes: decision frequencies per block and prompts per path cost.
    freq: Vec<[f64; 3]>,
    cost_counts: Vec<(usize, usize)>,
}

fn num(v: &serde_json::Value, what: &str, file: &Path) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("{}: {what} is not a number", file.display()))
}

fn pair(v: &serde_json::Value, what: &str, file: &Path) -> Result<(f64, f64)> {
    Ok((num(&v[0], what, file)?, num(&v[1], what, file)?))
}

/// The rows of one summary file.
fn read_summary(file: &Path) -> Result<(usize, Vec<Row>)> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let s: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not JSON (expected a drllm-infer eval --json summary)",
            file.display()
        )
    })?;
    let Some(tasks) = s["tasks"].as_array() else {
        bail!(
            "{}: no `tasks` list (expected a drllm-infer eval --json summary)",
            file.display()
        );
    };
    let n_layers = s["num_layers"]
        .as_u64()
        .with_context(|| format!("{}: num_layers missing", file.display()))?
        as usize;
    let text_of = |k: &str| s[k].as_str().unwrap_or("?").to_string();
    let mut rows = vec![];
    for t in tasks {
        let task = t["task"].as_str().unwrap_or("?").to_string();
        let prompts = t["prompts"].as_u64().unwrap_or(0);
        let mut modes = vec![("baseline".to_string(), &t["baseline"])];
        for st in t["static"].as_array().into_iter().flatten() {
            modes.push((format!("static {}", st["path"].as_str().unwrap_or("?")), st));
        }
        for r in t["routed"].as_array().into_iter().flatten() {
            modes.push(("routed".into(), r));
        }
        for (mode, m) in modes {
            let what = |k: &str| format!("tasks[{task}].{mode}.{k}");
            let minus = match m.get("minus_baseline") {
                Some(d) => {
                    let (lo, hi) = pair(&d["paired_ci95"], &what("paired_ci95"), file)?;
                    Some((num(&d["accuracy"], &what("minus_baseline"), file)?, lo, hi))
                }
                None => None,
            };
            let freq = m["decision_frequencies"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    [
                        f["skip"].as_f64().unwrap_or(0.0),
                        f["execute"].as_f64().unwrap_or(0.0),
                        f["repeat"].as_f64().unwrap_or(0.0),
                    ]
                })
                .collect();
            let cost_counts = m["cost_counts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| Some((c[0].as_u64()? as usize, c[1].as_u64()? as usize)))
                .collect();
            let (accuracy, ci95, cost) = (
                num(&m["accuracy"], &what("accuracy"), file)?,
                pair(&m["ci95"], &what("ci95"), file)?,
                num(&m["cost"], &what("cost"), file)?,
            );
            rows.push(Row {
                model: text_of("model"),
                routers: text_of("routers_fingerprint"),
                task: task.clone(),
                mode,
                budget: m["budget"].as_f64(),
                prompts,
                accuracy,
                ci95,
                minus_baseline: minus,
                cost,
                file: file.display().to_string(),
                freq,
                cost_counts,
            });
        }
    }
    Ok((n_layers, rows))
}

/// Merges the summaries: baselines that several files share are kept once (and must agree),
/// every other mode once per (model, routers, task, mode, budget); a duplicate is refused.
fn merge(files: &[PathBuf]) -> Result<(usize, Vec<Row>)> {
    let mut n_layers = None;
    let mut out: BTreeMap<(String, String, String, String, String), Row> = BTreeMap::new();
    for f in files {
        let (n, rows) = read_summary(f)?;
        if *n_layers.get_or_insert(n) != n {
            bail!(
                "{}: a model of {n} blocks, the other summaries {}",
                f.display(),
                n_layers.unwrap_or(0)
            );
        }
        for r in rows {
            let budget = r.budget.map(|b| format!("{b:+.4}")).unwrap_or_default();
            let key = (
                r.model.clone(),
                r.routers.clone(),
                r.task.clone(),
                r.mode.clone(),
                budget,
            );
            match out.get(&key) {
                Some(old) if r.mode == "baseline" => {
                    if (old.accuracy, old.prompts) != (r.accuracy, r.prompts) {
                        bail!(
                            "{} and {}: the baseline of {} differs ({} of {} prompts vs {} of {}): \
                             the runs did not evaluate the same prompts",
                            old.file, r.file, r.task, old.accuracy, old.prompts, r.accuracy, r.prompts
                        );
                    }
                }
                Some(old) => bail!(
                    "{} and {} both hold {} {} {}: merge each run once",
                    old.file,
                    r.file,
                    r.task,
                    r.mode,
                    key.4
                ),
                None => {
                    out.insert(key, r);
                }
            }
        }
    }
    let mut rows: Vec<Row> = out.into_values().collect();
    // Per task: baseline, static paths, then budgets from most to least compute.
    let order = |r: &Row| match r.mode.as_str() {
        "baseline" => 0,
        "routed" => 2,
        _ => 1,
    };
    rows.sort_by(|a, b| {
        (&a.model, &a.routers, &a.task, order(a))
            .cmp(&(&b.model, &b.routers, &b.task, order(b)))
            .then(b.budget.unwrap_or(0.0).total_cmp(&a.budget.unwrap_or(0.0)))
    });
    Ok((n_layers.unwrap_or(0), rows))
}

/// Merges eval summaries: prints the table, writes CSV and plot when asked.
pub fn run(a: MergeArgs) -> Result<()> {
    let (n_layers, rows) = merge(&a.files)?;
    println!("| task | mode | budget | prompts | accuracy [95% CI] | minus baseline [paired 95% CI] | cost |");
    println!("| --- | --- | ---: | ---: | --- | --- | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.3} [{:.3}, {:.3}] | {} | {:.2} |",
            r.task,
            r.mode,
            r.budget.map(|b| format!("{b:+.2}")).unwrap_or_default(),
            r.prompts,
            r.accuracy,
            r.ci95.0,
            r.ci95.1,
            r.minus_baseline
                .map(|(d, lo, hi)| format!("{d:+.3} [{lo:+.3}, {hi:+.3}]"))
                .unwrap_or_default(),
            r.cost
        );
    }
    if let Some(path) = &a.csv {
        write_csv(path, &rows).with_context(|| format!("writing {}", path.display()))?;
        println!("csv: {}", path.display());
    }
    if let Some(path) = &a.plot {
        crate::plot::draw(path, &plot_data(n_layers, &rows))?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record([
        "model",
        "routers_fingerprint",
        "task",
        "mode",
        "budget",
        "prompts",
        "accuracy",
        "ci95_lo",
        "ci95_hi",
        "minus_baseline",
        "paired_ci95_lo",
        "paired_ci95_hi",
        "cost",
        "file",
    ])?;
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        let d = r.minus_baseline;
        w.write_record([
            r.model.clone(),
            r.routers.clone(),
            r.task.clone(),
            r.mode.clone(),
            opt(r.budget),
            r.prompts.to_string(),
            r.accuracy.to_string(),
            r.ci95.0.to_string(),
            r.ci95.1.to_string(),
            opt(d.map(|d| d.0)),
            opt(d.map(|d| d.1)),
            opt(d.map(|d| d.2)),
            r.cost.to_string(),
            r.file.clone(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// The eval plot from merged rows: the routing pattern and cost histogram of each task's
/// largest budget (closest to the baseline), accuracy vs cost over every budget.
fn plot_data(n_layers: usize, rows: &[Row]) -> crate::plot::PlotData {
    let mut tasks: Vec<crate::plot::TaskPlot> = vec![];
    let mut first_budget = None;
    for r in rows {
        let t = match tasks.iter_mut().find(|t| t.name == r.task) {
            Some(t) => t,
            None => {
                tasks.push(crate::plot::TaskPlot {
                    name: r.task.clone(),
                    freq: vec![],
                    costs: vec![],
                    baseline_accuracy: 0.0,
                    sweep: vec![],
                    statics: vec![],
                });
                tasks.last_mut().expect("just pushed")
            }
        };
        match (r.mode.as_str(), r.budget) {
            ("baseline", _) => t.baseline_accuracy = r.accuracy,
            ("routed", Some(b)) => {
                if t.freq.is_empty() {
                    // Rows come most-compute budget first.
                    t.freq = r.freq.clone();
                    t.costs = r
                        .cost_counts
                        .iter()
                        .flat_map(|&(c, n)| std::iter::repeat_n(c, n))
                        .collect();
                    first_budget.get_or_insert(b);
                }
                t.sweep.push((b, r.cost, r.accuracy));
            }
            _ => t.statics.push((r.cost, r.accuracy)),
        }
    }
    let model = rows.first().map(|r| r.model.clone()).unwrap_or_default();
    crate::plot::PlotData {
        title: format!(
            "{model} routers, {} summaries merged",
            rows.iter()
                .map(|r| &r.file)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        ),
        num_layers: n_layers,
        budget: first_budget.unwrap_or(0.0),
        tasks,
    }
}
