//! Models from the Hugging Face hub cache: found where and as `huggingface_hub` finds them
//! (environment variables, refs, revisions, commit hashes), and named by repo id in outputs.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use drllm::runtime::loader::hf_hub_cache_from;
use drllm::runtime::ModelSource;

const REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";

/// A hub cache holding the embedded GGUF as `huggingface_hub` lays a download out: the file in
/// `blobs/`, a snapshot per commit linking to it, `refs/main` and `refs/v1`.
fn cache_with_model(cache: &Path, main: &str, v1: &str) {
    let folder = cache.join(format!("models--{}", REPO.replace('/', "--")));
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    let blob = folder.join("blobs").join("e".repeat(64));
    std::os::unix::fs::symlink(embedded_gguf(), &blob).unwrap();
    for commit in [main, v1] {
        let snap = folder.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/{}", "e".repeat(64)),
            snap.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        )
        .unwrap();
    }
    std::fs::write(folder.join("refs/main"), main).unwrap();
    std::fs::write(folder.join("refs/v1"), v1).unwrap();
}

#[test]
fn repo_ids_resolve_as_huggingface_hub_resolves_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (main, v1) = ("1".repeat(40), "2".repeat(40));
    // The same cache reached through each variable huggingface_hub reads.
    let hub = tmp.path().join("hf-home/hub");
    cache_with_model(&hub, &main, &v1);
    std::fs::create_dir_all(tmp.path().join("xdg")).unwrap();
    std::os::unix::fs::symlink(
        tmp.path().join("hf-home"),
        tmp.path().join("xdg/huggingface"),
    )
    .unwrap();
    let s = |p: &Path| p.display().to_string();
    let envs: Vec<Vec<(&str, String)>> = vec![
        vec![("HF_HUB_CACHE", s(&hub))],
        vec![
            ("HUGGINGFACE_HUB_CACHE", s(&hub)),
            ("HF_HOME", "/nonexistent".into()),
        ],
        vec![("HF_HOME", s(&tmp.path().join("hf-home")))],
        vec![("XDG_CACHE_HOME", s(&tmp.path().join("xdg")))],
        vec![
            ("HF_HUB_CACHE", "/nonexistent".into()),
            ("HF_HOME", s(&tmp.path().join("hf-home"))),
        ],
    ];
    let revisions = [
        None,
        Some("main"),
        Some("v1"),
        Some(v1.as_str()),
        Some("v9"),
    ];
    let mut cases = vec![];
    for env in &envs {
        for rev in revisions {
            cases.push(serde_json::json!({
                "env": env.iter().cloned().collect::<std::collections::HashMap<_, _>>(),
                "repo": REPO, "revision": rev,
            }));
        }
    }
    let theirs = run_script("hub_cache.py", &serde_json::json!({ "cases": cases }));
    let mut i = 0;
    for env in &envs {
        let cache = hf_hub_cache_from(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .or_else(|| (k == "HOME").then(|| "/nonexistent-home".into()))
        });
        for rev in revisions {
            let spec = match rev {
                Some(r) => format!("{REPO}@{r}"),
                None => REPO.to_string(),
            };
            let ours = ModelSource::resolve_in(&spec, &cache, false);
            let t = &theirs[i];
            i += 1;
            match (&ours, t["path"].as_str()) {
                (Ok(ModelSource::Gguf(f)), Some(dir)) => {
                    // huggingface_hub returns the path with symlinks resolved.
                    let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
                    assert_eq!(
                        canon(f.parent().unwrap()),
                        canon(Path::new(dir)),
                        "{env:?} {spec}"
                    )
                }
                (Err(_), None) => {}
                _ => panic!("{env:?} {spec}: ours {ours:?}, huggingface_hub {t}"),
            }
            if let Ok(src) = ours {
                assert_eq!(
                    src.name(),
                    format!("{REPO}/SmolLM2-135M-Instruct.Q4_1.gguf")
                );
            }
        }
    }
    // Both find the model in the first four settings, at main, v1 and its hash; neither at v9
    // nor in the unset cache of the fifth (HF_HUB_CACHE wins over HF_HOME).
    let found = theirs
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["path"].is_string())
        .count();
    assert_eq!(found, 4 * 4, "{theirs}");
}

