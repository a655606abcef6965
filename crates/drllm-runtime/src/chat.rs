//! Chat templates (Jinja, as shipped in model repos) rendered with minijinja the way
//! transformers' `apply_chat_template` does: `trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`, `strftime_now`.
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text of the message.
    pub content: String,
}

impl Message {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Message {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// Renders `template` for `messages` with the generation prompt appended.
pub fn render(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    // Templates (LLaMA-3.x) print today's date; a fixed date keeps prompts reproducible.
    env.add_function("strftime_now", |fmt: String| -> String {
        fmt.replace("%d", "26")
            .replace("%b", "Jul")
            .replace("%B", "July")
            .replace("%Y", "2024")
            .replace("%m", "07")
    });
    env.add_template("chat", template)
        .map_err(|e| Error::Template(format!("does not parse: {e:#}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
        tools => minijinja::Value::UNDEFINED,
    })
    .map_err(|e| Error::Template(format!("does not render: {e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Fuzz tier: a chat template with characters overwritten (Jinja's own delimiters
        /// among them) renders or is refused, never panics.
        #[test]
        fn mutated_templates_never_panic(
            muts in proptest::collection::vec((0usize..4096, 0usize..16), 1..8),
        ) {
            let t = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\
                     {% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endif %}\
                     {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
            let alphabet = b"{}%#()[]'\"|.-~ a1";
            let mut bytes = t.as_bytes().to_vec();
            let n = bytes.len();
            for (i, c) in muts {
                bytes[i % n] = alphabet[c % alphabet.len()];
            }
            let t = String::from_utf8(bytes).unwrap();
            let _ = render(&t, &[Message::system("s"), Message::user("hi")], "<s>", "</s>");
        }
    }

    #[test]
    fn renders_chatml_with_python_methods() {
        let t = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}\
                 {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let out = render(t, &[Message::user("  hi  ")], "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_reported() {
        let e = render("{{ raise_exception('no system role') }}", &[], "", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system role"), "{e}");
        let e = render("{% for %}", &[], "", "").unwrap_err().to_string();
        assert!(e.contains("does not parse"), "{e}");
    }
}
