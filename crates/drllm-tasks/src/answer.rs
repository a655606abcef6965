//! Answer extraction and equivalence: `\boxed{}` spans, numbers, and math answers compared after
//! LaTeX normalisation or numeric evaluation.
//!
//! Written by hand: no Rust crate decides equivalence of MATH-style LaTeX answers (fractions,
//! radicals, units, intervals); the rules follow the normalisations used by the MATH and
//! DART-Math evaluation scripts, plus a small exact evaluator for arithmetic forms.

/// Byte span `(start_of_command, content_start, content_end)` of every braced `\boxed{...}` /
/// `\fbox{...}`, in order of their start; `complete` is false for one whose braces never close.
fn boxed_spans(s: &str) -> Vec<(usize, usize, Option<usize>)> {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        let cmd = if rest.starts_with(b"\\boxed") {
            6
        } else if rest.starts_with(b"\\fbox") {
            5
        } else {
            i += 1;
            continue;
        };
        let mut j = i + cmd;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if j < b.len() && b[j] == b'{' {
            let mut depth = 0usize;
            let mut end = None;
            for (k, &c) in b.iter().enumerate().skip(j) {
                match c {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(k);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            out.push((i, j + 1, end));
        }
        i += cmd;
    }
    out
}

/// Contents of the last complete `\boxed{...}` / `\fbox{...}` (nested braces respected), or of
/// a trailing `\boxed 5` form: how MATH solutions state their answer.
pub fn last_boxed(s: &str) -> Option<&str> {
    let braced = boxed_spans(s)
        .into_iter()
        .filter_map(|(st, a, e)| e.map(|e| (st, a, e)))
        .next_back();
    // "\boxed 5" (no braces) appears in a few solutions.
    let bare = s.rfind("\\boxed ").and_then(|i| {
        let rest = s[i + 7..].trim_start();
        if rest.starts_with('{') {
            return None;
        }
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '$')
            .unwrap_or(rest.len());
        (end > 0).then(|| (i, &rest[..end]))
    });
    match (braced, bare) {
        (Some((st, a, e)), Some((bi, text))) => Some(if bi > st { text } else { &s[a..e] }),
        (Some((_, a, e)), None) => Some(&s[a..e]),
        (None, Some((_, text))) => Some(text),
        (None, None) => None,
    }
}

/// The first `\boxed{}` of a response, as far as it has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBoxed<'a> {
    /// No box so far.
    None,
    /// The first box is still open: more text could complete it.
    Open,
    /// The first box's contents.
    Answer(&'a str),
}

/// The model's answer in a response: the `\boxed{}` that starts first.
pub fn first_boxed(s: &str) -> FirstBoxed<'_> {
    match boxed_spans(s).first() {
        None => FirstBoxed::None,
        Some(&(_, a, Some(e))) => FirstBoxed::Answer(&s[a..e]),
        Some(&(_, _, None)) => FirstBoxed::Open,
    }
}

/// Parses a plain number: `1,234` (strict thousands groups), `-3.50`, `$12`, `.5`, `7%`.
pub fn parse_number(s: &str) -> Option<f64> {
    let t = s
        .trim()
        .trim_start_matches('$')
        .trim_end_matches('%')
        .trim_end_matches('.');
    let t: String = if t.contains(',') {
        if !is_thousands(t) {
            return None;
        }
        t.chars().filter(|&c| c != ',').collect()
    } else {
        t.to_string()
    };
    if t.is_empty()
        || !t
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '+')
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The last number in a text (GSM8K responses), with thousands separators removed.
pub fn last_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut end = b.len();
    while end > 0 {
        // Find the end of the last digit run.
        while end > 0 && !b[end - 1].is_ascii_digit() {
            end -= 1;
        }
        if end == 0 {
            return None;
        }
        let mut start = end;
        while start > 0
            && (b[start - 1].is_ascii_digit() || b[start - 1] == b'.' || b[start - 1] == b',')
        {
            start -= 1;
        }
        while start < end && (b[start] == b',' || b[start] == b'.') {
            start += 1;
        }
        // "1,2,3" is a list, not a number: keep its last element.
        if !is_thousands(&s[start..end]) {
            if let Some(k) = s[start..end].rfind(',') {
                start += k + 1;
            }
        }
        let neg = start > 0 && b[start - 1] == b'-';
        let text = &s[start..end];
        if let Some(v) = parse_number(text) {
            return Some(if neg { -v } else { v });
        }
        end = start;
    }
    None
}

