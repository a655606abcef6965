//! The search worker on real ARC prompts with the embedded model: batched evaluation equals
//! one-at-a-time evaluation, standalone runs are reproducible, bad prompts fail alone.
mod common;

use std::process::Command;

use common::*;
use drllm::eval::{
    decision_point, evaluate_alone, evaluate_batch, prepare, EvalOptions, PreparedPrompt,
};
use drllm::runtime::tch::{Device, Kind};
use drllm::runtime::{
    GenerateOptions, GenerateRequest, LayerPath, LoadedModel, ModelSource, Paths, PrefixCache,
};
use drllm::tasks::{data, LoadOptions, RewardMode, Split, Style, TaskName, Template};

/// Seeded random paths of a 30-block model: mostly ones, some skips and repeats.
fn random_paths(n: usize, count: usize, seed: u64) -> Vec<LayerPath> {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let counts = (0..n)
                .map(|_| match next() % 10 {
                    0 => 0,
                    1 => 2,
                    _ => 1,
                })
                .collect();
            LayerPath::from_counts(counts).unwrap()
        })
        .collect()
}

/// The embedded model (f32, CPU) and the first `n` ARC-Easy train samples.
fn model_and_arc_easy(n: usize) -> (LoadedModel, Vec<drllm::tasks::Sample>) {
    let lm =
        LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap();
    let samples = data::load(
        &data_dir(),
        TaskName::ArcEasy,
        Split::Train,
        &LoadOptions {
            limit: Some(n),
            ..Default::default()
        },
    )
    .unwrap()
    .samples;
    (lm, samples)
}

/// `path` with one block's count changed at a seeded position (as a search edit would).
fn edited(path: &LayerPath, seed: u64) -> LayerPath {
    let mut counts = path.counts().to_vec();
    let at = (seed as usize * 7 + 3) % counts.len();
    counts[at] = (counts[at] + 1 + (seed % 2) as u8) % 3;
    LayerPath::from_counts(counts).unwrap()
}

fn check_equivalence(n_prompts: usize, n_paths: usize, mode: RewardMode) {
    let (lm, samples) = model_and_arc_easy(n_prompts);
    let opts = EvalOptions {
        mode,
        max_new_tokens: 6,
    };
    let template = Template::builtin_for(
        drllm::tasks::Family::MultipleChoice,
        Style::default_for(mode),
        mode,
    );
    let prompts: Vec<PreparedPrompt> = samples
        .iter()
        .map(|s| prepare(&lm, s, &template, &opts).unwrap())
        .collect();
    // Random paths first, then one-edit variants of them (as a search asks for), so later
    // candidates resume from prefixes cached by earlier ones.
    let mut items = vec![];
    for (i, p) in prompts.iter().enumerate() {
        for path in random_paths(30, n_paths / 2, i as u64) {
            items.push((p, path));
        }
    }
    let variants: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(k, (p, path))| (*p, edited(path, k as u64)))
        .collect();
    items.extend(variants);
    // A budget of about 450 cached hidden states of the mean prompt length (a few candidates'
    // worth, whatever the prompt format): entries are evicted during the run.
    let mean_len = prompts.iter().map(|p| p.ids.len()).sum::<usize>() / prompts.len();
    let hidden = lm.model.cfg.hidden_size as usize;
    let mut cache = PrefixCache::new(450 * mean_len * hidden * 4);
    let (mut correct, mut early) = (0, 0);
    // Batches mix prompts of different lengths and paths of different shapes.
    for chunk in items.chunks(16) {
        let refs: Vec<(&PreparedPrompt, &LayerPath)> =
            chunk.iter().map(|(p, path)| (*p, path)).collect();
        let batched = evaluate_batch(&lm, &refs, &opts, &mut cache).unwrap();
        for ((p, path), b) in chunk.iter().zip(&batched) {
            let alone = evaluate_alone(&lm, p, path, &opts).unwrap();
            assert_eq!(b.reward, alone.reward, "{} along {path}", p.sample_id);
            for (x, y) in b.logliks.iter().zip(&alone.logliks) {
                assert!(
                    (x - y).abs() < 1e-3,
                    "{} along {path}: {x} vs {y}",
                    p.sample_id
                );
            }
            // Same text up to the decision point (after which the batched run stopped).
            let cut = decision_point(&lm, p, &alone.tokens, mode);
            assert_eq!(
                b.tokens[..],
                alone.tokens[..cut.min(b.tokens.len())],
                "{} along {path}",
                p.sample_id
            );
            assert!(b.tokens.len() >= cut.min(alone.tokens.len()));
            correct += b.reward as usize;
            early += (b.tokens.len() < alone.tokens.len()) as usize;
        }
    }
    let st = cache.stats();
    assert!(st.blocks_reused > 0 && st.evicted > 0, "{st:?}");
    eprintln!(
        "{mode:?}: {} candidates, {correct} correct, {early} stopped early, {:.0}% of block applications resumed from cache, {} evictions",
        items.len(),
        100.0 * st.blocks_reused as f64 / st.blocks_requested as f64,
        st.evicted
    );
}

