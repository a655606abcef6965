//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or rebuilt from GGUF metadata: a
//! byte-level BPE (tokens, merges, token types, pre-tokenizer name) with llama.cpp's semantics,
//! or the SentencePiece BPE of Gemma 3 files as transformers rebuilds it.
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::config::ids_of;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Pre-tokenizer regexes of the llama.cpp `tokenizer.ggml.pre` values we support. The patterns
/// are the published ones of each model family (LLaMA-3, Qwen2).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the special tokens and chat template of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
    /// Prepend BOS when encoding with special tokens (GGUF `add_bos_token`; `tokenizer.json`
    /// files do this in their own post-processor instead).
    prepend_bos: bool,
    /// BOS token text and id, if the model has one.
    pub bos: Option<(String, u32)>,
    /// EOS token text and id, if the model has one.
    pub eos: Option<(String, u32)>,
    /// Additional stop ids (e.g. from `generation_config.json`).
    pub extra_stop_ids: Vec<u32>,
    /// Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
}

fn tok_err(source: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        source_name: source.to_string(),
        msg: e.to_string(),
    }
}

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template),
    /// `chat_template.jinja` and `generation_config.json` from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::bad_file(
                dir,
                "missing tokenizer.json (needed to tokenize prompts)",
            ));
        }
        let source = tj.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| tok_err(&source, e))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::bad_file(&p, format!("invalid JSON: {e}")))
        };
        let tc = read_json("tokenizer_config.json")?.unwrap_or(serde_json::Value::Null);
        let special = |key: &str| -> Option<(String, u32)> {
            let text = tc.get(key).and_then(token_text)?;
            let id = inner.token_to_id(&text)?;
            Some((text, id))
        };
        let bos = special("bos_token");
        let eos = special("eos_token");
        let mut chat_template = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(String::from)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        // Chat models list their end-of-turn ids here (config.json's are read with the config).
        let extra_stop_ids = match read_json("generation_config.json")? {
            Some(v) => v.get("eos_token_id").map(ids_of).unwrap_or_default(),
            None => vec![],
        }
        .into_iter()
        .filter(|&i| i >= 0)
        .map(|i| i as u32)
        .collect();
        Ok(Tokenizer {
            inner,
            source,
            prepend_bos: false,
            bos,
            eos,
            extra_stop_ids,
            chat_template,
        })
    }

    /// Builds the tokenizer described by GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let source = g.path().display().to_string();
        let model = g.get_str("tokenizer.ggml.model")?;
        let arch = g
            .metadata
            .get("general.architecture")
            .and_then(|v| v.as_str());
        let sentencepiece = match (model, arch) {
            ("gpt2", _) => false,
            ("llama", Some("gemma3")) => true,
            _ => {
                return Err(Error::Unsupported {
                    source_name: source,
                    key: "tokenizer.ggml.model".into(),
                    value: model.into(),
                    supported: "gpt2 (byte-level BPE); llama (SentencePiece) in gemma3 files"
                        .into(),
                })
            }
        };
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let mut inner = if sentencepiece {
            gemma_sentencepiece(&source, &tokens)?
        } else {
            Self::byte_level_bpe(g, &source, &tokens)?
        };
        if let Some(types) = g
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            let mut control = vec![];
            let mut user = vec![];
            for (t, ty) in tokens.iter().zip(types) {
                match ty.as_u64().or_else(|| ty.as_f64().map(|f| f as u64)) {
                    Some(3) => {
                        control.push(AddedToken::from(t.to_string(), true).normalized(false))
                    }
                    // Only tokens the vocabulary spells so (transformers skips the others, as
                    // Gemma's whitespace tokens respelled with `▁`): no ids past the model's.
                    Some(4) if tokenizers::Model::token_to_id(inner.get_model(), t).is_some() => {
                        user.push(AddedToken::from(t.to_string(), false).normalized(false))
                    }
                    _ => {}
                }
            }
            inner.add_special_tokens(&control);
            inner.add_tokens(&user);
        }
        let id_key = |key: &str| -> Option<(String, u32)> {
            let id = g.metadata.get(key)?.as_u64()? as usize;
            Some((tokens.get(id)?.to_string(), id as u32))
        };
        let bos = id_key("tokenizer.ggml.bos_token_id");
        let eos = id_key("tokenizer.ggml.eos_token_id");
        let extra_stop_ids = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| id_key(k).map(|(_, id)| id))
            .collect();
        // A SentencePiece vocabulary that does not say gets BOS (llama.cpp and transformers).
        let prepend_bos = g
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(model == "llama");
        let chat_template = g
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from);
        Ok(Tokenizer {
            inner,
            source,
            prepend_bos,
            bos,
            eos,
            extra_stop_ids,
            chat_template,
        })
    }

    /// The byte-level BPE of a `gpt2` GGUF vocabulary, with its pre-tokenizer.
    fn byte_level_bpe(
        g: &GgufFile,
        source: &str,
        tokens: &[&str],
    ) -> Result<tokenizers::Tokenizer> {
        let source = source.to_string();
        let pre = g
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level = |use_regex: bool| {
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex))
        };
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Ok(PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(re.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(&source, e))?,
            ))
        };
        let pre_tokenizer = match pre {
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            // llama.cpp splits every digit first, then applies the GPT-2 regex.
            "smollm" | "starcoder" | "refact" | "codeshell" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false)]))
            }
            "qwen2" | "deepseek-r1-qwen" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false)]))
            }
            other => {
                return Err(Error::Unsupported {
                    source_name: source,
                    key: "tokenizer.ggml.pre".into(),
                    value: other.into(),
                    supported: "default, gpt2, smollm, starcoder, refact, codeshell, llama3, llama-bpe, smaug-bpe, qwen2, deepseek-r1-qwen".into(),
                })
            }
        };
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        Error::config(
                            &source,
                            "tokenizer.ggml.merges",
                            format!("entry {i} {m:?} is not \"left right\""),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(&source, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        Ok(inner)
    }

    /// Encodes text. With `add_special`, BOS is added the way the model expects; chat-templated
    /// text is encoded without (the template writes its own special tokens).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| tok_err(&self.source, e))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.prepend_bos {
            if let Some((_, bos)) = &self.bos {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Decodes ids to text, special tokens kept (so that re-encoding gives the ids back).
    pub fn decode_keep_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// The text of one token, special tokens included (as OpenAI's `logprobs.tokens` show it).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Ids that end generation: EOS plus any extra stop ids, deduplicated.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .eos
            .iter()
            .map(|(_, id)| *id)
            .chain(self.extra_stop_ids.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// An upper bound on the bytes of input text one token covers: the longest token's text,
    /// plus one (SentencePiece drops a leading space when a token is decoded alone), times 4
    /// when the tokenizer normalizes text first (NFC composes up to 3 UTF-8 characters into
    /// one of 3 bytes). Text longer than `n` times this is more than `n` tokens, so servers
    /// refuse such prompts before tokenizing them. Decodes every token once (about a second
    /// for 150k tokens).
    pub fn max_bytes_per_token(&self) -> usize {
        let longest = (0..self.inner.get_vocab_size(true) as u32)
            .map(|id| self.inner.decode(&[id], false).map_or(0, |t| t.len()))
            .max()
            .unwrap_or(0);
        let normalizes = self.inner.get_normalizer().is_some();
        (longest + 1) * if normalizes { 4 } else { 1 }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders a chat with the model's template (`add_generation_prompt` = true).
    pub fn apply_chat_template(&self, messages: &[crate::chat::Message]) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template(format!(
                "{} has no chat template; run without --chat",
                self.source
            ))
        })?;
        crate::chat::render(
            template,
            messages,
            self.bos.as_ref().map(|b| b.0.as_str()).unwrap_or(""),
            self.eos.as_ref().map(|b| b.0.as_str()).unwrap_or(""),
        )
    }
}

