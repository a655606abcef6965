//! Pooling the per-sample files of `drllm-infer eval --out` written by split runs (one per task,
//! say, so that a long evaluation keeps what it finished): every mode per task and over all
//! tasks, each paired with the baseline and with the routers on the same prompts, and the
//! oracle over every mode but the baseline. The intervals are eval's own
//! (seeded percentile bootstrap over prompts), so pooling one file reproduces its `--json`.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type, UInt8Type};
use arrow_array::{Array, RecordBatch};
use drllm_eval::stats::mean_ci;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// `drllm-infer pool` flags.
#[derive(clap::Args)]
pub struct PoolArgs {
    /// Per-sample files written by `drllm-infer eval --out` (of one model; a baseline that
    /// several files hold must agree). Tasks are pooled in the order they first appear: give
    /// the files in eval's --dataset order to reproduce its intervals exactly (another order
    /// gives the same accuracies, and intervals that differ by the bootstrap's noise).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Bootstrap resamples for the intervals.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    /// Write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One prompt's answer in one mode.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    sample_id: String,
    correct: bool,
    cost: u32,
}

/// A mode as the table names it, with its answers per task.
#[derive(Debug)]
struct Mode {
    label: String,
    /// eval's mode name (`baseline`, `static`, `per_task_static`, `routed`, `permuted`, `random`).
    kind: String,
    budget: Option<f64>,
    /// Per task (in the order tasks first appear): answers in prompt order, and the file.
    tasks: Vec<(String, Vec<Answer>, PathBuf)>,
}

/// A mode's figures on one task or pooled.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    task: String,
    mode: String,
    budget: Option<f64>,
    prompts: usize,
    accuracy: f64,
    ci95: (f64, f64),
    minus_baseline: Option<(f64, f64, f64)>,
    routed_minus_this: Option<(f64, f64, f64)>,
    /// Mean block applications per token (None for the oracle).
    cost: Option<f64>,
}

/// A static path's name: the blocks it skips (`-6,11,15`) and repeats (`+3`).
fn path_label(counts: &[u8]) -> String {
    let list = |c: u8| -> Vec<String> {
        (0..counts.len())
            .filter(|&i| counts[i] == c)
            .map(|i| i.to_string())
            .collect()
    };
    let (skip, rep) = (list(0), list(2));
    let mut s = String::new();
    if !skip.is_empty() {
        s += &format!("-{}", skip.join(","));
    }
    if !rep.is_empty() {
        s += &format!("{}+{}", if s.is_empty() { "" } else { " " }, rep.join(","));
    }
    if s.is_empty() {
        "all-execute".into()
    } else {
        s
    }
}

/// The rows of one `--out` file, grouped by mode label and task in the file's order.
type FileModes = Vec<(String, String, Option<f64>, String, Vec<Answer>)>;

fn read_file(path: &Path, fingerprint: &mut Option<(String, PathBuf)>) -> Result<FileModes> {
    let what = "expected a drllm-infer eval --out file";
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not Parquet ({what})", path.display()))?
        .build()?;
    let mut out: FileModes = vec![];
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    // How often each (task, label, sample) was seen: the k-th per-task path set (or a static
    // path given twice) is the k-th occurrence.
    let mut seen: HashMap<(String, String, String), usize> = HashMap::new();
    for batch in reader {
        let b: RecordBatch = batch.with_context(|| format!("reading {}", path.display()))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .with_context(|| format!("{}: no column `{name}` ({what})", path.display()))
        };
        let bad = |name: &str| {
            format!(
                "{}: column `{name}` has the wrong type ({what})",
                path.display()
            )
        };
        let text = |name: &str| -> Result<&arrow_array::StringArray> {
            col(name)?.as_string_opt::<i32>().with_context(|| bad(name))
        };
        let (task, id, mode, fp) = (
            text("task")?,
            text("sample_id")?,
            text("mode")?,
            text("model_fingerprint")?,
        );
        let budget = col("budget")?
            .as_primitive_opt::<Float64Type>()
            .with_context(|| bad("budget"))?;
        let cost = col("cost")?
            .as_primitive_opt::<UInt32Type>()
            .with_context(|| bad("cost"))?;
        let correct = col("correct")?
            .as_boolean_opt()
            .with_context(|| bad("correct"))?;
        let paths = col("path")?
            .as_list_opt::<i32>()
            .with_context(|| bad("path"))?;
        for r in 0..b.num_rows() {
            let this_fp = fp.value(r);
            match fingerprint {
                Some((f, other)) if f != this_fp => bail!(
                    "{} holds answers of model {this_fp}, {} of {f}: pool one model's runs",
                    path.display(),
                    other.display()
                ),
                Some(_) => {}
                None => *fingerprint = Some((this_fp.to_string(), path.to_path_buf())),
            }
            let kind = mode.value(r).to_string();
            let bud = (!budget.is_null(r)).then(|| budget.value(r));
            let mut label = match (kind.as_str(), bud) {
                ("baseline", _) => "baseline".to_string(),
                // Only a static mode is named by its path.
                ("static", _) => {
                    let counts = paths.value(r);
                    let counts = counts
                        .as_primitive_opt::<UInt8Type>()
                        .with_context(|| bad("path"))?;
                    format!("static {}", path_label(counts.values()))
                }
                ("per_task_static", _) => "per-task static".to_string(),
                (k, Some(b)) => format!("{k} {b:+.2}"),
                (k, None) => k.to_string(),
            };
            let (t, sample) = (task.value(r).to_string(), id.value(r).to_string());
            let n = seen
                .entry((t.clone(), label.clone(), sample.clone()))
                .or_insert(0);
            *n += 1;
            if *n > 1 {
                label = format!("{label} #{n}");
            }
            let slot = *index.entry((label.clone(), t.clone())).or_insert_with(|| {
                out.push((label.clone(), kind.clone(), bud, t.clone(), vec![]));
                out.len() - 1
            });
            out[slot].4.push(Answer {
                sample_id: sample,
                correct: correct.value(r),
                cost: cost.value(r),
            });
        }
    }
    if out.is_empty() {
        bail!("{}: no answers ({what})", path.display());
    }
    Ok(out)
}

