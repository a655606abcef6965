//! Cloze (log-likelihood) scoring of multiple choice on real ARC rows with the embedded model:
//! lm-evaluation-harness's definition computed by transformers is the reference (token split and
//! per-choice log-likelihoods), batched prefix-shared scoring equals each choice run alone, and
//! training and evaluation read the same tokens in every reward mode.
mod common;

use common::*;
use drllm::eval::{evaluate_alone, evaluate_batch, prepare, EvalOptions, PreparedPrompt, Scoring};
use drllm::runtime::tch::{Device, Kind};
use drllm::runtime::{LayerPath, LoadedModel, ModelSource, PrefixCache};
use drllm::tasks::{
    add_special_tokens, data, Family, LoadOptions, Question, RewardMode, Sample, Split, Style,
    TaskName, Template,
};

fn model() -> LoadedModel {
    LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap()
}

fn samples(task: TaskName, split: Split, n: usize) -> Vec<Sample> {
    data::load(
        &data_dir(),
        task,
        split,
        &LoadOptions {
            limit: Some(n),
            ..Default::default()
        },
    )
    .unwrap()
    .samples
}

fn edited_path(n: usize) -> LayerPath {
    let mut counts = vec![1u8; n];
    for l in [4, 13, 22] {
        counts[l] = 0;
    }
    counts[9] = 2;
    LayerPath::from_counts(counts).unwrap()
}

fn cloze_opts(mode: RewardMode) -> EvalOptions {
    EvalOptions {
        mode,
        max_new_tokens: 0,
    }
}

fn cloze_parts(p: &PreparedPrompt) -> (&Vec<Vec<u32>>, usize) {
    match &p.scoring {
        Scoring::Cloze { choices, gold, .. } => (choices, *gold),
        other => panic!("not cloze: {other:?}"),
    }
}

/// Our token split and per-choice log-likelihoods against lm-eval's definition computed with
/// transformers on the same weights, along the default path and an edited one.
#[test]
fn cloze_log_likelihoods_match_lm_eval_with_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model();
    let n = lm.model.num_layers();
    let mut rows = samples(TaskName::ArcEasy, Split::Dev, 5);
    rows.extend(samples(TaskName::ArcChallenge, Split::Dev, 3));
    let template = Template::builtin_for(Family::MultipleChoice, Style::Base, RewardMode::Cloze);
    let opts = cloze_opts(RewardMode::Cloze);
    let prompts: Vec<PreparedPrompt> = rows
        .iter()
        .map(|s| prepare(&lm, s, &template, &opts).unwrap())
        .collect();
    let job_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|s| {
            let Question::MultipleChoice { stem, choices, .. } = &s.question else {
                panic!("ARC is multiple choice")
            };
            serde_json::json!({"question": stem, "choices": choices.iter().map(|c| c.text.clone()).collect::<Vec<_>>()})
        })
        .collect();
    let paths = [LayerPath::all_ones(n), edited_path(n)];
    let job = serde_json::json!({
        "job": "cloze", "gguf": embedded_gguf(), "rows": job_rows,
        "paths": [serde_json::Value::Null, paths[1].counts()],
    });
    let (r, _) = reference(job, tmp.path());
    let mut cache = PrefixCache::new(256 << 20);
    let mut worst: f64 = 0.0;
    for (i, p) in prompts.iter().enumerate() {
        let want = &r[i];
        assert_eq!(
            p.text,
            want["context"].as_str().unwrap(),
            "context of row {i}"
        );
        assert_eq!(p.ids, ids(&want["context_ids"]), "context ids of row {i}");
        let (choices, _) = cloze_parts(p);
        for (k, c) in choices.iter().enumerate() {
            assert_eq!(*c, ids(&want["continuation_ids"][k]), "row {i} choice {k}");
        }
        for (j, path) in paths.iter().enumerate() {
            let reference: Vec<f64> = want["paths"][j]["logliks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            // Batched with the prefix cache (twice: computed, then resumed), and alone.
            for _ in 0..2 {
                let b = evaluate_batch(&lm, &[(p, path)], &opts, &mut cache).unwrap();
                for (k, (&ours, &theirs)) in b[0].logliks.iter().zip(&reference).enumerate() {
                    let d = (ours - theirs).abs();
                    worst = worst.max(d);
                    assert!(d <= 1e-3, "row {i} path {j} choice {k}: {ours} vs {theirs}");
                }
            }
            let alone = evaluate_alone(&lm, p, path, &opts).unwrap();
            assert_eq!(alone.logliks.len(), reference.len());
            let pick = want["paths"][j]["acc_pick"].as_u64().unwrap() as usize;
            let (_, gold) = cloze_parts(p);
            assert_eq!(
                alone.reward,
                (pick == gold) as u8 as f64,
                "row {i} path {j}"
            );
            let norm =
                prepare(&lm, &rows[i], &template, &cloze_opts(RewardMode::ClozeNorm)).unwrap();
            let e = evaluate_alone(&lm, &norm, path, &cloze_opts(RewardMode::ClozeNorm)).unwrap();
            let pick = want["paths"][j]["acc_norm_pick"].as_u64().unwrap() as usize;
            assert_eq!(
                e.reward,
                (pick == gold) as u8 as f64,
                "acc_norm, row {i} path {j}"
            );
        }
    }
    assert!(cache.stats().blocks_reused > 0);
    eprintln!("max |log-likelihood diff| vs transformers: {worst:.2e}");
}

