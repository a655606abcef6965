//! The handlers: completions and chat (plain; streaming is in [`super::stream`]), the model
//! list, health, metrics, route statistics and the tokenizer endpoints.
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use drllm_runtime::Tokenizer;
use std::collections::BTreeMap;

use crate::api::{self, ApiError, Fields, Prompt};
use crate::engine::{Finish, Route, TokenLogprob};
use crate::openai::{
    ChatChoice, ChatCompletion, ChatLogprobs, ChatMessage, ChatTokenLogprob, Completion,
    CompletionChoice, CompletionLogprobs, Detokenized, Health, ModelCard, ModelList, Stats,
    Tokenized, TokenizerInfo, TopLogprob, Usage,
};

use super::stream::{stream, Kind};
use super::validate::*;
use super::*;

pub(super) async fn not_found() -> Response {
    ApiError {
        status: 404,
        message: "Unknown endpoint: this server serves /v1/completions, /v1/chat/completions, \
                  /v1/models, /health, /tokenizer_info, /tokenize and /detokenize"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
    .into_response()
}

pub(super) async fn health() -> Response {
    json_response(200, &Health { status: "ok" })
}

pub(super) async fn metrics(State(s): State<AppState>) -> Response {
    match s.shared.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("encoding the metrics: {e}")).into_response(),
    }
}

pub(super) async fn models(State(s): State<AppState>) -> Response {
    let mut ids = vec![s.info.name.clone()];
    if let Route::Budget(b) = s.info.default_route {
        ids.push(format!("{}@{b}", s.info.name));
        ids.push(format!("{}@none", s.info.name));
    }
    let data = ids
        .into_iter()
        .map(|id| ModelCard {
            id,
            object: "model",
            created: 0,
            owned_by: "drllm",
        })
        .collect();
    json_response(
        200,
        &ModelList {
            object: "list",
            data,
        },
    )
}

pub(super) async fn stats(State(s): State<AppState>) -> Response {
    let stats = s.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let routes = stats
        .into_iter()
        .map(|(label, r)| {
            let mean = r.cost as f64 / r.prompts.max(1) as f64;
            let r = crate::openai::RouteStats {
                prompts: r.prompts,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                mean_cost: mean,
                num_layers: r.num_layers,
                blocks_saved: 1.0 - mean / r.num_layers.max(1) as f64,
            };
            (label, r)
        })
        .collect();
    json_response(
        200,
        &Stats {
            routes,
            cancelled: s.shared.metrics.cancelled.get(),
        },
    )
}

pub(super) async fn tokenizer_info(State(s): State<AppState>) -> Response {
    let t = &s.info.tokenizer;
    let eos = t.eos.as_ref().map(|e| e.0.clone());
    json_response(
        200,
        &TokenizerInfo {
            tokenizer_class: "drllm",
            bos_token: t.bos.as_ref().map(|b| b.0.clone()),
            // No pad token of its own: padding is never seen by the model here.
            pad_token: eos.clone(),
            eos_token: eos,
            chat_template: t.chat_template.clone(),
            model_max_length: s.info.context,
        },
    )
}

pub(super) async fn tokenize(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let text = f
        .str("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "'prompt' (a string) is required"))?;
    let special = f.bool("add_special_tokens")?.unwrap_or(true);
    let ids = s
        .encode_bounded(text.to_string(), special, "prompt", false)
        .await?;
    let v = Tokenized {
        count: ids.len(),
        tokens: ids,
        max_model_len: s.info.context,
    };
    Ok(json_response(200, &v))
}

pub(super) async fn detokenize(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let obj = api::object(&body)?;
    let bad = || ApiError::invalid("tokens", "'tokens' must be a list of token ids");
    let ids = match api::prompts(Fields(&obj).value("tokens"))
        .map_err(|_| bad())?
        .as_slice()
    {
        [Prompt::Ids(ids)] => ids.clone(),
        _ => return Err(bad()),
    };
    check_ids(&s.info, &ids, "tokens")?;
    let text = s
        .info
        .tokenizer
        .decode_keep_special(&ids)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(200, &Detokenized { prompt: text }))
}

/// The legacy completions `logprobs` object over `toks` (text offsets from `start`), and the
/// offset after them.
pub(super) fn completion_logprobs(
    t: &Tokenizer,
    toks: &[TokenLogprob],
    start: usize,
) -> (CompletionLogprobs, usize) {
    let mut offset = start;
    let mut lp = CompletionLogprobs::default();
    for tok in toks {
        let text = t.token_text(tok.id);
        lp.text_offset.push(offset);
        offset += text.chars().count();
        lp.tokens.push(text);
        lp.token_logprobs.push(tok.logprob.map(f64::from));
        lp.top_logprobs.push(tok.logprob.map(|_| {
            let mut m = BTreeMap::new();
            for &(id, x) in &tok.top {
                m.entry(t.token_text(id)).or_insert(f64::from(x));
            }
            m
        }));
    }
    (lp, offset)
}

