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
            let ours = ModelSource::resolve_in(&spec, &cache);
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