/// PIQA, OpenBookQA, SciQ and BoolQ (and both ARC sets) as lm-evaluation-harness 0.4.13
/// defines them, run by lm-eval itself with its `hf` backend on the same weights
/// (tests/reference/lm_eval_tasks.py: lm-eval's registered task YAML, documents read there from
/// the upstream files): the same documents in the same order, per-choice log-likelihoods, and
/// every document's acc and acc_norm.
#[test]
fn commonsense_tasks_match_lm_eval_hf_backend() {
    let worst = check_against_lm_eval(&embedded_gguf(), 6);
    eprintln!("max |log-likelihood diff| vs lm-eval's hf backend: {worst:.2e}");
}

/// The same on Gemma 3 270M (its Q4_K_M GGUF, fetched from PyPI), where lm-eval's `hf`
/// backend prepends the BOS that Gemma needs to every request: our cloze prompts must too.
#[test]
fn gemma3_cloze_matches_lm_eval_hf_backend() {
    let gguf = fetched_model("gemma-3-270m");
    let worst = check_against_lm_eval(&gguf, 3);
    eprintln!("gemma-3-270m: max |log-likelihood diff| vs lm-eval's hf backend: {worst:.2e}");
}

/// Runs lm-eval on the first `per_task` dev documents of every multiple-choice task with the
/// model in `gguf` and checks ours against it; returns the largest log-likelihood difference.
fn check_against_lm_eval(gguf: &std::path::Path, per_task: usize) -> f64 {
    let lm = LoadedModel::load(
        ModelSource::Gguf(gguf.to_path_buf()),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let n = lm.model.num_layers();
    let tasks = [
        TaskName::Piqa,
        TaskName::OpenBookQa,
        TaskName::Sciq,
        TaskName::Boolq,
        TaskName::ArcEasy,
        TaskName::ArcChallenge,
    ];
    let job = serde_json::json!({
        "gguf": gguf, "data": data_dir(), "batch_size": 8,
        "tasks": tasks.iter().map(|t| (t.to_string(), serde_json::json!(per_task))).collect::<serde_json::Map<_, _>>(),
    });
    let want = run_script("lm_eval_tasks.py", &job);
    let template = Template::builtin_for(Family::MultipleChoice, Style::Base, RewardMode::Cloze);
    let base = LayerPath::all_ones(n);
    let mut worst: f64 = 0.0;
    for task in tasks {
        let rows = samples(task, Split::Dev, per_task);
        let theirs = want[task.to_string()].as_array().unwrap();
        assert_eq!(rows.len(), theirs.len(), "{task}");
        for (s, t) in rows.iter().zip(theirs) {
            assert_eq!(
                s.id,
                t["id"].as_str().unwrap(),
                "{task}: documents in order"
            );
            for (mode, metric) in [
                (RewardMode::Cloze, "acc"),
                (RewardMode::ClozeNorm, "acc_norm"),
            ] {
                let Some(expected) = t[metric].as_f64() else {
                    continue; // boolq reports acc only
                };
                let opts = cloze_opts(mode);
                let p = prepare(&lm, s, &template, &opts).unwrap();
                let (_, gold) = cloze_parts(&p);
                assert_eq!(
                    gold as u64,
                    t["target"].as_u64().unwrap(),
                    "{task} {}",
                    s.id
                );
                let e = evaluate_alone(&lm, &p, &base, &opts).unwrap();
                let lls = t["lls"].as_array().unwrap();
                assert_eq!(e.logliks.len(), lls.len(), "{task} {}", s.id);
                for (ours, theirs) in e.logliks.iter().zip(lls) {
                    let d = (ours - theirs.as_f64().unwrap()).abs();
                    worst = worst.max(d);
                    assert!(d <= 2e-3, "{task} {}: {ours} vs {theirs}", s.id);
                }
                assert_eq!(e.reward, expected, "{task} {} {metric}", s.id);
            }
        }
    }
    worst
}

/// Many prompts and paths in mixed batches (padding, prefix sharing, evictions): every choice's
/// log-likelihood equals the choice appended to the prompt and run alone.
#[test]
fn batched_cloze_equals_each_choice_alone() {
    let lm = model();
    let n = lm.model.num_layers();
    let rows = samples(TaskName::ArcChallenge, Split::Train, 8);
    let opts = cloze_opts(RewardMode::Cloze);
    let template = Template::builtin_for(Family::MultipleChoice, Style::Base, RewardMode::Cloze);
    let prompts: Vec<PreparedPrompt> = rows
        .iter()
        .map(|s| prepare(&lm, s, &template, &opts).unwrap())
        .collect();
    let mut paths = vec![LayerPath::all_ones(n), edited_path(n)];
    let mut c = edited_path(n).counts().to_vec();
    c[25] = 0;
    c[26] = 2;
    paths.push(LayerPath::from_counts(c).unwrap());
    let items: Vec<(&PreparedPrompt, &LayerPath)> = prompts
        .iter()
        .flat_map(|p| paths.iter().map(move |path| (p, path)))
        .collect();
    let mut cache = PrefixCache::new(24 << 20);
    for chunk in items.chunks(7) {
        let batched = evaluate_batch(&lm, chunk, &opts, &mut cache).unwrap();
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
        }
    }
    let st = cache.stats();
    assert!(st.blocks_reused > 0 && st.evicted > 0, "{st:?}");
}

/// What the search stores as a row's prompt is what training tokenizes and what evaluation
/// routes on, token for token, in every reward mode.
#[test]
fn training_and_eval_read_the_same_tokens() {
    let lm = model();
    let rows = samples(TaskName::ArcEasy, Split::Train, 3);
    for (name, mode) in RewardMode::ALL {
        let style = Style::default_for(mode);
        let template = Template::builtin_for(Family::MultipleChoice, style, mode);
        let opts = EvalOptions {
            mode,
            max_new_tokens: 4,
        };
        for s in &rows {
            let p = prepare(&lm, s, &template, &opts).unwrap();
            // drllm-train re-tokenizes the stored text with this rule.
            let special = add_special_tokens(style, mode, Family::MultipleChoice, lm.needs_bos());
            assert_eq!(p.add_special, special, "{name}");
            assert_eq!(
                lm.tokenizer.encode(&p.text, special).unwrap(),
                p.ids,
                "{name}: {}",
                s.id
            );
        }
    }
}
