//! The task crate on the real data in ../shared/data, and the drllm-data binary.
mod common;

use std::process::Command;

use common::*;
use drllm::tasks::answer::{eval, math_equal, normalize};
use drllm::tasks::{data, Gold, LoadOptions, Split, TaskName};

fn load(task: TaskName, split: Split) -> Vec<drllm::tasks::Sample> {
    data::load(&data_dir(), task, split, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .samples
}

#[test]
fn every_real_row_parses() {
    let counts = [
        (TaskName::ArcEasy, Split::Train, 2251),
        (TaskName::ArcEasy, Split::Dev, 570),
        (TaskName::ArcChallenge, Split::Train, 1119),
        (TaskName::ArcChallenge, Split::Dev, 299),
        (TaskName::Dart(None), Split::Train, 7500),
        (TaskName::Gsm8k, Split::Train, 7473),
        // PIQA, SciQ and BoolQ: dev = every 4th validation row from the first, train = the rest.
        (TaskName::Piqa, Split::Dev, 335),
        (TaskName::Piqa, Split::Train, 1003),
        (TaskName::OpenBookQa, Split::Dev, 500),
        (TaskName::OpenBookQa, Split::Train, 4957),
        (TaskName::Sciq, Split::Dev, 250),
        (TaskName::Sciq, Split::Train, 750),
        (TaskName::Boolq, Split::Dev, 693),
        (TaskName::Boolq, Split::Train, 2077),
    ];
    for (task, split, n) in counts {
        let s = load(task, split);
        assert_eq!(s.len(), n, "{task} {split}");
        let mut ids: Vec<&str> = s.iter().map(|x| x.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "{task} {split}: sample ids must be unique");
    }
    // The carved splits do not overlap.
    for task in [TaskName::Piqa, TaskName::Sciq, TaskName::Boolq] {
        let dev: std::collections::HashSet<String> =
            load(task, Split::Dev).into_iter().map(|s| s.id).collect();
        assert!(
            load(task, Split::Train)
                .iter()
                .all(|s| !dev.contains(&s.id)),
            "{task}"
        );
    }
    // Every answer of the two-way tasks occurs (PIQA sol1/sol2, BoolQ no/yes).
    for task in [TaskName::Piqa, TaskName::Boolq] {
        let s = load(task, Split::Train);
        for g in ['A', 'B'] {
            assert!(s.iter().any(|x| x.gold == Gold::Letter(g)), "{task} {g}");
        }
    }
    // 3- and 5-choice ARC items keep all their choices; an E answer is gradable.
    let arc = load(TaskName::Arc, Split::Train);
    let with_e = arc.iter().filter(|s| s.gold == Gold::Letter('E')).count();
    assert!(with_e > 0, "some ARC items have gold E");
    // The two "Level ?" MATH rows belong to `dart` only.
    let unlevelled: Vec<String> = load(TaskName::Dart(None), Split::Train)
        .into_iter()
        .filter(|s| s.level.is_none())
        .map(|s| s.id)
        .collect();
    assert_eq!(unlevelled.len(), 2, "{unlevelled:?}");
    let by_level: usize = (1..=5)
        .map(|l| load(TaskName::Dart(Some(l)), Split::Train).len())
        .sum();
    assert_eq!(by_level, 7498);
}

#[test]
fn math_golds_grade_equal_to_themselves_and_to_a_rewritten_form() {
    let samples = load(TaskName::Dart(None), Split::Train);
    let mut empty = vec![];
    let mut rewrites_ok = [0usize; 4];
    for s in &samples {
        let Gold::Math(g) = &s.gold else {
            panic!("MATH gold is Math")
        };
        if g.trim().is_empty() {
            empty.push(s.id.clone());
            continue;
        }
        assert!(
            math_equal(g, g),
            "{}: {g:?} (normalized {:?}) must equal itself",
            s.id,
            normalize(g)
        );
        let forms = [
            (g.contains("\\frac")).then(|| g.replace("\\frac", "\\dfrac")),
            eval(&normalize(g))
                .filter(|v| v.is_finite())
                .map(|v| format!("{v:.10}")),
            Some(format!("$ {} $", g.replace(',', ", "))),
            (!g.contains('=')).then(|| format!("x = {g}")),
        ];
        let mut any = false;
        for (k, f) in forms.iter().enumerate() {
            if let Some(f) = f {
                if math_equal(f, g) {
                    rewrites_ok[k] += 1;
                    any = true;
                }
            }
        }
        assert!(any, "{}: no rewritten form of {g:?} grades equal", s.id);
    }
    eprintln!(
        "rewritten forms graded equal: dfrac {}, numeric value {}, spaced+dollars {}, \"x = \" {}",
        rewrites_ok[0], rewrites_ok[1], rewrites_ok[2], rewrites_ok[3]
    );
    // The two source rows whose solution ends in an empty \boxed{} (see data.rs).
    assert_eq!(
        empty,
        vec![
            "train/number_theory/7115".to_string(),
            "train/number_theory/7117".to_string()
        ]
    );
}

fn drllm_data(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin("drllm-data"))
        .args(args)
        .env("DRLLM_DATA", data_dir())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn stats_match_the_data_readme() {
    let (ok, out, err) = drllm_data(&["stats"]);
    assert!(ok, "{err}");
    for line in [
        "arc_easy train 2251",
        "arc_easy dev 570",
        "arc_challenge train 1119",
        "arc_challenge dev 299",
        "dart-5 train 2304",
        "dart-1 train 564",
        "dart train 7500",
        "gsm8k train 7473",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
}

#[test]
fn stats_on_a_missing_or_empty_directory_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let (ok, out, err) = drllm_data(&["stats", "--data", missing.to_str().unwrap()]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(
        err.contains("nope: no such directory") && err.contains("Expected layout"),
        "{err}"
    );
    let (ok, _, err) = drllm_data(&["stats", "--data", tmp.path().to_str().unwrap()]);
    assert!(!ok, "an empty directory has no data");
    assert!(
        err.contains("no task data found") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn show_and_grade() {
    let (ok, out, err) = drllm_data(&[
        "show",
        "--task",
        "arc_challenge",
        "--split",
        "dev",
        "--limit",
        "2",
        "--model",
        "embedded",
    ]);
    assert!(ok, "{err}");
    // Cloze prompts (the default): the question alone, then each choice's continuation.
    assert_eq!(
        out.matches("\nAnswer:\n--- continuation A: ").count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("=== Mercury_SC_407695") && out.contains("--- gold: D"),
        "{out}"
    );
    let (ok, out, err) = drllm_data(&[
        "show",
        "--task",
        "arc_challenge",
        "--split",
        "dev",
        "--limit",
        "2",
        "--model",
        "embedded",
        "--reward",
        "lenient",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("<|im_start|>assistant").count(), 2, "{out}");
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--task",
                "dart-3",
                "--response",
                "so \\boxed{0.5}",
                "--gold",
                "\\frac{1}{2}",
            ],
            "correct",
        ),
        (
            &[
                "--task",
                "dart-3",
                "--response",
                "3}$",
                "--gold",
                "3",
                "--style",
                "base",
            ],
            "correct",
        ),
        (
            &[
                "--task",
                "arc_easy",
                "--response",
                "A. a leg muscle",
                "--gold",
                "A",
                "--reward",
                "strict",
            ],
            "wrong",
        ),
        (
            &[
                "--task",
                "arc_easy",
                "--response",
                "A. a leg muscle",
                "--gold",
                "1",
                "--reward",
                "lenient",
            ],
            "correct",
        ),
        (
            &[
                "--task",
                "gsm8k",
                "--response",
                "She pays 1,200 dollars.",
                "--gold",
                "1200",
            ],
            "correct",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["grade"];
        a.extend_from_slice(args);
        let (ok, out, err) = drllm_data(&a);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), want, "{args:?}");
    }
}

#[test]
fn a_byte_order_mark_is_accepted_and_invalid_utf8_is_named_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let arc = tmp.path().join("arc");
    std::fs::create_dir(&arc).unwrap();
    let good = std::fs::read_to_string(data_dir().join("arc/ARC-Easy-Dev.jsonl")).unwrap();
    let lines: Vec<&str> = good.lines().take(3).collect();
    let file = arc.join("ARC-Easy-Dev.jsonl");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(lines.join("\r\n").as_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let d = tmp.path().to_str().unwrap();
    let show = [
        "show", "--data", d, "--task", "arc_easy", "--split", "dev", "--limit", "9",
    ];
    let (ok, out, err) = drllm_data(&show);
    assert!(ok, "{err}");
    assert_eq!(out.matches("=== ").count(), 3);
    // A line cut inside a multi-byte character.
    let mut bytes = format!("{}\n", lines[0]).into_bytes();
    bytes.extend(b"{\"id\": \"x\xC3\"}\n");
    std::fs::write(&file, &bytes).unwrap();
    let (ok, _, err) = drllm_data(&show);
    assert!(
        !ok && err.contains("ARC-Easy-Dev.jsonl:2") && err.contains("invalid UTF-8"),
        "{err}"
    );
}

#[test]
fn bad_rows_are_named_or_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let arc = tmp.path().join("arc");
    std::fs::create_dir(&arc).unwrap();
    let good = std::fs::read_to_string(data_dir().join("arc/ARC-Easy-Dev.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(4).collect();
    lines.insert(2, r#"{"id":"broken","question":{"stem":"S","choices":[{"text":"x","label":"Q"}]},"answerKey":"A"}"#);
    std::fs::write(arc.join("ARC-Easy-Dev.jsonl"), lines.join("\n")).unwrap();
    let d = tmp.path().to_str().unwrap();
    let (ok, _, err) = drllm_data(&["show", "--data", d, "--task", "arc_easy", "--split", "dev"]);
    assert!(
        !ok && err.contains("ARC-Easy-Dev.jsonl:3")
            && err.contains("choices[0].label")
            && err.contains("\"Q\""),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (ok, out, err) = drllm_data(&[
        "show",
        "--data",
        d,
        "--task",
        "arc_easy",
        "--split",
        "dev",
        "--limit",
        "10",
        "--skip-bad-rows",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("=== ").count(), 4);
    assert!(err.contains("skipped 1 malformed rows"), "{err}");
    let (ok, _, err) = drllm_data(&["show", "--data", d, "--task", "gsm8k"]);
    assert!(!ok && err.contains("gsm8k/train.jsonl"), "{err}");
    // Task names are checked by the flag parser, which lists the ones there are.
    let (ok, _, err) = drllm_data(&["show", "--task", "dart-9"]);
    assert!(
        !ok && err.contains("invalid value 'dart-9'") && err.contains("dart-5, dart, gsm8k"),
        "{err}"
    );
}

#[test]
fn hugging_face_parquet_layouts_load_like_the_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(python())
        .arg(root().join("tests/reference/write_hf_parquet.py"))
        .arg(data_dir())
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let opts = LoadOptions::default();
    let pq = |task, split| {
        data::load(tmp.path(), task, split, &opts)
            .unwrap_or_else(|e| panic!("{e}"))
            .samples
    };
    // ARC in the HF layout (question string + choices{text,label}) equals the AI2 original rows.
    assert_eq!(
        pq(TaskName::ArcEasy, Split::Dev),
        load(TaskName::ArcEasy, Split::Dev)
    );
    let gsm = pq(TaskName::Gsm8k, Split::Train);
    let want: Vec<_> = load(TaskName::Gsm8k, Split::Train)
        .into_iter()
        .take(300)
        .collect();
    assert_eq!(gsm.len(), 300);
    // jsonl rows without an id are named `<file stem>:<line>`; compare the content.
    for (a, b) in gsm.iter().zip(&want) {
        assert_eq!((&a.question, &a.gold), (&b.question, &b.gold));
    }
    let math = pq(TaskName::Dart(None), Split::Train);
    let want: Vec<_> = load(TaskName::Dart(None), Split::Train)
        .into_iter()
        .take(400)
        .collect();
    assert_eq!(math, want, "two snappy shards, in order");
    // PIQA, OpenBookQA, SciQ and BoolQ with the Hugging Face datasets' columns read as their
    // upstream files do (row-numbered ids differ by file name; the carve rule counts the same
    // rows), in both carved splits.
    for task in [
        TaskName::Piqa,
        TaskName::OpenBookQa,
        TaskName::Sciq,
        TaskName::Boolq,
    ] {
        let splits: &[Split] = if task == TaskName::OpenBookQa {
            &[Split::Dev]
        } else {
            &[Split::Dev, Split::Train]
        };
        for &split in splits {
            let (a, b) = (pq(task, split), load(task, split));
            assert!(!a.is_empty() && a.len() == b.len(), "{task} {split}");
            for (x, y) in a.iter().zip(&b) {
                assert_eq!((&x.question, &x.gold), (&y.question, &y.gold), "{task}");
                if matches!(task, TaskName::OpenBookQa | TaskName::Boolq) {
                    assert_eq!(x.id, y.id, "{task}: ids from the rows");
                }
            }
        }
    }
    // A file that is not parquet is named.
    std::fs::write(
        tmp.path().join("math/train-00002-of-00002.parquet"),
        b"not parquet",
    )
    .unwrap();
    let msg = data::load(tmp.path(), TaskName::Dart(None), Split::Train, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train-00002-of-00002.parquet") && msg.contains("not a readable parquet file"),
        "{msg}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// Fuzz tier: real ARC, GSM8K and MATH rows with bytes overwritten (quotes, braces, invalid
    /// UTF-8, anything) and cut short load or fail with an error naming the file, never panic.
    #[test]
    fn mutated_jsonl_rows_never_panic(
        which in 0usize..3,
        muts in proptest::collection::vec((0usize..1 << 16, proptest::prelude::any::<u8>()), 1..8),
        cut in 0usize..64,
    ) {
        let (sub, file, task, split) = [
            ("arc", "ARC-Easy-Dev.jsonl", TaskName::ArcEasy, Split::Dev),
            ("gsm8k", "train.jsonl", TaskName::Gsm8k, Split::Train),
            ("math", "train.jsonl", TaskName::Dart(None), Split::Train),
        ][which];
        let real = std::fs::read(data_dir().join(sub).join(file)).unwrap();
        // The first three rows.
        let end = real
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .nth(2)
            .map_or(real.len(), |(i, _)| i + 1);
        let mut bytes = real[..end].to_vec();
        let n = bytes.len();
        for (i, b) in muts {
            bytes[i % n] = b;
        }
        bytes.truncate(n.saturating_sub(cut));
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join(sub)).unwrap();
        std::fs::write(tmp.path().join(sub).join(file), &bytes).unwrap();
        for skip in [false, true] {
            let opts = LoadOptions { skip_bad_rows: skip, ..Default::default() };
            if let Err(e) = data::load(tmp.path(), task, split, &opts) {
                proptest::prop_assert!(e.to_string().contains(file), "{}", e);
            }
        }
    }
}
