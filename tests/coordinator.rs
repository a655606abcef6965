//! The distributed search with real processes: `drllm-coordinator` spawning `drllm-worker`s on
//! real ARC prompts with the embedded model, writing the Parquet dataset.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::dist::{read_rows, PathRecord};

/// The coordinator on the first `limit` ARC-Easy train prompts (8 simulations, seed 7).
fn coordinator_cmd(out: &Path, workers: usize, limit: usize, concurrency: usize) -> Command {
    coordinator_cmd_in(&data_dir(), out, workers, limit, concurrency)
}

/// [`coordinator_cmd`] over the task data in `data`.
fn coordinator_cmd_in(
    data: &Path,
    out: &Path,
    workers: usize,
    limit: usize,
    concurrency: usize,
) -> Command {
    let mut c = Command::new(bin("drllm-coordinator"));
    c.args([
        "--model",
        "embedded",
        "--dataset",
        "arc_easy",
        "--split",
        "train",
    ])
    .args([
        "--limit",
        &limit.to_string(),
        "--workers",
        &workers.to_string(),
    ])
    .args([
        "--num-simulations",
        "8",
        "--seed",
        "7",
        "--max-new-tokens",
        "6",
    ])
    .args(["--concurrency", &concurrency.to_string()])
    .arg("--data")
    .arg(data)
    .arg("--out")
    .arg(out);
    c
}

fn coordinator(out: &Path, workers: usize, limit: usize, extra: &[&str]) -> (bool, String) {
    let o = coordinator_cmd(out, workers, limit, 3)
        .args(["--part-rows", "4"])
        .args(extra)
        .env("DRLLM_LOG", "warn")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Rows by sample id without the fields that depend on who ran them and when.
fn comparable(out: &Path) -> Vec<PathRecord> {
    let mut rows = read_rows(out).unwrap();
    for r in &mut rows {
        r.worker.clear();
        r.search_ms = 0;
    }
    rows.sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
    rows
}

#[test]
fn two_workers_equal_one_and_runs_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let (ok, err) = coordinator(&one, 1, 6, &[]);
    assert!(ok, "{err}");
    let (ok, err) = coordinator(&two, 2, 6, &[]);
    assert!(ok, "{err}");
    let (a, b) = (comparable(&one), comparable(&two));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "two workers must find exactly what one worker finds");
    let workers: std::collections::HashSet<String> = read_rows(&two)
        .unwrap()
        .into_iter()
        .map(|r| r.worker)
        .collect();
    assert_eq!(workers.len(), 2, "both workers got work: {workers:?}");
    for r in &a {
        r.validate(30).unwrap();
        // Cloze (the default): the question alone, as plain text.
        assert!(
            r.prompt.starts_with("Question: ") && r.prompt.ends_with("\nAnswer:"),
            "{}",
            r.prompt
        );
    }
    assert!(one.join("_SUCCESS").exists());

    // Resume with a larger limit: only the new samples are searched, nothing is duplicated.
    let (ok, err) = coordinator(&one, 1, 9, &[]);
    assert!(ok, "{err}");
    assert!(err.contains("6 already committed"), "{err}");
    let rows = comparable(&one);
    assert_eq!(rows.len(), 9);
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.sample_id.as_str()).collect();
    assert_eq!(ids.len(), 9);
    // The resumed run's first six rows are the first run's, untouched.
    assert_eq!(
        rows.iter().filter(|r| a.contains(r)).count(),
        6,
        "committed rows changed on resume"
    );

    // Another configuration on the same OUT is refused, naming --force.
    let (ok, err) = coordinator(&one, 1, 9, &["--stop-on-saving", "3"]);
    assert!(!ok);
    assert!(
        err.contains("--force") && err.contains("stop_on_saving"),
        "{err}"
    );
}

#[test]
fn bad_settings_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    // Remote workers without a token.
    let (ok, err) = coordinator(&out, 0, 2, &["--listen", "0.0.0.0:0"]);
    assert!(!ok);
    assert!(err.contains("--token"), "{err}");
    // No local workers and no reachable address.
    let (ok, err) = coordinator(&out, 0, 2, &[]);
    assert!(!ok);
    assert!(err.contains("no workers"), "{err}");
    // An unknown task.
    let o = Command::new(bin("drllm-coordinator"))
        .args(["--dataset", "arc_medium", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("arc_medium"));
}

