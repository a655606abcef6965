//! The SLURM scripts in jobs/ on a real single-node cluster (CPU only): both search layouts give
//! the same dataset, a preempted search requeues itself and resumes to the dataset of an
//! undisturbed run. Opt-in: needs root and a running cluster, e.g. `scripts/slurm-up.sh
//! --install` (Debian's slurm-wlm + munge), then `cargo test --release --test slurm -- --ignored
//! --test-threads 1`.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::dist::{read_rows, PathRecord};

/// CPU settings of each script on the one-node test cluster.
const ONE_NODE: (&str, &[&str]) = (
    "jobs/search-1node.sbatch",
    &["--gres=none", "--cpus-per-task=2", "--mem=8G"],
);
const MULTI_NODE: (&str, &[&str]) = (
    "jobs/search-multinode.sbatch",
    &[
        "--nodes=1",
        "--gpus-per-node=0",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--mem=8G",
    ],
);

/// An sbatch command for `script` writing `out` (its log beside it) on `limit` ARC prompts, with
/// sbatch options `extra`.
fn submit(script: &str, out: &Path, extra: &[&str], limit: usize) -> Command {
    let mut c = Command::new("sbatch");
    c.arg(format!("--output={}", out.with_extension("log").display()))
        .args(extra)
        .arg(root().join(script))
        .current_dir(root())
        .env("OUT", out)
        .env("DATASET", "arc_easy")
        .env("SIMS", "8")
        .env("SEED", "7")
        // Every accepted row committed at once: a preemption finds some committed, some not.
        .env(
            "EXTRA_FLAGS",
            format!("--limit {limit} --max-new-tokens 6 --part-rows 1"),
        )
        .env("DATA", data_dir())
        .env("GPUS_PER_TASK", "0")
        .env("WORKER_DEVICE", "cpu")
        .env("BIN", bin("drllm-coordinator").parent().unwrap());
    c
}

fn sbatch(script: &str, out: &Path, extra: &[&str]) {
    let log = out.with_extension("log");
    let o = submit(script, out, &[extra, &["--wait"]].concat(), 4)
        .output()
        .expect("sbatch (is the cluster up? scripts/slurm-up.sh --install)");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        o.status.success(),
        "{script}: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.join("_SUCCESS").exists(), "{script}:\n{text}");
}

fn rows(out: &Path) -> Vec<PathRecord> {
    let mut r = read_rows(out).unwrap();
    for x in &mut r {
        x.worker.clear();
        x.search_ms = 0;
    }
    r.sort_by(|a, b| a.sample_id.cmp(&b.sample_id));
    r
}

#[test]
#[ignore = "needs a SLURM cluster: scripts/slurm-up.sh --install, then --ignored"]
fn job_scripts_produce_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one-node");
    sbatch(ONE_NODE.0, &one, ONE_NODE.1);
    let multi = dir.path().join("multi-node");
    sbatch(MULTI_NODE.0, &multi, MULTI_NODE.1);
    let (a, b) = (rows(&one), rows(&multi));
    assert_eq!(a.len(), 4);
    for r in &a {
        r.validate(30).unwrap();
    }
    assert_eq!(a, b, "both job layouts find the same paths");
}

/// `scontrol show job` fields of a job: (JobState, Restarts).
fn job_state(id: &str) -> (String, u32) {
    let o = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or("")
            .to_string()
    };
    (field("JobState="), field("Restarts=").parse().unwrap_or(0))
}

