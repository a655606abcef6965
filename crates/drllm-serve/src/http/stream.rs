//! Server-sent events for streamed completions and chats.
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::engine::{Event, Route};
use crate::openai::{ChatDelta, Chunk, ChunkChoice, Logprobs, PathInfo};

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
    // A chunk of new text (`None`: the prompt's last chunk, with its finish reason and path):
    // `text` for completions, a `delta` for chats.
    let chunk = move |index: usize,
                      text: Option<String>,
                      logprobs: Option<Logprobs>,
                      finish_reason: Option<&'static str>,
                      drllm: Option<PathInfo>| {
        let (text, delta) = match kind {
            Kind::Completion => (Some(text.unwrap_or_default()), None),
            Kind::Chat => (
                None,
                Some(ChatDelta {
                    role: None,
                    content: text,
                }),
            ),
        };
        Chunk {
            id: id.clone(),
            object,
            created,
            model: model.clone(),
            choices: [ChunkChoice {
                index,
                text,
                delta,
                logprobs,
                finish_reason,
                drllm,
            }],
        }
    };
    let n = rxs.len();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    for (index, mut events) in rxs.into_iter().enumerate() {
        let (tx, chunk, done_tx) = (tx.clone(), chunk.clone(), done_tx.clone());
        let (state, lens) = (state.clone(), lens.clone());
        let prefix = (echo && kind == Kind::Completion).then(|| texts[index].clone());
        tokio::spawn(async move {
            if kind == Kind::Chat {
                // The role first, with empty content, as OpenAI's first chunk.
                let mut first = chunk(index, None, None, None, None);
                first.choices[0].delta = Some(ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                });
                let _ = tx.send(sse(&first));
            }
            let tok = &state.info.tokenizer;
            // With log-probabilities, the echoed prompt goes out with its own (from the
            // prompt's event); without, at once.
            let mut prefix = prefix;
            if !logprobs {
                if let Some(p) = prefix.take() {
                    let _ = tx.send(sse(&chunk(index, Some(p), None, None, None)));
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
                            let lp = Some(Logprobs::Completion(lp));
                            let _ = tx.send(sse(&chunk(index, Some(text), lp, None, None)));
                        }
                    }
                    Event::Delta { text, tokens } => {
                        first.get_or_insert_with(Instant::now);
                        let lp = match (logprobs, kind) {
                            (false, _) => None,
                            (true, Kind::Completion) => {
                                let (lp, next) = completion_logprobs(tok, &tokens, offset);
                                offset = next;
                                Some(Logprobs::Completion(lp))
                            }
                            (true, Kind::Chat) => Some(Logprobs::Chat(chat_logprobs(tok, &tokens))),
                        };
                        if tx
                            .send(sse(&chunk(index, Some(text), lp, None, None)))
                            .is_err()
                        {
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
                        let last = chunk(
                            index,
                            None,
                            None,
                            Some(finish.as_str()),
                            path_info(Some(&path), route),
                        );
                        let _ = tx.send(sse(&last));
                        break;
                    }
                    Event::Failed { message, status } => {
                        let e = ApiError::from_status(status, message);
                        let _ = tx.send(sse(&e.body()));
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

/// One server-sent event carrying `v` as JSON.
fn sse(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(format!("data: {}\n\n", to_json(v)))
}
