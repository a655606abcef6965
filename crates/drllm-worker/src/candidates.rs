//! `drllm-search-bench candidates`: the diagnostic for candidate selection (PuDDing, arXiv
//! 2502.04348), before building it into routers. A few skip sets of equal cost are chosen on
//! some train prompts (greedy: one over all tasks, one per task); on the other train prompts
//! every candidate's cloze margin (the gold choice's score minus the best other's) is computed,
//! and a ridge probe on the pooled hidden state entering the first block any candidate skips
//! (what a router can read before it must choose) predicts each candidate's margin, cross-fitted
//! over folds of prompts. Routing each prompt to the candidate of highest predicted margin is
//! compared, on the same prompts and at the same cost, with the candidate that is best on the
//! other folds over all tasks (global static) and within the prompt's task (per-task static).

use drllm_tasks::RewardMode;
use serde_json::json;

use super::predict::{compare_auc, fold_ids, group_rate, mean_ci, Kernel};
use super::*;

/// A candidate path: its skipped blocks (sorted), the path, and the groups of prompts it was
/// chosen for ("all tasks" or a task).
struct Candidate {
    blocks: Vec<usize>,
    path: LayerPath,
    chosen_for: Vec<String>,
}

/// Index of the highest `score(c)` over `0..k` (the first on ties).
fn argmax(k: usize, score: impl Fn(usize) -> f64) -> usize {
    (0..k).fold(0, |best, c| if score(c) > score(best) { c } else { best })
}