fn manifest_rows(out: &Path) -> usize {
    std::fs::read(out.join("_manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["rows"].as_u64())
        .unwrap_or(0) as usize
}

/// Submits `script`, sends the batch shell SLURM's preemption warning (TERM, as `--signal=B:TERM`
/// does before a time limit or preemption) once some rows are committed, and waits for the
/// requeued job to finish. Returns the log of both runs.
fn preempted_run(script: &str, extra: &[&str], out: &Path, limit: usize) -> String {
    let o = submit(script, out, &[extra, &["--parsable"]].concat(), limit)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let log = || std::fs::read_to_string(out.with_extension("log")).unwrap_or_default();
    let t0 = std::time::Instant::now();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        while !done() {
            assert!(
                t0.elapsed().as_secs() < 900,
                "{script}: timed out waiting for {what} ({:?}):\n{}",
                job_state(&id),
                log()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    };
    wait("a first commit", &|| manifest_rows(out) > 0);
    let before = manifest_rows(out);
    assert!(
        before < limit,
        "{script}: the run finished before the preemption"
    );
    // TERM to the batch shell alone, as `--signal=B:TERM@120` sends it (`scancel --batch` would
    // signal the shell's children too). On this one-node cluster the shell is the process
    // running slurmd's copy of the script.
    let o = Command::new("pkill")
        .args(["-TERM", "-f", &format!("job0*{id}/slurm_script")])
        .output()
        .unwrap();
    assert!(o.status.success(), "no batch shell of job {id} to signal");
    let term_at = t0.elapsed();
    wait("the requeue", &|| job_state(&id).1 >= 1);
    wait("the requeued job to finish", &|| {
        let (state, _) = job_state(&id);
        state == "COMPLETED" || state == "FAILED" || state == "CANCELLED"
    });
    assert_eq!(job_state(&id), ("COMPLETED".to_string(), 1), "{}", log());
    eprintln!(
        "{script}: TERM at {:.1}s with {before} of {limit} rows committed; the requeued job finished at {:.1}s",
        term_at.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let text = log();
    eprintln!("{text}");
    text
}

#[test]
#[ignore = "needs a SLURM cluster: scripts/slurm-up.sh --install, then --ignored"]
fn preempted_searches_requeue_and_resume_to_the_undisturbed_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 10;
    let calm = dir.path().join("undisturbed");
    let o = submit(
        ONE_NODE.0,
        &calm,
        &[ONE_NODE.1, &["--wait"]].concat(),
        limit,
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = rows(&calm);
    assert_eq!(want.len(), limit);
    for (name, (script, extra)) in [("one-node", ONE_NODE), ("multi-node", MULTI_NODE)] {
        let out = dir.path().join(format!("preempted-{name}"));
        let log = preempted_run(script, extra, &out, limit);
        // The log of both runs (--open-mode=append): stopped on TERM, requeued, restarted.
        assert!(
            log.contains("TERM: stopping the coordinator") && log.contains("(restart 1)"),
            "{name}:\n{log}"
        );
        // The coordinator stopped itself (committing its rows) before the requeue.
        assert!(
            log.contains("interrupted (committed rows kept"),
            "{name}:\n{log}"
        );
        assert!(out.join("_SUCCESS").exists(), "{name}:\n{log}");
        // Parts from two runs (run tags), every sample once, the same rows as undisturbed.
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
        let tags: std::collections::BTreeSet<String> = m["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let path = p["path"].as_str().unwrap();
                path.rsplit('-').next().unwrap().to_string()
            })
            .collect();
        assert_eq!(tags.len(), 2, "{name}: parts {}", m["parts"]);
        let got = rows(&out);
        let mut ids: Vec<&str> = got.iter().map(|r| r.sample_id.as_str()).collect();
        ids.dedup();
        assert_eq!(ids.len(), limit, "{name}: a sample lost or duplicated");
        assert_eq!(
            got, want,
            "{name}: the resumed dataset differs from the undisturbed one"
        );
    }
}

#[test]
#[ignore = "needs a SLURM cluster: scripts/slurm-up.sh --install, then --ignored"]
fn train_and_eval_array_jobs_produce_a_merged_table() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("search");
    let o = submit(ONE_NODE.0, &run, &[ONE_NODE.1, &["--wait"]].concat(), 10)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bin_dir = bin("drllm-train").parent().unwrap().to_path_buf();
    let pkg = dir.path().join("pkg");
    let log = dir.path().join("train.log");
    let o = Command::new("sbatch")
        .args(["--wait", "--gres=none", "--cpus-per-task=2", "--mem=8G"])
        .arg(format!("--output={}", log.display()))
        .arg(root().join("jobs/train.sbatch"))
        .current_dir(root())
        .env("RUNS", &run)
        .env("PKG", &pkg)
        .env("DATA", data_dir())
        .env("EXTRA_FLAGS", "--epochs 2 --val-fraction 0.3 --seed 3")
        .env("BIN", &bin_dir)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        o.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    drllm_router::Package::load(&pkg).unwrap();

    // 2 tasks x 2 budgets: four array tasks, one summary each.
    let evals = dir.path().join("evals");
    let o = Command::new("sbatch")
        .args([
            "--wait",
            "--array=0-3",
            "--gres=none",
            "--cpus-per-task=1",
            "--mem=4G",
        ])
        .arg(format!("--output={}/eval-%a.log", dir.path().display()))
        .arg(root().join("jobs/eval-array.sbatch"))
        .current_dir(root())
        .env("ROUTERS", &pkg)
        .env("TASKS", "arc_easy arc_challenge")
        .env("BUDGETS", "0 -0.5")
        .env("EVALS", &evals)
        .env("DATA", data_dir())
        .env("EXTRA_FLAGS", "--limit 6")
        .env("BIN", &bin_dir)
        .output()
        .unwrap();
    let logs: String = (0..4)
        .map(|i| {
            std::fs::read_to_string(dir.path().join(format!("eval-{i}.log"))).unwrap_or_default()
        })
        .collect();
    assert!(
        o.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut jsons: Vec<_> = std::fs::read_dir(&evals)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    jsons.sort();
    assert_eq!(jsons.len(), 4, "{logs}");

    let csv = dir.path().join("merged.csv");
    let png = dir.path().join("merged.png");
    let o = Command::new(bin("drllm-infer"))
        .arg("merge")
        .args(&jsons)
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Per task one baseline (shared by its two files) and two budgets.
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = csv_text.lines().collect();
    assert_eq!(lines.len(), 1 + 2 * 3, "{csv_text}");
    for task in ["arc_easy", "arc_challenge"] {
        for mode in [",baseline,", ",routed,0,", ",routed,-0.5,"] {
            assert!(
                lines.iter().any(|l| l.contains(&format!(",{task}{mode}"))),
                "{task}{mode}: {csv_text}"
            );
        }
    }
    assert!(
        table.contains("| arc_easy | routed | -0.50 | 6 |"),
        "{table}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}
