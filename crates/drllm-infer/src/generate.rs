//! Generation for a batch of prompts, each along one layer path: a fixed path, or the path the
//! routers choose for it during prefill (decided once per prompt, then decoding follows it).
use anyhow::Result;
use drllm_router::Policy;
use drllm_runtime::{GenerateOptions, GenerateRequest, LayerPath, LoadedModel, Message, Paths};

/// Which path each prompt takes.
pub enum Routing<'a> {
    /// Every prompt along this path.
    Path(LayerPath),
    /// Each prompt along the path these routers choose for it.
    Routers(&'a Policy),
}

/// One prompt's greedy continuation.
#[derive(Debug, Clone)]
pub struct Completion {
    /// New token ids (stop token excluded).
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it (else the token budget did).
    pub stopped: bool,
    /// The path it was generated along.
    pub path: LayerPath,
}

/// Token ids of `text` as a prompt: with `chat = Some(system)`, wrapped as a user message (after
/// an optional system message) in the model's chat template; else the text with the
/// tokenizer's special tokens.
pub fn encode_prompt(lm: &LoadedModel, text: &str, chat: Option<Option<&str>>) -> Result<Vec<u32>> {
    Ok(match chat {
        Some(system) => {
            let mut msgs = vec![];
            if let Some(s) = system {
                msgs.push(Message::system(s.to_string()));
            }
            msgs.push(Message::user(text.to_string()));
            let rendered = lm.tokenizer.apply_chat_template(&msgs)?;
            lm.tokenizer.encode(&rendered, false)?
        }
        None => lm.tokenizer.encode(text, true)?,
    })
}

/// Greedy generation of up to `max_new_tokens` for every prompt in one batch, stopping at the
/// model's stop tokens.
pub fn complete(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    routing: &Routing<'_>,
    max_new_tokens: usize,
) -> Result<Vec<Completion>> {
    let opts = GenerateOptions {
        max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let g = match routing {
        Routing::Routers(p) => {
            let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
            let mut route = |l: usize, h: &tch::Tensor| p.decide(l, h, &lens);
            lm.model.generate(GenerateRequest::new(
                prompts,
                Paths::Routed(&mut route),
                opts,
            ))?
        }
        Routing::Path(path) => {
            let paths = vec![path.clone(); prompts.len()];
            lm.model
                .generate(GenerateRequest::new(prompts, Paths::Fixed(&paths), opts))?
        }
    };
    Ok(g.outputs
        .into_iter()
        .zip(g.paths)
        .map(|(g, path)| Completion {
            tokens: g.tokens,
            stopped: g.stopped,
            path,
        })
        .collect())
}