pub(super) async fn completions(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let s = &s;
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let info = &s.info;
    let c = common(info, &f, 16)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = f.usize("logprobs")?;
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::invalid(
            "logprobs",
            "'logprobs' must be at most 20",
        ));
    }
    let mut ids = vec![];
    let mut texts = vec![];
    for p in api::prompts(f.value("prompt"))? {
        let (p_ids, text) = match p {
            Prompt::Text(t) => {
                let ids = s.encode(t.clone(), true, "prompt").await?;
                check_ids(info, &ids, "prompt")?;
                (ids, t)
            }
            Prompt::Ids(p_ids) => {
                check_ids(info, &p_ids, "prompt")?;
                let text = info
                    .tokenizer
                    .decode_keep_special(&p_ids)
                    .unwrap_or_default();
                (p_ids, text)
            }
        };
        check_context(info, p_ids.len(), c.max_tokens)?;
        ids.push(p_ids);
        texts.push(text);
    }
    let model = f.str("model")?.unwrap_or(&info.name).to_string();
    let id = format!("cmpl-{}", s.ids.fetch_add(1, Ordering::Relaxed));
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let prompt_tokens: usize = lens.iter().sum();
    let mut sub = submit(s, ids, &c, echo, logprobs)?;
    if c.stream {
        return Ok(stream(
            s,
            lens.clone(),
            sub.rxs,
            id,
            model,
            c.route,
            Kind::Completion,
            texts,
            echo,
            logprobs.is_some(),
            arrived,
        ));
    }
    let mut choices = vec![];
    let mut completion_tokens = 0;
    // Gathered at once in this handler, so that each prompt's timings are its own, and a
    // client that leaves (the handler dropped) or a prompt that fails drops the request's other
    // receivers, which ends their jobs.
    let rxs = std::mem::take(&mut sub.rxs);
    let outcomes = futures_util::future::try_join_all(rxs.into_iter().map(gather))
        .await
        .map_err(|e| sub.abandon(e))?;
    for (i, o) in outcomes.into_iter().enumerate() {
        s.record(c.route, lens[i], &o, arrived);
        let prefix = if echo {
            texts[i].clone()
        } else {
            String::new()
        };
        let lp = logprobs.map(|_| {
            let all: Vec<TokenLogprob> = o.prompt.iter().chain(&o.tokens).cloned().collect();
            completion_logprobs(&info.tokenizer, &all, 0).0
        });
        completion_tokens += o.completion_tokens;
        choices.push(CompletionChoice {
            index: i,
            text: prefix + &o.text,
            logprobs: lp,
            finish_reason: o.finish.map(Finish::as_str),
            drllm: path_info(o.path.as_ref(), c.route),
        });
    }
    Ok(json_response(
        200,
        &Completion {
            id,
            object: "text_completion",
            created: now(),
            model,
            choices,
            usage: Usage::new(prompt_tokens, completion_tokens),
        },
    ))
}

pub(super) async fn chat_completions(
    State(s): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let s = &s;
    let obj = api::object(&body)?;
    let f = Fields(&obj);
    let info = &s.info;
    let c = common(info, &f, info.context)?;
    let msgs = api::messages(f.value("messages"))?;
    let logprobs = match f.bool("logprobs")?.unwrap_or(false) {
        true => match f.usize("top_logprobs")?.unwrap_or(0) {
            k if k > 20 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "'top_logprobs' must be at most 20",
                ))
            }
            k => Some(k),
        },
        false => None,
    };
    let rendered = info
        .tokenizer
        .apply_chat_template(&msgs)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = s.encode(rendered, false, "messages").await?;
    check_ids(info, &ids, "messages")?;
    // Without max_tokens, the completion may fill the context.
    let max_tokens =
        if f.value("max_tokens").is_none() && f.value("max_completion_tokens").is_none() {
            info.context.saturating_sub(ids.len())
        } else {
            c.max_tokens
        };
    let c = Common { max_tokens, ..c };
    check_context(info, ids.len(), c.max_tokens)?;
    let prompt_len = ids.len();
    let model = f.str("model")?.unwrap_or(&info.name).to_string();
    let id = format!("chatcmpl-{}", s.ids.fetch_add(1, Ordering::Relaxed));
    let sub = submit(s, vec![ids], &c, false, logprobs)?;
    if c.stream {
        return Ok(stream(
            s,
            vec![prompt_len],
            sub.rxs,
            id,
            model,
            c.route,
            Kind::Chat,
            vec![],
            false,
            logprobs.is_some(),
            arrived,
        ));
    }
    let Some(rx) = sub.rxs.into_iter().next() else {
        return Err(ApiError::internal("no job was queued"));
    };
    let o = gather(rx).await?;
    s.record(c.route, prompt_len, &o, arrived);
    let lp = logprobs.map(|_| chat_logprobs(&info.tokenizer, &o.tokens));
    Ok(json_response(
        200,
        &ChatCompletion {
            id,
            object: "chat.completion",
            created: now(),
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: o.text,
                },
                logprobs: lp,
                finish_reason: o.finish.map(Finish::as_str),
                drllm: path_info(o.path.as_ref(), c.route),
            }],
            usage: Usage::new(prompt_len, o.completion_tokens),
        },
    ))
}

/// The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub(super) fn chat_logprobs(t: &Tokenizer, toks: &[TokenLogprob]) -> ChatLogprobs {
    let top = |id: u32, lp: f32| {
        let token = t.token_text(id);
        TopLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: f64::from(lp),
        }
    };
    let content = toks
        .iter()
        .map(|tok| {
            let TopLogprob {
                token,
                logprob,
                bytes,
            } = top(tok.id, tok.logprob.unwrap_or(f32::NAN));
            ChatTokenLogprob {
                token,
                logprob,
                bytes,
                top_logprobs: tok.top.iter().map(|&(id, lp)| top(id, lp)).collect(),
            }
        })
        .collect();
    ChatLogprobs { content }
}
