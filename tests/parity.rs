//! Parity of the runtime with Hugging Face transformers on the same weights
//! (reference outputs from tests/reference/hf_reference.py).
mod common;

use common::*;
use drllm::runtime::tch::{Device, Kind, Tensor};
use drllm::runtime::{
    GenerateOptions, GenerateRequest, LayerPath, LoadedModel, Message, ModelSource, PathBatch,
    Paths,
};

/// First `n` ARC-Challenge dev questions as chat messages.
fn arc_chats(n: usize) -> Vec<Vec<Message>> {
    read_jsonl(&data_dir().join("arc/ARC-Challenge-Dev.jsonl"), n)
        .iter()
        .map(|row| {
            let q = &row["question"];
            let mut text = format!("{}\n", q["stem"].as_str().unwrap());
            for c in q["choices"].as_array().unwrap() {
                text += &format!(
                    "{}. {}\n",
                    c["label"].as_str().unwrap(),
                    c["text"].as_str().unwrap()
                );
            }
            text += "Answer with the letter of the correct choice.";
            vec![Message::user(text)]
        })
        .collect()
}

/// A path with skips and repeats for a model of `n` blocks (those of the 30-block model that
/// exist).
fn edited_path(n: usize) -> LayerPath {
    let mut counts = vec![1u8; n];
    for l in [3, 11, 17].into_iter().filter(|&l| l < n) {
        counts[l] = 0;
    }
    for l in [5, 20].into_iter().filter(|&l| l < n) {
        counts[l] = 2;
    }
    LayerPath::from_counts(counts).unwrap()
}

fn path_json(p: &LayerPath) -> serde_json::Value {
    p.counts()
        .iter()
        .map(|&c| c as u64)
        .collect::<Vec<_>>()
        .into()
}

/// Feeds `tokens` one by one after prefilling `prompt` and compares each step's logits with the
/// reference's no-cache logits: checks our per-slot KV caches against a cache-free run.
fn teacher_forced_max_diff(
    lm: &LoadedModel,
    prompt: &[u32],
    path: &LayerPath,
    tokens: &[u32],
    reference: &Tensor,
) -> f64 {
    let _g = drllm::runtime::tch::no_grad_guard();
    let mut b = PathBatch::new(&lm.model, std::slice::from_ref(path)).unwrap();
    let _ = b.prefill(&[prompt.to_vec()]).unwrap();
    let mut worst: f64 = 0.0;
    for (s, &tok) in tokens.iter().enumerate().take(tokens.len() - 1) {
        let logits = b.decode_step(&[tok]).unwrap();
        worst = worst.max(max_abs_diff(&logits.get(0), &reference.get(s as i64 + 1)));
    }
    worst
}

