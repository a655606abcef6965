//! The OpenAI wire format drllm-serve answers in: typed, documented response bodies of the
//! completions and chat endpoints (plain and streamed), the model list, the tokenizer endpoints
//! vLLM adds, drllm's route statistics and the error body. Requests are read field by field
//! ([`crate::api::Fields`]) so that every refusal names its parameter, then checked into typed
//! values by the handlers.
//!
//! Log-probabilities are carried as `f64` widened from the engine's `f32`, the value a client
//! parses; a non-finite one is written as `null`, as serde_json writes it.

use std::collections::BTreeMap;

use serde::Serialize;

/// Token counts of a request (`usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens over all prompts of the request.
    pub prompt_tokens: usize,
    /// Generated tokens over all prompts.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// The usage of `prompt` prompt tokens and `completion` generated ones.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// drllm's extension of a choice (`drllm`): the layer path that answered it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathInfo {
    /// The path, one count per block (`1,0,1,2,...`).
    pub path: String,
    /// Block applications per token along it.
    pub cost: usize,
    /// Blocks of the model (the all-execute path's cost).
    pub num_layers: usize,
    /// The routers' budget, `null` for the all-execute model.
    pub budget: Option<f64>,
}

/// The legacy completions `logprobs` object, one entry per token in each list.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability given the tokens before it (`null` for the first prompt
    /// token, which has no context).
    pub token_logprobs: Vec<Option<f64>>,
    /// The most likely alternatives at each position by token text (`null` where the token has
    /// no log-probability).
    pub top_logprobs: Vec<Option<BTreeMap<String, f64>>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

/// One alternative of a chat token's `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token of a chat `logprobs` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives at its position.
    pub top_logprobs: Vec<TopLogprob>,
}

/// The chat `logprobs` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The `logprobs` of a streamed chunk: the shape of its endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Logprobs {
    /// `/v1/completions`.
    Completion(CompletionLogprobs),
    /// `/v1/chat/completions`.
    Chat(ChatLogprobs),
}

/// One choice of a completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    /// Index of its prompt in the request.
    pub index: usize,
    /// The generated text (after the prompt when `echo` asked for it).
    pub text: String,
    /// Log-probabilities, when `logprobs` asked for them.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
    /// The path that answered.
    pub drllm: Option<PathInfo>,
}

/// The body of `POST /v1/completions` (not streamed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// `cmpl-N`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix time of the answer.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// One per prompt, in the request's order.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The assistant's message of a chat choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// The one choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Always 0 (`n` = 1).
    pub index: usize,
    /// The answer.
    pub message: ChatMessage,
    /// Log-probabilities, when `logprobs` asked for them.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
    /// The path that answered.
    pub drllm: Option<PathInfo>,
}

/// The body of `POST /v1/chat/completions` (not streamed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-N`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix time of the answer.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// The one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The `delta` of a streamed chat chunk: the role first, then text; the last chunk's is empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatDelta {
    /// `assistant`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chunk: `text` for completions, `delta` for chats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    /// Index of its prompt in the request.
    pub index: usize,
    /// New text of a completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// New text of a chat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatDelta>,
    /// Log-probabilities of the new tokens.
    pub logprobs: Option<Logprobs>,
    /// Set in the prompt's last chunk.
    pub finish_reason: Option<&'static str>,
    /// The path, in the prompt's last chunk.
    pub drllm: Option<PathInfo>,
}

/// One server-sent event of a streamed completion or chat.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chunk {
    /// The request's id.
    pub id: String,
    /// `text_completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time of the request's first chunk.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// The one choice this chunk updates.
    pub choices: [ChunkChoice; 1],
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    /// A name requests may use (`NAME`, `NAME@none`, `NAME@BUDGET`).
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// 0 (not recorded).
    pub created: u64,
    /// `drllm`.
    pub owned_by: &'static str,
}

/// The body of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served names.
    pub data: Vec<ModelCard>,
}

/// The body of `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// The body of `GET /tokenizer_info` (vLLM's), what lm-evaluation-harness reads to tokenize
/// locally.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizerInfo {
    /// `drllm`.
    pub tokenizer_class: &'static str,
    /// The end-of-sequence token.
    pub eos_token: Option<String>,
    /// The beginning-of-sequence token.
    pub bos_token: Option<String>,
    /// The end-of-sequence token again: padding is never seen by the model here.
    pub pad_token: Option<String>,
    /// The chat template (Jinja).
    pub chat_template: Option<String>,
    /// The context length.
    pub model_max_length: usize,
}

/// The body of `POST /tokenize`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tokenized {
    /// The token ids.
    pub tokens: Vec<u32>,
    /// How many.
    pub count: usize,
    /// The context length.
    pub max_model_len: usize,
}

/// The body of `POST /detokenize`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detokenized {
    /// The decoded text.
    pub prompt: String,
}

/// Served traffic of one route (`GET /drllm/stats`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteStats {
    /// Prompts answered.
    pub prompts: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// Their generated tokens.
    pub completion_tokens: u64,
    /// Mean block applications per token of their paths.
    pub mean_cost: f64,
    /// Blocks of the model.
    pub num_layers: usize,
    /// `1 - mean_cost / num_layers`.
    pub blocks_saved: f64,
}

/// The body of `GET /drllm/stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// By route label (`all-execute`, `budget B`).
    pub routes: BTreeMap<String, RouteStats>,
    /// Requests their clients cancelled.
    pub cancelled: u64,
}

/// The detail of an error body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `server_error`, ...).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request parameter at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `overloaded`, ...).
    pub code: Option<&'static str>,
}

/// Every error's body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    /// The detail.
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_have_openais_shape() {
        let chunk = Chunk {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk",
            created: 7,
            model: "m".into(),
            choices: [ChunkChoice {
                index: 0,
                text: None,
                delta: Some(ChatDelta::default()),
                logprobs: None,
                finish_reason: Some("stop"),
                drllm: Some(PathInfo {
                    path: "1,0,1".into(),
                    cost: 2,
                    num_layers: 3,
                    budget: None,
                }),
            }],
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap(),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                "model": "m", "choices": [{"index": 0, "delta": {}, "logprobs": null,
                "finish_reason": "stop",
                "drllm": {"path": "1,0,1", "cost": 2, "num_layers": 3, "budget": null}}]})
        );
        // Log-probabilities: the f32 widened, a missing one null, a non-finite one null.
        let lp = CompletionLogprobs {
            tokens: vec!["a".into(), "b".into()],
            token_logprobs: vec![None, Some(f64::from(-0.1f32))],
            top_logprobs: vec![None, Some(BTreeMap::from([("b".into(), f64::NAN)]))],
            text_offset: vec![0, 1],
        };
        assert_eq!(
            serde_json::to_string(&Logprobs::Completion(lp)).unwrap(),
            format!(
                r#"{{"tokens":["a","b"],"token_logprobs":[null,{}],"top_logprobs":[null,{{"b":null}}],"text_offset":[0,1]}}"#,
                json!(-0.1f32)
            )
        );
        let e = ErrorBody {
            error: ErrorDetail {
                message: "no".into(),
                kind: "invalid_request_error",
                param: Some("top_p".into()),
                code: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"error": {"message": "no", "type": "invalid_request_error",
                "param": "top_p", "code": null}})
        );
    }
}