pub(super) fn candidates(a: CandidatesArgs) -> Result<()> {
    let reward = a.common.search.run_config()?.reward;
    if !matches!(reward, RewardMode::Cloze | RewardMode::ClozeNorm) {
        bail!("--reward {reward}: candidates compares cloze margins, so it needs --reward cloze or cloze-norm");
    }
    let mut o = Oracle::open(&a.common)?;
    let n = o.lm.model.num_layers();
    let np = o.prompts.len();
    if a.skip == 0 || a.skip >= n {
        bail!("--skip {} is not in 1..{n} for a {n}-block model", a.skip);
    }
    let (task_names, task_of) = o.tasks();
    // Each prompt's position within its task: the first --select choose the candidates.
    let mut seen = vec![0usize; task_names.len()];
    let pos: Vec<usize> = task_of
        .iter()
        .map(|&t| {
            seen[t] += 1;
            seen[t] - 1
        })
        .collect();
    let select: Vec<usize> = (0..np).filter(|&i| pos[i] < a.select).collect();
    let diag: Vec<usize> = (0..np).filter(|&i| pos[i] >= a.select).collect();
    let folds = a.probe.folds as usize;
    for (t, name) in task_names.iter().enumerate() {
        let d = diag.iter().filter(|&&i| task_of[i] == t).count();
        if d < 2 * folds {
            bail!(
                "{name}: {d} prompts after the first --select {} (which choose the candidates): \
                 too few for {folds} folds (raise --limit)",
                a.select
            );
        }
        if !select.iter().any(|&i| task_of[i] == t) {
            bail!("--select 0 leaves no prompt to choose the candidates on");
        }
    }
    let bar = drllm_cli::progress_bar(0, "paths");
    // The candidates: the greedy set of --skip blocks over every task's selection prompts, and
    // one per task (the same set chosen twice is one candidate).
    let mut groups: Vec<(String, Vec<usize>)> = vec![("all tasks".into(), select.clone())];
    if task_names.len() > 1 {
        for (t, name) in task_names.iter().enumerate() {
            let idx = select
                .iter()
                .copied()
                .filter(|&i| task_of[i] == t)
                .collect();
            groups.push((name.clone(), idx));
        }
    }
    let mut cands: Vec<Candidate> = vec![];
    for (name, idx) in &groups {
        let prior: Vec<usize> = rank_single_skips(&mut o, idx, &bar)?
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        let (blocks, path, _) = greedy_sets(&mut o, idx, &prior, a.skip, a.shortlist, &bar)?
            .pop()
            .context("no skip set grown")?;
        match cands.iter_mut().find(|c| c.blocks == blocks) {
            Some(c) => c.chosen_for.push(name.clone()),
            None => cands.push(Candidate {
                blocks,
                path,
                chosen_for: vec![name.clone()],
            }),
        }
    }
    // Rewards of the baseline, and rewards and margins of every candidate, on the diagnostic
    // prompts.
    let base = LayerPath::all_ones(n);
    let paths: Vec<LayerPath> = std::iter::once(base)
        .chain(cands.iter().map(|c| c.path.clone()))
        .collect();
    o.fill(pairs_of(&diag, &paths[..1]), false, &bar)?;
    o.fill(pairs_of(&diag, &paths[1..]), true, &bar)?;
    bar.finish_and_clear();
    let acc: Vec<Vec<f64>> = paths
        .iter()
        .map(|p| diag.iter().map(|&i| o.get(i, p).unwrap_or(0.0)).collect())
        .collect();
    let margin: Vec<Vec<f64>> = paths[1..]
        .iter()
        .map(|p| {
            diag.iter()
                .map(|&i| {
                    o.margin(i, p).with_context(|| {
                        format!(
                            "{} has no cloze margin: candidates scores multiple-choice prompts \
                             with --reward cloze or cloze-norm",
                            o.keys[i]
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()
        })
        .collect::<Result<_>>()?;
    // What a router can read before the first block any candidate skips.
    let read_at = cands
        .iter()
        .filter_map(|c| c.blocks.first().copied())
        .min()
        .unwrap_or(0);
    let feats = block_features(&o, &diag, a.probe.windows as usize, o.batch)?
        .into_iter()
        .nth(read_at)
        .context("no features at the decision block")?;
    let kernel = Kernel::new(&feats);
    drop(feats);
    // Local numbering over the diagnostic prompts.
    let nd = diag.len();
    let k = cands.len();
    let items: Vec<usize> = (0..nd).collect();
    let task: Vec<usize> = diag.iter().map(|&i| task_of[i]).collect();
    let fold = fold_ids(nd, folds, o.run.seed);
    let lambdas = [0.01, 0.1, 1.0, 10.0, 100.0];
    let bar = drllm_cli::progress_bar(k as u64, "probes");
    let mut probe = vec![];
    let mut blind = vec![];
    for m in &margin {
        probe.push(kernel.cross_fit(&items, m, 0.0, &fold, &task, &lambdas));
        blind.push(group_rate(&items, m, &fold, &task));
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Accuracy of candidate c (paths[c + 1]) on the prompts outside fold f, of task t or all.
    let acc_outside = |c: usize, f: usize, t: Option<usize>| {
        let (mut s, mut m) = (0.0, 0.0);
        for r in 0..nd {
            if fold[r] != f && t.is_none_or(|t| task[r] == t) {
                s += acc[c + 1][r];
                m += 1.0;
            }
        }
        s / f64::max(m, 1.0)
    };
    let global: Vec<usize> = (0..nd)
        .map(|r| argmax(k, |c| acc_outside(c, fold[r], None)))
        .collect();
    let per_task: Vec<usize> = (0..nd)
        .map(|r| argmax(k, |c| acc_outside(c, fold[r], Some(task[r]))))
        .collect();
    let routed: Vec<usize> = (0..nd).map(|r| argmax(k, |c| probe[c][r])).collect();
    let blind_pick: Vec<usize> = (0..nd).map(|r| argmax(k, |c| blind[c][r])).collect();
    let chose = |pick: &[usize], r: usize| acc[pick[r] + 1][r];
    println!("{}", o.header(&a.common.d));
    println!(
        "{} candidates of {} blocks each (cost {} of {n}), chosen greedily on the first {} prompts \
         of each task; {nd} other prompts for the diagnostic, {folds} folds; decisions read the \
         hidden state entering block {read_at}",
        k,
        a.skip,
        n - a.skip,
        a.select
    );
    let fmt = |c: (f64, f64, f64)| format!("{:.3} [{:.3}, {:.3}]", c.0, c.1, c.2);
    let mut json_cands = vec![];
    for (c, cand) in cands.iter().enumerate() {
        let m = mean_ci(&acc[c + 1], a.probe.bootstrap);
        println!(
            "  candidate {c}: skips {:?} (chosen for {}); accuracy on the diagnostic prompts {}",
            cand.blocks,
            cand.chosen_for.join(", "),
            fmt(m)
        );
        json_cands.push(
            json!({"skipped": cand.blocks, "path": cand.path.to_string(),
            "chosen_for": cand.chosen_for, "accuracy": m}),
        );
    }
    // Margin prediction: does the probe tell which candidates keep the answer (margin > 0)
    // better than the task's mean margin?
    let (mut s1, mut s2, mut labels, mut owner) = (vec![], vec![], vec![], vec![]);
    for c in 0..k {
        for r in 0..nd {
            s1.push(probe[c][r]);
            s2.push(blind[c][r]);
            labels.push(margin[c][r] > 0.0);
            owner.push(r);
        }
    }
    let sign_auc = compare_auc(&s1, &s2, &labels, &owner, nd, a.probe.bootstrap);
    if let Some(s) = &sign_auc {
        println!(
            "margin > 0 over (prompt, candidate) pairs: probe AUC {}, task-mean AUC {}, paired {}",
            fmt(s.a),
            fmt(s.b),
            fmt(s.diff)
        );
    }
    println!(
        "\naccuracy at equal cost (routed: each prompt runs the candidate of highest predicted margin)"
    );
    println!(
        "{:<12} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>24} {:>24} {:>8}",
        "task",
        "prompts",
        "base",
        "global",
        "per-task",
        "mean-mg",
        "routed",
        "oracle",
        "routed - per-task",
        "routed - global",
        "differs"
    );
    let mut rows: Vec<(String, Option<usize>)> = task_names
        .iter()
        .enumerate()
        .map(|(t, name)| (name.clone(), Some(t)))
        .collect();
    if task_names.len() > 1 {
        rows.push(("pooled".into(), None));
    }
    let mut json_rows = vec![];
    for (name, t) in &rows {
        let rs: Vec<usize> = (0..nd)
            .filter(|&r| t.is_none_or(|t| task[r] == t))
            .collect();
        let col = |f: &dyn Fn(usize) -> f64| rs.iter().map(|&r| f(r)).collect::<Vec<f64>>();
        let base = col(&|r| acc[0][r]);
        let g = col(&|r| chose(&global, r));
        let p = col(&|r| chose(&per_task, r));
        let mm = col(&|r| chose(&blind_pick, r));
        let ro = col(&|r| chose(&routed, r));
        let or = col(&|r| (0..k).map(|c| acc[c + 1][r]).fold(0.0, f64::max));
        let diff = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a - b).collect::<Vec<_>>();
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let (vs_task, vs_global, vs_base) = (
            mean_ci(&diff(&ro, &p), a.probe.bootstrap),
            mean_ci(&diff(&ro, &g), a.probe.bootstrap),
            mean_ci(&diff(&ro, &base), a.probe.bootstrap),
        );
        let differs = rs.iter().filter(|&&r| routed[r] != per_task[r]).count() as f64
            / rs.len().max(1) as f64;
        println!(
            "{name:<12} {:>7} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>24} {:>24} {:>8.2}",
            rs.len(),
            mean(&base),
            mean(&g),
            mean(&p),
            mean(&mm),
            mean(&ro),
            mean(&or),
            fmt(vs_task),
            fmt(vs_global),
            differs
        );
        json_rows.push(json!({
            "task": name, "prompts": rs.len(),
            "baseline": mean_ci(&base, a.probe.bootstrap), "global_static": mean_ci(&g, a.probe.bootstrap),
            "per_task_static": mean_ci(&p, a.probe.bootstrap), "task_mean_margin": mean_ci(&mm, a.probe.bootstrap),
            "routed": mean_ci(&ro, a.probe.bootstrap), "oracle": mean_ci(&or, a.probe.bootstrap),
            "routed_minus_per_task_static": vs_task, "routed_minus_global_static": vs_global,
            "routed_minus_baseline": vs_base, "routed_differs_from_per_task": differs,
        }));
    }
    println!(
        "global / per-task: the candidate most accurate on the other folds (over all tasks / in the \
         prompt's task); mean-mg: the candidate of highest mean margin in the task on the other \
         folds; oracle: any candidate right; differs: share of prompts routed off the per-task \
         choice. Intervals: 95% percentile bootstrap over prompts ({} resamples), differences paired",
        a.probe.bootstrap
    );
    if let Some(p) = &a.probe.json {
        let v = json!({
            "model": o.lm.source.name(), "reward": o.run.reward.to_string(),
            "style": o.run.style.to_string(), "skip": a.skip, "select": a.select,
            "prompts": nd, "folds": folds, "windows": a.probe.windows, "read_at_block": read_at,
            "candidates": json_cands,
            "margin_sign_auc": sign_auc.as_ref().map(|s| json!({"probe": s.a, "task_mean": s.b, "difference": s.diff})),
            "groups": json_rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
