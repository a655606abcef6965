//! OpenAI's request fields and error shape. Bodies are parsed by hand from JSON values so that
//! every refusal names the field (`param`) and what was expected; unknown fields are ignored,
//! as OpenAI clients send more than a server needs.
use serde_json::{Map, Value};

use crate::openai::{ErrorBody, ErrorDetail};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP
/// status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if any (`invalid_api_key`, `model_not_found`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400, naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// 400 without a field.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// 401.
    pub fn unauthorized() -> ApiError {
        ApiError {
            status: 401,
            message: "Incorrect API key provided: send `Authorization: Bearer <key>` with the \
                      server's --api-key"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(model: &str, served: &str) -> ApiError {
        ApiError {
            status: 404,
            message: format!(
                "The model `{model}` does not exist on this server: it serves `{served}` \
                 (unrouted, or routed at its default budget) and, when it has routers, \
                 `{served}@<budget>` (routed at a budget in [-1, 1]) and `{served}@none` \
                 (every block)"
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 503: the queue is full.
    pub fn overloaded() -> ApiError {
        ApiError {
            status: 503,
            message: "The server is busy (its queue is full); retry later".into(),
            kind: "server_error",
            param: None,
            code: Some("overloaded"),
        }
    }

    /// 503 with a reason (the server is stopping).
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 503,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("unavailable"),
        }
    }

    /// An error of `status` from the engine: 400, 503, else 500.
    pub fn from_status(status: u16, message: impl Into<String>) -> ApiError {
        match status {
            400 => ApiError::bad_request(message),
            503 => ApiError::unavailable(message),
            _ => ApiError::internal(message),
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

/// The request body as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(format!(
            "The request body must be a JSON object, got {}",
            kind_of(&other)
        ))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to a request object's fields; `null` counts as absent.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A field read by `pick`, which refuses a value that is not `what`.
    fn typed<'v, T>(
        &'v self,
        name: &str,
        what: &str,
        pick: impl FnOnce(&'v Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => pick(v).map(Some).ok_or_else(|| {
                let got = match v {
                    Value::Number(n) => n.to_string(),
                    other => kind_of(other).to_string(),
                };
                ApiError::invalid(name, format!("'{name}' must be {what}, got {got}"))
            }),
        }
    }

    /// A number field (absent: `None`).
    pub fn f64(&self, name: &str) -> Result<Option<f64>, ApiError> {
        self.typed(name, "a number", Value::as_f64)
    }

    /// A non-negative integer field.
    pub fn usize(&self, name: &str) -> Result<Option<usize>, ApiError> {
        self.typed(name, "a non-negative integer", |v| {
            v.as_u64().and_then(|x| usize::try_from(x).ok())
        })
    }

    /// A boolean field.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.typed(name, "a boolean", Value::as_bool)
    }

    /// A string field.
    pub fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.typed(name, "a string", Value::as_str)
    }

    /// `stop`: a string or a list of strings.
    pub fn stop(&self) -> Result<Vec<String>, ApiError> {
        match self.get("stop") {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ApiError::invalid(
                        "stop",
                        format!("'stop' must hold strings, got {}", kind_of(other)),
                    )),
                })
                .collect(),
            Some(v) => Err(ApiError::invalid(
                "stop",
                format!(
                    "'stop' must be a string or a list of strings, got {}",
                    kind_of(v)
                ),
            )),
        }
    }

    /// The raw value of a field.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

