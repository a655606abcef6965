//! Server-sent events for streamed completions and chats.
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::engine::{Event, Route};

use super::*;

/// Which endpoint a stream answers.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

/// Server-sent events: one chunk per text delta of any prompt, a last chunk per prompt with its
/// finish reason and path, then `[DONE]`. An error mid-stream is sent as an `error` chunk.
#[allow(clippy::too_many_arguments)]
pub(super) fn stream(
    state: &AppState,
    lens: Vec<usize>,
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
    id: String,
    model: String,
    route: Route,
    kind: Kind,
    texts: Vec<String>,
    echo: bool,
    logprobs: bool,
    arrived: Instant,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let created = now();
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let chunk = move |index: usize, delta: Value, lp: Value, finish: Option<&str>, ext: Value| {
        let choice = match kind {
            Kind::Completion => json!({"index": index, "text": delta, "logprobs": lp,
                "finish_reason": finish, "drllm": ext}),
            Kind::Chat => json!({"index": index, "delta": delta, "logprobs": lp,
                "finish_reason": finish, "drllm": ext}),
        };
        let v = json!({"id": id, "object": object, "created": created, "model": model,
            "choices": [choice]});
        Bytes::from(format!("data: {v}\n\n"))
    };
    let n = rxs.len();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    for (index, mut events) in rxs.into_iter().enumerate() {
        let (tx, chunk, done_tx) = (tx.clone(), chunk.clone(), done_tx.clone());
        let (state, lens) = (state.clone(), lens.clone());
        let prefix = (echo && kind == Kind::Completion).then(|| texts[index].clone());
        tokio::spawn(async move {
            if kind == Kind::Chat {
                let _ = tx.send(chunk(
                    index,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                    Value::Null,
                ));
            }
            let tok = &state.info.tokenizer;
            // With log-probabilities, the echoed prompt goes out with its own (from the
            // prompt's event); without, at once.
            let mut prefix = prefix;
            if !logprobs {
                if let Some(p) = prefix.take() {
                    let _ = tx.send(chunk(index, json!(p), Value::Null, None, Value::Null));
                }
            }
            // Text offset of the next token (completions' `text_offset`).
            let mut offset = 0;
            let mut first = None;
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Prompt(p) => {
                        if let Some(text) = prefix.take() {
                            let (lp, next) = completion_logprobs(tok, &p, offset);
                            offset = next;
                            let _ = tx.send(chunk(index, json!(text), lp, None, Value::Null));
                        }
                    }
                    Event::Delta { text, tokens } => {
                        first.get_or_insert_with(Instant::now);
                        let delta = match kind {
                            Kind::Completion => json!(text),
                            Kind::Chat => json!({"content": text}),
                        };
                        let lp = match (logprobs, kind) {
                            (false, _) => Value::Null,
                            (true, Kind::Completion) => {
                                let (lp, next) = completion_logprobs(tok, &tokens, offset);
                                offset = next;
                                lp
                            }
                            (true, Kind::Chat) => chat_logprobs(tok, &tokens),
                        };
                        if tx.send(chunk(index, delta, lp, None, Value::Null)).is_err() {
                            return; // The client left: dropping `events` ends the job.
                        }
                    }
                    Event::Done {
                        finish,
                        path,
                        completion_tokens,
                    } => {
                        let o = Outcome {
                            path: Some(path.clone()),
                            completion_tokens,
                            first,
                            ..Outcome::default()
                        };
                        state.record(route, lens[index], &o, arrived);
                        let empty = match kind {
                            Kind::Completion => json!(""),
                            Kind::Chat => json!({}),
                        };
                        let _ = tx.send(chunk(
                            index,
                            empty,
                            Value::Null,
                            Some(finish.as_str()),
                            path_ext(Some(&path), route),
                        ));
                        break;
                    }
                    Event::Failed { message, status } => {
                        let e = ApiError::from_status(status, message);
                        let _ = tx.send(Bytes::from(format!("data: {}\n\n", e.body())));
                        break;
                    }
                }
            }
            let _ = done_tx.send(());
        });
    }
    drop(done_tx);
    tokio::spawn(async move {
        for _ in 0..n {
            if done_rx.recv().await.is_none() {
                break;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| ApiError::internal("building the stream").into_response())
}
