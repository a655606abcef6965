//! The paths dataset a run produces: hive-partitioned Parquet parts under `OUT/data/task=<task>/`
//! (zstd, one row per sample), and `OUT/_manifest.json` (run config, model fingerprint, code
//! version, counts, the committed parts) plus `OUT/_SUCCESS` at the root, outside `data/`, so
//! `pl.scan_parquet("OUT/data/**/*.parquet", hive_partitioning=True)` and
//! `pd.read_parquet("OUT/data")` read only data.
//!
//! Commit protocol (nothing committed is ever lost, nothing half-written is ever read): a part is
//! written under `OUT/_staging/`, fsync'd, renamed into `data/` (atomic), the directory fsync'd,
//! then the manifest is rewritten the same way (temp file, fsync, rename). A crash between the
//! rename and the manifest update leaves a complete part the manifest does not list yet; the
//! next open adopts it. Staging leftovers are deleted on open.
#![warn(missing_docs)]

mod card;
mod codec;
mod error;
mod integrity;
mod manifest;
mod row;
mod store;

pub use card::dataset_card;
pub use codec::{read_rows, schema, to_batch};
pub use error::DatasetError;
pub use integrity::{file_sha256, verify, Checked, VerifyReport, CONTENT_KEY};
pub use manifest::{config_diff, read_manifest, FailedSample, Manifest, PartInfo, FORMAT_VERSION};
pub use row::{PathRecord, RowError};
pub use store::Dataset;

#[allow(unused_imports)]
pub(crate) use card::{CARD_COLUMNS, CARD_MARKER};
#[allow(unused_imports)]
pub(crate) use codec::from_batch;
pub(crate) use error::{io, Result};
#[allow(unused_imports)]
pub(crate) use store::{check_stray, lock_out, sync_dir, write_atomic};

/// The path type rows hold (re-exported so readers of rows need not name `drllm-path`).
pub use drllm_path::LayerPath;