/// Whether two numbers agree within 1e-6 relative tolerance (exact for zero).
pub fn numbers_close(a: f64, b: f64) -> bool {
    if a == b {
        return true;
    }
    if !a.is_finite() || !b.is_finite() {
        return false;
    }
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-12)
}

/// Replaces `\cmd{x}` by `x` (or drops it when `drop_units` and it reads as a unit after a value).
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        let after = &rest[i + cmd.len()..];
        let Some(body) = after.strip_prefix('{') else {
            out.push_str(&rest[..i + cmd.len()]);
            rest = after;
            continue;
        };
        let mut depth = 1usize;
        let mut end = None;
        for (k, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            out.push_str(&rest[..i + cmd.len()]);
            rest = after;
            continue;
        };
        let inner = &body[..end];
        out.push_str(&rest[..i]);
        // A unit such as "5\text{ cm}" or "90\text{ degrees}": words after a value are dropped.
        let is_unit = !out.trim().is_empty()
            && inner
                .trim()
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic())
            && inner.chars().all(|c| {
                c.is_alphabetic() || c == ' ' || c == '^' || c == '.' || c.is_ascii_digit()
            });
        rest = &body[end + 1..];
        if is_unit {
            // "\text{ cm}^2": the unit's power goes with it.
            if let Some(p) = rest.strip_prefix('^') {
                let skip = match p.strip_prefix('{') {
                    Some(q) => q.find('}').map_or(0, |k| k + 2),
                    None => p
                        .chars()
                        .next()
                        .filter(char::is_ascii_digit)
                        .map_or(0, |_| 1),
                };
                if skip > 0 {
                    rest = &p[skip..];
                }
            }
        } else {
            out.push_str(inner);
        }
    }
    out.push_str(rest);
    out
}

/// Writes `\frac12` as `\frac{1}{2}` and `\sqrt2` as `\sqrt{2}` (single-character arguments).
fn brace_short_args(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    loop {
        let next = ["\\frac", "\\sqrt"]
            .iter()
            .filter_map(|c| rest.find(c).map(|i| (i, *c)))
            .min();
        let Some((i, cmd)) = next else { break };
        out.push_str(&rest[..i + cmd.len()]);
        rest = &rest[i + cmd.len()..];
        let nargs = if cmd == "\\frac" { 2 } else { 1 };
        for _ in 0..nargs {
            let mut chars = rest.chars();
            match chars.next() {
                Some(c) if c.is_ascii_alphanumeric() => {
                    out.push('{');
                    out.push(c);
                    out.push('}');
                    rest = &rest[c.len_utf8()..];
                }
                _ => break,
            }
        }
    }
    out.push_str(rest);
    out
}

/// Canonical text of a math answer: the normalisations applied before comparing strings.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("°", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("~", ""),
        ("{,}", ","),
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\div", "/"),
        ("\\le", "<="),
        ("\\ge", ">="),
    ] {
        s = s.replace(from, to);
    }
    for cmd in [
        "\\text",
        "\\mbox",
        "\\textbf",
        "\\textrm",
        "\\mathrm",
        "\\mathbf",
        "\\textnormal",
        "\\operatorname",
    ] {
        s = unwrap_command(&s, cmd);
    }
    s.retain(|c| !c.is_whitespace());
    s = brace_short_args(&s);
    // A leading "x=" / "y =" (one variable) names the answer, it is not part of it.
    let b = s.as_bytes();
    if b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b'=' {
        s = s[2..].to_string();
    }
    // Thousands separators: 1,000 or 12,345.67 (strict three-digit groups only).
    if is_thousands(&s) {
        s.retain(|c| c != ',');
    }
    s = s.trim_end_matches('.').to_string();
    if let Some(v) = parse_number(&s) {
        // Canonical decimal form: trailing zeros and "+" dropped.
        return format_number(v);
    }
    s
}

fn is_thousands(s: &str) -> bool {
    let t = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let groups: Vec<&str> = int.split(',').collect();
    groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups
            .iter()
            .all(|g| !g.is_empty() && g.chars().all(|c| c.is_ascii_digit()))
        && groups[1..].iter().all(|g| g.len() == 3)
        && frac.chars().all(|c| c.is_ascii_digit())
}

