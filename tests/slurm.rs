//! The SLURM scripts in jobs/ on a real single-node cluster (CPU only). Opt-in: needs root and
//! a running cluster, e.g. `scripts/slurm-up.sh --install` (Debian's slurm-wlm + munge), then
//! `cargo test --release --test slurm -- --ignored`.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::dist::{read_rows, PathRecord};

fn sbatch(script: &str, out: &Path, extra: &[&str]) {
    let log = out.with_extension("log");
    let o = Command::new("sbatch")
        .arg("--wait")
        .arg(format!("--output={}", log.display()))
        .args(extra)
        .arg(root().join(script))
        .current_dir(root())
        .env("OUT", out)
        .env("DATASET", "arc_easy")
        .env("SIMS", "8")
        .env("SEED", "7")
        .env("EXTRA_FLAGS", "--limit 4 --max-new-tokens 6")
        .env("DRLLM_DATA", data_dir())
        .env("GPUS_PER_TASK", "0")
        .env("WORKER_DEVICE", "cpu")
        .env("BIN", bin("drllm-coordinator").parent().unwrap())
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
    sbatch(
        "jobs/search-1node.sbatch",
        &one,
        &["--gres=none", "--cpus-per-task=2"],
    );
    let multi = dir.path().join("multi-node");
    sbatch(
        "jobs/search-multinode.sbatch",
        &multi,
        &[
            "--nodes=1",
            "--gpus-per-node=0",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
        ],
    );
    let (a, b) = (rows(&one), rows(&multi));
    assert_eq!(a.len(), 4);
    for r in &a {
        r.validate(30).unwrap();
    }
    assert_eq!(a, b, "both job layouts find the same paths");
}