#[test]
fn nothing_to_search_starts_no_worker() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("empty");
    let (ok, err) = coordinator(&out, 2, 0, &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("no samples selected") && err.contains("--limit Some(0)"),
        "{err}"
    );
    assert!(
        !out.join("_logs").exists(),
        "a worker was started for nothing"
    );
    assert!(read_rows(&out).unwrap().is_empty());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Remote workers without the token or with another model are refused with a clear message
/// (and a log line on the coordinator); a killed local worker's leases are reissued; the run
/// completes with the rows an undisturbed run gives.
#[test]
fn intruders_are_refused_and_a_killed_worker_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let port = free_port();
    let mut coord = coordinator_cmd(&out, 2, 6, 1)
        .args(["--lease-timeout-s", "8", "--token", "s3cret"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("DRLLM_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let worker = |token: &str, model: &Path| {
        Command::new(bin("drllm-worker"))
            .args([
                "--connect",
                &format!("http://127.0.0.1:{port}"),
                "--token",
                token,
            ])
            .arg("--model")
            .arg(model)
            .args(["--device", "cpu", "--threads", "1"])
            .output()
            .unwrap()
    };
    // Kill one local worker once it has registered (it takes a lease right away), before the
    // intruders come: the killed worker's lease keeps the run alive for --lease-timeout-s, so
    // the intruders always meet a running coordinator however long they take on a busy machine.
    let stderr = coord.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let registered = rx
        .iter()
        .any(|l| l.contains("worker registered") && l.contains("local-1"));
    assert!(registered, "local-1 never registered");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = Command::new("pkill")
        .args(["-9", "-f", &format!("127.0.0.1:{port} --worker-id local-1")])
        .status()
        .unwrap();
    assert!(killed.success(), "local-1 not found to kill");
    let o = worker("wrong", &embedded_gguf());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refused") && err.contains("token"), "{err}");
    // Same architecture and size, one byte of tensor data in the middle of the file different
    // (where the fingerprint of name, size, first and last MiB did not look): another model,
    // refused naming both fingerprints.
    // (The same file name in another directory: the old fingerprint hashed the name too.)
    std::fs::create_dir_all(dir.path().join("edited")).unwrap();
    let other = dir
        .path()
        .join("edited")
        .join(embedded_gguf().file_name().unwrap());
    let mut bytes = std::fs::read(embedded_gguf()).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&other, bytes).unwrap();
    let (ours, theirs) = (
        drllm::runtime::ModelSource::Gguf(embedded_gguf())
            .fingerprints()
            .unwrap(),
        drllm::runtime::ModelSource::Gguf(other.clone())
            .fingerprints()
            .unwrap(),
    );
    assert_eq!(ours.legacy, theirs.legacy, "the old fingerprint misses it");
    assert_ne!(ours.current, theirs.current);
    let o = worker("s3cret", &other);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "model fingerprint {} differs from the run's {}",
            theirs.current, ours.current
        )),
        "{err}"
    );
    let status = coord.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("refused a caller without the run's token"),
        "{log}"
    );
    assert!(
        log.contains("refused a worker with a different model"),
        "{log}"
    );
    assert!(log.contains("local worker exited"), "{log}");
    let rows = comparable(&out);
    assert_eq!(rows.len(), 6, "nothing lost, nothing duplicated");
    // Undisturbed reference: the same search by one worker.
    let reference = dir.path().join("reference");
    let (ok, err) = coordinator(&reference, 1, 6, &[]);
    assert!(ok, "{err}");
    assert_eq!(rows, comparable(&reference));
}

