//! The README's main command, `scripts/quickstart.sh`, end to end with small limits: path search
//! (coordinator + 2 workers) on ARC-Easy, router training, and the validation run on held-out
//! ARC-Easy dev prompts (baseline, static paths, routers, the reference routers) with its JSON
//! summary, Parquet file and plot.
mod common;

use std::process::Command;

use common::*;

fn quickstart(args: &[&str], feature_cache: &std::path::Path) -> (bool, String, String) {
    outcome(
        Command::new("bash")
            .arg(root().join("scripts/quickstart.sh"))
            .args(args)
            .current_dir(root())
            // The test command has built everything already.
            .env("DRLLM_QUICKSTART_NO_BUILD", "1")
            .env("PYTHON", python())
            .env("DRLLM_FEATURE_CACHE", feature_cache)
            .env("DRLLM_LOG", "warn")
            .env("RUST_BACKTRACE", "0"),
    )
}

#[test]
fn quickstart_runs_the_whole_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qs");
    let (o, d) = (out.display().to_string(), data_dir().display().to_string());
    let cache = dir.path().join("features");
    let args = [
        "--data",
        &d,
        "--out",
        &o,
        "--arc",
        "12",
        "--dev",
        "8",
        "--sims",
        "20",
        "--budgets",
        "0,-0.5",
    ];
    let (ok, stdout, stderr) = quickstart(&args, &cache);
    assert!(ok, "{stdout}\n{stderr}");
    for want in [
        "reward: cloze",
        "12 prompts searched",
        "labels: skip",
        "epoch",
        "baseline",
        "static -3",
        "static -6",
        "routed +0.0",
        "routed -0.5",
        "the reference routers",
        "reference run (docs/benchmarks.md)",
        "plot: ",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from\n{stdout}");
    }
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(e["tasks"][0]["task"], "arc_easy");
    assert_eq!(e["split"], "dev");
    assert_eq!(e["tasks"][0]["prompts"], 8);
    assert_eq!(e["tasks"][0]["routed"].as_array().unwrap().len(), 2);
    assert_eq!(e["tasks"][0]["static"].as_array().unwrap().len(), 2);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval-reference.json")).unwrap())
            .unwrap();
    assert_eq!(r["tasks"][0]["prompts"], 8);
    assert_eq!(
        &std::fs::read(out.join("routing.png")).unwrap()[1..4],
        b"PNG"
    );
    assert!(out.join("eval.parquet").is_file());

    // A rerun with the same flags reuses the searches (nothing left to search).
    let (ok, stdout, stderr) = quickstart(&args, &cache);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("12 already committed"), "{stderr}");

    // A data directory without the files is named.
    let (ok, _, stderr) = quickstart(&["--data", "/nonexistent", "--out", &o], &cache);
    assert!(
        !ok && stderr.contains("/nonexistent/arc/ARC-Easy-Train.jsonl not found"),
        "{stderr}"
    );
}
