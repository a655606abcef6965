//! Prompt templates: data (minijinja files), not code. Built-ins cover instruct and base use for
//! every task family; users can pass their own file. Instruct prompts get the model's chat
//! template applied by the runtime; base prompts are fed as they are.
use std::path::Path;

use serde::Serialize;

use crate::data::{Choice, Family, Question, Sample};
use crate::error::{Error, Result};
use crate::grade::RewardMode;

/// Whether a template is for chat (instruct) models or plain completion (base) models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// Wrapped in the model's chat template as a user message.
    Instruct,
    /// Fed as it is; the model continues the text.
    Base,
}

impl Style {
    /// The style a run uses when none is asked for: cloze scoring reads the question as plain
    /// text (lm-evaluation-harness's formulation), every other mode asks an instruct model in its
    /// chat template.
    pub fn default_for(mode: RewardMode) -> Style {
        if mode.is_cloze() {
            Style::Base
        } else {
            Style::Instruct
        }
    }

    /// The style a `--style` flag names: `instruct`, `base`, or `auto` ([`Style::default_for`]
    /// the reward mode).
    pub fn resolve(spec: &str, mode: RewardMode) -> Result<Style> {
        match spec {
            "auto" => Ok(Style::default_for(mode)),
            s => s.parse(),
        }
    }

    /// The flag name of the style.
    pub fn name(self) -> &'static str {
        match self {
            Style::Instruct => "instruct",
            Style::Base => "base",
        }
    }
}

impl std::fmt::Display for Style {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a prompt's text is tokenized with the tokenizer's special tokens (e.g. a BOS). Base
/// prompts get them, except under cloze scoring, which follows lm-evaluation-harness (no special
/// tokens but a BOS where the model's family needs one, `model_needs_bos`: lm-eval's `hf`
/// backend encodes with the tokenizer's defaults, which give Gemma models their BOS and the
/// others nothing); instruct prompts never do (the chat template already holds them). Every
/// place that turns a rendered prompt into ids (search, training, eval) asks here.
pub fn add_special_tokens(
    style: Style,
    mode: RewardMode,
    family: Family,
    model_needs_bos: bool,
) -> bool {
    style == Style::Base
        && (model_needs_bos || !(mode.is_cloze() && family == Family::MultipleChoice))
}

impl std::str::FromStr for Style {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "instruct" => Ok(Style::Instruct),
            "base" => Ok(Style::Base),
            other => Err(Error::Template {
                name: "--style".into(),
                msg: format!("{other:?}: expected instruct or base"),
            }),
        }
    }
}

/// A prompt template, parsed once.
#[derive(Clone)]
pub struct Template {
    name: String,
    source: String,
    style: Style,
    env: std::sync::Arc<minijinja::Environment<'static>>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .field("style", &self.style)
            .finish()
    }
}

#[derive(Serialize)]
struct Ctx<'a> {
    id: &'a str,
    task: String,
    question: &'a str,
    choices: &'a [Choice],
    /// The text a question is about (SciQ's support, BoolQ's passage); empty when none.
    context: &'a str,
}

impl Template {
    /// The built-in template for a task family, style and reward mode: multiple choice under
    /// cloze scoring renders only the question, as lm-evaluation-harness 0.4.13's task of the
    /// same name does (`Question: ...\nAnswer:` for ARC and PIQA, the stem alone for
    /// OpenBookQA, the support or passage first for SciQ and BoolQ), since the choices are
    /// scored as its continuations.
    pub fn builtin_for(family: Family, style: Style, mode: RewardMode) -> Template {
        if family == Family::MultipleChoice && mode.is_cloze() {
            return Template::parse(
                "mc_cloze".into(),
                include_str!("../templates/mc_cloze.j2").into(),
                style,
            )
            .expect("built-in templates parse (unit-tested)");
        }
        Template::builtin(family, style)
    }

    /// The built-in template for a task family and style.
    pub fn builtin(family: Family, style: Style) -> Template {
        let (name, source) = match (family, style) {
            (Family::MultipleChoice, Style::Instruct) => {
                ("mc_instruct", include_str!("../templates/mc_instruct.j2"))
            }
            (Family::MultipleChoice, Style::Base) => {
                ("mc_base", include_str!("../templates/mc_base.j2"))
            }
            (Family::Math, Style::Instruct) => (
                "math_instruct",
                include_str!("../templates/math_instruct.j2"),
            ),
            (Family::Math, Style::Base) => ("math_base", include_str!("../templates/math_base.j2")),
            (Family::Gsm8k, Style::Instruct) => (
                "gsm8k_instruct",
                include_str!("../templates/gsm8k_instruct.j2"),
            ),
            (Family::Gsm8k, Style::Base) => {
                ("gsm8k_base", include_str!("../templates/gsm8k_base.j2"))
            }
        };
        Template::parse(name.into(), source.into(), style)
            .expect("built-in templates parse (unit-tested)")
    }

