//! Router training with real processes: the coordinator searches real ARC prompts with the
//! embedded model, `drllm-train` fits routers on its output, and the package reads back. Also
//! the teacher-forced router inputs of the runtime, and the training inputs users get wrong.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::dist::{read_rows, Dataset};
use drllm::runtime::tch::{Device, Kind, Tensor};
use drllm::runtime::{LayerPath, LoadedModel, ModelSource, PathBatch};
use drllm_router::Package;

/// The hidden state entering block `l` along a path is what the model computes before block `l`:
/// equal alone and in a padded batch, carried over a skipped block, and equal to the state that
/// a path stopping just before `l` (all zeros from `l` on) hands to its last block.
#[test]
fn block_inputs_are_the_teacher_forced_states() {
    let lm =
        LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    let prompts: Vec<Vec<u32>> = [
        "Which gas do plants take in from the air?",
        "A student pushes a cart. What makes it speed up? Answer with a letter.",
    ]
    .iter()
    .map(|t| lm.tokenizer.encode(t, true).unwrap())
    .collect();
    let mut counts = vec![1u8; n];
    counts[3] = 0;
    counts[5] = 2;
    counts[6] = 0;
    let paths = vec![
        LayerPath::from_counts(vec![1; n]).unwrap(),
        LayerPath::from_counts(counts.clone()).unwrap(),
    ];
    let _g = drllm::runtime::tch::no_grad_guard();
    let batched = PathBatch::new(&lm.model, &paths)
        .unwrap()
        .prefill_block_inputs(&prompts)
        .unwrap();
    assert_eq!(batched.len(), n);
    let t = batched[0].size()[1];
    let row = |x: &Tensor, r: i64, len: usize| x.get(r).narrow(0, t - len as i64, len as i64);
    for r in 0..2 {
        let alone = PathBatch::new(&lm.model, &paths[r..=r])
            .unwrap()
            .prefill_block_inputs(&prompts[r..=r])
            .unwrap();
        for l in 0..n {
            let d = max_abs_diff(
                &row(&batched[l], r as i64, prompts[r].len()),
                &alone[l].get(0),
            );
            // The residual stream reaches ~2.5e4 in later blocks, where f32 rounding alone
            // exceeds an absolute 1e-3 (batch shapes and the padding mask pick other kernels,
            // and 30 blocks amplify it); a wrong mask or row would differ by far more than 1e-5
            // of the scale.
            let scale = alone[l].abs().max().double_value(&[]);
            let tol = 1e-3f64.max(1e-5 * scale);
            assert!(
                d < tol,
                "row {r} block {l}: batched vs alone {d} (max |x| {scale})"
            );
        }
    }
    // Skipped blocks 3 and 6 hand their input on unchanged.
    for l in [3, 6] {
        assert!(batched[l].get(1).equal(&batched[l + 1].get(1)));
    }
    assert!(!batched[5].get(1).equal(&batched[6].get(1)));
    // Along the second path, block l's input = the last block's input of counts[..l] + zeros.
    for l in [1, 5, 6, 12, n - 1] {
        let mut cut = counts.clone();
        for c in cut.iter_mut().skip(l) {
            *c = 0;
        }
        let inputs = PathBatch::new(&lm.model, &[LayerPath::from_counts(cut).unwrap()])
            .unwrap()
            .prefill_block_inputs(&prompts[1..2])
            .unwrap();
        let d = max_abs_diff(
            &inputs[n - 1].get(0),
            &row(&batched[l], 1, prompts[1].len()),
        );
        assert!(d < 1e-3, "block {l}: {d}");
    }
}