/// A completion prompt as sent: text (tokenized by the server, with the tokenizer's special
/// tokens) or token ids (used exactly as given).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists.
pub fn prompts(v: Option<&Value>) -> Result<Vec<Prompt>, ApiError> {
    let bad = |what: String| ApiError::invalid("prompt", what);
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(format!("token ids must be non-negative integers, got {x}")))
            })
            .collect()
    };
    let out = match v {
        None => return Err(bad("'prompt' is required".into())),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad("'prompt' is empty".into())),
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    other => Err(bad(format!(
                        "a list of prompts must hold only strings, got {}",
                        kind_of(other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(a)?)],
            Value::Array(_) => a
                .iter()
                .map(|x| match x {
                    Value::Array(inner) => Ok(Prompt::Ids(ids(inner)?)),
                    other => Err(bad(format!(
                        "a list of token-id lists must hold only lists, got {}",
                        kind_of(other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(bad(format!(
                    "'prompt' must be a string, a list of strings, a list of token ids or a list \
                     of token-id lists; its first item is {}",
                    kind_of(other)
                )))
            }
        },
        Some(other) => {
            return Err(bad(format!(
                "'prompt' must be a string or a list, got {}",
                kind_of(other)
            )))
        }
    };
    Ok(out)
}

/// Chat roles this server takes (OpenAI's, less tool and function messages).
pub const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// A chat message of `messages`: role and text content (a string, or a list of text parts).
pub fn messages(v: Option<&Value>) -> Result<Vec<drllm_runtime::Message>, ApiError> {
    let bad = |what: String| ApiError::invalid("messages", what);
    let Some(Value::Array(a)) = v else {
        return Err(bad("'messages' must be a non-empty list of messages".into()));
    };
    if a.is_empty() {
        return Err(bad("'messages' is empty".into()));
    }
    a.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("messages[{i}] has no string 'role'")))?;
            if !ROLES.contains(&role) {
                return Err(bad(format!(
                    "messages[{i}].role is `{role}`: one of {} (tool calls are not supported)",
                    ROLES.join(", ")
                )));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            bad(format!("messages[{i}].content parts must be text parts"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(Value::Null) | None => {
                    return Err(bad(format!(
                        "messages[{i}] ({role}) has no 'content': a string or a list of text parts"
                    )))
                }
                Some(other) => {
                    return Err(bad(format!(
                        "messages[{i}].content must be a string, got {}",
                        kind_of(other)
                    )))
                }
            };
            Ok(drllm_runtime::Message {
                // OpenAI's newer name for the system message; chat templates know `system`.
                role: if role == "developer" { "system" } else { role }.to_string(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_prompt_form_parses_and_bad_ones_name_the_field() {
        let p = |v: Value| prompts(Some(&v));
        assert_eq!(p(json!("hi")).unwrap(), vec![Prompt::Text("hi".into())]);
        assert_eq!(
            p(json!(["a", "b"])).unwrap(),
            vec![Prompt::Text("a".into()), Prompt::Text("b".into())]
        );
        assert_eq!(p(json!([1, 2])).unwrap(), vec![Prompt::Ids(vec![1, 2])]);
        assert_eq!(
            p(json!([[1], [2, 3]])).unwrap(),
            vec![Prompt::Ids(vec![1]), Prompt::Ids(vec![2, 3])]
        );
        for bad in [
            json!([]),
            json!([1, -2]),
            json!(["a", 1]),
            json!(5),
            json!([{}]),
        ] {
            let e = p(bad.clone()).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some("prompt")),
                "{bad}"
            );
        }
        assert!(prompts(None).is_err());
    }

    #[test]
    fn wrong_types_are_refused_with_their_field() {
        let m = object(br#"{"max_tokens": "5", "temperature": 0, "stop": ["a", 3]}"#).unwrap();
        let f = Fields(&m);
        let e = f.usize("max_tokens").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("integer"), "{}", e.message);
        assert_eq!(f.f64("temperature").unwrap(), Some(0.0));
        assert_eq!(f.stop().unwrap_err().param.as_deref(), Some("stop"));
        assert!(object(b"{not json").unwrap_err().message.contains("parse"));
        assert!(object(b"[1]").unwrap_err().message.contains("an array"));
        let body = ApiError::unauthorized().body();
        assert_eq!(body.error.code, Some("invalid_api_key"));
        assert!(body.error.param.is_none());
    }
}