/// Prefix sharing at the runtime level: logits after resuming from cached prefixes (including a
/// fully cached path and prefixes ending in skips) match a plain prefill, and grouped prefill +
/// joined decoding generates the same tokens as the plain runtime.
#[test]
fn prefix_sharing_matches_plain_prefill() {
    let (lm, samples) = model_and_arc_easy(4);
    let opts = EvalOptions {
        mode: RewardMode::Lenient,
        max_new_tokens: 5,
    };
    let template = Template::builtin(drllm::tasks::Family::MultipleChoice, Style::Instruct);
    let prompts: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| prepare(&lm, s, &template, &opts).unwrap().ids)
        .collect();
    let base = LayerPath::all_ones(30);
    let mut skip_tail = base.counts().to_vec();
    skip_tail[20] = 0;
    skip_tail[21] = 0;
    let rounds: Vec<Vec<LayerPath>> = vec![
        vec![base.clone(); 4],
        (0..4).map(|i| edited(&base, 10 + i)).collect(),
        vec![
            base.clone(),
            LayerPath::from_counts(skip_tail).unwrap(),
            edited(&edited(&base, 11), 5),
            edited(&base, 12),
        ],
    ];
    let gopts = GenerateOptions {
        max_new_tokens: 5,
        stop_ids: lm.stop_ids(),
    };
    for budget_mb in [1024, 8] {
        let mut cache = PrefixCache::new(budget_mb << 20);
        for paths in &rounds {
            let (cached, _) = lm
                .model
                .last_logits_cached(&prompts, paths, &mut cache)
                .unwrap();
            let plain = lm.model.prompt_logits(&prompts, paths).unwrap();
            for (r, p) in plain.iter().enumerate() {
                let d = max_abs_diff(&cached.get(r as i64), &p.get(p.size()[0] - 1));
                assert!(d < 1e-3, "row {r} along {}: max |diff| {d}", paths[r]);
            }
            let cached = Paths::Cached {
                paths,
                cache: &mut cache,
            };
            let a = lm
                .model
                .generate(GenerateRequest::new(&prompts, cached, gopts.clone()))
                .unwrap()
                .outputs;
            let b = generate_fixed(&lm, &prompts, paths, &gopts);
            let toks = |g: &[drllm::runtime::Generated]| {
                g.iter().map(|x| x.tokens.clone()).collect::<Vec<_>>()
            };
            assert_eq!(toks(&a), toks(&b));
        }
        let st = cache.stats();
        assert!(st.blocks_reused > 0, "{st:?}");
        assert!(cache.used_bytes() <= budget_mb << 20);
        if budget_mb == 8 {
            assert!(st.evicted > 0, "{st:?}");
        } else {
            // The second identical default path resumes entirely from cache.
            assert!(st.blocks_reused >= 4 * 30, "{st:?}");
        }
    }
}

#[test]
fn batched_evaluation_equals_one_at_a_time() {
    check_equivalence(6, 8, RewardMode::Lenient);
    check_equivalence(6, 8, RewardMode::ChoiceLogits);
    check_equivalence(6, 8, RewardMode::Cloze);
}

/// The full check: 20 real ARC-Easy prompts x 30 random paths (several minutes on 2
/// cores): `cargo test --release --test search -- --ignored`.
#[test]
#[ignore = "slow (20 prompts x 30 paths, one at a time); run with --ignored"]
fn batched_evaluation_equals_one_at_a_time_full() {
    check_equivalence(20, 30, RewardMode::Lenient);
    check_equivalence(20, 30, RewardMode::Strict);
    check_equivalence(20, 30, RewardMode::ChoiceLogits);
    check_equivalence(20, 30, RewardMode::Cloze);
}