/// The gated prefill that distillation trains through: hard gates are paths (1 executes, 0 skips
/// exactly as a count of 0 does, alone and in a padded batch), and a loss on its output has a
/// gradient with respect to soft gates.
#[test]
fn gated_prefill_is_a_path_at_hard_gates_and_differentiable() {
    let lm =
        LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    let prompts: Vec<Vec<u32>> = ["Which gas do plants take in from the air?", "2 + 2 ="]
        .iter()
        .map(|t| lm.tokenizer.encode(t, true).unwrap())
        .collect();
    let skipped = [3usize, 11, 17];
    let mut counts = vec![1u8; n];
    for &l in &skipped {
        counts[l] = 0;
    }
    let path = LayerPath::from_counts(counts).unwrap();
    let want = {
        let _g = drllm::runtime::tch::no_grad_guard();
        PathBatch::new(&lm.model, &[LayerPath::all_ones(n), path.clone()])
            .unwrap()
            .prefill(&prompts)
            .unwrap()
    };
    // Row 0 executes every block, row 1 skips `skipped`.
    let mut hard = |l: usize, _h: &Tensor| -> Tensor {
        Tensor::from_slice(&[1f32, if skipped.contains(&l) { 0.0 } else { 1.0 }])
    };
    let got = {
        let _g = drllm::runtime::tch::no_grad_guard();
        PathBatch::new_routed(&lm.model, 2)
            .prefill_gated(&prompts, &mut hard)
            .unwrap()
    };
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-3, "gated vs path prefill: {d}");
    // Alone (the same kernels as the path's batch), hard gates give the path's states exactly,
    // also in bf16, where `h + g * (out - h)` would not.
    for kind in [Kind::Float, Kind::BFloat16] {
        let lm = LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, kind).unwrap();
        let _g = drllm::runtime::tch::no_grad_guard();
        let want = PathBatch::new(&lm.model, std::slice::from_ref(&path))
            .unwrap()
            .prefill(&prompts[..1])
            .unwrap();
        let mut one = |l: usize, _h: &Tensor| -> Tensor {
            Tensor::from_slice(&[if skipped.contains(&l) { 0f32 } else { 1.0 }])
        };
        let got = PathBatch::new_routed(&lm.model, 1)
            .prefill_gated(&prompts[..1], &mut one)
            .unwrap();
        assert!(got.equal(&want), "{kind:?}: {}", max_abs_diff(&got, &want));
    }

    // Soft gates: a leaf per block, every one reached by the gradient of the output's logits.
    let leaves: Vec<Tensor> = (0..n)
        .map(|_| Tensor::from_slice(&[0.9f32, 0.9]).set_requires_grad(true))
        .collect();
    let mut soft = |l: usize, _h: &Tensor| -> Tensor { leaves[l].shallow_clone() };
    let h = PathBatch::new_routed(&lm.model, 2)
        .prefill_gated(&prompts, &mut soft)
        .unwrap();
    let loss = lm
        .model
        .logits(&h)
        .log_softmax(-1, Kind::Float)
        .select(-1, 42)
        .sum(Kind::Float);
    loss.backward();
    for (l, g) in leaves.iter().enumerate() {
        let grad = g.grad();
        let v: Vec<f32> = Vec::try_from(&grad).unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0),
            "block {l}: {v:?}"
        );
    }
    // A batch made for fixed paths is refused.
    let fixed = PathBatch::new(&lm.model, &[path.clone(), path.clone()]).unwrap();
    assert!(fixed.prefill_gated(&prompts, &mut hard).is_err());
    // A gate of the wrong shape is refused, not broadcast.
    let mut wrong = |_l: usize, _h: &Tensor| -> Tensor { Tensor::from_slice(&[1f32]) };
    let e = PathBatch::new_routed(&lm.model, 2)
        .prefill_gated(&prompts, &mut wrong)
        .unwrap_err();
    assert!(e.to_string().contains("expected [2]"), "{e}");
}

