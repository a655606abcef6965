//! Rewards: 0/1 verdicts for complete responses, and early decisions on partial ones so the
//! search can stop decoding as soon as the verdict is fixed.
use std::str::FromStr;

use crate::answer::{first_boxed, last_number, math_equal, parse_number, FirstBoxed};
use crate::data::{Family, Gold};
use crate::error::Error;

/// How multiple-choice responses are scored (recorded with each run's results).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardMode {
    /// The whole stripped response is the letter, optionally after "Answer:" and optionally
    /// followed by "." (the paper's rule; case-insensitive).
    Strict,
    /// The first answer letter of a leading `B`, `B.`, `B)`, `(B)`, `Answer: B. text` form.
    Lenient,
    /// No decoding: the gold letter must have the highest logit among the choice letters after
    /// the assistant turn is pre-filled up to "Answer:" (see [`choice_logits_correct`]).
    ChoiceLogits,
    /// No decoding: the gold choice's text must have the highest log-likelihood as the
    /// continuation of the question (lm-evaluation-harness's `acc`; see [`cloze_pick`]).
    Cloze,
    /// [`RewardMode::Cloze`] with each log-likelihood divided by the choice's length in
    /// characters (lm-evaluation-harness's `acc_norm`).
    ClozeNorm,
}

impl RewardMode {
    /// Every mode, by its flag name.
    pub const ALL: [(&'static str, RewardMode); 5] = [
        ("strict", RewardMode::Strict),
        ("lenient", RewardMode::Lenient),
        ("choice-logits", RewardMode::ChoiceLogits),
        ("cloze", RewardMode::Cloze),
        ("cloze-norm", RewardMode::ClozeNorm),
    ];

    /// The flag name of the mode.
    pub fn name(self) -> &'static str {
        RewardMode::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("?", |(n, _)| n)
    }

    /// Whether multiple-choice prompts are scored by choice log-likelihoods.
    pub fn is_cloze(self) -> bool {
        matches!(self, RewardMode::Cloze | RewardMode::ClozeNorm)
    }

    /// The form of the multiple-choice prompts this mode renders: modes of one form read the
    /// same tokens (cloze and cloze-norm differ only in how the choices are compared; strict and
    /// lenient only in how the decoded text is graded), so routers trained under one serve both.
    pub fn prompt_form(self) -> &'static str {
        match self {
            RewardMode::Strict | RewardMode::Lenient => "decoded",
            RewardMode::ChoiceLogits => "choice-logits",
            RewardMode::Cloze | RewardMode::ClozeNorm => "cloze",
        }
    }
}

impl std::fmt::Display for RewardMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RewardMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        RewardMode::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| Error::Template {
                name: "--reward".into(),
                msg: format!(
                    "unknown reward mode {s:?} (expected strict, lenient, choice-logits, cloze or cloze-norm)"
                ),
            })
    }
}

/// A verdict on a (possibly partial) response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Reward 1, whatever follows.
    Correct,
    /// Reward 0, whatever follows.
    Wrong,
    /// More text could change the reward.
    Undecided,
}

impl Verdict {
    fn of(ok: bool) -> Self {
        if ok {
            Verdict::Correct
        } else {
            Verdict::Wrong
        }
    }
}

/// Strips a leading case-insensitive `answer:`. `Err(())` while an unfinished text is a strict
/// prefix of it (could still become "Answer:"); a finished one such as "A" is no tag.
fn strip_answer_tag(t: &str, finished: bool) -> Result<&str, ()> {
    const TAG: &str = "answer:";
    let n = t.len().min(TAG.len());
    if !t.is_char_boundary(n) || !t[..n].eq_ignore_ascii_case(&TAG[..n]) {
        return Ok(t);
    }
    if t.len() < TAG.len() {
        return if finished { Ok(t) } else { Err(()) };
    }
    Ok(t[TAG.len()..].trim_start())
}

/// The strict multiple-choice rule on `text`; `finished` = no more text will come.
fn strict(text: &str, gold: char, finished: bool) -> Verdict {
    let t = text.trim_start();
    let rest = match strip_answer_tag(t, finished) {
        Ok(r) => r,
        Err(()) => {
            return if finished {
                Verdict::Wrong
            } else {
                Verdict::Undecided
            }
        }
    };
    let mut chars = rest.chars();
    let letter = match chars.next() {
        None => {
            return if finished {
                Verdict::Wrong
            } else {
                Verdict::Undecided
            }
        }
        Some(c) if c.is_ascii_alphabetic() => c.to_ascii_uppercase(),
        Some(_) => return Verdict::Wrong,
    };
    let after = chars.as_str();
    let tail = after.strip_prefix('.').unwrap_or(after);
    if !tail.trim().is_empty() {
        return Verdict::Wrong;
    }
    if finished {
        Verdict::of(letter == gold)
    } else {
        Verdict::Undecided
    }
}