/// Every file's modes together: a baseline that several files hold must agree; any other mode
/// of a task may come from one file only.
fn gather(files: &[PathBuf]) -> Result<(Vec<String>, Vec<Mode>)> {
    let mut fingerprint = None;
    let (mut tasks, mut modes): (Vec<String>, Vec<Mode>) = (vec![], vec![]);
    for f in files {
        for (label, kind, budget, task, answers) in read_file(f, &mut fingerprint)? {
            if !tasks.contains(&task) {
                tasks.push(task.clone());
            }
            let m = match modes.iter_mut().position(|m| m.label == label) {
                Some(i) => &mut modes[i],
                None => {
                    modes.push(Mode {
                        label: label.clone(),
                        kind,
                        budget,
                        tasks: vec![],
                    });
                    modes.last_mut().context("just pushed")?
                }
            };
            match m.tasks.iter().find(|(t, _, _)| *t == task) {
                Some((_, old, from)) if label == "baseline" => {
                    if *old != answers {
                        bail!(
                            "{} and {}: the baseline of {task} differs: the runs did not evaluate \
                             the same prompts with the same model",
                            from.display(),
                            f.display()
                        );
                    }
                }
                Some((_, _, from)) => bail!(
                    "{} and {} both hold {task} {label}: pool each run once",
                    from.display(),
                    f.display()
                ),
                None => m.tasks.push((task, answers, f.clone())),
            }
        }
    }
    Ok((tasks, modes))
}