/// Greedy continuations `gens` of `prompts` along `path` (the reference's path `j`) equal the
/// reference's, and our KV-cached decode steps give its cache-free logits within `tol`.
fn check_greedy(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    path: &LayerPath,
    j: usize,
    gens: &[drllm::runtime::Generated],
    (r, t): (
        &serde_json::Value,
        &std::collections::HashMap<String, Tensor>,
    ),
    tol: f64,
) {
    for (i, g) in gens.iter().enumerate() {
        let want = ids(&r["generated"][i][format!("path{j}")]);
        assert_eq!(g.tokens, want, "greedy continuation, path {j} prompt {i}");
        let d = teacher_forced_max_diff(
            lm,
            &prompts[i],
            path,
            &want,
            &t[&format!("p{i}_path{j}_steps")],
        );
        assert!(
            d <= tol,
            "decode-step logits vs no-cache reference, path {j} prompt {i}: {d}"
        );
    }
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = embedded_gguf();
    let chats = arc_chats(5);
    let lm = LoadedModel::load(ModelSource::Gguf(gguf.clone()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    assert_eq!(n, 30);
    let edited = edited_path(n);
    let paths = [LayerPath::all_ones(n), edited.clone()];
    let job = serde_json::json!({
        "job": "gguf", "gguf": gguf, "steps": 20,
        "chats": chats, "paths": [serde_json::Value::Null, path_json(&edited)],
    });
    let (r, t) = reference(job, tmp.path());

    // Chat template and tokenizer.
    let mut prompts = vec![];
    for (i, chat) in chats.iter().enumerate() {
        let text = lm.tokenizer.apply_chat_template(chat).unwrap();
        assert_eq!(
            text,
            r["rendered"][i].as_str().unwrap(),
            "chat template, prompt {i}"
        );
        let ours = lm.tokenizer.encode(&text, false).unwrap();
        assert_eq!(ours, ids(&r["ids"][i]), "token ids, prompt {i}");
        prompts.push(ours);
    }

    for (j, path) in paths.iter().enumerate() {
        // Logits at every position, all prompts in one left-padded batch.
        let logits = lm
            .model
            .prompt_logits(&prompts, &vec![path.clone(); prompts.len()])
            .unwrap();
        for (i, l) in logits.iter().enumerate() {
            let d = max_abs_diff(l, &t[&format!("p{i}_path{j}_logits")]);
            assert!(d <= 1e-3, "path {j} prompt {i}: max |logit diff| {d}");
        }
        // 20 greedy tokens, batched, with our KV caches.
        let opts = GenerateOptions {
            max_new_tokens: 20,
            stop_ids: vec![],
        };
        let gens = generate_fixed(&lm, &prompts, &vec![path.clone(); prompts.len()], &opts);
        if j == 0 {
            // With the file's EOS (<|im_end|>) as stop id, against transformers' generate().
            let opts = GenerateOptions {
                max_new_tokens: 20,
                stop_ids: lm.stop_ids(),
            };
            let stopped = generate_fixed(&lm, &prompts, &vec![path.clone(); prompts.len()], &opts);
            for (i, g) in stopped.iter().enumerate() {
                let mut want = ids(&r["generated"][i]["generate"]);
                if want.last() == Some(&2) {
                    want.pop();
                    assert!(g.stopped, "prompt {i} should stop at <|im_end|>");
                }
                assert_eq!(g.tokens, want, "generate() with EOS, prompt {i}");
            }
        }
        check_greedy(&lm, &prompts, path, j, &gens, (&r, &t), 1e-3);
    }
}

/// Gemma 3 270M as GGUF-my-repo converts it (`scripts/fetch-model.sh gemma-3-270m`, 253 MB:
/// Q5_0, Q8_0, Q4_K and Q6_K matrices, norms stored with the 1 added, a SentencePiece vocabulary
/// without merges): token ids of 300 real strings, and logits, greedy continuations and
/// KV-cached decode steps along the default and an edited path, equal to transformers loading
/// the same file. One prompt is longer than the 512-token sliding window, so local blocks hide
/// keys in prefill and in decode.
#[test]
fn gemma3_270m_gguf_matches_transformers() {
    let gguf = fetched_model("gemma-3-270m");
    let tmp = tempfile::tempdir().unwrap();
    let lm = LoadedModel::load(ModelSource::Gguf(gguf.clone()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    assert_eq!(n, 18);

    let strings = tokenizer_strings();
    let (r, _) = reference(
        serde_json::json!({"job": "tokens", "gguf": gguf, "strings": strings}),
        tmp.path(),
    );
    for (i, s) in strings.iter().enumerate() {
        assert_eq!(
            lm.tokenizer.encode(s, false).unwrap(),
            ids(&r["ids"][i]),
            "string {i}: {s:?}"
        );
    }

    let questions: Vec<String> = arc_chats(12)
        .iter()
        .map(|c| format!("Question: {}\nAnswer:", c[0].content))
        .collect();
    let texts = vec![
        questions[0].clone(),
        questions[1].clone(),
        questions.join("\n\n"),
    ];
    let edited = edited_path(n);
    let paths = [LayerPath::all_ones(n), edited.clone()];
    let job = serde_json::json!({
        "job": "gguf", "gguf": gguf, "steps": 12, "texts": texts, "keep_last": 64,
        "paths": [serde_json::Value::Null, path_json(&edited)],
    });
    let (r, t) = reference(job, tmp.path());
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ours = lm.tokenizer.encode(s, true).unwrap();
            assert_eq!(ours, ids(&r["ids"][i]), "token ids (with BOS), prompt {i}");
            ours
        })
        .collect();
    assert!(prompts[2].len() > 512, "{} tokens", prompts[2].len());
    for (j, path) in paths.iter().enumerate() {
        let logits = lm
            .model
            .prompt_logits(&prompts, &vec![path.clone(); prompts.len()])
            .unwrap();
        for (i, l) in logits.iter().enumerate() {
            // The last 64 positions (262,144 logits each).
            let keep = l.size()[0].min(64);
            let l = l.narrow(0, l.size()[0] - keep, keep);
            let d = max_abs_diff(&l, &t[&format!("p{i}_path{j}_logits")]);
            assert!(d <= 2e-3, "path {j} prompt {i}: max |logit diff| {d}");
        }
        let opts = GenerateOptions {
            max_new_tokens: 12,
            stop_ids: vec![],
        };
        let gens = generate_fixed(&lm, &prompts, &vec![path.clone(); prompts.len()], &opts);
        check_greedy(&lm, &prompts, path, j, &gens, (&r, &t), 2e-3);
    }
}

/// 300 real strings from the shared data plus edge cases.
fn tokenizer_strings() -> Vec<String> {
    let d = data_dir();
    let mut v: Vec<String> = vec![];
    for row in read_jsonl(&d.join("arc/ARC-Easy-Train.jsonl"), 100) {
        let q = &row["question"];
        let choices: Vec<&str> = q["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap())
            .collect();
        v.push(format!(
            "{} {}",
            q["stem"].as_str().unwrap(),
            choices.join(" | ")
        ));
    }
    v.extend(
        read_jsonl(&d.join("math/train.jsonl"), 100)
            .iter()
            .map(|r| {
                format!(
                    "{}\n{}",
                    r["problem"].as_str().unwrap(),
                    r["solution"].as_str().unwrap()
                )
            }),
    );
    v.extend(
        read_jsonl(&d.join("gsm8k/train.jsonl"), 100)
            .iter()
            .map(|r| {
                format!(
                    "{}\n{}",
                    r["question"].as_str().unwrap(),
                    r["answer"].as_str().unwrap()
                )
            }),
    );
    for s in [
        "",
        " ",
        "  leading and trailing  ",
        "\n\n\tTabs\tand\r\nCRLF\n",
        "12345678901234567890",
        "3.14159 and -2.5e-3",
        "don't won't it's I'M we'LL",
        "naïve café résumé",
        "日本語のテキストと中文",
        "emoji 🤖🎉 mixed",
        "\u{200b}zero\u{200b}width",
        "<|im_start|>user\nhi<|im_end|>",
        "$\\frac{1}{2} + \\sqrt{x^2}$",
        "a    many     spaces",
        "Ünïcödé ÀÉÎÕÜ ß",
        "x=1;y=2\n\n\n",
        "((((nested))))",
        "https://example.com/a?b=c&d=e",
        "tab\tsep\tvalues",
        "ends with newline\n",
    ] {
        v.push(s.to_string());
    }
    v
}

#[test]
fn tokenizer_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = embedded_gguf();
    let strings = tokenizer_strings();
    assert!(strings.len() >= 320);
    let (r, _) = reference(
        serde_json::json!({"job": "tokens", "gguf": gguf, "strings": strings}),
        tmp.path(),
    );
    eprintln!(
        "strings where transformers' uncorrected GGUF tokenizer differs: {}",
        r["uncorrected_differs"]
    );
    let lm_tok = {
        let g = drllm::runtime::gguf::GgufFile::open(&gguf).unwrap();
        drllm::runtime::Tokenizer::from_gguf(&g).unwrap()
    };
    for (i, s) in strings.iter().enumerate() {
        // The reference is asked without special tokens: the file says add_bos_token = false and
        // no BOS may be prepended; some transformers versions prepend one on GGUF tokenizers.
        let ours = lm_tok.encode(s, false).unwrap();
        assert_eq!(ours, ids(&r["ids"][i]), "string {i}: {s:?}");
        assert_eq!(
            lm_tok.encode(s, true).unwrap(),
            ours,
            "add_bos_token is false: no BOS for {s:?}"
        );
    }
    // Metadata says eos = 2 (<|im_end|>).
    assert_eq!(lm_tok.eos.as_ref().unwrap(), &("<|im_end|>".to_string(), 2));
}

#[test]
fn tiny_random_models_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 6;
    let paths = [
        LayerPath::all_ones(n),
        LayerPath::from_counts(vec![1, 0, 2, 1, 0, 1]).unwrap(),
        LayerPath::from_counts(vec![2, 1, 1, 0, 2, 2]).unwrap(),
    ];
    let prompts: Vec<Vec<u32>> = vec![
        vec![17, 2043, 99, 5, 4000, 12, 731],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        vec![30000, 7, 8],
    ];
    let job = serde_json::json!({
        "job": "tiny", "gguf": embedded_gguf(), "dir": tmp.path(), "steps": 8,
        "archs": ["llama", "qwen2", "qwen3", "gemma", "gemma3"], "sharded": "qwen2",
        "prompts": prompts,
        "paths": [serde_json::Value::Null, path_json(&paths[1]), path_json(&paths[2])],
    });
    let (r, t) = reference(job, tmp.path());
    assert!(
        tmp.path()
            .join("qwen2/model.safetensors.index.json")
            .exists(),
        "qwen2 should be saved sharded"
    );
    for arch in ["llama", "qwen2", "qwen3", "gemma", "gemma3"] {
        let lm = LoadedModel::load(
            ModelSource::resolve(tmp.path().join(arch).to_str().unwrap()).unwrap(),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        // Every (prompt, path) pair in ONE batch: rows take different paths and lengths.
        let mut rows = vec![];
        for (i, p) in prompts.iter().enumerate() {
            for (j, path) in paths.iter().enumerate() {
                rows.push((i, j, p.clone(), path.clone()));
            }
        }
        let batch_prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.2.clone()).collect();
        let batch_paths: Vec<LayerPath> = rows.iter().map(|r| r.3.clone()).collect();
        let logits = lm
            .model
            .prompt_logits(&batch_prompts, &batch_paths)
            .unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 8,
            stop_ids: vec![],
        };
        let gens = generate_fixed(&lm, &batch_prompts, &batch_paths, &opts);
        // Rows leaving the batch at different steps (their caches dropped) do not disturb the
        // others.
        let mut until = |i: usize, t: &[u32]| t.len() > i % 4;
        let req = GenerateRequest::new(&batch_prompts, Paths::Fixed(&batch_paths), opts)
            .until(&mut until);
        let early = lm.model.generate(req).unwrap().outputs;
        for (k, e) in early.iter().enumerate() {
            assert_eq!(e.tokens.len(), k % 4 + 1, "{arch} row {k}");
            assert_eq!(
                e.tokens[..],
                gens[k].tokens[..e.tokens.len()],
                "{arch} row {k}"
            );
        }
        for (k, (i, j, prompt, path)) in rows.iter().enumerate() {
            let key = format!("{arch}_p{i}_path{j}");
            let d = max_abs_diff(&logits[k], &t[&format!("{key}_logits")]);
            assert!(d <= 1e-4, "{key}: max |logit diff| {d}");
            let want = ids(&r[arch][*i][format!("path{j}")]);
            assert_eq!(gens[k].tokens, want, "{key}: greedy tokens");
            let d = teacher_forced_max_diff(&lm, prompt, path, &want, &t[&format!("{key}_steps")]);
            assert!(
                d <= 1e-4,
                "{key}: decode-step logits vs no-cache reference: {d}"
            );
        }
    }

    // Bad model directories built from the good ones: clear errors naming file and field.
    let good = tmp.path().join("llama");
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(&good).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, bad.join(f.file_name().unwrap())).unwrap();
    }
    let load = || {
        LoadedModel::load(ModelSource::HfDir(bad.clone()), Device::Cpu, Kind::Float)
            .err()
            .expect("must fail")
            .to_string()
    };
    let cfg_text = std::fs::read_to_string(good.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["intermediate_size"] = 80.into();
    std::fs::write(bad.join("config.json"), cfg.to_string()).unwrap();
    let msg = load();
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("[80, 64]"),
        "{msg}"
    );
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(bad.join("config.json"), cfg.to_string()).unwrap();
    let msg = load();
    assert!(
        msg.contains("config.json") && msg.contains("hidden_size"),
        "{msg}"
    );
    std::fs::write(bad.join("config.json"), &cfg_text).unwrap();
    std::fs::remove_file(bad.join("tokenizer.json")).unwrap();
    let msg = load();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

