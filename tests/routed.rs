//! Routed generation: paths chosen by routers once per prompt during prefill, then decoding
//! along them; checked against plain generation along the same paths, and through the CLI.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::runtime::tch::{self, Device, Kind, Tensor};
use drllm::runtime::{GenerateOptions, GenerateRequest, LoadedModel, ModelSource, Paths};
use drllm_router::{Package, PackageManifest, Policy, RouterShape, Routers};

/// A static path skipping blocks 3, 11 and 17 of the embedded model.
const STATIC_3: &str = "1,1,1,0,1,1,1,1,1,1,1,0,1,1,1,1,1,0,1,1,1,1,1,1,1,1,1,1,1,1";

fn model() -> LoadedModel {
    LoadedModel::load(ModelSource::Gguf(embedded_gguf()), Device::Cpu, Kind::Float).unwrap()
}

fn chat_prompts(lm: &LoadedModel) -> Vec<Vec<u32>> {
    [
        "Which gas do plants take in from the air? A) oxygen B) carbon dioxide C) helium D) neon",
        "What is the boiling point of water at sea level?",
        "Name a mammal that can fly.",
    ]
    .iter()
    .map(|t| {
        let chat = lm
            .tokenizer
            .apply_chat_template(&[drllm::runtime::Message::user(t.to_string())])
            .unwrap();
        lm.tokenizer.encode(&chat, false).unwrap()
    })
    .collect()
}

/// Routers for the embedded model: random (seeded), or always choosing `always`.
fn routers(seed: i64, always: Option<u8>) -> Routers {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let shape = RouterShape {
        num_layers: 30,
        hidden_size: 576,
        router_hidden: 128,
    };
    let r = Routers::new(&vs.root(), shape).snapshot();
    let _g = tch::no_grad_guard();
    match always {
        Some(c) => {
            let _ = r.w2.shallow_clone().zero_();
            let mut b = [0f32; 3];
            b[c as usize] = 10.0;
            r.b2.shallow_clone()
                .copy_(&Tensor::from_slice(&b).expand([30, 3], false));
        }
        None => {
            // Spread the decisions: random biases so every class occurs.
            r.b2.shallow_clone()
                .copy_(&(Tensor::randn([30, 3], (Kind::Float, Device::Cpu)) * 3.0));
        }
    }
    r
}

/// Generation routed by `p` during prefill: the outputs and the chosen paths.
fn route_and_generate(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    p: &Policy,
    lens: &[usize],
    opts: &GenerateOptions,
) -> (
    Vec<drllm::runtime::Generated>,
    Vec<drllm::runtime::LayerPath>,
) {
    let mut route = |l: usize, h: &Tensor| p.decide(l, h, lens);
    let req = GenerateRequest::new(prompts, Paths::Routed(&mut route), opts.clone());
    let g = lm.model.generate(req).unwrap();
    (g.outputs, g.paths)
}