fn worker(args: &[&str]) -> (bool, String) {
    let o = Command::new(bin("drllm-worker"))
        .args(args)
        .env("DRLLM_DATA", data_dir())
        .env("DRLLM_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn lines_without_timing(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("search_ms");
            v
        })
        .collect()
}

#[test]
fn standalone_runs_are_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    for (out, conc) in [(&a, "4"), (&b, "2")] {
        let (ok, err) = worker(&[
            "--standalone",
            "--dataset",
            "arc_easy",
            "--split",
            "train",
            "--limit",
            "4",
            "--num-simulations",
            "6",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--concurrency",
            conc,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
    }
    let mut la = lines_without_timing(&a);
    let mut lb = lines_without_timing(&b);
    // Completion order may differ with the concurrency; content may not.
    let key = |v: &serde_json::Value| v["sample_id"].as_str().unwrap().to_string();
    la.sort_by_key(key);
    lb.sort_by_key(key);
    assert_eq!(la, lb);
    assert_eq!(la.len(), 4);
    for l in &la {
        assert!(l["simulations"].as_u64().unwrap() <= 6);
        if let Some(best) = l["best_path"].as_array() {
            assert_eq!(best.len(), 30);
            assert!(l["good_paths"]
                .as_array()
                .unwrap()
                .contains(&l["best_path"]));
        }
    }
}

#[test]
fn a_prompt_too_long_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("arc")).unwrap();
    let good = std::fs::read_to_string(data_dir().join("arc/ARC-Easy-Train.jsonl")).unwrap();
    let mut rows: Vec<String> = good.lines().take(2).map(String::from).collect();
    let long = serde_json::json!({"id": "too_long", "question": {"stem": "word ".repeat(9000),
        "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "A"});
    rows.insert(1, long.to_string());
    std::fs::write(tmp.path().join("arc/ARC-Easy-Train.jsonl"), rows.join("\n")).unwrap();
    let out = tmp.path().join("o.jsonl");
    let (ok, err) = worker(&[
        "--standalone",
        "--data",
        tmp.path().to_str().unwrap(),
        "--dataset",
        "arc_easy",
        "--num-simulations",
        "2",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let lines = lines_without_timing(&out);
    assert_eq!(lines.len(), 3);
    let bad = lines.iter().find(|l| l["sample_id"] == "too_long").unwrap();
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("exceeds the model's context of 8192"),
        "{bad}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.get("simulations").is_some())
            .count(),
        2
    );
}

#[test]
fn an_impossible_budget_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.jsonl");
    let (ok, err) = worker(&[
        "--standalone",
        "--dataset",
        "arc_easy",
        "--cost-cap",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--cost-cap = 0.5: the budget cannot be met"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
    let (ok, err) = worker(&[
        "--standalone",
        "--dataset",
        "arc_easy",
        "--max-count",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--max-count = 3"), "{err}");
}

/// `drllm-search-bench predict` on real prompts of two tasks: every block and task reported
/// with AUCs in range, the rewards reused from its memo on a rerun (same figures), and too few
/// answered prompts refused before any probe is fitted.
#[test]
fn the_routing_diagnostic_reports_every_block_and_reuses_its_memo() {
    let dir = tempfile::tempdir().unwrap();
    let memo = dir.path().join("memo.jsonl");
    let run = |limit: &str, json: &std::path::Path| {
        let o = Command::new(bin("drllm-search-bench"))
            .args(["predict", "--data"])
            .arg(data_dir())
            .args(["--dataset", "arc_easy,piqa", "--split", "train"])
            .args(["--limit", limit, "--folds", "2", "--bootstrap", "50"])
            .args(["--threads", "2", "--memo"])
            .arg(&memo)
            .arg("--json")
            .arg(json)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (first, second) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let (ok, out, err) = run("10", &first);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("620 rewards computed"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&first).unwrap()).unwrap();
    assert_eq!(v["prompts"], 20);
    let kept = v["default_correct"].as_u64().unwrap();
    assert!(kept >= 4, "{v}");
    assert_eq!(v["blocks"].as_array().unwrap().len(), 30);
    for b in v["blocks"].as_array().unwrap() {
        let lost = b["lost"].as_u64().unwrap();
        assert!(lost <= kept);
        if let Some(a) = b["probe_auc"].as_array() {
            assert!((0.0..=1.0).contains(&a[0].as_f64().unwrap()), "{b}");
        }
    }
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["task"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["arc_easy", "piqa", "pooled"]);
    let keep = &v["groups"][2]["one_skip_keep"];
    for k in ["probe", "static"] {
        assert!(
            (0.0..=1.0).contains(&keep[k][0].as_f64().unwrap()),
            "{keep}"
        );
    }
    // A rerun computes nothing and reports the same.
    let (ok, out, err) = run("10", &second);
    assert!(ok && out.contains("0 rewards computed"), "{out}\n{err}");
    let w: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&second).unwrap()).unwrap();
    assert_eq!(v, w);
    // Too few answered prompts for the folds.
    let (ok, _, err) = run("1", &second);
    assert!(!ok && err.contains("too few for 2 folds"), "{err}");
}

/// `drllm-search-bench candidates` on real prompts of two tasks: candidates of equal cost chosen
/// on the first prompts of each task (one over both tasks, one per task), every choice at most
/// the oracle's accuracy, margins whose sign is the reward's, the memo reused on a rerun (same
/// report), and bad flags refused before any reward is computed.
#[test]
fn the_candidate_diagnostic_chooses_equal_cost_sets_and_reuses_its_memo() {
    let dir = tempfile::tempdir().unwrap();
    let memo = dir.path().join("memo.jsonl");
    let run = |extra: &[&str], json: &std::path::Path| {
        let o = Command::new(bin("drllm-search-bench"))
            .args(["candidates", "--data"])
            .arg(data_dir())
            .args(["--dataset", "arc_easy,piqa", "--split", "train"])
            .args(["--limit", "12", "--shortlist", "3", "--folds", "2"])
            .args(["--bootstrap", "50", "--threads", "2", "--memo"])
            .arg(&memo)
            .arg("--json")
            .arg(json)
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (first, second) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let flags = ["--select", "4", "--skip", "2"];
    let (ok, out, err) = run(&flags, &first);
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&first).unwrap()).unwrap();
    assert_eq!(v["prompts"], 16, "12 per task, the first 4 of each choose");
    let cands = v["candidates"].as_array().unwrap();
    assert!((1..=3).contains(&cands.len()), "{v}");
    let mut chosen_for: Vec<&str> = vec![];
    for c in cands {
        assert_eq!(c["skipped"].as_array().unwrap().len(), 2, "{c}");
        assert_eq!(c["path"].as_str().unwrap().matches('0').count(), 2, "{c}");
        chosen_for.extend(
            c["chosen_for"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap()),
        );
    }
    chosen_for.sort();
    assert_eq!(chosen_for, ["all tasks", "arc_easy", "piqa"]);
    let groups = v["groups"].as_array().unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g["task"].as_str().unwrap()).collect();
    assert_eq!(names, ["arc_easy", "piqa", "pooled"]);
    for g in groups {
        let oracle = g["oracle"][0].as_f64().unwrap();
        for k in [
            "global_static",
            "per_task_static",
            "task_mean_margin",
            "routed",
        ] {
            let x = g[k][0].as_f64().unwrap();
            assert!(
                (0.0..=oracle + 1e-12).contains(&x),
                "{k} above the oracle: {g}"
            );
        }
    }
    // Margins were kept in the memo, and their sign is the reward (ties aside).
    let text = std::fs::read_to_string(&memo).unwrap();
    let mut with_margin = 0;
    for line in text.lines().skip(1) {
        let l: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(m) = l["margin"].as_f64() {
            with_margin += 1;
            if m != 0.0 {
                assert_eq!(l["reward"].as_f64().unwrap() == 1.0, m > 0.0, "{l}");
            }
        }
    }
    assert!(
        with_margin >= 16 * (1 + cands.len()),
        "{with_margin} margins"
    );
    // A rerun computes nothing and reports the same.
    let (ok, out, err) = run(&flags, &second);
    assert!(ok && out.contains("| 0 rewards computed"), "{out}\n{err}");
    let w: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&second).unwrap()).unwrap();
    assert_eq!(v, w);
    // Refused: a reward without margins, no blocks to skip, too few prompts left for the folds.
    let (ok, _, err) = run(
        &[&flags[..], &["--reward", "choice-logits"]].concat(),
        &second,
    );
    assert!(!ok && err.contains("cloze or cloze-norm"), "{err}");
    let (ok, _, err) = run(&["--select", "4", "--skip", "0"], &second);
    assert!(!ok && err.contains("--skip 0"), "{err}");
    let (ok, _, err) = run(&["--select", "10", "--skip", "2"], &second);
    assert!(!ok && err.contains("too few for 2 folds"), "{err}");
}