/// K-quants (Q4_K, Q5_K, Q6_K: the matrices of the hub's Q4_K_M / Q5_K_M files; Q2_K and Q3_K:
/// those of Q2_K / Q3_K_M files) and Q5_0 / Q5_1 (which some of those mixes hold): a tiny LLaMA GGUF of random blocks, written by the `gguf` package. Every tensor dequantizes to the package's own
/// values bit for bit, and the loaded model's logits equal transformers' on the same file.
#[test]
fn k_quant_gguf_matches_gguf_package_and_transformers() {
    use drllm::runtime::gguf::{dequantize, GgufFile};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-kquant.gguf");
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 504, 3458, 314, 260, 6421, 47, 28, 216],
        vec![9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3717],
    ];
    let job = serde_json::json!({
        "job": "kquant", "tokenizer_gguf": embedded_gguf(), "path": path, "prompts": prompts,
    });
    let (r, t) = reference(job, tmp.path());

    let file = GgufFile::open(&path).unwrap();
    let types = r["types"].as_object().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (name, ty) in types {
        let info = &file.tensors[name];
        assert_eq!(format!("{:?}", info.ty), ty.as_str().unwrap(), "{name}");
        seen.insert(ty.as_str().unwrap().to_string());
        let ours = dequantize(info.ty, file.tensor_bytes(info));
        let want = Vec::<f32>::try_from(t[&format!("dequant.{name}")].flatten(0, -1)).unwrap();
        assert_eq!(ours.len(), want.len(), "{name}: element count");
        let differ = ours
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{name} ({ty}): {differ} values differ from gguf's"
        );
    }
    assert_eq!(
        seen.len(),
        7,
        "Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 all checked: {seen:?}"
    );

    let lm = LoadedModel::load(ModelSource::Gguf(path.clone()), Device::Cpu, Kind::Float).unwrap();
    let n = lm.model.num_layers();
    let logits = lm
        .model
        .prompt_logits(&prompts, &vec![LayerPath::all_ones(n); prompts.len()])
        .unwrap();
    for (i, l) in logits.iter().enumerate() {
        let d = max_abs_diff(l, &t[&format!("p{i}_logits")]);
        assert!(d <= 1e-4, "prompt {i}: max |logit diff| {d}");
    }
}