/// The block inputs match transformers' hidden states on the same weights, along the default
/// path and along a path with skips and repeats (the last block executed, so no state is the
/// final-normed one transformers reports last).
#[test]
fn block_inputs_match_transformers() {
    let lm =
        LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    let prompts: Vec<Vec<u32>> = [
        "The sun is a star. Which planet is closest to it?",
        "2 + 2 =",
    ]
    .iter()
    .map(|t| lm.tokenizer.encode(t, true).unwrap())
    .collect();
    let mut counts = vec![1u8; n];
    for (l, c) in [(2, 0), (3, 2), (9, 0), (10, 0), (17, 2), (28, 0)] {
        counts[l] = c;
    }
    let paths = [vec![1u8; n], counts];
    let tmp = tempfile::tempdir().unwrap();
    let (_, want) = reference(
        serde_json::json!({"job": "hidden", "gguf": embedded_gguf(), "prompts": prompts, "paths": paths}),
        tmp.path(),
    );
    // Every (prompt, path) pair in one left-padded batch.
    let rows: Vec<(usize, usize)> = (0..2).flat_map(|i| (0..2).map(move |j| (i, j))).collect();
    let lp: Vec<LayerPath> = rows
        .iter()
        .map(|&(_, j)| LayerPath::from_counts(paths[j].clone()).unwrap())
        .collect();
    let rp: Vec<Vec<u32>> = rows.iter().map(|&(i, _)| prompts[i].clone()).collect();
    let _g = drllm::runtime::tch::no_grad_guard();
    let got = PathBatch::new(&lm.model, &lp)
        .unwrap()
        .prefill_block_inputs(&rp)
        .unwrap();
    let t = got[0].size()[1];
    let mut worst = 0f64;
    for (r, &(i, j)) in rows.iter().enumerate() {
        let len = prompts[i].len() as i64;
        for l in 0..n {
            let ours = got[l].get(r as i64).narrow(0, t - len, len);
            let theirs = &want[&format!("p{i}_path{j}_in{l}")];
            // Relative to the state's scale: the residual stream grows through the blocks.
            let scale = theirs.abs().max().double_value(&[]).max(1.0);
            let d = max_abs_diff(&ours, theirs) / scale;
            worst = worst.max(d);
            assert!(d < 1e-4, "prompt {i} path {j} block {l}: relative diff {d}");
        }
    }
    eprintln!("largest relative difference to transformers: {worst:.2e}");
}

fn search(out: &Path, limit: usize) {
    let o = Command::new(bin("drllm-coordinator"))
        .args([
            "--model",
            "embedded",
            "--dataset",
            "arc_easy",
            "--split",
            "train",
        ])
        .args(["--limit", &limit.to_string(), "--workers", "1"])
        .args([
            "--num-simulations",
            "8",
            "--seed",
            "7",
            "--max-new-tokens",
            "6",
        ])
        .arg("--data")
        .arg(data_dir())
        .arg("--out")
        .arg(out)
        .env("DRLLM_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn train(args: &[&str], data: &[&Path], out: &Path, cache: &Path) -> (bool, String, String) {
    let mut c = Command::new(bin("drllm-train"));
    for d in data {
        c.arg("--data").arg(d);
    }
    if !args.contains(&"--task-data") {
        c.arg("--task-data").arg(data_dir());
    }
    let o = c
        .arg("--out")
        .arg(out)
        .arg("--feature-cache")
        .arg(cache)
        .args(args)
        .env("DRLLM_LOG", "warn")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A copy of the dataset at `from` with its rows changed by `edit` (same model fingerprint).
fn rewritten(from: &Path, to: &Path, edit: impl Fn(&mut drllm::dist::PathRecord)) {
    try_rewritten(from, to, edit).unwrap()
}

/// [`rewritten`], returning the store's error.
fn try_rewritten(
    from: &Path,
    to: &Path,
    edit: impl Fn(&mut drllm::dist::PathRecord),
) -> Result<(), drllm::dataset::DatasetError> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("_manifest.json")).unwrap())
            .unwrap();
    let fp = m["model_fingerprint"].as_str().unwrap();
    let mut ds = Dataset::open(to, fp, m["config"].clone(), false).unwrap();
    let mut rows = read_rows(from).unwrap();
    rows.iter_mut().for_each(edit);
    ds.commit("arc_easy", &rows)
}