/// The lenient multiple-choice rule: the first letter in a leading answer form.
fn lenient(text: &str, gold: char, finished: bool) -> Verdict {
    let more = |v| if finished { Verdict::Wrong } else { v };
    let t = text.trim_start();
    let rest = match strip_answer_tag(t, finished) {
        Ok(r) => r,
        Err(()) => return more(Verdict::Undecided),
    };
    let (paren, rest) = match rest.strip_prefix('(') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let mut chars = rest.chars();
    let letter = match chars.next() {
        None => return more(Verdict::Undecided),
        Some(c @ 'A'..='E') => c,
        Some(_) => return Verdict::Wrong,
    };
    let after = chars.as_str();
    let ok = match after.chars().next() {
        // "B" alone could still become "Because": decided only at the end.
        None if paren => return more(Verdict::Undecided),
        None => {
            return if finished {
                Verdict::of(letter == gold)
            } else {
                Verdict::Undecided
            }
        }
        Some(')') => true,
        Some(c) => !paren && (c.is_whitespace() || matches!(c, '.' | ':' | ',')),
    };
    if ok {
        Verdict::of(letter == gold)
    } else {
        Verdict::Wrong
    }
}

/// Verdict on a response so far; with `finished` the verdict is never `Undecided`.
/// `response` must already include any template response prefix (see
/// [`crate::Template::response_prefix`]).
pub fn decide(
    family: Family,
    gold: &Gold,
    mode: RewardMode,
    response: &str,
    finished: bool,
) -> Verdict {
    let v = match (family, gold) {
        (Family::MultipleChoice, Gold::Letter(g)) => match mode {
            RewardMode::Strict => strict(response, *g, finished),
            // choice-logits and cloze score without decoding; a decoded response is read
            // leniently.
            RewardMode::Lenient
            | RewardMode::ChoiceLogits
            | RewardMode::Cloze
            | RewardMode::ClozeNorm => lenient(response, *g, finished),
        },
        (Family::Math, Gold::Math(g)) | (Family::Math, Gold::Number(g)) => {
            match first_boxed(response) {
                FirstBoxed::Answer(ans) => Verdict::of(math_equal(ans, g)),
                FirstBoxed::None | FirstBoxed::Open => Verdict::Undecided,
            }
        }
        (Family::Gsm8k, Gold::Number(g) | Gold::Math(g)) => {
            if finished {
                let want = parse_number(g);
                Verdict::of(
                    matches!((last_number(response), want), (Some(a), Some(b)) if crate::answer::numbers_close(a, b)),
                )
            } else {
                Verdict::Undecided
            }
        }
        _ => Verdict::Wrong,
    };
    if finished && v == Verdict::Undecided {
        Verdict::Wrong
    } else {
        v
    }
}

/// Reward (0 or 1) of a complete response.
pub fn reward(family: Family, gold: &Gold, mode: RewardMode, response: &str) -> u8 {
    (decide(family, gold, mode, response, true) == Verdict::Correct) as u8
}

/// choice-logits scoring: `letter_logits` holds each choice letter's logit at the answer
/// position; correct when the gold letter's is strictly the highest.
pub fn choice_logits_correct(letter_logits: &[(char, f32)], gold: char) -> bool {
    let Some(&(_, g)) = letter_logits.iter().find(|(c, _)| *c == gold) else {
        return false;
    };
    letter_logits.iter().all(|&(c, l)| c == gold || l < g)
}