fn format_number(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Splits at top-level commas (outside braces/brackets/parentheses).
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = vec![];
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A tuple, interval or set: (open, close, elements).
fn collection(s: &str) -> Option<(&str, &str, Vec<&str>)> {
    for (open, close) in [
        ("\\{", "\\}"),
        ("(", ")"),
        ("[", "]"),
        ("(", "]"),
        ("[", ")"),
    ] {
        if let Some(inner) = s.strip_prefix(open).and_then(|r| r.strip_suffix(close)) {
            // The brackets must enclose the whole answer, not e.g. "(1)+(2)".
            let mut depth = 0i32;
            let enclosing = inner.chars().all(|c| {
                match c {
                    '(' | '[' | '{' => depth += 1,
                    ')' | ']' | '}' => depth -= 1,
                    _ => {}
                }
                depth >= 0
            });
            let parts = split_top(inner);
            if enclosing && parts.len() > 1 {
                return Some((open, close, parts));
            }
        }
    }
    let parts = split_top(s);
    (parts.len() > 1).then_some(("", "", parts))
}

/// Whether a predicted math answer equals the reference.
pub fn math_equal(pred: &str, gold: &str) -> bool {
    equal_at(&normalize(pred), &normalize(gold), 0)
}

fn equal_at(a: &str, b: &str, depth: usize) -> bool {
    if a.is_empty() || b.is_empty() || depth > 4 {
        return false;
    }
    if a == b {
        return true;
    }
    match (collection(a), collection(b)) {
        (Some((oa, ca, ea)), Some((ob, cb, eb))) => {
            if ea.len() != eb.len() {
                return false;
            }
            // Sets and bare lists compare in any order; tuples and intervals in order, with
            // the same brackets.
            let unordered = |o: &str| o.is_empty() || o == "\\{";
            if unordered(oa) && unordered(ob) {
                let mut used = vec![false; eb.len()];
                return ea.iter().all(|x| {
                    let hit = eb
                        .iter()
                        .enumerate()
                        .position(|(k, y)| !used[k] && equal_at(x, y, depth + 1));
                    hit.map(|k| used[k] = true).is_some()
                });
            }
            oa == ob && ca == cb && ea.iter().zip(&eb).all(|(x, y)| equal_at(x, y, depth + 1))
        }
        (None, None) => match (eval(a), eval(b)) {
            (Some(x), Some(y)) => numbers_close(x, y),
            _ => false,
        },
        _ => false,
    }
}

/// Evaluates an arithmetic LaTeX expression (numbers, + - * / ^, `\frac`, `\sqrt[n]{}`, `\pi`,
/// `\infty`, parentheses, implicit products such as `2\sqrt{3}`); `None` for anything symbolic.
pub fn eval(s: &str) -> Option<f64> {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.expr()?;
    (p.i == p.s.len()).then_some(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }
    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth < 64).then_some(())
    }
    fn expr(&mut self) -> Option<f64> {
        self.enter()?;
        let mut v = self.term()?;
        loop {
            if self.eat("+") {
                v += self.term()?;
            } else if self.eat("-") {
                v -= self.term()?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(v)
    }
    fn starts_primary(&self) -> bool {
        match self.peek() {
            Some(c) if c.is_ascii_digit() || c == b'(' || c == b'{' || c == b'.' => true,
            Some(b'\\') => ["\\frac", "\\sqrt", "\\pi", "\\infty"]
                .iter()
                .any(|t| self.s[self.i..].starts_with(t.as_bytes())),
            _ => false,
        }
    }
    fn term(&mut self) -> Option<f64> {
        let mut v = self.power()?;
        loop {
            if self.eat("*") {
                v *= self.power()?;
            } else if self.eat("/") {
                v /= self.power()?;
            } else if self.starts_primary() {
                v *= self.power()?;
            } else {
                break;
            }
        }
        Some(v)
    }
    fn power(&mut self) -> Option<f64> {
        let base = self.unary()?;
        if self.eat("^") {
            self.enter()?;
            let e = self.power()?;
            self.depth -= 1;
            return Some(base.powf(e));
        }
        Some(base)
    }
    fn unary(&mut self) -> Option<f64> {
        if self.eat("-") {
            self.enter()?;
            let v = -self.unary()?;
            self.depth -= 1;
            return Some(v);
        }
        if self.eat("+") {
            return self.unary();
        }
        self.primary()
    }
    fn group(&mut self) -> Option<f64> {
        if self.eat("{") {
            let v = self.expr()?;
            return self.eat("}").then_some(v);
        }
        // Single-character argument: \frac12.
        let c = self.peek()?;
        if c.is_ascii_digit() {
            self.i += 1;
            return Some((c - b'0') as f64);
        }
        None
    }
    fn primary(&mut self) -> Option<f64> {
        if self.eat("(") {
            let v = self.expr()?;
            return self.eat(")").then_some(v);
        }
        if self.peek() == Some(b'{') {
            return self.group();
        }
        if self.eat("\\frac") {
            let a = self.group()?;
            let b = self.group()?;
            return Some(a / b);
        }
        if self.eat("\\sqrt") {
            let n = if self.eat("[") {
                let n = self.expr()?;
                if !self.eat("]") {
                    return None;
                }
                n
            } else {
                2.0
            };
            let x = self.group()?;
            return Some(if n == 2.0 { x.sqrt() } else { x.powf(1.0 / n) });
        }
        if self.eat("\\pi") {
            return Some(std::f64::consts::PI);
        }
        if self.eat("\\infty") {
            return Some(f64::INFINITY);
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit() || c == b'.') {
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boxed_extraction() {
        assert_eq!(
            last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}."),
            Some("\\frac{1}{2}")
        );
        assert_eq!(last_boxed("\\fbox{x^{2}}"), Some("x^{2}"));
        assert_eq!(last_boxed("so \\boxed 5$."), Some("5"));
        assert_eq!(last_boxed("no box"), None);
        assert_eq!(
            first_boxed("\\boxed{3} and \\boxed{4}"),
            FirstBoxed::Answer("3")
        );
        assert_eq!(first_boxed("\\boxed{\\frac{1}{"), FirstBoxed::Open);
        assert_eq!(first_boxed("nothing yet"), FirstBoxed::None);
    }

    #[test]
    fn last_numbers() {
        assert_eq!(
            last_number("She has 1,234 apples and 5.5 pears."),
            Some(5.5)
        );
        assert_eq!(last_number("The answer is -12."), Some(-12.0));
        assert_eq!(last_number("#### 72"), Some(72.0));
        assert_eq!(last_number("no digits"), None);
        assert_eq!(last_number("costs $1,000,000"), Some(1_000_000.0));
    }

    /// (prediction, gold, equal?)
    const CASES: &[(&str, &str, bool)] = &[
        ("\\frac{1}{2}", "\\frac{1}{2}", true),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", true),
        ("\\tfrac{1}{2}", "\\frac12", true),
        ("1/2", "\\frac{1}{2}", true),
        ("0.5", "\\frac{1}{2}", true),
        (".5", "\\frac{1}{2}", true),
        ("0.50", "\\frac12", true),
        ("\\frac{2}{4}", "\\frac{1}{2}", true),
        ("\\frac{1}{3}", "0.333", false),
        ("\\frac{1}{3}", "\\frac{2}{6}", true),
        ("\\left( 1, 2 \\right)", "(1,2)", true),
        ("(1, 2)", "(2, 1)", false),
        ("[1, 2)", "[1,2)", true),
        ("[1, 2)", "(1,2)", false),
        ("(-\\infty, 3]", "(-\\infty,3]", true),
        ("\\{1, 2, 3\\}", "\\{3,2,1\\}", true),
        ("1, 2", "2, 1", true),
        ("1, 2", "1, 2, 3", false),
        ("5\\text{ cm}", "5", true),
        ("5 \\text{ inches}", "5", true),
        ("10\\mbox{ units}", "10", true),
        ("90^\\circ", "90", true),
        ("90^{\\circ}", "90", true),
        ("45°", "45", true),
        ("50\\%", "50", true),
        ("50%", "50", true),
        ("\\$5.00", "5", true),
        ("\\$ 12", "12", true),
        ("1,000", "1000", true),
        ("12,345.67", "12345.67", true),
        ("1{,}000", "1000", true),
        ("3.0", "3", true),
        ("3.", "3", true),
        ("2.500", "2.5", true),
        ("+7", "7", true),
        ("-7", "7", false),
        ("x = 3", "3", true),
        ("y=-2", "-2", true),
        ("2\\pi", "2\\pi", true),
        ("\\pi \\cdot 2", "2\\pi", true),
        ("6.2831853", "2\\pi", true),
        ("6.28", "2\\pi", false),
        ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", true),
        ("\\sqrt{8}", "2\\sqrt{2}", true),
        ("2\\sqrt2", "\\sqrt{8}", true),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", true),
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", true),
        ("\\sqrt[3]{27}", "3", true),
        ("3\\sqrt{3}", "\\sqrt{27}", true),
        ("\\sqrt{3}", "3", false),
        ("2^{10}", "1024", true),
        ("2^3", "8", true),
        ("10^{-2}", "0.01", true),
        ("-\\frac{3}{4}", "-0.75", true),
        ("\\frac{-3}{4}", "-\\frac34", true),
        ("\\text{(A)}", "(A)", true),
        ("\\textbf{(B)}", "\\text{(B)}", true),
        ("(A)", "(B)", false),
        ("x^2+1", "x^2+1", true),
        ("x^2 + 1", "x^{2}+1", false),
        ("\\text{Monday}", "\\text{Monday}", true),
        ("Monday", "\\text{Tuesday}", false),
        ("1000000", "10^6", true),
        ("1.0000001", "1", true),
        ("1.001", "1", false),
        ("0", "0.0", true),
        ("0", "-0", true),
        ("0.000001", "0", false),
        ("4\\times 3", "12", true),
        ("12\\div 4", "3", true),
        ("(3)", "3", true),
        ("{3}", "3", true),
        ("\\left[ 2, 5 \\right]", "[2,5]", true),
        ("\\frac{7}{2}", "3\\frac{1}{2}", false),
        ("3.5", "\\frac72", true),
        ("\\frac{a}{b}", "\\frac{a}{b}", true),
        ("\\frac{a}{b}", "\\frac{b}{a}", false),
        ("(1,2),(3,4)", "(3,4),(1,2)", true),
        ("", "0", false),
        ("\\infty", "\\infty", true),
        ("-\\infty", "\\infty", false),
        ("25\\text{ square units}", "25", true),
        ("\\$\\,1,\\!000", "1000", true),
        ("5\\sqrt{2}", "\\sqrt{50}", true),
        ("8 \\text{ cm}^2", "8", true),
        ("\\dfrac{3\\sqrt{3}}{2}", "\\frac{3\\sqrt3}{2}", true),
        ("1e3", "1000", false),
    ];

    #[test]
    fn math_equivalence_table() {
        assert!(CASES.len() >= 80, "{} cases", CASES.len());
        let positives = CASES.iter().filter(|c| c.2).count();
        assert!(positives >= 30 && CASES.len() - positives >= 15);
        for (pred, gold, want) in CASES {
            assert_eq!(
                math_equal(pred, gold),
                *want,
                "math_equal({pred:?}, {gold:?}) = !{want}; normalized {:?} vs {:?}",
                normalize(pred),
                normalize(gold)
            );
        }
    }

    proptest::proptest! {
        /// The evaluator and normaliser never panic, whatever the text.
        #[test]
        fn never_panics(s in "\\PC{0,60}", t in "[\\\\a-z{}()\\[\\]0-9+*/^.,=-]{0,60}") {
            let _ = math_equal(&s, &t);
            let _ = eval(&t);
            let _ = last_boxed(&s);
            let _ = first_boxed(&t);
            let _ = last_number(&s);
        }

        /// Integers and decimals equal themselves in every written form we normalise.
        #[test]
        fn numbers_equal_their_forms(n in -100000i64..100000, d in 1i64..1000) {
            let v = n as f64 / d as f64;
            let frac = format!("\\frac{{{n}}}{{{d}}}");
            let dec = format!("{v:.12}");
            prop_assert!(math_equal(&frac, &dec), "{} vs {}", frac, dec);
            let (int, padded) = (n.to_string(), format!("{n}.000"));
            prop_assert!(math_equal(&int, &padded));
        }
    }
}
