//! Downloading a model from the Hugging Face hub into the local hub cache, laid out as
//! `huggingface_hub` lays it out (blobs named by etag, a snapshot per commit, `refs/REV`), so that
//! `transformers`, `hf` and drllm share one copy. The `hf-hub` crate does the transfer; this
//! module only chooses the files a drllm model needs and the settings `huggingface_hub` users set
//! (`HF_ENDPOINT`, `HF_TOKEN`, `HF_TOKEN_PATH`).
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::error::HubError;

/// The files of a Hugging Face model directory drllm reads (weights, config, tokenizer, chat
/// template, stop tokens); everything else in a repo (other formats, READMEs, images) is left.
fn wanted(file: &str) -> bool {
    matches!(
        file,
        "config.json"
            | "generation_config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "special_tokens_map.json"
            | "chat_template.jinja"
            | "model.safetensors.index.json"
    ) || (file.ends_with(".safetensors") && !file.contains('/'))
}

/// The access token, looked up as `huggingface_hub` does: `HF_TOKEN`, else the file at
/// `HF_TOKEN_PATH`, else `token` in the hub cache's parent (`HF_HOME`).
fn token(cache: &Path) -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Some(t.trim().to_string());
    }
    let path = match std::env::var_os("HF_TOKEN_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => cache.parent()?.join("token"),
    };
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The hub drllm talks to: `HF_ENDPOINT`, else huggingface.co.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// Downloads `repo` at `revision` into the hub cache `cache` and returns its snapshot directory.
/// `file` names the one file to fetch (a `.gguf` of a repo holding many quantizations); without
/// it, the files of a Hugging Face model directory are fetched. Errors name the repo, revision
/// and hub.
pub fn download(
    cache: &Path,
    repo: &str,
    revision: &str,
    file: Option<&str>,
) -> Result<PathBuf, HubError> {
    let hub = endpoint();
    let api = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_endpoint(hub.clone())
        .with_token(token(cache))
        .with_progress(true)
        .build()
        .map_err(|source| HubError::Client {
            hub: hub.clone(),
            source,
        })?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = handle.info().map_err(|source| HubError::List {
        repo: repo.into(),
        revision: revision.into(),
        hub: hub.clone(),
        source,
    })?;
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let ggufs: Vec<String> = listed
        .iter()
        .filter(|n| n.ends_with(".gguf"))
        .map(|n| n.to_string())
        .collect();
    let files: Vec<&str> = match file {
        Some(f) if listed.contains(&f) => vec![f],
        Some(f) => {
            return Err(HubError::NoFile {
                repo: repo.into(),
                revision: revision.into(),
                hub,
                file: f.into(),
                ggufs,
            });
        }
        None => {
            let files: Vec<&str> = listed.iter().copied().filter(|n| wanted(n)).collect();
            if !files.contains(&"config.json") {
                return Err(match ggufs.as_slice() {
                    [] => HubError::NoModelFiles {
                        repo: repo.into(),
                        revision: revision.into(),
                        hub,
                    },
                    [one] => return download(cache, repo, revision, Some(one)),
                    _ => HubError::SeveralGguf {
                        repo: repo.into(),
                        revision: revision.into(),
                        hub,
                        ggufs,
                    },
                });
            }
            files
        }
    };
    let mut snapshot = None;
    for f in files {
        tracing::info!(%repo, %revision, file = f, hub = %hub, "downloading");
        let path = handle.get(f).map_err(|source| HubError::Download {
            file: f.into(),
            repo: repo.into(),
            revision: revision.into(),
            hub: hub.clone(),
            source,
        })?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    // hf-hub records the ref under the revision asked for; huggingface_hub keeps no ref for a
    // commit hash (the snapshot directory is its own name), so neither does drllm.
    let is_hash = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hash {
        let r = cache
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("refs")
            .join(revision);
        let _ = std::fs::remove_file(r);
    }
    snapshot.ok_or_else(|| HubError::Nothing {
        repo: repo.into(),
        revision: revision.into(),
        hub,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_a_model_directory_needs_are_wanted() {
        for f in [
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "chat_template.jinja",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "README.md",
            "pytorch_model.bin",
            "onnx/model.onnx",
            "original/consolidated.safetensors",
            "model.Q4_K_M.gguf",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