#[test]
fn routed_generation_equals_generation_along_the_chosen_paths() {
    let lm = model();
    let prompts = chat_prompts(&lm);
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_ids: lm.stop_ids(),
    };
    // Always execute: exactly the baseline.
    let p = Policy::new(routers(1, Some(1)), 8, 0.0).unwrap();
    let (routed, paths) = route_and_generate(&lm, &prompts, &p, &lens, &opts);
    assert!(paths
        .iter()
        .all(|p| p.cost() == 30 && p.counts().iter().all(|&c| c == 1)));
    let base = generate_fixed(&lm, &prompts, &paths, &opts);
    assert_eq!(routed, base);
    // Random routers: each prompt gets its own path with skips and repeats; decoding along it
    // equals plain generation along the same fixed paths, token for token.
    let p = Policy::new(routers(2, None), 8, 0.0).unwrap();
    let (routed, paths) = route_and_generate(&lm, &prompts, &p, &lens, &opts);
    let counts: Vec<&[u8]> = paths.iter().map(|p| p.counts()).collect();
    assert!(counts.iter().flat_map(|c| c.iter()).any(|&c| c == 0));
    assert!(counts.iter().flat_map(|c| c.iter()).any(|&c| c == 2));
    let fixed = generate_fixed(&lm, &prompts, &paths, &opts);
    for (i, (a, b)) in routed.iter().zip(&fixed).enumerate() {
        assert_eq!(a.tokens, b.tokens, "prompt {i} along {}", paths[i]);
    }
    // Each prompt routed alone chooses the same path as in the batch (padding is ignored).
    for i in 0..prompts.len() {
        let one = &prompts[i..=i];
        let (_, alone) = route_and_generate(&lm, one, &p, &lens[i..=i], &opts);
        assert_eq!(alone[0], paths[i], "prompt {i}");
    }
    // Grouped by path for decoding (routed in batches of 2, decoded in batches of 2 regrouped by
    // path): the same paths and tokens, in prompt order.
    let mut many = prompts.clone();
    many.extend(prompts.iter().map(|p| p[..p.len() - 3].to_vec()));
    let many_lens: Vec<usize> = many.iter().map(Vec::len).collect();
    let mut route = |rows: &[usize], l: usize, h: &Tensor| {
        let lens: Vec<usize> = rows.iter().map(|&r| many_lens[r]).collect();
        p.decide(l, h, &lens)
    };
    let grouped = Paths::RoutedGrouped {
        route: &mut route,
        batch: 2,
    };
    let g = lm
        .model
        .generate(GenerateRequest::new(&many, grouped, opts.clone()))
        .unwrap();
    let (grouped, gpaths) = (g.outputs, g.paths);
    assert_eq!(&gpaths[..3], &paths[..]);
    let fixed = generate_fixed(&lm, &many, &gpaths, &opts);
    for (i, (a, b)) in grouped.iter().zip(&fixed).enumerate() {
        assert_eq!(a.tokens, b.tokens, "prompt {i} along {}", gpaths[i]);
    }
}

fn save(pkg_dir: &Path, r: Routers, fingerprint: &str) {
    save_for(pkg_dir, r, fingerprint, None)
}

/// A package that records the prompts it was trained on (reward, style).
fn save_for(pkg_dir: &Path, r: Routers, fingerprint: &str, prompts: Option<(&str, &str)>) {
    save_with(pkg_dir, r, fingerprint, prompts, vec![])
}

fn save_with(
    pkg_dir: &Path,
    r: Routers,
    fingerprint: &str,
    prompts: Option<(&str, &str)>,
    templates: Vec<drllm_router::TemplateSpec>,
) {
    let shape = r.shape;
    let mut m = PackageManifest::new(fingerprint.into(), "SmolLM2".into(), shape, 8);
    m.prompts = prompts.map(|(reward, style)| drllm_router::PromptSpec {
        reward: reward.into(),
        style: style.into(),
        templates,
    });
    Package {
        manifest: m,
        routers: r,
    }
    .save(pkg_dir)
    .unwrap();
}

fn infer(args: &[&str]) -> (bool, String, String) {
    outcome(
        Command::new(bin("drllm-infer"))
            .args(args)
            .env("DRLLM_LOG", "warn")
            .env("RUST_BACKTRACE", "0"),
    )
}

#[test]
fn drllm_infer_routes_with_a_package_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let fp = ModelSource::Gguf(embedded_gguf()).fingerprint().unwrap();
    let exec = dir.path().join("exec");
    save(&exec, routers(1, Some(1)), &fp);
    let prompt = [
        "--chat",
        "--prompt",
        "Name a mammal that can fly.",
        "--max-new-tokens",
        "8",
        "--json",
    ];
    let (ok, base, e) = infer(&[&["generate"][..], &prompt].concat());
    assert!(ok, "{e}");
    let exec_s = exec.display().to_string();
    let (ok, routed, e) = infer(&[&["generate", "--routers", &exec_s][..], &prompt].concat());
    assert!(ok, "{e}");
    let (b, r): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&base).unwrap(),
        serde_json::from_str(&routed).unwrap(),
    );
    assert_eq!(b["tokens"], r["tokens"]);
    assert_eq!(r["cost"], 30);
    // Skip everywhere at budget -1; --no-routing is the baseline.
    let (ok, out, e) = infer(
        &[
            &["generate", "--routers", &exec_s, "--budget", "-1"][..],
            &prompt,
        ]
        .concat(),
    );
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cost"], 0);
    let (ok, out, e) = infer(
        &[
            &["generate", "--routers", &exec_s, "--no-routing"][..],
            &prompt,
        ]
        .concat(),
    );
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens"], b["tokens"]);

    // Bad input: a budget outside [-1, 1], a package of another model, a missing package,
    // --path together with --routers.
    let (ok, _, e) = infer(&[
        "generate",
        "--routers",
        &exec_s,
        "--budget",
        "1.5",
        "--prompt",
        "x",
    ]);
    assert!(!ok && e.contains("budget 1.5 is outside [-1, 1]"), "{e}");
    let other = dir.path().join("other");
    save(&other, routers(1, Some(1)), "another-model");
    let (ok, _, e) = infer(&[
        "generate",
        "--routers",
        &other.display().to_string(),
        "--prompt",
        "x",
    ]);
    assert!(!ok && e.contains("not this model"), "{e}");
    let (ok, _, e) = infer(&["generate", "--routers", "/nonexistent/pkg", "--prompt", "x"]);
    assert!(!ok && e.contains("no such router package directory"), "{e}");
    let (ok, _, e) = infer(&[
        "generate",
        "--routers",
        &exec_s,
        "--path",
        "1,1",
        "--prompt",
        "x",
    ]);
    assert!(!ok && e.contains("cannot be used with"), "{e}");
}