#[test]
fn drllm_train_fits_routers_on_a_real_search_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    search(&run, 10);
    let cache = dir.path().join("features");
    let pkg = dir.path().join("pkg");
    let (ok, stdout, stderr) = train(
        &["--epochs", "4", "--val-fraction", "0.3", "--seed", "3"],
        &[&run],
        &pkg,
        &cache,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("validation macro-F1"), "{stdout}");
    assert!(stdout.contains("routed validation ("), "{stdout}");
    assert!(
        stderr.contains("examples/s") && stderr.contains("labels: skip"),
        "{stderr}"
    );
    let p = Package::load(&pkg).unwrap();
    let m = &p.manifest;
    assert_eq!((m.shape.num_layers, m.shape.hidden_size), (30, 576));
    assert_eq!((m.shape.router_hidden, m.windows), (128, 8));
    assert_eq!(m.epochs.len(), 4);
    assert!((1..=4).contains(&m.best_epoch));
    // The per-epoch metrics also as CSV, the kept epoch marked.
    let csv = std::fs::read_to_string(pkg.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(
        lines[0].starts_with("epoch,train_loss,val_macro_f1,val_f1_skip,"),
        "{csv}"
    );
    assert!(
        lines[0].ends_with(",val_routed_accuracy,val_routed_cost,lr,secs,kept"),
        "{csv}"
    );
    let kept: Vec<&str> = lines[1..]
        .iter()
        .filter(|l| l.ends_with(",true"))
        .copied()
        .collect();
    assert_eq!(kept.len(), 1, "{csv}");
    assert!(kept[0].starts_with(&format!("{},", m.best_epoch)), "{csv}");
    let rows = read_rows(&run).unwrap();
    let labelled = rows.iter().filter(|r| r.best_path.is_some()).count() as u64;
    assert_eq!(m.label_counts.iter().sum::<u64>() % 30, 0);
    let used = m.data["train"].as_u64().unwrap() + m.data["val"].as_u64().unwrap();
    assert!(used <= labelled && used > 0);
    // Every epoch was measured routing the held-out prompts; the kept one is the most accurate.
    let best = m.epochs[m.best_epoch - 1].val_routed_accuracy.unwrap();
    assert!(m
        .epochs
        .iter()
        .all(|e| e.val_routed_accuracy.unwrap() <= best));
    let prompts = m.prompts.as_ref().unwrap();
    assert_eq!((&prompts.reward[..], &prompts.style[..]), ("cloze", "base"));
    // The templates the search rendered its prompts with, one per answer family.
    let mc = prompts
        .templates
        .iter()
        .find(|t| t.family == "multiple_choice")
        .unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/drllm-tasks/templates/mc_cloze.j2"),
    )
    .unwrap();
    assert_eq!(
        (&mc.name[..], mc.source.trim()),
        ("mc_cloze", shipped.trim())
    );
    assert!(mc.source.contains("Question: {{ question }}\nAnswer:"));
    assert_eq!(prompts.templates.len(), 3);
    let outcomes: u64 = m.data["rows_by_outcome"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(outcomes, rows.len() as u64);
    // inspect prints it; a second run with other flags takes the features from the cache.
    let o = Command::new(bin("drllm-train"))
        .arg("inspect")
        .arg(&pkg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("30 blocks, 576 -> 128 -> 3, 8 windows"),
        "{text}"
    );
    let (ok, _, stderr) = train(&["--epochs", "2", "--lr", "5e-4"], &[&run], &pkg, &cache);
    assert!(ok && stderr.contains("from the cache"), "{stderr}");
    assert_eq!(Package::load(&pkg).unwrap().manifest.epochs.len(), 2);
    // Soft targets from every verified path: the same features, the mass printed and recorded.
    let soft = [
        "--epochs",
        "2",
        "--routed-every",
        "0",
        "--targets",
        "search",
        "--target-temperature",
        "2",
    ];
    let (ok, _, stderr) = train(&soft, &[&run], &pkg, &cache);
    assert!(
        ok && stderr.contains("from the cache")
            && stderr.contains("--targets search (temperature 2): target mass skip"),
        "{stderr}"
    );
    let t = Package::load(&pkg).unwrap().manifest.training;
    assert_eq!(
        (t["targets"].as_str(), t["target_temperature"].as_f64()),
        (Some("search"), Some(2.0)),
        "{t}"
    );
    let (ok, _, e) = train(
        &["--targets", "search", "--label-margin", "0.5"],
        &[&run],
        &pkg,
        &cache,
    );
    assert!(!ok && e.contains("use one of them"), "{e}");

    // Margin labels: a strict share relabels the default-correct rows it applies to, each
    // exactly once, and records what it did; a second run reads every margin from the cache.
    let margin = [
        "--epochs",
        "1",
        "--routed-every",
        "0",
        "--label-margin",
        "3",
    ];
    let (ok, _, stderr) = train(&margin, &[&run], &pkg, &cache);
    assert!(ok && stderr.contains("--label-margin 3: of"), "{stderr}");
    let d = Package::load(&pkg).unwrap().manifest.data;
    let r = &d["margin_labels"];
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(n("rows"), n("cheapest") + n("dearer") + n("fragile"), "{r}");
    assert!(n("computed") >= n("rows"), "{r}");
    assert_eq!(d["label_margin"].as_f64(), Some(3.0));
    let fragile = d["rows_by_outcome"]["fragile"].as_u64().unwrap();
    assert_eq!(fragile, n("fragile"));
    let (ok, _, stderr) = train(&margin, &[&run], &pkg, &cache);
    assert!(ok && stderr.contains(" 0 margins measured"), "{stderr}");
    let (ok, _, e) = train(&["--label-margin=-1"], &[&run], &pkg, &cache);
    assert!(
        !ok && e.contains("--label-margin") && e.contains("expected a number in [0"),
        "{e}"
    );

    // Bad input: no dataset there.
    let (ok, _, e) = train(&[], &[&dir.path().join("nope")], &pkg, &cache);
    assert!(!ok && e.contains("nope/_manifest.json"), "{e}");
    // A dataset of another model.
    // (Made by the store itself: a hand-edited manifest fails its own checksum.)
    let other = dir.path().join("other");
    let text = std::fs::read_to_string(run.join("_manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    drop(
        Dataset::open(
            &other,
            "0123456789abcdef01234567",
            v["config"].clone(),
            false,
        )
        .unwrap(),
    );
    let (ok, _, e) = train(&[], &[&run, &other], &pkg, &cache);
    assert!(
        !ok && e.contains("other: made with model fingerprint 0123456789abcdef01234567"),
        "{e}"
    );
    // No correct path anywhere.
    let none = dir.path().join("none");
    rewritten(&run, &none, |r| {
        r.default_correct = false;
        r.found = false;
        r.improved = false;
        r.best_path = None;
        r.good_paths.clear();
    });
    let (ok, _, e) = train(&[], &[&none], &pkg, &cache);
    assert!(!ok && e.contains("has a correct path"), "{e}");
    // No rows at all.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("_manifest.json")).unwrap())
            .unwrap();
    let fresh = dir.path().join("fresh");
    drop(
        Dataset::open(
            &fresh,
            m["model_fingerprint"].as_str().unwrap(),
            m["config"].clone(),
            false,
        )
        .unwrap(),
    );
    let (ok, _, e) = train(&[], &[&fresh], &pkg, &cache);
    assert!(
        !ok && e.contains("no rows in") && e.contains("run the search first"),
        "{e}"
    );
    // A label vector of the wrong length never reaches a dataset: the store reads each part
    // back before it commits it, and refuses it naming the row and the field.
    let short = dir.path().join("short");
    let e = try_rewritten(&run, &short, |r| {
        if r.best_path.is_some() {
            r.best_path = Some(drllm::dataset::LayerPath::all_ones(12));
        }
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("best_path has 12 counts, expected 30"), "{e}");
    let (ok, _, e) = train(&[], &[&short], &pkg, &cache);
    assert!(!ok && e.contains("no rows in"), "{e}");
    // An output that is not a package is never overwritten; the package is still intact.
    let (ok, _, e) = train(&[], &[&run], &run, &cache);
    assert!(!ok && e.contains("is not a router package"), "{e}");
    assert!(Package::load(&pkg).is_ok());
    // A bad fraction.
    let (ok, _, e) = train(&["--val-fraction", "1.5"], &[&run], &pkg, &cache);
    assert!(!ok && e.contains("--val-fraction"), "{e}");
    let (ok, _, e) = train(&["--max-improved-share", "2"], &[&run], &pkg, &cache);
    assert!(!ok && e.contains("--max-improved-share"), "{e}");
    let (ok, _, e) = train(&["--select", "f1"], &[&run], &pkg, &cache);
    assert!(
        !ok && e.contains("expected routed-accuracy or macro-f1"),
        "{e}"
    );
    // Routed validation needs the questions: a data directory without them is named.
    let empty = dir.path().join("nodata");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, e) = train(
        &["--task-data", &empty.display().to_string()],
        &[&run],
        &pkg,
        &cache,
    );
    assert!(
        !ok && e.contains("routed validation") && e.contains("nodata"),
        "{e}"
    );
}

/// `drllm-train export --format dr-llm` writes the routers under the paper's tensor names; the
/// paper's router blocks built from that file give our logits (prompt lengths that are multiples
/// of 8, where both windowings agree), and a shape the paper's code cannot hold is refused.
#[test]
fn export_dr_llm_reproduces_the_routers_in_the_papers_layout() {
    use drllm_router::pool_windows;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smol-dr-llm.safetensors");
    let o = Command::new(bin("drllm-train"))
        .args(["export", "embedded", "--format", "dr-llm", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("T % 8") && stdout.contains("router_penalty -0.5"),
        "{stdout}"
    );

    let pkg =
        Package::load(&drllm_router::embedded::resolve(Path::new("embedded")).unwrap()).unwrap();
    let h_size = pkg.manifest.shape.hidden_size as i64;
    drllm::runtime::tch::manual_seed(5);
    let mut inputs = vec![];
    for t in [8i64, 24, 13] {
        let h = Tensor::randn([t, h_size], (Kind::Float, Device::Cpu));
        inputs.push((format!("h{t}"), h));
    }
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let inputs_file = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&refs, &inputs_file).unwrap();
    let r = run_script(
        "dr_llm_routers.py",
        &serde_json::json!({"routers": file, "inputs": inputs_file}),
    );
    let names = r["names"].as_array().unwrap();
    assert_eq!(names.len(), 4 * 30);
    assert!(
        names.iter().any(|n| n == "model.routers.29.linear2.bias"),
        "{names:?}"
    );
    for (name, h) in &inputs {
        let t = h.size()[0] as usize;
        let pooled = pool_windows(&h.unsqueeze(0), &[t], pkg.manifest.windows);
        // [1, L, W, H] -> our logits [1, L, 3], every block reading the same states.
        let x = pooled.unsqueeze(1).expand([1, 30, 8, h_size], false);
        let ours = pkg.routers.forward(&x).squeeze_dim(0);
        let theirs = Tensor::from_slice(
            &r["logits"][name]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|l| {
                    l.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                })
                .collect::<Vec<f32>>(),
        )
        .view([30, 3]);
        let d = max_abs_diff(&ours, &theirs);
        if t.is_multiple_of(8) {
            assert!(d < 1e-4, "{name}: max |logit diff| {d}");
        } else {
            // The documented difference: their windows drop the last T % 8 tokens.
            assert!(d > 1e-4, "{name}: windows should differ, diff {d}");
        }
    }

    // Routers the paper's code cannot hold are refused with the flags to change.
    let small = dir.path().join("small");
    let mut manifest = pkg.manifest.clone();
    manifest.shape.router_hidden = 16;
    let vs = drllm::runtime::tch::nn::VarStore::new(Device::Cpu);
    let routers = drllm_router::Routers::new(&vs.root(), manifest.shape).snapshot();
    Package { manifest, routers }.save(&small).unwrap();
    let o = Command::new(bin("drllm-train"))
        .args(["export", "--format", "dr-llm", "--out"])
        .arg(dir.path().join("x.safetensors"))
        .arg(&small)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("16 hidden units") && e.contains("--router-hidden 128"),
        "{e}"
    );
}