/// Rows shaped like real search outcomes, for the tests and benchmarks of the crates that move
/// rows around (feature `fixtures`).
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures {
    use super::PathRecord;
    use drllm_path::LayerPath;

    /// A row like a real search outcome (the sample ids are ARC's): blocks 7 and 8 skipped.
    pub fn row(task: &str, id: &str, found: bool) -> PathRecord {
        let counts: Vec<u8> = (0..30).map(|l| u8::from(l != 7 && l != 8)).collect();
        let best = LayerPath::from_counts(counts).expect("counts 0 and 1");
        PathRecord {
            sample_id: id.into(),
            task: task.into(),
            split: "train".into(),
            question: "Which gas do plants take in? (A) oxygen (B) carbon dioxide".into(),
            answer: "B".into(),
            prompt: "<|im_start|>user\n...<|im_end|>\n".into(),
            model: "SmolLM2-135M-Instruct".into(),
            num_layers: 30,
            default_correct: true,
            found,
            improved: false,
            best_path: found.then(|| best.clone()),
            good_paths: if found {
                vec![best.clone(), LayerPath::all_ones(30)]
            } else {
                vec![]
            },
            simulations: 50,
            evaluations: 37,
            search_ms: 1234,
            worker: "w0".into(),
            seed: 14396215654857862097,
            best_response: found.then(|| "B".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::{self, File};
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, UInt8Builder};
    use arrow_array::{ArrayRef, RecordBatch};
    use parquet::arrow::ArrowWriter;

    use crate::fixtures::row;

    fn cfg() -> serde_json::Value {
        serde_json::json!({"tasks": ["arc_easy"], "num_simulations": 50})
    }

    #[test]
    fn the_card_names_every_task_and_column_and_spares_a_users_readme() {
        let names: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        let card_names: Vec<&str> = CARD_COLUMNS.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            names, card_names,
            "the card documents the schema's columns in order"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let cfg = serde_json::json!({"split": "dev", "model": "SmolLM2"});
        let mut ds = Dataset::open(&out, "fp", cfg.clone(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        ds.commit(
            "gsm8k",
            &[row("gsm8k", "b", true), row("gsm8k", "c", false)],
        )
        .unwrap();
        let card = fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.starts_with("---\nconfigs:\n- config_name: arc_easy\n"),
            "{card}"
        );
        assert!(
            card.contains("  - split: dev\n    path: data/task=gsm8k/*.parquet\n"),
            "{card}"
        );
        assert!(
            card.contains("| gsm8k | 2 |") && card.contains("run in progress"),
            "{card}"
        );
        ds.finish().unwrap();
        assert!(fs::read_to_string(out.join("README.md"))
            .unwrap()
            .contains("run complete"));
        drop(ds);
        // A README the user wrote is left alone.
        fs::write(out.join("README.md"), "my notes").unwrap();
        let mut ds = Dataset::open(&out, "fp", cfg, false).unwrap();
        ds.commit("math", &[row("math", "d", true)]).unwrap();
        assert_eq!(
            fs::read_to_string(out.join("README.md")).unwrap(),
            "my notes"
        );
    }

    #[test]
    fn path_columns_derive_from_the_layer_paths() {
        let mut r = row("arc_easy", "a", false);
        let mut counts = vec![1u8; 30];
        counts[2] = 0;
        counts[5] = 2;
        r.best_path = Some(LayerPath::from_counts(counts.clone()).unwrap());
        r.found = true;
        assert_eq!(r.best_cost(), Some(30));
        let layers = r.best_layers().unwrap();
        assert_eq!(&layers[..6], &[0, 1, 3, 4, 5, 5]);
        assert_eq!(r.validate(30), Ok(()));
        let b = to_batch(std::slice::from_ref(&r)).unwrap();
        let back = from_batch(&b, "arc_easy").unwrap();
        assert_eq!(back, vec![r.clone()]);
        r.best_path = None;
        r.found = false;
        assert_eq!((r.best_cost(), r.best_layers()), (None, None));
    }

    #[test]
    fn rows_validate_against_the_model() {
        assert_eq!(row("arc_easy", "a", true).validate(30), Ok(()));
        assert_eq!(row("arc_easy", "a", false).validate(30), Ok(()));
        assert_eq!(
            row("arc_easy", "a", true).validate(28),
            Err(RowError::NumLayers {
                stored: 30,
                model: 28
            })
        );
        let mut r = row("arc_easy", "a", true);
        r.best_path = Some(LayerPath::all_ones(29));
        assert!(r
            .validate(30)
            .unwrap_err()
            .to_string()
            .contains("29 counts"));
        let mut r = row("arc_easy", "a", true);
        r.good_paths.push(LayerPath::all_ones(31));
        assert!(r
            .validate(30)
            .unwrap_err()
            .to_string()
            .contains("a good path has 31"));
        let mut r = row("arc_easy", "a", true);
        r.best_path = None;
        assert_eq!(r.validate(30), Err(RowError::MissingBestPath));
    }

    /// A part whose columns disagree (edited, or written by another tool) is refused on read,
    /// naming the file, the row and the column (read alone, as a part without checksums is;
    /// in a dataset its checksum refuses it first).
    #[test]
    fn inconsistent_path_columns_are_refused_on_read() {
        use arrow_array::UInt32Array;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp", cfg(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        ds.finish().unwrap();
        let part = out.join(&read_manifest(&out).unwrap().parts[0].path);
        let rewrite = |col: &str, values: ArrayRef| {
            let b = to_batch(&[row("arc_easy", "a", true)]).unwrap();
            let i = b.schema().index_of(col).unwrap();
            let mut cols = b.columns().to_vec();
            cols[i] = values;
            let b = RecordBatch::try_new(b.schema(), cols).unwrap();
            let mut w =
                ArrowWriter::try_new(File::create(&part).unwrap(), b.schema(), None).unwrap();
            w.write(&b).unwrap();
            w.close().unwrap();
            let e = read_rows(&out).unwrap_err().to_string();
            assert!(e.contains("damaged part") && e.contains("SHA-256"), "{e}");
            match integrity::check_part(&part, "arc_easy", None, None) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("read"),
            }
        };
        let e = rewrite("best_cost", Arc::new(UInt32Array::from(vec![30])));
        assert!(e.contains(part.to_str().unwrap()), "{e}");
        assert!(e.contains("row 0 (a): best_cost Some(30)"), "{e}");
        let mut counts = vec![1u8; 30];
        counts[4] = 3;
        let mut best = ListBuilder::new(UInt8Builder::new());
        best.values().append_slice(&counts);
        best.append(true);
        let e = rewrite("best_path", Arc::new(best.finish()));
        assert!(
            e.contains("row 0: best_path") && e.contains("count 3"),
            "{e}"
        );
    }

    #[test]
    fn commits_survive_reopen_and_missed_parts_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        ds.commit(
            "arc_easy",
            &[row("arc_easy", "a", true), row("arc_easy", "b", false)],
        )
        .unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "c", true)])
            .unwrap();
        // A part renamed in just before a crash, missing from the manifest.
        let before = fs::read(out.join("_manifest.json")).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "d", true)])
            .unwrap();
        fs::write(out.join("_manifest.json"), before).unwrap();
        // A staging leftover is never data.
        fs::write(out.join("_staging/part-99999-x.parquet"), b"half").unwrap();
        drop(ds);
        let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        for id in ["a", "b", "c", "d"] {
            assert!(ds.is_committed("arc_easy", id), "{id}");
        }
        assert!(!ds.is_committed("arc_easy", "e"));
        assert_eq!(ds.manifest().rows, 4);
        let back = read_rows(&out).unwrap();
        let ids: Vec<&str> = back.iter().map(|r| r.sample_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(back[0], row("arc_easy", "a", true));
        assert_eq!(back[1], row("arc_easy", "b", false));
        assert_eq!(ds.manifest().parts.len(), 3);
        assert!(!out.join("_staging/part-99999-x.parquet").exists());
        ds.record_failure(FailedSample {
            task: "arc_easy".into(),
            sample_id: "z".into(),
            error: "too long".into(),
        })
        .unwrap();
        ds.finish().unwrap();
        assert!(out.join("_SUCCESS").exists());
        let m: Manifest =
            serde_json::from_slice(&fs::read(out.join("_manifest.json")).unwrap()).unwrap();
        assert!(m.complete);
        assert_eq!(m.failed.len(), 1);
        // Only parquet parts under data/.
        for p in &m.parts {
            assert!(p.path.starts_with("data/task=arc_easy/part-"));
        }
    }

    #[test]
    fn other_configs_and_models_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let mut ds = Dataset::open(out, "fp1", cfg(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        drop(ds);
        let other = serde_json::json!({"tasks": ["arc_easy"], "num_simulations": 20});
        let e = Dataset::open(out, "fp1", other.clone(), false)
            .err()
            .unwrap();
        // The fields that differ are named, not both configs dumped.
        assert!(
            e.to_string()
                .contains("config differs in num_simulations: 50 (now 20)"),
            "{e}"
        );
        assert!(!e.to_string().contains("tasks"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        let e = Dataset::open(out, "fp2", cfg(), true).err().unwrap();
        assert!(e.to_string().contains("model fingerprint fp1"), "{e}");
        // --force continues under the new config, keeping every committed row.
        let ds = Dataset::open(out, "fp1", other, true).unwrap();
        assert!(ds.is_committed("arc_easy", "a"));
        assert_eq!(ds.manifest().previous_configs, [cfg()]);
        drop(ds);
        // A manifest from a newer drllm, or not a manifest at all.
        let mut m: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("_manifest.json")).unwrap()).unwrap();
        m["format_version"] = 99.into();
        fs::write(out.join("_manifest.json"), m.to_string()).unwrap();
        let e = Dataset::open(out, "fp1", cfg(), true).err().unwrap();
        assert!(e.to_string().contains("format version 99"), "{e}");
        fs::write(out.join("_manifest.json"), "{").unwrap();
        let e = Dataset::open(out, "fp1", cfg(), true).err().unwrap();
        assert!(
            e.to_string()
                .contains("_manifest.json: not a drllm manifest"),
            "{e}"
        );
    }

    #[test]
    fn one_run_at_a_time_holds_the_output_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        let e = Dataset::open(&out, "fp1", cfg(), false).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, DatasetError::Locked { .. }), "{msg}");
        assert!(
            msg.contains("_lock") && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Released with the run (and by the OS when a process dies).
        drop(ds);
        Dataset::open(&out, "fp1", cfg(), false).unwrap();
    }

    #[test]
    fn stray_parts_of_other_runs_or_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        drop(ds);
        let part = out.join(&read_manifest(&out).unwrap().parts[0].path);
        let task_dir = part.parent().unwrap().to_path_buf();
        // A copy of a committed part: its sample would be there twice.
        let copy = task_dir.join("part-00007-copy.parquet");
        fs::copy(&part, &copy).unwrap();
        let e = Dataset::open(&out, "fp1", cfg(), false).err().unwrap();
        assert!(
            matches!(e, DatasetError::StrayPart { .. })
                && e.to_string().contains("part-00007-copy.parquet")
                && e.to_string()
                    .contains("sample a (arc_easy) that is already committed"),
            "{e}"
        );
        fs::remove_file(&copy).unwrap();
        // A part of a run with another configuration.
        let other_out = dir.path().join("other");
        let other = serde_json::json!({"tasks": ["arc_easy"], "num_simulations": 20});
        let mut ds = Dataset::open(&other_out, "fp1", other, false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "q", true)])
            .unwrap();
        drop(ds);
        let theirs = other_out.join(&read_manifest(&other_out).unwrap().parts[0].path);
        fs::copy(&theirs, task_dir.join("part-00008-other.parquet")).unwrap();
        let e = Dataset::open(&out, "fp1", cfg(), false).err().unwrap();
        assert!(
            e.to_string().contains("part-00008-other.parquet")
                && e.to_string().contains("num_simulations: 20 (now 50)"),
            "{e}"
        );
        // Nothing was adopted or lost: once the stray part is gone the run resumes as it was.
        fs::remove_file(task_dir.join("part-00008-other.parquet")).unwrap();
        let ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
        assert_eq!(ds.manifest().rows, 1);
        assert!(ds.is_committed("arc_easy", "a") && !ds.is_committed("arc_easy", "q"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(150))]
        /// Fuzz tier: a committed part or the manifest with bytes overwritten or cut short is
        /// an error (or, in the data pages, other values), never a panic, when read or resumed.
        #[test]
        fn mutated_parts_and_manifests_never_panic(
            muts in proptest::collection::vec((0usize..1 << 20, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..256,
            manifest in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("run");
            let mut ds = Dataset::open(&out, "fp1", cfg(), false).unwrap();
            ds.commit("arc_easy", &[row("arc_easy", "a", true), row("arc_easy", "b", false)])
                .unwrap();
            drop(ds);
            let file = if manifest {
                out.join("_manifest.json")
            } else {
                out.join(&read_manifest(&out).unwrap().parts[0].path)
            };
            let mut bytes = fs::read(&file).unwrap();
            let n = bytes.len();
            for (i, b) in muts {
                bytes[i % n] = b;
            }
            bytes.truncate(n.saturating_sub(cut));
            fs::write(&file, &bytes).unwrap();
            let _ = read_rows(&out);
            let _ = Dataset::open(&out, "fp1", cfg(), false);
        }
    }

    #[test]
    fn an_unwritable_output_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let e = Dataset::open(&file.join("run"), "fp", cfg(), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("plain-file"), "{e}");
    }
}