/// `drllm-infer eval` with routers that always execute: routed answers equal the baseline's on
/// real ARC dev prompts at budget 0 (and cost 0 at budget -1), paired difference exactly 0; a
/// static path is evaluated beside them; the JSON summary, the per-sample Parquet file (read by
/// pandas, with each choice's log-likelihood) and the plot say so. Bad task names, routers
/// trained on other prompts and plot formats are refused.
#[test]
fn eval_compares_routed_and_baseline_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fp = ModelSource::Gguf(embedded_gguf()).fingerprint().unwrap();
    let exec = dir.path().join("exec");
    save(&exec, routers(1, Some(1)), &fp);
    let (json, parquet) = (dir.path().join("s.json"), dir.path().join("s.parquet"));
    let plot = dir.path().join("routing.png");
    let data = data_dir().display().to_string();
    let exec_s = exec.display().to_string();
    let common = [
        "eval",
        "--routers",
        &exec_s,
        "--data",
        &data,
        "--dataset",
        "arc_easy",
        "--split",
        "dev",
        "--limit",
        "6",
        "--max-new-tokens",
        "6",
        "--batch",
        "4",
    ];
    let (j, p, g) = (
        json.display().to_string(),
        parquet.display().to_string(),
        plot.display().to_string(),
    );
    let (ok, out, e) = infer(
        &[
            &common[..],
            &[
                "--budget", "0,-1", "--path", STATIC_3, "--json", &j, "--out", &p, "--plot", &g,
            ],
        ]
        .concat(),
    );
    assert!(ok, "{e}");
    assert!(
        out.contains("baseline") && out.contains("routed +0.00") && out.contains("path -3"),
        "{out}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let t = &s["tasks"][0];
    assert_eq!(t["prompts"], 6);
    let (r0, r1) = (&t["routed"][0], &t["routed"][1]);
    assert_eq!(r0["budget"], 0.0);
    assert_eq!(r0["cost"], 30.0);
    assert_eq!(r0["accuracy"], t["baseline"]["accuracy"]);
    assert_eq!(r0["minus_baseline"]["accuracy"], 0.0);
    assert_eq!(
        r0["minus_baseline"]["paired_ci95"],
        serde_json::json!([0.0, 0.0])
    );
    assert_eq!(r1["cost"], 0.0);
    let st = &t["static"][0];
    assert_eq!(st["cost"], 27.0);
    assert_eq!(st["path"], STATIC_3);
    assert!(st["minus_baseline"]["paired_ci95"].is_array());
    let freq = r0["decision_frequencies"].as_array().unwrap();
    assert_eq!(freq.len(), 30);
    assert!(freq.iter().all(|f| f["execute"] == 1.0));
    assert!(r1["decision_frequencies"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["skip"] == 1.0));
    // The per-cost prompt counts a merge redraws the histogram from.
    let counts: u64 = r1["cost_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_u64().unwrap())
        .sum();
    assert_eq!(counts, 6);
    // merge: one summary gives its table; the same run twice, or a file that is no summary,
    // is refused naming the files.
    let merge = |files: &[&str]| {
        let o = Command::new(bin("drllm-infer"))
            .arg("merge")
            .args(files)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, table, e) = merge(&[&j]);
    assert!(ok, "{e}");
    assert_eq!(table.lines().count(), 2 + 4, "{table}");
    assert!(
        table.contains("| arc_easy | routed | -1.00 | 6 |"),
        "{table}"
    );
    let (ok, _, e) = merge(&[&j, &j]);
    assert!(!ok && e.contains("merge each run once"), "{e}");
    let (ok, _, e) = merge(&[&p]);
    assert!(!ok && e.contains("not JSON"), "{e}");
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let code = format!(
        "import pandas as pd, pyarrow as pa, pyarrow.parquet, json; d = pd.read_parquet({p:?}); \
         b = d[d['mode'] == 'baseline'].reset_index(); r = d[d.budget == 0.0].reset_index(); \
         print(json.dumps({{'n': len(d), 'same': bool((b.response == r.response).all()), \
         'cols': list(d.columns), 'acc': float(r.correct.mean()), \
         'skip_cost': int(d[d.budget == -1.0].cost.max()), \
         'static': int((d['mode'] == 'static').sum()), \
         'choices': int(d.choice_logliks.map(len).min()), \
         'path_cost': bool((d.path.map(sum) == d.cost).all()), \
         'path_len': sorted(set(d.path.map(len))), \
         'path_type': str(pa.parquet.read_schema({p:?}).field('path').type), \
         'gold': sorted(set(d.gold)), 'model': sorted(set(d.model)), \
         'fps': [sorted(set(d.model_fingerprint)), sorted(set(d.routers_fingerprint))]}}))"
    );
    let o = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 24);
    assert_eq!(v["static"], 6);
    assert!(v["choices"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["same"], true);
    assert_eq!(v["skip_cost"], 0);
    assert_eq!(v["acc"].as_f64().unwrap(), r0["accuracy"].as_f64().unwrap());
    // Paths as the paths dataset stores them: one uint8 count per block.
    assert_eq!(v["path_type"], "list<item: uint8>");
    assert_eq!(v["path_len"], serde_json::json!([30]));
    assert_eq!(v["path_cost"], true);
    assert!(
        v["gold"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| ["A", "B", "C", "D", "E", "1", "2", "3", "4"].contains(&g.as_str().unwrap())),
        "{v}"
    );
    assert_eq!(v["model"], serde_json::json!([s["model"]]));
    assert_eq!(v["fps"][0], serde_json::json!([s["model_fingerprint"]]));
    assert_eq!(v["fps"][1], serde_json::json!([s["routers_fingerprint"]]));
    assert_eq!(s["routers_fingerprint"].as_str().unwrap().len(), 24);
    for c in [
        "task",
        "sample_id",
        "mode",
        "budget",
        "path",
        "cost",
        "correct",
        "choice_logliks",
    ] {
        assert!(v["cols"].as_array().unwrap().iter().any(|x| x == c), "{c}");
    }

    let (ok, _, e) = infer(&[
        "eval",
        "--routers",
        &exec_s,
        "--dataset",
        "arc_hard",
        "--limit",
        "2",
    ]);
    assert!(!ok && e.contains("arc_hard"), "{e}");
    // Routers trained on lenient (instruct) prompts are not used on cloze prompts, and are
    // with the reward they were trained on.
    let lenient = dir.path().join("lenient");
    save_for(
        &lenient,
        routers(1, Some(1)),
        &fp,
        Some(("lenient", "instruct")),
    );
    let l = lenient.display().to_string();
    let mut other = common.to_vec();
    other[2] = &l;
    let (ok, _, e) = infer(&other);
    assert!(
        !ok && e.contains("trained on prompts of reward lenient and style instruct"),
        "{e}"
    );
    let (ok, _, e) = infer(&[&other[..], &["--reward", "lenient"]].concat());
    assert!(ok, "{e}");
    // Routers trained on prompts rendered with an own template are refused on the built-in
    // one, and used with that template file.
    let source = "Q: {{ question }}\nA:";
    let own = dir.path().join("own.j2");
    std::fs::write(&own, source).unwrap();
    let templated = dir.path().join("templated");
    let spec = drllm_router::TemplateSpec {
        family: "multiple_choice".into(),
        name: own.display().to_string(),
        source: source.into(),
    };
    save_with(
        &templated,
        routers(1, Some(1)),
        &fp,
        Some(("cloze", "base")),
        vec![spec],
    );
    let t = templated.display().to_string();
    let mut other = common.to_vec();
    other[2] = &t;
    let (ok, _, e) = infer(&other);
    assert!(
        !ok && e.contains("rendered with the template") && e.contains("own.j2"),
        "{e}"
    );
    let own_s = own.display().to_string();
    let (ok, _, e) = infer(&[&other[..], &["--template", &own_s]].concat());
    assert!(ok, "{e}");
    // A package recording an older built-in source (the cloze template before it learned the
    // commonsense tasks) routes ARC prompts, which both render alike.
    let older = dir.path().join("older");
    let spec = drllm_router::TemplateSpec {
        family: "multiple_choice".into(),
        name: "mc_cloze".into(),
        source: "Question: {{ question }}\nAnswer:".into(),
    };
    save_with(
        &older,
        routers(1, Some(1)),
        &fp,
        Some(("cloze", "base")),
        vec![spec],
    );
    let o = older.display().to_string();
    let mut other = common.to_vec();
    other[2] = &o;
    let (ok, _, e) = infer(&other);
    assert!(ok, "{e}");
    let (ok, _, e) = infer(&[&common[..], &["--path", "1,1"]].concat());
    assert!(!ok && e.contains("--path 1,1"), "{e}");
    let (ok, _, e) = infer(&[&common[..], &["--plot", "r.pdf"]].concat());
    assert!(
        !ok && e.contains("expected a file name ending in .png or .svg"),
        "{e}"
    );
    let (ok, _, e) = infer(&[&common[..], &["--budget", "0,-2"]].concat());
    assert!(!ok && e.contains("budget -2 is outside [-1, 1]"), "{e}");
}

/// The budget knob on 20 real ARC dev prompts: the average cost of the chosen paths never rises
/// as the budget moves toward skip (0 to -1, where every block is skipped); toward execute (0 to
/// 1) fewer blocks leave execute, and at 1 every path is the baseline's, with its accuracy.
#[test]
fn budget_runs_from_all_skip_through_the_routers_to_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let fp = ModelSource::Gguf(embedded_gguf()).fingerprint().unwrap();
    let pkg = dir.path().join("random");
    save(&pkg, routers(3, None), &fp);
    let json = dir.path().join("s.json");
    let budgets = [1.0, 0.9, 0.6, 0.3, 0.0, -0.1, -0.3, -0.6, -1.0];
    let list: Vec<String> = budgets.iter().map(|b| b.to_string()).collect();
    let (ok, out, e) = infer(&[
        "eval",
        "--routers",
        &pkg.display().to_string(),
        "--data",
        &data_dir().display().to_string(),
        "--dataset",
        "arc_easy",
        "--limit",
        "20",
        "--budget",
        &list.join(","),
        "--json",
        &json.display().to_string(),
    ]);
    assert!(ok, "{e}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let t = &s["tasks"][0];
    assert_eq!(t["prompts"], 20);
    let routed = t["routed"].as_array().unwrap();
    assert_eq!(routed.len(), budgets.len());
    let costs: Vec<f64> = routed.iter().map(|r| r["cost"].as_f64().unwrap()).collect();
    // Toward skip: the cost falls to 0.
    assert_eq!(costs[budgets.len() - 1], 0.0, "{out}");
    for w in costs[4..].windows(2) {
        assert!(w[1] <= w[0], "cost rose toward skip: {costs:?}\n{out}");
    }
    // Toward execute: the share of decisions other than execute falls to 0 at budget 1,
    // where routed accuracy is the baseline's.
    let off: Vec<f64> = routed[..5]
        .iter()
        .map(|r| {
            r["decision_frequencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| 1.0 - f["execute"].as_f64().unwrap())
                .sum::<f64>()
        })
        .collect();
    // Each decision is monotone in the budget for a given hidden state, but a decision changes
    // the states later blocks are routed on, so the aggregate may wobble between neighbouring
    // budgets (seen once: 19.8 then 19.35 of 30 blocks, with thread-dependent rounding): allow
    // 5% of the budget-0 level, and require the trend.
    let slack = 0.05 * off[4];
    for w in off.windows(2) {
        assert!(w[0] <= w[1] + slack, "toward execute: {off:?}\n{out}");
    }
    assert!(off[1] < off[4], "toward execute: {off:?}\n{out}");
    assert!(off[0].abs() < 1e-9, "{off:?}");
    assert_eq!(costs[0], 30.0);
    assert_eq!(routed[0]["accuracy"], t["baseline"]["accuracy"]);
    assert_eq!(routed[0]["minus_baseline"]["accuracy"], 0.0);
    // The plain routers skip and repeat.
    assert!(off[4] > 0.0, "{off:?}");
}

/// The controls of issue 31 on real PIQA and BoolQ dev prompts: fixed paths alone (no router
/// package), per-task paths, pooled rows, and with the reference routers the permuted and random
/// controls (the routed paths' mix, resp. their costs), each paired with the baseline and with
/// the routers; flags that cannot apply are refused by name.
#[test]
fn eval_controls_tell_routing_from_static_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_dir().display().to_string();
    let json = dir.path().join("s.json");
    let j = json.display().to_string();
    let piqa_path = format!("piqa={STATIC_3}");
    let boolq_path = format!(
        "boolq={}",
        (0..30)
            .map(|i| if i == 26 { "0" } else { "1" })
            .collect::<Vec<_>>()
            .join(",")
    );
    let common = [
        "eval",
        "--data",
        &data,
        "--dataset",
        "piqa,boolq",
        "--limit",
        "4",
        "--batch",
        "4",
    ];
    let (ok, out, e) = infer(
        &[
            &common[..],
            &[
                "--path",
                STATIC_3,
                "--task-path",
                &piqa_path,
                "--task-path",
                &boolq_path,
                "--json",
                &j,
            ],
        ]
        .concat(),
    );
    assert!(ok, "{e}");
    assert!(
        out.contains("routers none") && out.contains("task path #1"),
        "{out}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(s["routers"].is_null() && s["routers_fingerprint"].is_null());
    let (piqa, boolq, pooled) = (&s["tasks"][0], &s["tasks"][1], &s["pooled"]);
    assert_eq!(piqa["static"].as_array().unwrap().len(), 2);
    assert_eq!(piqa["static"][1]["mode"], "per_task_static");
    assert_eq!(piqa["static"][1]["cost"], 27.0);
    assert_eq!(boolq["static"][1]["cost"], 29.0);
    assert_eq!(pooled["prompts"], 8);
    // Pooled: the per-task path set costs the mean of its paths' costs over all prompts.
    assert_eq!(pooled["static"][1]["cost"], 28.0);
    let mean = |k: &str| {
        (piqa["baseline"][k].as_f64().unwrap() + boolq["baseline"][k].as_f64().unwrap()) / 2.0
    };
    assert!((pooled["baseline"]["accuracy"].as_f64().unwrap() - mean("accuracy")).abs() < 1e-12);
    assert!(piqa["static"][0]["routed_minus_this"].is_null());

    // The same prompts evaluated one task per run and pooled: eval's own pooled figures.
    let mut files = vec![];
    for (task, tp) in [("piqa", &piqa_path), ("boolq", &boolq_path)] {
        let out = dir.path().join(format!("{task}.parquet"));
        let o = out.display().to_string();
        let (ok, _, e) = infer(&[
            "eval",
            "--data",
            &data,
            "--dataset",
            task,
            "--limit",
            "4",
            "--batch",
            "4",
            "--path",
            STATIC_3,
            "--task-path",
            tp,
            "--out",
            &o,
        ]);
        assert!(ok, "{e}");
        files.push(o);
    }
    let pooled_json = dir.path().join("pooled.json");
    let pj = pooled_json.display().to_string();
    let (ok, out, e) = infer(&["pool", &files[0], &files[1], "--json", &pj]);
    assert!(ok, "{e}");
    assert!(out.contains("| pooled | per-task static | 8 |"), "{out}");
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pooled_json).unwrap()).unwrap();
    let row = |task: &str, mode: &str| {
        p["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["task"] == task && r["mode"] == mode)
            .unwrap_or_else(|| panic!("no {task} {mode} in {p}"))
            .clone()
    };
    let b = row("pooled", "baseline");
    assert_eq!(b["accuracy"], pooled["baseline"]["accuracy"]);
    assert_eq!(b["ci95"], pooled["baseline"]["ci95"]);
    let skips = STATIC_3
        .split(',')
        .enumerate()
        .filter(|(_, c)| *c == "0")
        .map(|(i, _)| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for (mode, k) in [
        (format!("static -{skips}"), 0),
        ("per-task static".into(), 1),
    ] {
        let r = row("pooled", &mode);
        let want = &pooled["static"][k]["minus_baseline"];
        assert_eq!(r["minus_baseline"][0], want["accuracy"], "{mode}");
        assert_eq!(
            r["minus_baseline"].as_array().unwrap()[1..],
            want["paired_ci95"].as_array().unwrap()[..],
            "{mode}"
        );
        assert_eq!(r["cost"], pooled["static"][k]["cost"], "{mode}");
    }
    let oracle = row("pooled", "oracle (any mode but the baseline)");
    assert!(
        oracle["accuracy"].as_f64().unwrap()
            >= row("pooled", "per-task static")["accuracy"]
                .as_f64()
                .unwrap()
                - 1e-12
    );
    // A run given twice, and a file that is not an eval's, are refused by name.
    let (ok, _, e) = infer(&["pool", &files[0], &files[0]]);
    assert!(!ok && e.contains("both hold piqa static"), "{e}");
    let (ok, _, e) = infer(&["pool", &j]);
    assert!(!ok && e.contains("s.json: not Parquet"), "{e}");

    for (flags, want) in [
        (vec!["--budget", "0"], "pass --routers too"),
        (vec!["--control", "permuted"], "pass --routers too"),
        (vec!["--task-path", &piqa_path], "no path for boolq"),
        (
            vec!["--task-path", "arc_easy=1,1"],
            "arc_easy is not among the evaluated tasks",
        ),
        (vec!["--task-path", "piqa"], "expected TASK=COUNTS"),
        (
            vec!["--control", "shuffled", "--routers", "embedded"],
            "shuffled",
        ),
    ] {
        let (ok, _, e) = infer(&[&common[..], &flags[..]].concat());
        assert!(!ok && e.contains(want), "{flags:?}: {e}");
    }

    // The reference routers with both controls.
    let parquet = dir.path().join("c.parquet");
    let p = parquet.display().to_string();
    let (ok, out, e) = infer(&[
        "eval",
        "--data",
        &data,
        "--dataset",
        "piqa",
        "--limit",
        "12",
        "--routers",
        "embedded",
        "--control",
        "permuted,random",
        "--json",
        &j,
        "--out",
        &p,
    ]);
    assert!(ok, "{e}");
    assert!(
        out.contains("permuted +0.00") && out.contains("random +0.00"),
        "{out}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let t = &s["tasks"][0];
    let routed = &t["routed"][0];
    for c in t["controls"].as_array().unwrap() {
        assert_eq!(c["cost"], routed["cost"], "{c}");
        assert!(c["routed_minus_this"]["paired_ci95"].is_array(), "{c}");
        assert!(c["minus_baseline"]["paired_ci95"].is_array(), "{c}");
    }
    // Pooling the one file gives the controls' pairings with the routers as eval did.
    let pooled_json = dir.path().join("controls.json");
    let pj = pooled_json.display().to_string();
    let (ok, _, e) = infer(&["pool", &p, "--json", &pj]);
    assert!(ok, "{e}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pooled_json).unwrap()).unwrap();
    for c in t["controls"].as_array().unwrap() {
        let mode = format!("{} +0.00", c["mode"].as_str().unwrap());
        let r = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["mode"] == mode.as_str())
            .unwrap_or_else(|| panic!("no {mode} in {v}"));
        assert_eq!(
            r["routed_minus_this"][0], c["routed_minus_this"]["accuracy"],
            "{mode}"
        );
        assert_eq!(
            r["routed_minus_this"].as_array().unwrap()[1..],
            c["routed_minus_this"]["paired_ci95"].as_array().unwrap()[..],
            "{mode}"
        );
    }
    let code = format!(
        "import pandas as pd, json; d = pd.read_parquet({p:?}); \
         r = d[d['mode'] == 'routed'].reset_index(); q = d[d['mode'] == 'permuted'].reset_index(); \
         x = d[d['mode'] == 'random'].reset_index(); k = lambda s: sorted(tuple(v) for v in s); \
         print(json.dumps({{'mix': k(r.path) == k(q.path), 'n': [len(r), len(q), len(x)], \
         'cost': bool((r.cost == x.cost).all()), \
         'moved': int(sum(tuple(a) != tuple(b) for a, b in zip(r.path, q.path))), \
         'ids': bool((r.sample_id == q.sample_id).all())}}))"
    );
    let o = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], serde_json::json!([12, 12, 12]));
    assert_eq!(v["mix"], true, "{v}");
    assert_eq!(v["cost"], true, "{v}");
    assert_eq!(v["ids"], true, "{v}");
    assert!(v["moved"].as_u64().unwrap() > 0, "{v}");
}
