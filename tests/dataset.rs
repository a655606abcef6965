//! The paths dataset as users open it: pandas `read_parquet(OUT/data)` and Polars
//! `scan_parquet(OUT/data/**/*.parquet, hive_partitioning=True)` read exactly the committed rows,
//! with the documented types and values, and never the manifest, staging files or `_SUCCESS`.
mod common;

use std::process::Command;

use common::*;
use drllm::dataset::LayerPath;
use drllm::dist::{Dataset, PathRecord};

fn record(task: &str, i: usize) -> PathRecord {
    let found = i % 3 != 2;
    let mut counts = vec![1u8; 30];
    counts[i % 30] = 0;
    counts[(i + 5) % 30] = 2;
    counts[(i + 9) % 30] = 0;
    let best = LayerPath::from_counts(counts).unwrap();
    PathRecord {
        sample_id: format!("{task}-{i:03}"),
        task: task.into(),
        split: "train".into(),
        question: format!("Question {i} with unicode: café ∑ \"quotes\""),
        answer: "C".into(),
        prompt: format!("<|im_start|>user\nQuestion {i}<|im_end|>\n<|im_start|>assistant\n"),
        model: "SmolLM2-135M-Instruct".into(),
        num_layers: 30,
        default_correct: i.is_multiple_of(2),
        found,
        improved: found && i % 2 == 1,
        best_path: found.then(|| best.clone()),
        good_paths: if found {
            vec![best.clone(), LayerPath::all_ones(30)]
        } else {
            vec![]
        },
        simulations: 50,
        evaluations: 20 + i as u32,
        search_ms: 1000 + i as u64,
        worker: format!("w{}", i % 2),
        seed: u64::MAX - i as u64,
        best_response: found.then(|| "C".into()),
    }
}

#[test]
fn pandas_and_polars_read_the_dataset_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = serde_json::json!({"tasks": ["arc_easy", "dart-1"], "seed": 7});
    let mut ds = Dataset::open(&out, "fp", cfg, false).unwrap();
    let mut all = vec![];
    for (task, n) in [("arc_easy", 5), ("dart-1", 4)] {
        let rows: Vec<PathRecord> = (0..n).map(|i| record(task, i)).collect();
        for r in &rows {
            r.validate(30).unwrap();
        }
        // Two parts per task.
        ds.commit(task, &rows[..2]).unwrap();
        ds.commit(task, &rows[2..]).unwrap();
        all.extend(rows);
    }
    ds.finish().unwrap();
    assert!(out.join("_SUCCESS").exists() && out.join("_manifest.json").exists());

    let o = Command::new(python())
        .arg(root().join("tests/reference/read_dataset.py"))
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    all.sort_by(|a, b| (&a.task, &a.sample_id).cmp(&(&b.task, &b.sample_id)));
    // Every field, and the two columns derived from the best path.
    let expect: Vec<serde_json::Value> = all
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap();
            v["best_cost"] = serde_json::json!(r.best_cost());
            v["best_layers"] = serde_json::json!(r.best_layers());
            v
        })
        .collect();
    assert_eq!(expect[0]["best_cost"], 29);
    for reader in ["pandas", "polars"] {
        let got = &v[reader];
        assert_eq!(got["rows"], all.len(), "{reader}");
        let data = got["data"].as_array().unwrap();
        for (g, e) in data.iter().zip(&expect) {
            for (k, ev) in e.as_object().unwrap() {
                assert_eq!(&g[k], ev, "{reader}: column {k} of {}", e["sample_id"]);
            }
        }
    }
    // Hugging Face `datasets` through the card: one config per task, every field.
    let hf = &v["datasets"];
    assert_eq!(
        hf["configs"],
        serde_json::json!(["arc_easy", "dart-1"]),
        "{}",
        std::fs::read_to_string(out.join("README.md")).unwrap()
    );
    for (config, want) in [("arc_easy", 5), ("dart-1", 4)] {
        let got = &hf[config];
        assert_eq!(got["split"], "train", "{config}");
        assert_eq!(got["rows"], want, "{config}");
        assert_eq!(
            got["features"]["best_path"], "List(Value('uint8'))",
            "{config}"
        );
        let expect_task: Vec<&serde_json::Value> =
            expect.iter().filter(|e| e["task"] == config).collect();
        for (g, e) in got["data"].as_array().unwrap().iter().zip(expect_task) {
            for (k, ev) in e.as_object().unwrap() {
                if k != "task" {
                    assert_eq!(
                        &g[k], ev,
                        "datasets {config}: column {k} of {}",
                        e["sample_id"]
                    );
                }
            }
        }
    }
    let pl = &v["polars"]["dtypes"];
    for (col, t) in [
        ("best_path", "List(UInt8)"),
        ("best_layers", "List(UInt16)"),
        ("good_paths", "List(List(UInt8))"),
        ("num_layers", "UInt16"),
        ("best_cost", "UInt32"),
        ("seed", "UInt64"),
        ("default_correct", "Boolean"),
        ("task", "String"),
    ] {
        assert_eq!(pl[col], t, "polars type of {col}");
    }
    let pd = &v["pandas"]["dtypes"];
    for (col, t) in [
        ("num_layers", "uint16"),
        ("seed", "uint64"),
        ("found", "bool"),
    ] {
        assert_eq!(pd[col], t, "pandas type of {col}");
    }
}