/// Distillation moves the gates the way its loss says, and what training believes the routers
/// do is what routed inference does: without a penalty the gates stay open at zero KL; with a
/// large one they close; the trained routers' hard gates are the paths `Policy` routes at
/// budget 0, with no repeat.
#[test]
fn distillation_trains_the_gates_routed_inference_follows() {
    use drllm_train::distill::{distill, gated_paths, DistillConfig};
    let lm =
        LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    let prompts: Vec<Vec<u32>> = [
        "Which gas do plants take in from the air? Carbon dioxide.",
        "A student pushes a cart. What makes it speed up?",
        "The sun is a star. Which planet is closest to it?",
        "Water boils at",
        "Frogs lay their eggs in",
        "Which tool measures temperature?",
    ]
    .iter()
    .map(|t| lm.tokenizer.encode(t, true).unwrap())
    .collect();
    // One step per epoch: an epoch's figures are its step's forward pass, before the update.
    let cfg = |penalty: f64, epochs: usize| DistillConfig {
        epochs,
        batch_size: prompts.len(),
        lr: 0.1,
        warmup: 0.0,
        penalty,
        noise: 0.0,
        init_execute: 0.3,
        ..DistillConfig::default()
    };
    let run =
        |c: &DistillConfig| distill(&lm, &prompts, c, |_, _| Ok(None), |_, _| {}, |_| {}).unwrap();
    // Open gates: the routed pass is the full model's, bit for bit.
    let free = run(&cfg(0.0, 1));
    assert_eq!(free.epochs[0].executed, 1.0, "{:?}", free.epochs);
    assert!(free.epochs[0].kl.abs() < 1e-5, "{:?}", free.epochs);
    // A heavy penalty closes them, and the KL they cost shows.
    let taxed = run(&cfg(50.0, 4));
    assert_eq!(taxed.epochs[0].executed, 1.0, "{:?}", taxed.epochs);
    let closed = taxed.epochs.iter().skip(1).find(|e| e.executed < 0.5);
    assert!(closed.is_some_and(|e| e.kl > 0.01), "{:?}", taxed.epochs);
    // Training's view of the routers against routed inference.
    let want = gated_paths(&lm, &taxed.routers, 8, &prompts).unwrap();
    let policy = drllm_router::Policy::new(taxed.routers.snapshot(), 8, 0.0).unwrap();
    let mut batch = PathBatch::new_routed(&lm.model, prompts.len());
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut route = |l: usize, h: &Tensor| policy.decide(l, h, &lens);
    let _g = drllm::runtime::tch::no_grad_guard();
    let _ = batch.prefill_routed(&prompts, &mut route).unwrap();
    let got: Vec<Vec<u8>> = batch.paths().iter().map(|p| p.counts().to_vec()).collect();
    assert_eq!(got, want);
    assert!(got.iter().flatten().all(|&c| c < 2));
    assert!(
        got.iter()
            .any(|p| p.iter().filter(|&&c| c == 0).count() > n / 2),
        "{got:?}"
    );
}

