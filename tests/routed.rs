//! Routed generation: paths chosen by routers once per prompt during prefill, then decoding
//! along them; checked against plain generation along the same paths, and through the CLI.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::runtime::tch::{self, Device, Kind, Tensor};
use drllm::runtime::{GenerateOptions, LoadedModel, ModelSource};
use drllm_router::{Package, PackageManifest, Policy, RouterShape, Routers};

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
    let (routed, paths) = lm
        .model
        .generate_routed(&prompts, &mut |l, h| p.decide(l, h, &lens), &opts)
        .unwrap();
    assert!(paths
        .iter()
        .all(|p| p.cost() == 30 && p.counts().iter().all(|&c| c == 1)));
    let base = lm.model.generate(&prompts, &paths, &opts).unwrap();
    assert_eq!(routed, base);
    // Random routers: each prompt gets its own path with skips and repeats; decoding along it
    // equals plain generation along the same fixed paths, token for token.
    let p = Policy::new(routers(2, None), 8, 0.0).unwrap();
    let (routed, paths) = lm
        .model
        .generate_routed(&prompts, &mut |l, h| p.decide(l, h, &lens), &opts)
        .unwrap();
    let counts: Vec<&[u8]> = paths.iter().map(|p| p.counts()).collect();
    assert!(counts.iter().flat_map(|c| c.iter()).any(|&c| c == 0));
    assert!(counts.iter().flat_map(|c| c.iter()).any(|&c| c == 2));
    let fixed = lm.model.generate(&prompts, &paths, &opts).unwrap();
    for (i, (a, b)) in routed.iter().zip(&fixed).enumerate() {
        assert_eq!(a.tokens, b.tokens, "prompt {i} along {}", paths[i]);
    }
    // Each prompt routed alone chooses the same path as in the batch (padding is ignored).
    for i in 0..prompts.len() {
        let one = &prompts[i..=i];
        let (_, alone) = lm
            .model
            .generate_routed(one, &mut |l, h| p.decide(l, h, &lens[i..=i]), &opts)
            .unwrap();
        assert_eq!(alone[0], paths[i], "prompt {i}");
    }
}

fn save(pkg_dir: &Path, r: Routers, fingerprint: &str) {
    let shape = r.shape;
    let m = PackageManifest::new(fingerprint.into(), "SmolLM2".into(), shape, 8);
    Package {
        manifest: m,
        routers: r,
    }
    .save(pkg_dir)
    .unwrap();
}

fn infer(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin("drllm-infer"))
        .args(args)
        .env("DRLLM_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
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
/// real ARC dev prompts; the JSON summary and the per-sample Parquet file (read by pandas) say
/// so. Bad task names and reward modes are refused.
#[test]
fn eval_compares_routed_and_baseline_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fp = ModelSource::Gguf(embedded_gguf()).fingerprint().unwrap();
    let exec = dir.path().join("exec");
    save(&exec, routers(1, Some(1)), &fp);
    let (json, parquet) = (dir.path().join("s.json"), dir.path().join("s.parquet"));
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
    let (j, p) = (json.display().to_string(), parquet.display().to_string());
    let (ok, out, e) = infer(&[&common[..], &["--json", &j, "--out", &p]].concat());
    assert!(ok, "{e}");
    assert!(out.contains("baseline") && out.contains("routed"), "{out}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(s["prompts"], 6);
    assert_eq!(s["routed"]["cost"], 30.0);
    assert_eq!(s["routed"]["accuracy"], s["baseline"]["accuracy"]);
    let freq = s["decision_frequencies"].as_array().unwrap();
    assert_eq!(freq.len(), 30);
    assert!(freq.iter().all(|f| f["execute"] == 1.0));
    let code = format!(
        "import pandas as pd, json; d = pd.read_parquet({p:?}); \
         print(json.dumps({{'n': len(d), 'same': bool((d.baseline_response == d.routed_response).all()), \
         'cols': list(d.columns), 'acc': float(d.routed_correct.mean())}}))"
    );
    let o = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 6);
    assert_eq!(v["same"], true);
    assert_eq!(
        v["acc"].as_f64().unwrap(),
        s["routed"]["accuracy"].as_f64().unwrap()
    );
    assert!(v["cols"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "routed_path"));

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
    let (ok, _, e) = infer(&[&common[..], &["--reward", "choice-logits"]].concat());
    assert!(!ok && e.contains("use strict or lenient"), "{e}");
}