#[test]
fn a_model_from_the_cache_is_named_by_repo_id_and_revisions_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let (main, v1) = ("1".repeat(40), "2".repeat(40));
    let hub = tmp.path().join("hub");
    cache_with_model(&hub, &main, &v1);
    let json = tmp.path().join("eval.json");
    let o = Command::new(bin("drllm-infer"))
        .args([
            "eval",
            "--routers",
            "embedded",
            "--dataset",
            "arc_easy",
            "--split",
            "dev",
        ])
        .args([
            "--limit",
            "2",
            "--budget",
            "0",
            "--model",
            REPO,
            "--revision",
            "v1",
            "--json",
        ])
        .arg(&json)
        .env("HF_HUB_CACHE", &hub)
        .arg("--data")
        .arg(data_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        v["model"],
        format!("{REPO}/SmolLM2-135M-Instruct.Q4_1.gguf")
    );

    // An absent revision and an absent repo, offline: what is missing, where, and how to get it.
    for (model, rev, want) in [
        (REPO, "v9", "has no revision v9"),
        (
            "HuggingFaceTB/absent",
            "main",
            "HuggingFaceTB/absent is not in the Hugging Face cache",
        ),
    ] {
        let o = Command::new(bin("drllm-infer"))
            .args([
                "generate",
                "--prompt",
                "hi",
                "--model",
                model,
                "--revision",
                rev,
            ])
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{model}@{rev}");
        assert!(
            e.contains(want)
                && e.contains(&hub.display().to_string())
                && e.contains("HF_HUB_OFFLINE is set")
                && e.contains(&format!("hf download {model} --revision {rev}")),
            "{e}"
        );
    }
    // --revision is for repo ids.
    let o = Command::new(bin("drllm-infer"))
        .args([
            "generate",
            "--prompt",
            "hi",
            "--model",
            "embedded",
            "--revision",
            "v1",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("applies to a Hugging Face repo id"),
        "{e}"
    );
}

/// `tests/reference/fake_hub.py`: a hub on loopback serving `repos`, logging each request.
struct FakeHub {
    child: std::process::Child,
    url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl FakeHub {
    fn start(job: &serde_json::Value) -> Self {
        use std::io::{BufRead, Write};
        use std::process::Stdio;
        let mut child = Command::new(python())
            .arg(root().join("tests/reference/fake_hub.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(job.to_string().as_bytes())
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: serde_json::Value = serde_json::from_str(&line).expect("the hub's port");
        let requests = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let log = requests.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                match serde_json::from_str(&l) {
                    Ok(v) => log.lock().unwrap().push(v),
                    Err(_) => eprintln!("fake hub: {l}"),
                }
            }
        });
        FakeHub {
            child,
            url: format!("http://127.0.0.1:{}", port["port"]),
            requests,
        }
    }