    fn parse(name: String, source: String, style: Style) -> Result<Template> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned("t", source.clone())
            .map_err(|e| Error::Template {
                name: name.clone(),
                msg: format!("{e:#}"),
            })?;
        Ok(Template {
            name,
            source,
            style,
            env: std::sync::Arc::new(env),
        })
    }

    /// A template from its source, as a router package records it (a template file's text, or
    /// a built-in's of any drllm version).
    pub fn from_source(name: String, source: String, style: Style) -> Result<Template> {
        Template::parse(name, source, style)
    }

    /// A user template file; it sees `question`, `choices` (label, text), `context` (SciQ's
    /// support, BoolQ's passage; empty for other tasks), `id` and `task`.
    pub fn from_file(path: &Path, style: Style) -> Result<Template> {
        let source = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        // Parsed now, so a broken file fails before any model work.
        Template::parse(path.display().to_string(), source, style)
    }

    /// Template name (built-in name or file path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its minijinja source: two templates render alike when their sources and styles agree.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Instruct or base.
    pub fn style(&self) -> Style {
        self.style
    }

    /// The prompt text for a sample.
    pub fn render(&self, sample: &Sample) -> Result<String> {
        let (question, choices, context): (&str, &[Choice], &str) = match &sample.question {
            Question::MultipleChoice {
                stem,
                choices,
                context,
            } => (stem, choices, context.as_deref().unwrap_or("")),
            Question::Problem(p) => (p, &[], ""),
        };
        let ctx = Ctx {
            id: &sample.id,
            task: sample.task.to_string(),
            question,
            choices,
            context,
        };
        let t = self.env.get_template("t").map_err(|e| Error::Template {
            name: self.name.clone(),
            msg: e.to_string(),
        })?;
        t.render(&ctx).map_err(|e| Error::Template {
            name: self.name.clone(),
            msg: format!("{e:#}"),
        })
    }

    /// The continuation scored for a choice under cloze scoring: the choice text after
    /// lm-evaluation-harness's default target delimiter (one space).
    pub fn cloze_continuation(&self, choice: &Choice) -> String {
        format!(" {}", choice.text)
    }

    /// Text the prompt opened for the answer (base math prompts end inside `\boxed{`): prepend
    /// it to a response before grading.
    pub fn response_prefix(&self) -> &'static str {
        if self.style == Style::Base && self.source.trim_end().ends_with("\\boxed{") {
            "\\boxed{"
        } else {
            ""
        }
    }

    /// A base model continues past its answer into a new few-shot example: the response is cut
    /// at the first blank line. Instruct responses are kept whole.
    pub fn truncate<'a>(&self, response: &'a str) -> &'a str {
        match self.style {
            Style::Base => response.find("\n\n").map_or(response, |i| &response[..i]),
            Style::Instruct => response,
        }
    }

    /// The response as the grader should see it.
    pub fn graded_text(&self, response: &str) -> String {
        format!("{}{}", self.response_prefix(), self.truncate(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Gold, TaskName};

    fn arc() -> Sample {
        Sample {
            id: "x".into(),
            task: TaskName::ArcEasy,
            question: Question::MultipleChoice {
                stem: "Which is a gas?".into(),
                choices: vec![
                    Choice {
                        label: 'A',
                        text: "ice".into(),
                    },
                    Choice {
                        label: 'B',
                        text: "steam".into(),
                    },
                ],
                context: None,
            },
            gold: Gold::Letter('B'),
            level: None,
        }
    }

    #[test]
    fn every_builtin_parses_and_renders() {
        let problem = Sample {
            question: Question::Problem("What is 2+2?".into()),
            task: TaskName::Gsm8k,
            gold: Gold::Number("4".into()),
            ..arc()
        };
        for family in [Family::MultipleChoice, Family::Math, Family::Gsm8k] {
            for style in [Style::Instruct, Style::Base] {
                let t = Template::builtin(family, style);
                let s = if family == Family::MultipleChoice {
                    arc()
                } else {
                    problem.clone()
                };
                let text = t.render(&s).unwrap();
                assert!(
                    text.contains(if family == Family::MultipleChoice {
                        "Which is a gas?"
                    } else {
                        "What is 2+2?"
                    }),
                    "{}",
                    t.name()
                );
            }
        }
    }

    #[test]
    fn builtins_render() {
        let p = Template::builtin(Family::MultipleChoice, Style::Instruct)
            .render(&arc())
            .unwrap();
        assert_eq!(p, "Which is a gas?\n\nA. ice\nB. steam\n\nReply with only the letter of the correct choice, after \"Answer: \".");
        let b = Template::builtin(Family::MultipleChoice, Style::Base)
            .render(&arc())
            .unwrap();
        assert!(b.ends_with("B. steam\nThe correct answer is"), "{b:?}");
        let m = Sample {
            question: Question::Problem("What is $1+1$?".into()),
            task: TaskName::Dart(Some(1)),
            gold: Gold::Math("2".into()),
            ..arc()
        };
        let t = Template::builtin(Family::Math, Style::Base);
        assert!(t
            .render(&m)
            .unwrap()
            .ends_with("Problem: What is $1+1$?\nAnswer: $\\boxed{"));
        assert_eq!(t.graded_text("2}$\n\nProblem: next"), "\\boxed{2}$");
        assert_eq!(
            Template::builtin(Family::Math, Style::Instruct).response_prefix(),
            ""
        );
    }

    #[test]
    fn cloze_template_renders_the_question_alone() {
        let t = Template::builtin_for(Family::MultipleChoice, Style::Base, RewardMode::Cloze);
        assert_eq!(
            t.render(&arc()).unwrap(),
            "Question: Which is a gas?\nAnswer:"
        );
        assert_eq!(
            t.cloze_continuation(&Choice {
                label: 'B',
                text: "steam".into()
            }),
            " steam"
        );
        // Other modes and families keep their templates.
        let g = Template::builtin_for(Family::MultipleChoice, Style::Base, RewardMode::Lenient);
        assert_eq!(g.name(), "mc_base");
        assert_eq!(
            Template::builtin_for(Family::Math, Style::Base, RewardMode::Cloze).name(),
            "math_base"
        );
        assert_eq!(Style::default_for(RewardMode::ClozeNorm), Style::Base);
        assert_eq!(
            Style::resolve("auto", RewardMode::Cloze).unwrap(),
            Style::Base
        );
        assert_eq!(
            Style::resolve("instruct", RewardMode::Cloze).unwrap(),
            Style::Instruct
        );
        assert!(Style::resolve("chat", RewardMode::Cloze).is_err());
        assert_eq!(Style::default_for(RewardMode::Lenient), Style::Instruct);
        let mc = Family::MultipleChoice;
        assert!(!add_special_tokens(
            Style::Base,
            RewardMode::Cloze,
            mc,
            false
        ));
        assert!(!add_special_tokens(
            Style::Base,
            RewardMode::ClozeNorm,
            mc,
            false
        ));
        // Gemma: lm-eval adds the BOS to log-likelihood requests too.
        assert!(add_special_tokens(Style::Base, RewardMode::Cloze, mc, true));
        assert!(add_special_tokens(
            Style::Base,
            RewardMode::Cloze,
            Family::Math,
            false
        ));
        assert!(add_special_tokens(
            Style::Base,
            RewardMode::Lenient,
            mc,
            false
        ));
        assert!(!add_special_tokens(
            Style::Instruct,
            RewardMode::Lenient,
            Family::Math,
            false
        ));
        assert!(!add_special_tokens(
            Style::Instruct,
            RewardMode::Cloze,
            mc,
            true
        ));
    }

    /// Each task's cloze prompt is lm-evaluation-harness 0.4.13's `doc_to_text` for it (the
    /// parity with lm-eval itself is tested end to end in tests/cloze.rs).
    #[test]
    fn cloze_prompts_follow_lm_eval_per_task() {
        let t = Template::builtin_for(Family::MultipleChoice, Style::Base, RewardMode::Cloze);
        let with = |task: TaskName, context: Option<&str>| Sample {
            task,
            question: Question::MultipleChoice {
                stem: "Is it so".into(),
                choices: vec![],
                context: context.map(String::from),
            },
            ..arc()
        };
        let cases = [
            (TaskName::ArcChallenge, None, "Question: Is it so\nAnswer:"),
            (TaskName::Piqa, None, "Question: Is it so\nAnswer:"),
            (TaskName::OpenBookQa, None, "Is it so"),
            (
                TaskName::Sciq,
                Some("Support."),
                "Support.\nQuestion: Is it so\nAnswer:",
            ),
            (TaskName::Sciq, Some(""), "\nQuestion: Is it so\nAnswer:"),
            (
                TaskName::Boolq,
                Some("A passage."),
                "A passage.\nQuestion: Is it so?\nAnswer:",
            ),
        ];
        for (task, context, want) in cases {
            assert_eq!(t.render(&with(task, context)).unwrap(), want, "{task}");
        }
        // The letter formats show the context first, and nothing more without one.
        let i = Template::builtin(Family::MultipleChoice, Style::Instruct);
        let p = i
            .render(&with(TaskName::Boolq, Some("A passage.")))
            .unwrap();
        assert!(p.starts_with("A passage.\n\nIs it so\n\n"), "{p:?}");
        assert!(i
            .render(&arc())
            .unwrap()
            .starts_with("Which is a gas?\n\nA."));
    }

    #[test]
    fn user_templates_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.j2");
        std::fs::write(&p, "{% for c in choices %}").unwrap();
        let msg = Template::from_file(&p, Style::Instruct)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("t.j2"), "{msg}");
        std::fs::write(&p, "{{ question }} {{ nonexistent }}").unwrap();
        let t = Template::from_file(&p, Style::Instruct).unwrap();
        let msg = t.render(&arc()).unwrap_err().to_string();
        assert!(msg.contains("t.j2") && msg.contains("undefined"), "{msg}");
    }
}
