//! Request checks shared by the endpoints: the route a request asks for, sampling and length
//! fields, token ids and the context bound, each refusal naming its field.

use serde_json::Value;

use crate::api::{ApiError, Fields};
use crate::engine::{Route, Sampling};

use super::*;

pub(super) fn check_ids(info: &ServerInfo, ids: &[u32], param: &str) -> Result<(), ApiError> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= info.vocab) {
        return Err(ApiError::invalid(
            param,
            format!(
                "token id {bad} is outside the vocabulary (ids are 0..{})",
                info.vocab
            ),
        ));
    }
    Ok(())
}

/// The route a request asks for: `model` = the served name (the server's default route) or
/// `<name>@<budget>`; the `drllm` extension field (`{"budget": b}` or `{"routers": false}`)
/// overrides it.
pub(super) fn route(info: &ServerInfo, f: &Fields<'_>) -> Result<Route, ApiError> {
    let mut route = match f.str("model")? {
        None => info.default_route,
        Some(m) if m == info.name => info.default_route,
        Some(m) => match m.rsplit_once('@') {
            Some((name, "none")) if name == info.name => Route::AllExecute,
            Some((name, b)) if name == info.name => {
                let budget: f64 = b.parse().map_err(|_| {
                    ApiError::invalid(
                        "model",
                        format!(
                            "`{m}`: after @ comes a budget in [-1, 1], or `none` for the \
                             all-execute model"
                        ),
                    )
                })?;
                Route::Budget(budget)
            }
            _ => return Err(ApiError::unknown_model(m, &info.name)),
        },
    };
    if let Some(ext) = f.value("drllm") {
        let Value::Object(ext) = ext else {
            return Err(ApiError::invalid("drllm", "'drllm' must be an object"));
        };
        let e = Fields(ext);
        if let Some(b) = e.f64("budget").map_err(|_| {
            ApiError::invalid("drllm.budget", "'drllm.budget' must be a number in [-1, 1]")
        })? {
            route = Route::Budget(b);
        }
        if e.bool("routers").ok().flatten() == Some(false) {
            route = Route::AllExecute;
        }
    }
    if let Route::Budget(b) = route {
        if !info.has_routers {
            return Err(ApiError::invalid(
                "model",
                "this server has no routers (start it with --routers) so it serves the \
                 all-execute model only",
            ));
        }
        if !(-1.0..=1.0).contains(&b) {
            return Err(ApiError::invalid(
                "model",
                format!("budget {b} is outside [-1, 1]"),
            ));
        }
    }
    Ok(route)
}

/// Most stop strings per request, and bytes per stop string (every decode step searches them).
pub(super) const MAX_STOP: usize = 32;

pub(super) const MAX_STOP_BYTES: usize = 512;

/// Sampling and length fields shared by both endpoints.
pub(super) struct Common {
    pub(super) max_tokens: usize,
    pub(super) sampling: Sampling,
    pub(super) stop: Vec<String>,
    pub(super) stream: bool,
    pub(super) route: Route,
}

pub(super) fn common(
    info: &ServerInfo,
    f: &Fields<'_>,
    max_tokens_default: usize,
) -> Result<Common, ApiError> {
    if let Some(n) = f.usize("n")? {
        if n != 1 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    let temperature = f.f64("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("'temperature' must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = f.f64("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("'top_p' must be in (0, 1], got {top_p}"),
        ));
    }
    let seed = match f.value("seed") {
        None => None,
        Some(v) => Some(v.as_i64().map(|x| x as u64).ok_or_else(|| {
            ApiError::invalid("seed", format!("'seed' must be an integer, got {v}"))
        })?),
    };
    let max_tokens = f
        .usize("max_completion_tokens")?
        .or(f.usize("max_tokens")?)
        .unwrap_or(max_tokens_default);
    if max_tokens > info.context {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "'max_tokens' is {max_tokens}, more than the model's context of {} tokens",
                info.context
            ),
        ));
    }
    let stop = f.stop()?;
    if stop.len() > MAX_STOP || stop.iter().any(|x| x.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!("'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(Common {
        max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        stop,
        stream: f.bool("stream")?.unwrap_or(false),
        route: route(info, f)?,
    })
}

pub(super) fn check_context(
    info: &ServerInfo,
    len: usize,
    max_tokens: usize,
) -> Result<(), ApiError> {
    if len == 0 {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if len.saturating_add(max_tokens) > info.context {
        return Err(ApiError::invalid(
            if len > info.context {
                "prompt"
            } else {
                "max_tokens"
            },
            format!(
                "This model's maximum context length is {} tokens, however you requested {} \
                 tokens ({len} in the prompt, {max_tokens} for the completion)",
                info.context,
                len + max_tokens
            ),
        ));
    }
    Ok(())
}