/// The figures of every mode on `task` (None: pooled over `tasks`, for the modes every task
/// has), the oracle last.
fn figures<'a>(
    tasks: &[String],
    modes: &'a [Mode],
    task: Option<&str>,
    resamples: usize,
) -> Result<Vec<Figures>> {
    let name = task.unwrap_or("pooled");
    fn answers<'m>(m: &'m Mode, tasks: &[String], task: Option<&str>) -> Option<Vec<&'m Answer>> {
        let mut all = vec![];
        for t in tasks.iter().filter(|x| task.is_none_or(|t| *x == t)) {
            let (_, a, _) = m.tasks.iter().find(|(x, _, _)| x == t)?;
            all.extend(a.iter());
        }
        Some(all)
    }
    let answers = |m: &'a Mode| answers(m, tasks, task);
    let Some(base_mode) = modes.iter().find(|m| m.kind == "baseline") else {
        bail!(
            "no baseline answers: pool files of drllm-infer eval runs (each writes its baseline)"
        );
    };
    let Some(base) = answers(base_mode) else {
        bail!("no baseline answers for {name}");
    };
    let present: Vec<(&Mode, Vec<&Answer>)> = modes
        .iter()
        .filter_map(|m| answers(m).map(|a| (m, a)))
        .collect();
    for (m, a) in &present {
        let same =
            a.len() == base.len() && a.iter().zip(&base).all(|(x, y)| x.sample_id == y.sample_id);
        if !same {
            bail!(
                "{name}: {} covers other prompts than the baseline ({} vs {}): pool runs of the \
                 same prompts",
                m.label,
                a.len(),
                base.len()
            );
        }
    }
    let bits = |a: &[&Answer]| -> Vec<f64> { a.iter().map(|x| x.correct as u8 as f64).collect() };
    let paired = |a: &[&Answer], b: &[&Answer]| {
        let d: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| x.correct as u8 as f64 - y.correct as u8 as f64)
            .collect();
        mean_ci(&d, resamples)
    };
    let first_routed = present.iter().find(|(m, _)| m.kind == "routed");
    let mut rows = vec![];
    for (m, a) in &present {
        let (acc, lo, hi) = mean_ci(&bits(a), resamples);
        let routed = match m.kind.as_str() {
            "baseline" | "routed" => None,
            "permuted" | "random" => present
                .iter()
                .find(|(r, _)| r.kind == "routed" && r.budget == m.budget),
            _ => first_routed,
        };
        rows.push(Figures {
            task: name.to_string(),
            mode: m.label.clone(),
            budget: m.budget,
            prompts: a.len(),
            accuracy: acc,
            ci95: (lo, hi),
            minus_baseline: (m.kind != "baseline").then(|| paired(a, &base)),
            routed_minus_this: routed.map(|(_, r)| paired(r, a)),
            cost: Some(a.iter().map(|x| x.cost as f64).sum::<f64>() / a.len().max(1) as f64),
        });
    }
    // The oracle: a prompt counts when any mode but the baseline answers it (the best a choice
    // among these modes' paths could do per prompt; a routed prompt's path may be the default).
    let others: Vec<&Vec<&Answer>> = present
        .iter()
        .filter(|(m, _)| m.kind != "baseline")
        .map(|(_, a)| a)
        .collect();
    if !others.is_empty() {
        let oracle: Vec<Answer> = (0..base.len())
            .map(|i| Answer {
                sample_id: base[i].sample_id.clone(),
                correct: others.iter().any(|a| a[i].correct),
                cost: 0,
            })
            .collect();
        let o: Vec<&Answer> = oracle.iter().collect();
        let (acc, lo, hi) = mean_ci(&bits(&o), resamples);
        rows.push(Figures {
            task: name.to_string(),
            mode: "oracle (any mode but the baseline)".into(),
            budget: None,
            prompts: o.len(),
            accuracy: acc,
            ci95: (lo, hi),
            minus_baseline: Some(paired(&o, &base)),
            routed_minus_this: None,
            cost: None,
        });
    }
    Ok(rows)
}

/// Pools the files: prints the table (per task, then pooled when there are several tasks) and
/// writes JSON when asked.
pub fn run(a: PoolArgs) -> Result<()> {
    let (tasks, modes) = gather(&a.files)?;
    let n_layers = modes
        .iter()
        .find(|m| m.kind == "baseline")
        .and_then(|m| m.tasks.first())
        .and_then(|(_, ans, _)| ans.first())
        .map_or(0, |x| x.cost);
    let mut rows = vec![];
    for t in &tasks {
        rows.extend(figures(&tasks, &modes, Some(t), a.bootstrap)?);
    }
    if tasks.len() > 1 {
        rows.extend(figures(&tasks, &modes, None, a.bootstrap)?);
        let partial: Vec<&str> = modes
            .iter()
            .filter(|m| m.tasks.len() < tasks.len())
            .map(|m| m.label.as_str())
            .collect();
        if !partial.is_empty() {
            println!(
                "not pooled (missing from some tasks): {}",
                partial.join(", ")
            );
        }
    }
    let d = |v: Option<(f64, f64, f64)>| {
        v.map(|(d, lo, hi)| format!("{d:+.3} [{lo:+.3}, {hi:+.3}]"))
            .unwrap_or_default()
    };
    println!("| task | mode | prompts | accuracy [95% CI] | - baseline [paired 95%] | routed - this [paired 95%] | cost | saved |");
    println!("| --- | --- | ---: | --- | --- | --- | ---: | ---: |");
    for r in &rows {
        let (cost, saved) = match r.cost {
            Some(c) => (
                format!("{c:.2}"),
                format!("{:.1}%", 100.0 * (1.0 - c / n_layers.max(1) as f64)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {:.3} [{:.3}, {:.3}] | {} | {} | {cost} | {saved} |",
            r.task,
            r.mode,
            r.prompts,
            r.accuracy,
            r.ci95.0,
            r.ci95.1,
            d(r.minus_baseline),
            d(r.routed_minus_this)
        );
    }
    println!(
        "cost = block applications per token ({n_layers} for the baseline); routed - this: the \
         routers at the control's budget, else the first routed budget; the oracle counts a \
         prompt when any mode but the baseline answers it"
    );
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "files": a.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "num_layers": n_layers,
            "bootstrap": a.bootstrap,
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_are_named_by_their_edits() {
        assert_eq!(path_label(&[1, 0, 1, 0, 1]), "-1,3");
        assert_eq!(path_label(&[1, 2, 0, 1]), "-2 +1");
        assert_eq!(path_label(&[2, 1]), "+0");
        assert_eq!(path_label(&[1, 1]), "all-execute");
    }
}
