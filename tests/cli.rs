//! End-to-end tests of the `drllm-infer` binary on the embedded model: the happy path and bad
//! input (each must fail with a clear message naming the file/field, never a panic).
mod common;

use std::process::{Command, Output};

use common::*;

fn infer(args: &[&str]) -> Output {
    Command::new(bin("drllm-infer"))
        .args(args)
        .env("DRLLM_LOG", "warn")
        .output()
        .expect("run drllm-infer")
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let o = infer(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    err
}

#[test]
fn generates_json_along_a_path() {
    let mut path = vec!["1"; 30];
    path[4] = "2";
    path[25] = "0";
    path[28] = "0";
    let path = path.join(",");
    let o = infer(&[
        "generate",
        "--prompt",
        "What is 2+3?",
        "--prompt",
        "Name a primary color.",
        "--chat",
        "--path",
        &path,
        "--max-new-tokens",
        "12",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["cost"], 29);
        assert_eq!(l["layers"], 30);
        assert_eq!(l["path"], path.as_str());
        let n = l["tokens"].as_array().unwrap().len();
        assert!((1..=12).contains(&n), "{l}");
        assert!(!l["text"].as_str().unwrap().is_empty());
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tokens/s") && err.contains("path cost 29/30"),
        "{err}"
    );
}

#[test]
fn help_has_examples() {
    let o = infer(&["generate", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("Examples:") && out.contains("--path"),
        "{out}"
    );
    // Every binary's --help shows examples.
    for b in [
        "drllm-infer",
        "drllm-data",
        "drllm-worker",
        "drllm-coordinator",
        "drllm-infer-bench",
        "drllm-data-bench",
        "drllm-worker-bench",
        "drllm-dist-bench",
        "drllm-train",
        "drllm-train-bench",
        "drllm-search-bench",
    ] {
        let o = std::process::Command::new(bin(b))
            .arg("--help")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("Examples:"),
            "{b}: {out}"
        );
    }
}

#[test]
fn bad_paths_are_rejected() {
    let err = fails(&["generate", "--prompt", "hi", "--path", "1,1,0"]);
    assert!(
        err.contains("path has 3 entries but the model has 30 blocks"),
        "{err}"
    );
    let mut p = vec!["1"; 30];
    p[7] = "3";
    let err = fails(&["generate", "--prompt", "hi", "--path", &p.join(",")]);
    assert!(err.contains("block 7 has count 3"), "{err}");
    let err = fails(&["generate", "--prompt", "hi", "--path", "1,a"]);
    assert!(err.contains("entry 1") && err.contains("\"a\""), "{err}");
}

#[test]
fn bad_models_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        "/nonexistent/model-dir",
    ]);
    assert!(
        err.contains("/nonexistent/model-dir") && err.contains("no such file or directory"),
        "{err}"
    );

    // A GGUF cut short: the error names the file and what was being read.
    let gguf = std::fs::read(embedded_gguf()).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() / 2]).unwrap();
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        cut.to_str().unwrap(),
    ]);
    assert!(
        err.contains("cut.gguf")
            && err.contains("truncated GGUF")
            && err.contains("data of tensor"),
        "{err}"
    );

    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        junk.to_str().unwrap(),
    ]);
    assert!(
        err.contains("junk.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );

    let empty_dir = tmp.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        empty_dir.to_str().unwrap(),
    ]);
    assert!(err.contains("neither config.json"), "{err}");
}

/// Inputs that used to panic inside libtorch or run silently past the model's context.
#[test]
fn bad_requests_are_refused_not_panicked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.safetensors");
    let ids = tmp.path().join("ids.json");
    // The last one is longer than the model's context (8,192 tokens): refused with the
    // lengths, before any compute.
    let too_long = serde_json::to_string(&vec![vec![1u32; 9000]]).unwrap();
    for (text, want) in [
        ("[]", &["no prompts"][..]),
        ("[[]]", &["prompt 0 is empty"]),
        ("[[1, 2], [99999999]]", &["outside the vocabulary"]),
        (too_long.as_str(), &["9000 tokens", "context is 8192"]),
    ] {
        std::fs::write(&ids, text).unwrap();
        let err = fails(&[
            "logits",
            "--ids-file",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            err.contains("ids.json") && want.iter().all(|w| err.contains(w)),
            "{}: {err}",
            &text[..text.len().min(40)]
        );
    }
    let long = "word ".repeat(8200);
    let err = fails(&["generate", "--prompt", &long, "--max-new-tokens", "4"]);
    assert!(err.contains("context is 8192"), "{err}");
    // Zero threads (libtorch would abort) and more threads than CPUs (100,000 spawned OpenMP
    // threads for minutes): refused before anything loads, naming the flag.
    for n in ["0", "100000", "NaN"] {
        let err = fails(&["generate", "--prompt", "hi", "--threads", n]);
        assert!(
            err.contains("--threads") && err.contains("expected"),
            "{err}"
        );
    }
    // Flags are checked before the model loads.
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--routers",
        tmp.path().join("nope").to_str().unwrap(),
        "--model",
        "/nonexistent/model",
    ]);
    assert!(err.contains("no such router package directory"), "{err}");
}

#[test]
fn cuda_without_gpu_is_a_clear_error() {
    if drllm::runtime::tch::Cuda::is_available() {
        return; // GPU machines: covered by scripts/gpu-check.sh.
    }
    let err = fails(&["generate", "--prompt", "hi", "--device", "cuda"]);
    assert!(
        err.contains("CUDA was requested but libtorch sees no GPU"),
        "{err}"
    );
    let err = fails(&["generate", "--prompt", "hi", "--device", "tpu"]);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    let err = fails(&[
        "generate", "--prompt", "hi", "--device", "cpu", "--dtype", "f8",
    ]);
    assert!(
        err.contains("f8") && err.contains("auto, f32, bf16, f16"),
        "{err}"
    );
}

#[test]
fn cli_docs_are_current() {
    let dir = bin("drllm-infer").parent().unwrap().to_path_buf();
    let o = Command::new("bash")
        .arg(root().join("scripts/gen-cli-docs.sh"))
        .arg("--check")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The prepared GPU check runs end to end on CPU with a tiny model, so it works when a GPU
/// machine is lent (where it runs the LLaMA-3.2-3B shape on CUDA).
#[test]
fn gpu_check_script_runs_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(root().join("scripts/gpu-check.sh"))
        .arg(bin("drllm-infer"))
        .env("PYTHON", python())
        .env("GPU_CHECK_SHAPE", "tiny")
        .env("GPU_CHECK_DEVICE", "cpu")
        .env("GPU_CHECK_DATA", data_dir())
        .env("OUT", tmp.path())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(tmp.path().join("gpu-check.log")).unwrap_or_default();
    assert!(
        o.status.success() && log.contains("GPU PARITY: PASS") && log.contains("peak RSS"),
        "{log}"
    );
}