/// The SentencePiece BPE of a Gemma 3 GGUF file, built as transformers' GGUF loader builds it
/// (the reference its parity test checks against; llama.cpp's own tokenizer uses the scores
/// instead): tokens of spaces only, stored as spaces, are spelled with `▁` as `GemmaTokenizer`
/// looks them up; the file has no merges, so they are rebuilt from the vocabulary, every split
/// of a token into two tokens, best first in the order the tokens appear in the file (Gemma's
/// scores do not follow its merge order); byte fallback; spaces normalised to `▁` with no
/// other pre-tokenization. Written here because the `tokenizers` crate has no builder for a
/// vocabulary without merges.
fn gemma_sentencepiece(source: &str, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    use std::collections::HashMap;
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence,
    };
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::{DecoderWrapper, NormalizerWrapper};

    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    // As a Python dict built in file order: the last id of a repeated spelling wins, the first
    // occurrence fixes its place.
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(spelled.len());
    let mut order: Vec<&str> = Vec::with_capacity(spelled.len());
    for (i, t) in spelled.iter().enumerate() {
        if vocab.insert(t.clone(), i as u32).is_none() {
            order.push(t);
        }
    }
    // (left, right, merged token's id, chars of left, chars of right).
    let mut merges: Vec<(&str, &str, u32, usize, usize)> = vec![];
    for &t in &order {
        let id = vocab[t];
        let mut local: Vec<(&str, &str, u32, usize, usize)> = t
            .char_indices()
            .skip(1)
            .enumerate()
            .filter_map(|(k, (at, _))| {
                let (l, r) = t.split_at(at);
                (vocab.contains_key(l) && vocab.contains_key(r)).then(|| {
                    let left_chars = k + 1;
                    (l, r, id, left_chars, t.chars().count() - left_chars)
                })
            })
            .collect();
        local.sort_by_key(|m| (vocab[m.0], vocab[m.1]));
        merges.extend(local);
    }
    // Best first: lower ids, then longer left and right parts (a stable sort, as Python's).
    merges.sort_by(|a, b| (a.2, b.3, b.4).cmp(&(b.2, a.3, a.4)));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| tok_err(source, e))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_normalizer(Some(NormalizerWrapper::Replace(
        Replace::new(" ", "\u{2581}").map_err(|e| tok_err(source, e))?,
    )));
    inner.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(|e| tok_err(source, e))?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ]))));
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::GgufBuilder;

    fn tiny(pre: &str) -> GgufBuilder {
        GgufBuilder::new()
            .kv_str("general.architecture", "llama")
            .kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str("tokenizer.ggml.pre", pre)
            .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "ab", "Ġ", "1", "2"])
            .kv_str_array("tokenizer.ggml.merges", &["a b"])
            .kv_u32("tokenizer.ggml.eos_token_id", 2)
    }

    #[test]
    fn builds_byte_level_bpe_from_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let g = GgufFile::open(tiny("smollm").write(dir.path(), "t.gguf")).unwrap();
        let t = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(t.encode("ab a", false).unwrap(), vec![2, 3, 0]);
        assert_eq!(t.encode("12", false).unwrap(), vec![4, 5]);
        assert_eq!(t.decode(&[2, 3, 0]).unwrap(), "ab a");
        assert_eq!(t.stop_ids(), vec![2]);
    }

    #[test]
    fn unknown_pre_tokenizer_and_model_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let g = GgufFile::open(tiny("mystery-pre").write(dir.path(), "t.gguf")).unwrap();
        let msg = Tokenizer::from_gguf(&g).err().unwrap().to_string();
        assert!(
            msg.contains("tokenizer.ggml.pre") && msg.contains("mystery-pre"),
            "{msg}"
        );
        let g = GgufFile::open(
            GgufBuilder::new()
                .kv_str("tokenizer.ggml.model", "llama")
                .write(dir.path(), "s.gguf"),
        )
        .unwrap();
        let msg = Tokenizer::from_gguf(&g).err().unwrap().to_string();
        assert!(
            msg.contains("tokenizer.ggml.model") && msg.contains("llama"),
            "{msg}"
        );
        let g = GgufFile::open(GgufBuilder::new().write(dir.path(), "e.gguf")).unwrap();
        let msg = Tokenizer::from_gguf(&g).err().unwrap().to_string();
        assert!(
            msg.contains("tokenizer.ggml.model") && msg.contains("missing"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_architecture_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let g = GgufFile::open(
            GgufBuilder::new()
                .kv_str("general.architecture", "falcon")
                .write(dir.path(), "f.gguf"),
        )
        .unwrap();
        let msg = crate::config::ModelConfig::from_gguf(&g)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("general.architecture") && msg.contains("falcon"),
            "{msg}"
        );
        let g = GgufFile::open(
            GgufBuilder::new()
                .kv_str("general.architecture", "llama")
                .write(dir.path(), "l.gguf"),
        )
        .unwrap();
        let msg = crate::config::ModelConfig::from_gguf(&g)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("llama.embedding_length"), "{msg}");
    }
}