/// Cloze scoring: the choice picked from each choice's summed log-likelihood `lls` (divided by
/// its length in characters `chars` when `norm`), as lm-evaluation-harness picks it: the first
/// index of the maximum (`np.argmax`). `None` when there are no choices or a score is NaN.
pub fn cloze_pick(lls: &[f64], chars: &[usize], norm: bool) -> Option<usize> {
    let score = |i: usize| {
        if norm {
            lls[i] / chars.get(i).copied().unwrap_or(1).max(1) as f64
        } else {
            lls[i]
        }
    };
    let mut best: Option<(usize, f64)> = None;
    for i in 0..lls.len() {
        let s = score(i);
        if s.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// Cloze scoring: by how much the gold choice `gold` wins (> 0) or loses (<= 0), in the units
/// [`cloze_pick`] compares: its score minus the best other choice's. `None` when there is no
/// other choice, `gold` is out of range or a score is NaN. Labels that must survive small
/// perturbations (a skipped block) are asked for a share of this margin, not only its sign.
pub fn cloze_margin(lls: &[f64], chars: &[usize], norm: bool, gold: usize) -> Option<f64> {
    let score = |i: usize| {
        if norm {
            lls[i] / chars.get(i).copied().unwrap_or(1).max(1) as f64
        } else {
            lls[i]
        }
    };
    if gold >= lls.len() || lls.len() < 2 {
        return None;
    }
    let g = score(gold);
    let mut best_other = f64::NEG_INFINITY;
    for i in (0..lls.len()).filter(|&i| i != gold) {
        let s = score(i);
        if s.is_nan() {
            return None;
        }
        best_other = best_other.max(s);
    }
    (!g.is_nan()).then_some(g - best_other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mc(mode: RewardMode, resp: &str, gold: char) -> u8 {
        reward(Family::MultipleChoice, &Gold::Letter(gold), mode, resp)
    }

    #[test]
    fn strict_rule() {
        for ok in ["B", " b ", "B.", "Answer: B", "answer:B.", "ANSWER:  b\n"] {
            assert_eq!(mc(RewardMode::Strict, ok, 'B'), 1, "{ok:?}");
        }
        for bad in [
            "A",
            "B. Because",
            "(B)",
            "B)",
            "The answer is B",
            "",
            "Answer:",
            "BB",
        ] {
            assert_eq!(mc(RewardMode::Strict, bad, 'B'), 0, "{bad:?}");
        }
    }

    #[test]
    fn lenient_rule() {
        assert_eq!(mc(RewardMode::Lenient, "A", 'A'), 1);
        assert_eq!(mc(RewardMode::Strict, "a", 'A'), 1);
        for ok in [
            "B",
            "B.",
            "B)",
            "(B)",
            "Answer: B. a leg muscle",
            "B: text",
            "B, since",
            " B\nmore",
            "answer: (B) x",
        ] {
            assert_eq!(mc(RewardMode::Lenient, ok, 'B'), 1, "{ok:?}");
        }
        for bad in [
            "A. a leg muscle",
            "Because",
            "(B",
            "b.",
            "The answer is B",
            "",
            "E",
        ] {
            assert_eq!(mc(RewardMode::Lenient, bad, 'B'), 0, "{bad:?}");
        }
        // SmolLM2-135M-Instruct's typical reply: 0 under strict, scored under lenient.
        assert_eq!(
            mc(
                RewardMode::Strict,
                "A. a leg muscle relaxing after exercise",
                'A'
            ),
            0
        );
        assert_eq!(
            mc(
                RewardMode::Lenient,
                "A. a leg muscle relaxing after exercise",
                'A'
            ),
            1
        );
    }

    #[test]
    fn math_and_gsm8k() {
        let g = Gold::Math("\\frac{1}{2}".into());
        assert_eq!(
            reward(
                Family::Math,
                &g,
                RewardMode::Lenient,
                "so \\boxed{0.5} done"
            ),
            1
        );
        assert_eq!(
            reward(
                Family::Math,
                &g,
                RewardMode::Lenient,
                "\\boxed{0.5}\\boxed{3}"
            ),
            1
        );
        assert_eq!(reward(Family::Math, &g, RewardMode::Lenient, "0.5"), 0);
        assert_eq!(
            decide(Family::Math, &g, RewardMode::Lenient, "\\boxed{0.", false),
            Verdict::Undecided
        );
        assert_eq!(
            decide(Family::Math, &g, RewardMode::Lenient, "\\boxed{0.5}", false),
            Verdict::Correct
        );
        let n = Gold::Number("72".into());
        assert_eq!(
            reward(Family::Gsm8k, &n, RewardMode::Lenient, "48+24 = 72 clips."),
            1
        );
        assert_eq!(
            reward(Family::Gsm8k, &n, RewardMode::Lenient, "72 then 73"),
            0
        );
        assert_eq!(
            decide(Family::Gsm8k, &n, RewardMode::Lenient, "72", false),
            Verdict::Undecided
        );
    }

    #[test]
    fn choice_logits() {
        assert!(choice_logits_correct(
            &[('A', 0.1), ('B', 2.0), ('C', 1.0)],
            'B'
        ));
        assert!(!choice_logits_correct(&[('A', 2.0), ('B', 2.0)], 'B'));
        assert!(!choice_logits_correct(&[('A', 2.0)], 'B'));
    }

    #[test]
    fn cloze_margin_is_gold_minus_best_other() {
        let lls = [-3.0, -1.0, -2.5, -4.0];
        assert_eq!(cloze_margin(&lls, &[1; 4], false, 1), Some(1.5));
        assert_eq!(cloze_margin(&lls, &[1; 4], false, 2), Some(-1.5));
        // Normalised per character: -1.0/4 vs -3.0/1 and -2.5/5 and -4.0/8.
        let m = cloze_margin(&lls, &[1, 4, 5, 8], true, 1).unwrap();
        assert!((m - (-0.25 + 0.5)).abs() < 1e-12, "{m}");
        assert_eq!(cloze_margin(&lls, &[1; 4], false, 4), None);
        assert_eq!(cloze_margin(&[-1.0], &[1], false, 0), None);
        assert_eq!(cloze_margin(&[-1.0, f64::NAN], &[1, 1], false, 0), None);
        // A positive margin is exactly a correct pick (no ties).
        for gold in 0..4 {
            let m = cloze_margin(&lls, &[1; 4], false, gold).unwrap();
            assert_eq!(m > 0.0, cloze_pick(&lls, &[1; 4], false) == Some(gold));
        }
    }

    #[test]
    fn cloze_picks_like_numpy_argmax() {
        // Raw sums favour the short choice; per-character normalisation the long one.
        let lls = [-4.0, -6.0, -9.0];
        let chars = [4, 12, 9];
        assert_eq!(cloze_pick(&lls, &chars, false), Some(0));
        assert_eq!(cloze_pick(&lls, &chars, true), Some(1));
        // Ties go to the first index, as np.argmax.
        assert_eq!(cloze_pick(&[-1.0, -1.0], &[3, 3], false), Some(0));
        assert_eq!(cloze_pick(&[], &[], false), None);
        assert_eq!(cloze_pick(&[-1.0, f64::NAN], &[1, 1], false), None);
        for (name, m) in RewardMode::ALL {
            assert_eq!(name.parse::<RewardMode>().unwrap(), m);
            assert_eq!(m.to_string(), name);
        }
        assert!("clozed"
            .parse::<RewardMode>()
            .unwrap_err()
            .to_string()
            .contains("cloze-norm"));
        assert_eq!(
            RewardMode::Cloze.prompt_form(),
            RewardMode::ClozeNorm.prompt_form()
        );
        assert_eq!(
            RewardMode::Strict.prompt_form(),
            RewardMode::Lenient.prompt_form()
        );
        assert_ne!(
            RewardMode::Cloze.prompt_form(),
            RewardMode::ChoiceLogits.prompt_form()
        );
    }

    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "Answer:",
            "answer: ",
            "A",
            "B",
            "C",
            "b",
            ".",
            ")",
            "(",
            " ",
            "\n",
            "The",
            "cause",
            "\\boxed{",
            "}",
            "\\fbox{",
            "1",
            "2",
            "/",
            "\\frac{1}{2}",
            "0.5",
            "x",
            ",",
            "72",
            "-",
            "An",
            "Ans",
        ])
    }

    proptest! {
        /// A decision taken on a prefix never contradicts the decision on the complete response.
        #[test]
        fn prefix_decisions_are_final(pieces in prop::collection::vec(piece(), 0..12), mode in 0usize..5) {
            let mode = RewardMode::ALL[mode].1;
            let full: String = pieces.concat();
            let cases = [
                (Family::MultipleChoice, Gold::Letter('B')),
                (Family::Math, Gold::Math("\\frac{1}{2}".into())),
                (Family::Gsm8k, Gold::Number("72".into())),
            ];
            for (family, gold) in cases {
                let end = decide(family, &gold, mode, &full, true);
                prop_assert_ne!(end, Verdict::Undecided);
                for (i, _) in full.char_indices().chain(std::iter::once((full.len(), ' '))) {
                    let v = decide(family, &gold, mode, &full[..i], false);
                    prop_assert!(v == Verdict::Undecided || v == end, "{:?} on {:?} but {:?} on {:?}", v, &full[..i], end, full);
                }
            }
        }
    }
}