/// `kill -9` of the coordinator mid-run, then a restart on the same OUT: the run completes with
/// the rows of an undisturbed run, nothing duplicated, and the committed parts were never
/// rewritten.
#[test]
fn a_killed_coordinator_resumes_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut coord = coordinator_cmd(&out, 1, 6, 3)
        .args(["--part-rows", "1"])
        .env("DRLLM_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first committed part, then kill -9.
    let parts = |out: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(out.join("data/task=arc_easy"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    wait_for(|| Some(parts(&out)).filter(|p| !p.is_empty()))
        .expect("no part was committed (hang guard)");
    // A second coordinator on the same OUT while the first runs: refused, naming the holder,
    // before it starts a worker or touches a file.
    let (ok, err) = coordinator(&out, 1, 6, &[]);
    assert!(!ok);
    assert!(
        err.contains("in use by pid") && err.contains(&format!("pid {}", coord.id())),
        "{err}"
    );
    coord.kill().unwrap();
    coord.wait().unwrap();
    let before: Vec<(std::path::PathBuf, Vec<u8>)> = parts(&out)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    assert!(before.len() < 6 || !out.join("_SUCCESS").exists());
    let (ok, err) = coordinator(&out, 1, 6, &[]);
    assert!(ok, "{err}");
    let rows = comparable(&out);
    assert_eq!(rows.len(), 6, "nothing lost, nothing duplicated");
    for (p, b) in &before {
        assert_eq!(
            &std::fs::read(p).unwrap(),
            b,
            "{} was rewritten",
            p.display()
        );
    }
    let reference = dir.path().join("reference");
    let (ok, err) = coordinator(&reference, 1, 6, &[]);
    assert!(ok, "{err}");
    assert_eq!(rows, comparable(&reference));
}

fn parts(out: &Path) -> Vec<std::path::PathBuf> {
    let mut p: Vec<_> = std::fs::read_dir(out.join("data/task=arc_easy"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    p.sort();
    p
}

/// Ctrl-C (SIGINT) mid-run commits the rows accepted so far (none were due to be written: parts
/// of 100 rows), exits 130, and a rerun completes to the undisturbed rows. Then the disk fills up
/// mid-run (a small tmpfs in a private mount namespace): the coordinator stops with an error that
/// names the file and the cause, every part committed before stays readable, and a rerun after
/// space is freed completes to the same rows.
#[test]
fn interrupted_and_disk_full_runs_keep_what_was_committed_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let (ok, err) = coordinator(&reference, 1, 6, &[]);
    assert!(ok, "{err}");
    let want = comparable(&reference);

    // SIGINT once two samples are accepted.
    let out = dir.path().join("interrupted");
    let coord = coordinator_cmd(&out, 1, 6, 3)
        .args(["--part-rows", "100", "--flush-s", "3600"])
        .env("DRLLM_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("_logs/local-0.log");
    // Each result the coordinator accepted is a "reported" line in the worker's log.
    wait_for(|| {
        let reported = std::fs::read_to_string(&log)
            .map(|s| s.matches("reported").count())
            .unwrap_or(0);
        (reported >= 2).then_some(())
    })
    .expect("the worker never reported twice (hang guard)");
    assert!(
        parts(&out).is_empty(),
        "rows were written before the interrupt"
    );
    let pid = coord.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let o = coord.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let kept = read_rows(&out).unwrap();
    assert!(kept.len() >= 2, "only {} rows were committed", kept.len());
    assert!(!out.join("_SUCCESS").exists());
    let (ok, err) = coordinator(&out, 1, 6, &[]);
    assert!(ok, "{err}");
    assert_eq!(comparable(&out), want);

    // Disk full: the run happens in a private mount namespace on a 4 MiB tmpfs, filled up once
    // the first part is committed; what is left there is copied out for the checks.
    let full = dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    let cmd = coordinator_cmd(Path::new("$MNT/run"), 1, 6, 3);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let script = format!(
        r#"set -u
MNT=$(mktemp -d)
mount -t tmpfs -o size=4m tmpfs "$MNT" || exit 97
"{bin}" {args} --part-rows 1 2> "{full}/stderr" &
c=$!
for _ in $(seq 1200); do
  ls "$MNT"/run/data/task=arc_easy/*.parquet >/dev/null 2>&1 && break
  sleep 0.1
done
dd if=/dev/zero of="$MNT/filler" bs=4k 2>/dev/null
wait $c
echo $? > "{full}/rc"
cp -a "$MNT/run" "{full}/run"
"#,
        bin = bin("drllm-coordinator").display(),
        args = args
            .iter()
            .map(|a| if a == "$MNT/run" {
                "\"$MNT/run\"".to_string()
            } else {
                format!("'{a}'")
            })
            .collect::<Vec<_>>()
            .join(" "),
        full = full.display(),
    );
    let st = Command::new("unshare")
        .args(["--map-root-user", "--mount", "bash", "-c", &script])
        .env("DRLLM_LOG", "warn")
        .status()
        .expect("running unshare (util-linux)");
    assert!(
        st.success(),
        "could not mount a tmpfs in a private mount namespace (unshare: {st}); this test needs \
         user namespaces or root"
    );
    let rc = std::fs::read_to_string(full.join("rc")).unwrap();
    let err = std::fs::read_to_string(full.join("stderr")).unwrap();
    assert_eq!(rc.trim(), "1", "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("run/"),
        "the error names neither the cause nor the file: {err}"
    );
    assert!(err.contains("everything committed before is kept"), "{err}");
    let out = full.join("run");
    let kept = read_rows(&out).unwrap();
    assert!(
        !kept.is_empty() && kept.len() < 6,
        "{} rows kept",
        kept.len()
    );
    assert!(!out.join("_SUCCESS").exists());
    let (ok, err) = coordinator(&out, 1, 6, &[]);
    assert!(ok, "{err}");
    assert_eq!(comparable(&out), want);
}

/// Silent damage is refused by name (issue 32): a flipped bit in a committed part stops the
/// resume and `drllm-data verify` names the part (restored, the run completes and verifies); a
/// task file with a repeated line is refused naming both lines, or searched once per id with
/// `--skip-duplicate-ids`.
#[test]
fn damaged_parts_and_duplicate_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = coordinator_cmd(&out, 1, 3, 3)
        .args(["--part-rows", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let verify = |out: &Path| {
        let o = Command::new(bin("drllm-data"))
            .arg("verify")
            .arg(out)
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (ok, text) = verify(&out);
    assert!(
        ok && text.contains("3 parts (3 verified") && text.contains("intact"),
        "{text}"
    );
    let part = parts(&out).into_iter().next().unwrap();
    let orig = std::fs::read(&part).unwrap();
    let mut bytes = orig.clone();
    bytes[39] ^= 1;
    std::fs::write(&part, &bytes).unwrap();
    let (ok, err) = coordinator(&out, 1, 4, &[]);
    assert!(!ok, "resumed over a damaged part");
    assert!(
        err.contains("damaged part") && err.contains(part.to_str().unwrap()),
        "{err}"
    );
    let (ok, text) = verify(&out);
    assert!(
        !ok && text.contains(part.to_str().unwrap()) && text.contains("SHA-256"),
        "{text}"
    );
    std::fs::write(&part, &orig).unwrap();
    let (ok, err) = coordinator(&out, 1, 4, &[]);
    assert!(ok, "{err}");
    assert_eq!(read_rows(&out).unwrap().len(), 4);
    assert!(verify(&out).0);

    // One ARC line repeated.
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("arc")).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(data_dir().join("arc/ARC-Easy-Train.jsonl"))
        .unwrap()
        .lines()
        .take(2)
        .map(String::from)
        .collect();
    std::fs::write(
        data.join("arc/ARC-Easy-Train.jsonl"),
        format!("{}\n{}\n{}\n", lines[0], lines[1], lines[0]),
    )
    .unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let o = coordinator_cmd_in(&data, out, 1, 3, 3)
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let dup = dir.path().join("dup");
    let (ok, err) = run(&dup, &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("duplicate sample id")
            && err.contains("ARC-Easy-Train.jsonl:1")
            && err.contains("ARC-Easy-Train.jsonl:3"),
        "{err}"
    );
    let (ok, err) = run(&dup, &["--skip-duplicate-ids"]);
    assert!(ok, "{err}");
    let rows = read_rows(&dup).unwrap();
    let mut ids: Vec<&str> = rows.iter().map(|r| r.sample_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((rows.len(), ids.len()), (2, 2));
}