/// `drllm-train distill` trains distillation gates on real task prompts (no paths dataset),
/// writes a package that drllm-infer routes with, measures the budget sweep on held-out prompts
/// (budget 1 is the baseline exactly), and refuses bad flags.
#[test]
fn drllm_train_distill_writes_a_package_that_routes() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("distilled");
    let distill = |extra: &[&str], out: &Path| {
        outcome(
            Command::new(bin("drllm-train"))
                .args(["distill", "--dataset", "arc_easy,piqa", "--split", "train"])
                .args([
                    "--limit",
                    "10",
                    "--epochs",
                    "1",
                    "--batch-size",
                    "4",
                    "--threads",
                    "2",
                ])
                .arg("--data")
                .arg(data_dir())
                .args(extra)
                .arg("--out")
                .arg(out),
        )
    };
    let (ok, stdout, stderr) = distill(&["--val-fraction", "0.4", "--val-budgets", "0,1"], &pkg);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("KL (nats/pos)") && stdout.contains("budget +1.00"),
        "{stdout}"
    );
    let p = Package::load(&pkg).unwrap();
    let m = &p.manifest;
    assert_eq!(m.training["supervision"], "distill");
    assert_eq!(m.best_epoch, 1);
    assert_eq!(m.prompts.as_ref().unwrap().reward, "cloze");
    // Repeat is never chosen.
    let rep: Vec<f32> = Vec::try_from(p.routers.b2.select(1, 2)).unwrap();
    assert!(rep.iter().all(|&b| b <= -29.0), "{rep:?}");
    let base = m.data["routed_val_baseline_accuracy"].as_f64().unwrap();
    let sweep = m.data["routed_val_budgets"].as_array().unwrap();
    let at1 = sweep.iter().find(|s| s["budget"] == 1.0).unwrap();
    assert_eq!(at1["accuracy"].as_f64().unwrap(), base);
    assert_eq!(at1["cost"].as_f64().unwrap(), 30.0);
    let n_val = m.data["routed_val_prompts"].as_u64().unwrap();
    assert!(
        n_val > 0 && m.data["train"].as_u64().unwrap() + n_val == 20,
        "{}",
        m.data
    );
    // drllm-infer evaluates it like any package.
    let (ok, out, err) = outcome(
        Command::new(bin("drllm-infer"))
            .args([
                "eval",
                "--dataset",
                "arc_easy",
                "--split",
                "dev",
                "--limit",
                "4",
            ])
            .arg("--data")
            .arg(data_dir())
            .arg("--routers")
            .arg(&pkg),
    );
    assert!(ok, "{err}");
    assert!(out.contains("routed"), "{out}");
    // inspect prints the distillation epochs.
    let (ok, out, err) = outcome(Command::new(bin("drllm-train")).arg("inspect").arg(&pkg));
    assert!(ok && out.contains("distillation gates"), "{out}{err}");

    // Bad input: an existing directory that is not a package, zero sizes, a budget outside
    // [-1, 1], no task.
    let other = tmp.path().join("not-a-package");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let (ok, _, err) = distill(&[], &other);
    assert!(!ok && err.contains("is not a router package"), "{err}");
    assert!(other.join("notes.txt").is_file());
    let (ok, _, err) = distill(&["--batch-tokens", "0"], &tmp.path().join("x"));
    assert!(!ok && err.contains("must be positive"), "{err}");
    let (ok, _, err) = distill(&["--val-budgets", "2"], &tmp.path().join("x"));
    assert!(!ok && err.contains("outside [-1, 1]"), "{err}");
    let (ok, _, err) = outcome(
        Command::new(bin("drllm-train"))
            .args(["distill", "--out"])
            .arg(tmp.path().join("y"))
            .arg("--data")
            .arg(data_dir()),
    );
    assert!(!ok && err.contains("--dataset"), "{err}");
}