    /// The files fetched (GET .../resolve/...) since the last call.
    fn fetched(&self) -> Vec<String> {
        let mut v: Vec<String> = std::mem::take(&mut *self.requests.lock().unwrap())
            .into_iter()
            .filter(|r| r["method"] == "GET" && r["status"].as_u64().unwrap_or(0) < 300)
            .filter_map(|r| {
                let p = r["path"].as_str()?.to_string();
                p.contains("/resolve/")
                    .then(|| p.rsplit('/').next().unwrap().to_string())
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub cache as a comparable listing: refs and their commits, and each snapshot file with the
/// blob it links to and the blob's size.
fn cache_listing(cache: &Path) -> Vec<String> {
    let mut out = vec![];
    for entry in walk(cache) {
        let rel = entry.strip_prefix(cache).unwrap().display().to_string();
        if rel.contains("/refs/") {
            out.push(format!(
                "{rel} -> {}",
                std::fs::read_to_string(&entry).unwrap()
            ));
        } else if rel.contains("/snapshots/") {
            let target = std::fs::canonicalize(&entry).unwrap();
            out.push(format!(
                "{rel} -> blobs/{} ({} bytes)",
                target.file_name().unwrap().to_string_lossy(),
                std::fs::metadata(&target).unwrap().len()
            ));
        }
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.symlink_metadata().unwrap().is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn absent_models_are_downloaded_into_the_cache_as_huggingface_hub_downloads_them() {
    let tmp = tempfile::tempdir().unwrap();
    // A tiny sharded Qwen2 written by transformers, served as a hub repo with files drllm has
    // no use for (a README, PyTorch weights).
    let job = serde_json::json!({
        "job": "tiny", "gguf": embedded_gguf(), "dir": tmp.path().join("models"), "steps": 1,
        "archs": ["qwen2"], "sharded": "qwen2", "prompts": [[1, 2, 3]], "paths": [null],
    });
    reference(job, tmp.path());
    let model_dir = tmp.path().join("models/qwen2");
    let mut files = serde_json::Map::new();
    for p in walk(&model_dir) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        files.insert(name, p.display().to_string().into());
    }
    let extra = tmp.path().join("extra");
    std::fs::write(&extra, b"not needed").unwrap();
    for name in ["README.md", "pytorch_model.bin"] {
        files.insert(name.into(), extra.display().to_string().into());
    }
    let mut ggufs = serde_json::Map::new();
    ggufs.insert(
        "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        embedded_gguf().display().to_string().into(),
    );
    ggufs.insert(
        "SmolLM2-135M-Instruct.Q8_0.gguf".into(),
        extra.display().to_string().into(),
    );
    let (main, v1) = ("a".repeat(40), "b".repeat(40));
    let hub = FakeHub::start(&serde_json::json!({
        "token": "hf_test",
        "repos": {
            "org/tiny-qwen2": {"refs": {"main": main, "v1": v1}, "files": files},
            REPO: {"refs": {"main": "c".repeat(40)}, "files": ggufs},
        }
    }));
    let ours = tmp.path().join("ours");
    let drllm = |model: &str, env: &[(&str, &str)]| {
        let mut c = Command::new(bin("drllm-infer"));
        c.args(["generate", "--prompt", "Hello", "--max-new-tokens", "4"])
            .args(["--json", "--model", model])
            .env("HF_HUB_CACHE", &ours)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_TOKEN", "hf_test")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HOME");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let text = |stdout: &str| {
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        v["tokens"].clone()
    };

    // A repo id at a tag: the model directory's files, and only those, are fetched; the model
    // generates as the directory it was served from.
    let (ok, out, e) = drllm("org/tiny-qwen2@v1", &[]);
    assert!(ok, "{e}");
    let (ok2, direct, e2) = drllm(model_dir.to_str().unwrap(), &[]);
    assert!(ok2, "{e2}");
    assert_eq!(text(&out), text(&direct));
    let fetched = hub.fetched();
    let mut want: Vec<String> = files
        .keys()
        .filter(|f| !["README.md", "pytorch_model.bin"].contains(&f.as_str()))
        .cloned()
        .collect();
    want.sort();
    assert_eq!(fetched, want);
    // Sharded: several safetensors shards and their index.
    assert!(
        fetched.iter().filter(|f| f.contains("-of-")).count() >= 2
            && fetched.iter().any(|f| f == "model.safetensors.index.json"),
        "{fetched:?}"
    );
    // ... and by commit hash (no ref is written for a hash, as huggingface_hub writes none).
    let (ok, _, e) = drllm(&format!("org/tiny-qwen2@{main}"), &[]);
    assert!(ok, "{e}");
    assert_eq!(hub.fetched(), want);
    assert!(!ours
        .join(format!("models--org--tiny-qwen2/refs/{main}"))
        .exists());

    // huggingface_hub downloads the same files from the same hub into a cache of its own: the
    // two caches hold the same refs, snapshots and blobs; and it finds drllm's offline.
    let theirs = tmp.path().join("theirs");
    let env = |cache: &Path| serde_json::json!({"HF_HUB_CACHE": cache, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"});
    let got = run_script(
        "hub_cache.py",
        &serde_json::json!({"cases": [
            {"env": env(&theirs), "repo": "org/tiny-qwen2", "revision": "v1", "download": want},
            {"env": env(&theirs), "repo": "org/tiny-qwen2", "revision": main, "download": want},
            {"env": env(&ours), "repo": "org/tiny-qwen2", "revision": "v1"},
        ]}),
    );
    assert!(
        got[0]["path"].is_string() && got[1]["path"].is_string(),
        "{got}"
    );
    hub.fetched();
    assert_eq!(cache_listing(&ours), cache_listing(&theirs));
    assert_eq!(
        std::fs::canonicalize(got[2]["path"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(ours.join(format!("models--org--tiny-qwen2/snapshots/{v1}")))
            .unwrap()
    );

    // A GGUF repo of several quantizations: the file is named, and only it is fetched.
    let (ok, _, e) = drllm(REPO, &[]);
    assert!(
        !ok && e.contains("holds 2 .gguf files; name one as")
            && e.contains("SmolLM2-135M-Instruct.Q8_0.gguf"),
        "{e}"
    );
    let (ok, _, e) = drllm(&format!("{REPO}/SmolLM2-135M-Instruct.Q4_1.gguf"), &[]);
    assert!(ok, "{e}");
    assert_eq!(hub.fetched(), vec!["SmolLM2-135M-Instruct.Q4_1.gguf"]);

    // No token for a gated repo, HF_HUB_OFFLINE, a revision the hub lacks: clear refusals.
    let (ok, _, e) = drllm("org/tiny-qwen2", &[("HF_TOKEN", "")]);
    assert!(
        !ok && e.contains("org/tiny-qwen2 has no revision main")
            && e.contains(&hub.url)
            && e.contains("HF_TOKEN"),
        "{e}"
    );
    let (ok, _, e) = drllm("org/tiny-qwen2", &[("HF_HUB_OFFLINE", "1")]);
    assert!(!ok && e.contains("HF_HUB_OFFLINE is set"), "{e}");
    let (ok, _, e) = drllm("org/tiny-qwen2@v9", &[]);
    assert!(
        !ok && e.contains("cannot list org/tiny-qwen2 at revision v9"),
        "{e}"
    );
    assert!(hub.fetched().is_empty());

    // With the hub gone, what is cached still loads.
    let url = hub.url.clone();
    drop(hub);
    let (ok, _, e) = Command::new(bin("drllm-infer"))
        .args(["generate", "--prompt", "Hello", "--max-new-tokens", "1"])
        .args(["--model", "org/tiny-qwen2@v1"])
        .env("HF_HUB_CACHE", &ours)
        .env("HF_ENDPOINT", &url)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        })
        .unwrap();
    assert!(ok, "{e}");
}
