//! What wraps every route: the API key check, and the observer that counts and logs each
//! answer and gives axum's own errors OpenAI's shape.
use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;

use super::*;

/// Counts and logs every answer, and gives the errors axum makes itself (413, 405, 415, ...)
/// OpenAI's shape.
pub(super) async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().chars().take(200).collect::<String>();
    // The route pattern, never the raw path, labels the metrics.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let resp = openai_shaped(&s, &method, &path, resp).await;
    let status = resp.status().as_u16();
    s.shared.metrics.request(&route, status);
    tracing::info!(
        target: "drllm_serve::access",
        %peer,
        method = %method,
        path,
        status,
        ms = (started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        "request"
    );
    resp
}

/// Reads the request body within `--body-timeout`, at most `--max-body-bytes` of it: a client
/// that sends its headers and then trickles its body, or stops, is answered 408 instead of
/// holding its connection (and, on a full server, another client's place) indefinitely.
pub(super) async fn body_in_time(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = s.info.max_body_bytes;
    match tokio::time::timeout(s.info.body_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            // Over the limit, or the client went away mid-body (then nobody reads the answer).
            let too_large = std::error::Error::source(&e)
                .is_some_and(|src| src.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError {
                    status: 413,
                    message: format!(
                        "The request body is larger than this server's limit of {limit} bytes \
                         (--max-body-bytes)"
                    ),
                    kind: "invalid_request_error",
                    param: None,
                    code: Some("request_too_large"),
                }
                .into_response()
            } else {
                ApiError::bad_request(format!("the request body could not be read: {e}"))
                    .into_response()
            }
        }
        Err(_) => ApiError {
            status: 408,
            message: format!(
                "The request body did not arrive within {:.0} s (--body-timeout)",
                s.info.body_timeout.as_secs_f64()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }
        .into_response(),
    }
}

pub(super) async fn openai_shaped(
    s: &AppState,
    method: &axum::http::Method,
    path: &str,
    resp: Response,
) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (message, code) = match status.as_u16() {
        413 => (
            format!(
                "The request body is larger than this server's limit of {} bytes \
                 (--max-body-bytes)",
                s.info.max_body_bytes
            ),
            Some("request_too_large"),
        ),
        405 => (
            format!("{method} is not allowed on {path}"),
            Some("method_not_allowed"),
        ),
        _ if text.is_empty() => (
            status.canonical_reason().unwrap_or("error").to_string(),
            None,
        ),
        _ => (text, None),
    };
    let e = ApiError {
        status: status.as_u16(),
        message,
        kind: if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        },
        param: None,
        code,
    };
    let mut r = e.into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

pub(super) async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match check_key(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub(super) fn check_key(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.info.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in time independent of where the strings differ.
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}
