//! Dataset readers: ARC (AI2 original jsonl and the Hugging Face jsonl layout), MATH (raw layout
//! and DART-Math's pool layout), GSM8K. Rows stream line by line; a bad row is an error naming
//! file, line and field, or (with `skip_bad_rows`) is counted and skipped.
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::answer::last_boxed;
use crate::error::{Error, Result};

/// The datasets users name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskName {
    /// ARC-Easy.
    ArcEasy,
    /// ARC-Challenge.
    ArcChallenge,
    /// Both ARC sets.
    Arc,
    /// MATH / DART-Math pool; `Some(level)` for one difficulty level, `None` for all.
    Dart(Option<u8>),
    /// GSM8K.
    Gsm8k,
}

impl TaskName {
    /// Every task name users can give, in the order help texts list them.
    pub const NAMES: [&'static str; 10] = [
        "arc_easy",
        "arc_challenge",
        "arc",
        "dart-1",
        "dart-2",
        "dart-3",
        "dart-4",
        "dart-5",
        "dart",
        "gsm8k",
    ];
}

impl FromStr for TaskName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "arc_easy" => TaskName::ArcEasy,
            "arc_challenge" => TaskName::ArcChallenge,
            "arc" => TaskName::Arc,
            "dart" => TaskName::Dart(None),
            "gsm8k" => TaskName::Gsm8k,
            other => match other
                .strip_prefix("dart-")
                .and_then(|l| l.parse::<u8>().ok())
            {
                Some(l @ 1..=5) => TaskName::Dart(Some(l)),
                _ => return Err(Error::UnknownTask(s.to_string())),
            },
        })
    }
}

impl std::fmt::Display for TaskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskName::ArcEasy => f.write_str("arc_easy"),
            TaskName::ArcChallenge => f.write_str("arc_challenge"),
            TaskName::Arc => f.write_str("arc"),
            TaskName::Dart(Some(l)) => write!(f, "dart-{l}"),
            TaskName::Dart(None) => f.write_str("dart"),
            TaskName::Gsm8k => f.write_str("gsm8k"),
        }
    }
}

impl TaskName {
    /// Every single-dataset task (what `stats` lists).
    pub const ALL: [TaskName; 8] = [
        TaskName::ArcEasy,
        TaskName::ArcChallenge,
        TaskName::Dart(Some(1)),
        TaskName::Dart(Some(2)),
        TaskName::Dart(Some(3)),
        TaskName::Dart(Some(4)),
        TaskName::Dart(Some(5)),
        TaskName::Gsm8k,
    ];

    /// The answer family of the task.
    pub fn family(self) -> Family {
        match self {
            TaskName::ArcEasy | TaskName::ArcChallenge | TaskName::Arc => Family::MultipleChoice,
            TaskName::Dart(_) => Family::Math,
            TaskName::Gsm8k => Family::Gsm8k,
        }
    }
}

/// How answers of a task are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Lettered choices.
    MultipleChoice,
    /// A `\boxed{}` expression equal to the reference.
    Math,
    /// The last number of the response.
    Gsm8k,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 3] = [Family::MultipleChoice, Family::Math, Family::Gsm8k];

    /// Its name in files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::MultipleChoice => "multiple_choice",
            Family::Math => "math",
            Family::Gsm8k => "gsm8k",
        }
    }
}

/// Dataset split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training split.
    Train,
    /// Validation split (`dev` or `validation`).
    Dev,
    /// Test split.
    Test,
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "dev" | "validation" | "val" => Ok(Split::Dev),
            "test" => Ok(Split::Test),
            other => Err(Error::UnknownSplit(other.to_string())),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        })
    }
}

/// One lettered choice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Choice {
    /// Normalised letter (`A`..`E`; items labelled 1-5 are mapped).
    pub label: char,
    /// Choice text.
    pub text: String,
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    /// Stem and lettered choices.
    MultipleChoice {
        /// Question stem.
        stem: String,
        /// Choices in order.
        choices: Vec<Choice>,
    },
    /// A free-form problem (math, GSM8K).
    Problem(String),
}

/// The reference answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gold {
    /// Correct choice letter.
    Letter(char),
    /// Reference math answer (contents of the solution's last `\boxed{}`).
    Math(String),
    /// Reference number (GSM8K).
    Number(String),
}

impl std::fmt::Display for Gold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gold::Letter(c) => write!(f, "{c}"),
            Gold::Math(s) | Gold::Number(s) => f.write_str(s),
        }
    }
}

/// One dataset row, ready for prompting and grading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Stable id: the dataset's own id, else `<file stem>:<line>`.
    pub id: String,
    /// Task the sample belongs to (`arc_easy`, `dart-3`, `gsm8k`, ...).
    pub task: TaskName,
    /// The question.
    pub question: Question,
    /// The reference answer.
    pub gold: Gold,
    /// MATH difficulty level (1..=5), when known.
    pub level: Option<u8>,
}

/// Where the data lives: `--data DIR`, else `$DRLLM_DATA`, else `../shared/data` when present.
pub fn resolve_data_dir(arg: Option<&Path>) -> Result<PathBuf> {
    let given = arg.map(|p| (p.to_path_buf(), "--data")).or_else(|| {
        std::env::var_os("DRLLM_DATA")
            .filter(|p| !p.is_empty())
            .map(|p| (PathBuf::from(p), "DRLLM_DATA"))
    });
    if let Some((p, from)) = given {
        if !p.is_dir() {
            return Err(Error::MissingData(format!(
                "{from} {}: no such directory. {DATA_LAYOUT}",
                p.display()
            )));
        }
        return Ok(p);
    }
    let dev = PathBuf::from("../shared/data");
    if dev.is_dir() {
        return Ok(dev);
    }
    Err(Error::MissingData(format!(
        "no data directory: pass --data DIR or set DRLLM_DATA. {DATA_LAYOUT}"
    )))
}

/// Where the task files are expected under a data directory (for error messages).
pub const DATA_LAYOUT: &str =
    "Expected layout: DIR/arc/ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl, \
     DIR/math/{train,test}.jsonl (MATH, or DART-Math pool rows), DIR/gsm8k/{train,test}.jsonl";

/// One place a split may be stored.
enum Candidate {
    /// A single jsonl file.
    File(PathBuf),
    /// Parquet shards `DIR/<prefix>-*.parquet` or `DIR/<prefix>.parquet` (Hugging Face layout).
    Shards(PathBuf, String),
}

impl Candidate {
    fn files(&self) -> Vec<PathBuf> {
        match self {
            Candidate::File(p) => p.is_file().then(|| p.clone()).into_iter().collect(),
            Candidate::Shards(dir, prefix) => {
                let Ok(rd) = std::fs::read_dir(dir) else {
                    return vec![];
                };
                let mut v: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        let name = p
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default();
                        name.ends_with(".parquet")
                            && (name.starts_with(&format!("{prefix}-"))
                                || name == format!("{prefix}.parquet"))
                    })
                    .collect();
                v.sort();
                v
            }
        }
    }
    fn describe(&self) -> String {
        match self {
            Candidate::File(p) => p.display().to_string(),
            Candidate::Shards(dir, prefix) => format!("{}/{prefix}-*.parquet", dir.display()),
        }
    }
}

/// Files holding `task`'s `split` under `dir` (jsonl, or Hugging Face parquet shards), and the
/// sub-task each belongs to.
pub fn task_files(dir: &Path, task: TaskName, split: Split) -> Result<Vec<(TaskName, PathBuf)>> {
    let arc_split = match split {
        Split::Train => "Train",
        Split::Dev => "Dev",
        Split::Test => "Test",
    };
    let hf_split = match split {
        Split::Train => "train",
        Split::Dev => "validation",
        Split::Test => "test",
    };
    let find = |sub: TaskName, candidates: Vec<Candidate>| -> Result<Vec<(TaskName, PathBuf)>> {
        for c in &candidates {
            let files = c.files();
            if !files.is_empty() {
                return Ok(files.into_iter().map(|f| (sub, f)).collect());
            }
        }
        Err(Error::MissingData(format!(
            "no {sub} {split} data in {}: looked for {}",
            dir.display(),
            candidates
                .iter()
                .map(Candidate::describe)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    };
    let arc = |sub: TaskName, name: &str| {
        find(
            sub,
            vec![
                Candidate::File(dir.join("arc").join(format!("{name}-{arc_split}.jsonl"))),
                Candidate::File(dir.join(name).join(format!("{name}-{arc_split}.jsonl"))),
                Candidate::File(dir.join("arc").join(name).join(format!("{hf_split}.jsonl"))),
                Candidate::Shards(dir.join("arc").join(name), hf_split.into()),
                Candidate::Shards(dir.join(name), hf_split.into()),
            ],
        )
    };
    let plain = |sub: TaskName, folder: &str| {
        let base = dir.join(folder);
        let mut c = vec![Candidate::File(base.join(format!("{split}.jsonl")))];
        if split == Split::Dev {
            c.push(Candidate::File(base.join("validation.jsonl")));
        }
        c.push(Candidate::Shards(base.clone(), hf_split.into()));
        c.push(Candidate::Shards(base.join("main"), hf_split.into()));
        find(sub, c)
    };
    Ok(match task {
        TaskName::ArcEasy => arc(task, "ARC-Easy")?,
        TaskName::ArcChallenge => arc(task, "ARC-Challenge")?,
        TaskName::Arc => {
            let mut v = arc(TaskName::ArcEasy, "ARC-Easy")?;
            v.extend(arc(TaskName::ArcChallenge, "ARC-Challenge")?);
            v
        }
        TaskName::Dart(_) => plain(task, "math")?,
        TaskName::Gsm8k => plain(task, "gsm8k")?,
    })
}

/// Options of [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Skip rows after shuffling.
    pub offset: usize,
    /// Keep at most this many rows.
    pub limit: Option<usize>,
    /// Shuffle with this seed (ChaCha8: stable across platforms and rand versions).
    pub shuffle_seed: Option<u64>,
    /// Count and skip malformed rows instead of failing.
    pub skip_bad_rows: bool,
}

/// Samples plus what was skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The samples, in file order or shuffled.
    pub samples: Vec<Sample>,
    /// Malformed rows skipped (only with `skip_bad_rows`), with their errors.
    pub bad_rows: Vec<Error>,
}

/// Streams the rows of one file (jsonl, or parquet by extension) as samples of `task` (a
/// single-dataset task or `Dart`).
pub fn read_file(
    path: &Path,
    task: TaskName,
    mut on_row: impl FnMut(Result<Sample>) -> Result<()>,
) -> Result<()> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut handle = |line_no: usize, value: Result<Value>| -> Result<()> {
        match value.and_then(|v| parse_row(path, line_no, &stem, task, &v)) {
            Ok(Some(s)) => on_row(Ok(s)),
            Ok(None) => Ok(()),
            Err(e) => on_row(Err(e)),
        }
    };
    if path.extension().is_some_and(|e| e == "parquet") {
        let reader = parquet::file::reader::SerializedFileReader::try_from(path).map_err(|e| {
            Error::BadFile {
                path: path.to_path_buf(),
                msg: format!("not a readable parquet file: {e}"),
            }
        })?;
        for (i, row) in reader.into_iter().enumerate() {
            let value = row.map(|r| r.to_json_value()).map_err(|e| {
                Error::bad_row(path, i + 1, "-", format!("unreadable parquet row: {e}"))
            });
            handle(i + 1, value)?;
        }
        return Ok(());
    }
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    // Lines are read as bytes so that a line of invalid UTF-8 is reported with its number; a
    // byte-order mark (as some editors write) is skipped.
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let bytes = match line.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) if i == 0 => rest,
            _ => &line[..],
        };
        let value = match std::str::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => serde_json::from_str::<Value>(text)
                .map_err(|e| Error::bad_row(path, i + 1, "-", format!("invalid JSON: {e}"))),
            Err(e) => Err(Error::bad_row(
                path,
                i + 1,
                "-",
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )),
        };
        handle(i + 1, value)?;
    }
    Ok(())
}

/// Loads `task`'s `split` from `dir` with limit, offset and seeded shuffle.
pub fn load(dir: &Path, task: TaskName, split: Split, opts: &LoadOptions) -> Result<Loaded> {
    let mut out = Loaded::default();
    for (sub, path) in task_files(dir, task, split)? {
        read_file(&path, sub, |row| {
            match row {
                Ok(s) => out.samples.push(s),
                Err(e) if opts.skip_bad_rows => out.bad_rows.push(e),
                Err(e) => return Err(e),
            }
            Ok(())
        })?;
    }
    if let Some(seed) = opts.shuffle_seed {
        out.samples
            .shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    }
    let end = opts.limit.map_or(out.samples.len(), |l| {
        opts.offset.saturating_add(l).min(out.samples.len())
    });
    let start = opts.offset.min(end);
    out.samples = out.samples.drain(start..end).collect();
    Ok(out)
}

fn str_field<'a>(path: &Path, line: usize, v: &'a Value, field: &str) -> Result<&'a str> {
    let mut cur = v;
    for part in field.split('.') {
        cur = cur
            .get(part)
            .ok_or_else(|| Error::bad_row(path, line, field, "missing"))?;
    }
    cur.as_str()
        .ok_or_else(|| Error::bad_row(path, line, field, "expected a string"))
}

/// Maps an ARC label to a letter: `A`..`E` stay, `1`..`5` become `A`..`E`.
pub fn normalize_label(label: &str) -> Option<char> {
    let l = label.trim();
    let mut chars = l.chars();
    let c = chars.next()?;
    if chars.next().is_some() {
        return None;
    }
    match c {
        'A'..='E' => Some(c),
        'a'..='e' => Some(c.to_ascii_uppercase()),
        '1'..='5' => Some((b'A' + (c as u8 - b'1')) as char),
        _ => None,
    }
}

/// Parses one row; `Ok(None)` = a row that belongs to another sub-task (another MATH level).
fn parse_row(
    path: &Path,
    line: usize,
    stem: &str,
    task: TaskName,
    v: &Value,
) -> Result<Option<Sample>> {
    let id = v.get("id").and_then(|x| {
        x.as_str()
            .map(String::from)
            .or_else(|| x.as_u64().map(|n| n.to_string()))
    });
    let id = id.unwrap_or_else(|| format!("{stem}:{line}"));
    match task.family() {
        Family::MultipleChoice => parse_arc(path, line, id, task, v).map(Some),
        Family::Math => {
            let (problem, gold, level) = if v.get("problem").is_some() {
                let solution = str_field(path, line, v, "solution")?;
                let gold = last_boxed(solution).ok_or_else(|| {
                    Error::bad_row(
                        path,
                        line,
                        "solution",
                        "no \\boxed{...} or \\fbox{...} answer",
                    )
                })?;
                (
                    str_field(path, line, v, "problem")?,
                    gold.to_string(),
                    parse_level(path, line, v.get("level"), "level")?,
                )
            } else if v.get("query").is_some() {
                let gold = str_field(path, line, v, "gt_ans")?;
                let level = v.get("query_metadata").and_then(|m| m.get("level"));
                (
                    str_field(path, line, v, "query")?,
                    gold.to_string(),
                    parse_level(path, line, level, "query_metadata.level")?,
                )
            } else {
                return Err(Error::bad_row(
                    path,
                    line,
                    "problem",
                    "missing (expected MATH `problem` or DART `query`)",
                ));
            };
            // An empty box is a defect of the source (MATH train/number_theory/7115 and 7117
            // end in "$\\boxed{}$"): the row is kept, and nothing grades equal to an empty
            // reference, so it can only ever score 0.
            // Rows of unknown level ("Level ?": two MATH train rows) belong to `dart` only.
            if let TaskName::Dart(Some(want)) = task {
                if level != Some(want) {
                    return Ok(None);
                }
            }
            let task = match level {
                Some(l) => TaskName::Dart(Some(l)),
                None => TaskName::Dart(None),
            };
            Ok(Some(Sample {
                id,
                task,
                question: Question::Problem(problem.to_string()),
                gold: Gold::Math(gold),
                level,
            }))
        }
        Family::Gsm8k => {
            let question = str_field(path, line, v, "question")?;
            let answer = str_field(path, line, v, "answer")?;
            let gold = answer
                .rsplit_once("####")
                .map(|(_, g)| g.trim().replace(',', ""))
                .filter(|g| crate::answer::parse_number(g).is_some())
                .ok_or_else(|| {
                    Error::bad_row(path, line, "answer", "expected a final \"#### <number>\"")
                })?;
            Ok(Some(Sample {
                id,
                task,
                question: Question::Problem(question.to_string()),
                gold: Gold::Number(gold),
                level: None,
            }))
        }
    }
}

fn parse_level(path: &Path, line: usize, v: Option<&Value>, field: &str) -> Result<Option<u8>> {
    let level = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => {
            let t = s.trim().trim_start_matches("Level").trim();
            if t == "?" {
                return Ok(None);
            }
            t.parse::<u64>().ok()
        }
        Some(_) => None,
    };
    match level {
        Some(l @ 1..=5) => Ok(Some(l as u8)),
        _ => Err(Error::bad_row(
            path,
            line,
            field,
            format!(
                "expected \"Level 1\"..\"Level 5\" (or \"Level ?\"), got {}",
                v.map(|x| x.to_string()).unwrap_or_default()
            ),
        )),
    }
}

fn parse_arc(path: &Path, line: usize, id: String, task: TaskName, v: &Value) -> Result<Sample> {
    let bad = |field: &str, msg: &str| Error::bad_row(path, line, field, msg);
    let q = v
        .get("question")
        .ok_or_else(|| bad("question", "missing"))?;
    // AI2 original: question = {stem, choices: [{text, label}]}; HF: question = "...",
    // choices = {text: [...], label: [...]}.
    let (stem, raw): (&str, Vec<(String, String)>) = if let Some(obj) = q.as_object() {
        let stem = obj
            .get("stem")
            .and_then(|s| s.as_str())
            .ok_or_else(|| bad("question.stem", "missing or not a string"))?;
        let list = obj
            .get("choices")
            .and_then(|c| c.as_array())
            .ok_or_else(|| bad("question.choices", "missing or not a list"))?;
        let mut raw = vec![];
        for (k, c) in list.iter().enumerate() {
            let f = |n: &str| format!("question.choices[{k}].{n}");
            let text = c
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| bad(&f("text"), "missing or not a string"))?;
            let label = c
                .get("label")
                .and_then(|t| t.as_str())
                .ok_or_else(|| bad(&f("label"), "missing or not a string"))?;
            raw.push((label.to_string(), text.to_string()));
        }
        (stem, raw)
    } else {
        let stem = q
            .as_str()
            .ok_or_else(|| bad("question", "expected a string or an object with stem"))?;
        let c = v.get("choices").ok_or_else(|| bad("choices", "missing"))?;
        let texts = c
            .get("text")
            .and_then(|t| t.as_array())
            .ok_or_else(|| bad("choices.text", "missing or not a list"))?;
        let labels = c
            .get("label")
            .and_then(|t| t.as_array())
            .ok_or_else(|| bad("choices.label", "missing or not a list"))?;
        if texts.len() != labels.len() {
            return Err(bad("choices", "text and label lists differ in length"));
        }
        let mut raw = vec![];
        for (k, (t, l)) in texts.iter().zip(labels).enumerate() {
            let t = t
                .as_str()
                .ok_or_else(|| bad(&format!("choices.text[{k}]"), "not a string"))?;
            let l = l
                .as_str()
                .ok_or_else(|| bad(&format!("choices.label[{k}]"), "not a string"))?;
            raw.push((l.to_string(), t.to_string()));
        }
        (stem, raw)
    };
    if raw.is_empty() {
        return Err(bad("choices", "empty: at least two choices expected"));
    }
    let mut choices = Vec::with_capacity(raw.len());
    for (k, (label, text)) in raw.into_iter().enumerate() {
        let letter = normalize_label(&label).ok_or_else(|| {
            Error::bad_row(
                path,
                line,
                &format!("choices[{k}].label"),
                format!("unknown label {label:?} (expected A-E or 1-5)"),
            )
        })?;
        if choices.iter().any(|c: &Choice| c.label == letter) {
            return Err(Error::bad_row(
                path,
                line,
                &format!("choices[{k}].label"),
                format!("duplicate label {label:?}"),
            ));
        }
        choices.push(Choice {
            label: letter,
            text,
        });
    }
    let key = str_field(path, line, v, "answerKey")?;
    let gold = normalize_label(key)
        .filter(|g| choices.iter().any(|c| c.label == *g))
        .ok_or_else(|| {
            Error::bad_row(
                path,
                line,
                "answerKey",
                format!("{key:?} is not one of the choice labels"),
            )
        })?;
    Ok(Sample {
        id,
        task,
        question: Question::MultipleChoice {
            stem: stem.to_string(),
            choices,
        },
        gold: Gold::Letter(gold),
        level: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_task_name_parses_and_prints_back() {
        for name in TaskName::NAMES {
            let t: TaskName = name.parse().unwrap();
            assert_eq!(t.to_string(), name);
        }
        assert!("dart-6".parse::<TaskName>().is_err());
    }

    fn write(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    }

    fn read_all(p: &Path, task: TaskName) -> Result<Vec<Sample>> {
        let mut v = vec![];
        read_file(p, task, |r| {
            v.push(r?);
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn task_and_split_names() {
        assert_eq!(
            "dart-3".parse::<TaskName>().unwrap(),
            TaskName::Dart(Some(3))
        );
        assert!("dart-6".parse::<TaskName>().is_err());
        assert_eq!("validation".parse::<Split>().unwrap(), Split::Dev);
        for t in [
            "arc_easy",
            "arc_challenge",
            "arc",
            "dart",
            "dart-1",
            "gsm8k",
        ] {
            assert_eq!(t.parse::<TaskName>().unwrap().to_string(), t);
        }
    }

    #[test]
    fn arc_layouts_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.jsonl",
            &[
                r#"{"id":"x1","question":{"stem":"S?","choices":[{"text":"a","label":"1"},{"text":"b","label":"2"},{"text":"c","label":"3"}]},"answerKey":"3"}"#,
                r#"{"id":"x2","question":"Q?","choices":{"text":["a","b","c","d","e"],"label":["A","B","C","D","E"]},"answerKey":"E"}"#,
            ],
        );
        let s = read_all(&p, TaskName::ArcEasy).unwrap();
        assert_eq!(s[0].gold, Gold::Letter('C'));
        match &s[0].question {
            Question::MultipleChoice { choices, .. } => {
                assert_eq!(choices.iter().map(|c| c.label).collect::<String>(), "ABC")
            }
            _ => panic!(),
        }
        assert_eq!(s[1].gold, Gold::Letter('E'));
        assert_eq!(s[1].id, "x2");
    }

    #[test]
    fn bad_rows_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"id":"x","question":{"stem":"S","choices":[]},"answerKey":"A"}"#,
                "choices",
            ),
            (
                r#"{"id":"x","question":{"stem":"S","choices":[{"text":"a","label":"Z"}]},"answerKey":"A"}"#,
                "choices[0].label",
            ),
            (
                r#"{"id":"x","question":{"stem":"S","choices":[{"text":"a","label":"A"}]},"answerKey":"B"}"#,
                "answerKey",
            ),
            (
                r#"{"id":"x","question":{"choices":[]},"answerKey":"B"}"#,
                "question.stem",
            ),
            (
                r#"{"id":"x","question":{"stem":"S","choices":[{"label":"A"}]},"answerKey":"A"}"#,
                "question.choices[0].text",
            ),
            (r#"{not json"#, "field -"),
        ];
        for (row, field) in cases {
            let p = write(
                dir.path(),
                "bad.jsonl",
                &[
                    r#"{"id":"ok","question":{"stem":"S","choices":[{"text":"a","label":"A"}]},"answerKey":"A"}"#,
                    row,
                ],
            );
            let msg = read_all(&p, TaskName::ArcEasy).unwrap_err().to_string();
            assert!(
                msg.contains("bad.jsonl:2") && msg.contains(field),
                "{msg} (wanted {field})"
            );
        }
        let p = write(
            dir.path(),
            "m.jsonl",
            &[r#"{"problem":"p","level":"Level 9","solution":"\\boxed{1}"}"#],
        );
        let msg = read_all(&p, TaskName::Dart(None)).unwrap_err().to_string();
        assert!(msg.contains("m.jsonl:1") && msg.contains("level"), "{msg}");
        let p = write(
            dir.path(),
            "m.jsonl",
            &[r#"{"problem":"p","level":"Level 2","solution":"no answer"}"#],
        );
        let msg = read_all(&p, TaskName::Dart(None)).unwrap_err().to_string();
        assert!(msg.contains("field solution"), "{msg}");
        let p = write(
            dir.path(),
            "g.jsonl",
            &[r#"{"question":"q","answer":"it is 5"}"#],
        );
        let msg = read_all(&p, TaskName::Gsm8k).unwrap_err().to_string();
        assert!(
            msg.contains("g.jsonl:1") && msg.contains("field answer"),
            "{msg}"
        );
    }

    #[test]
    fn math_layouts_levels_and_gsm8k() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "math/train.jsonl",
            &[
                r#"{"id":"m1","problem":"p1","level":"Level 3","solution":"so \\boxed{\\frac{1}{2}}."}"#,
                r#"{"id":"m2","problem":"p2","level":"Level ?","solution":"\\boxed{7}"}"#,
                r#"{"query":"q3","gt_ans":"4","query_metadata":{"level":3}}"#,
            ],
        );
        let all = read_all(&p, TaskName::Dart(None)).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].gold, Gold::Math("\\frac{1}{2}".into()));
        assert_eq!(all[1].level, None);
        assert_eq!(all[2].id, "train:3");
        let l3 = read_all(&p, TaskName::Dart(Some(3))).unwrap();
        assert_eq!(l3.len(), 2);
        let g = write(
            dir.path(),
            "gsm8k/train.jsonl",
            &[r#"{"question":"q","answer":"work\n#### 1,234"}"#],
        );
        assert_eq!(
            read_all(&g, TaskName::Gsm8k).unwrap()[0].gold,
            Gold::Number("1234".into())
        );
    }

    #[test]
    fn load_shuffles_reproducibly_and_skips_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines: Vec<String> = (0..20)
            .map(|i| {
                serde_json::json!({"question": format!("q{i}"), "answer": format!("#### {i}")})
                    .to_string()
            })
            .collect();
        lines.insert(5, "garbage".into());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        write(dir.path(), "gsm8k/train.jsonl", &refs);
        let strict = load(
            dir.path(),
            TaskName::Gsm8k,
            Split::Train,
            &LoadOptions::default(),
        );
        assert!(strict.unwrap_err().to_string().contains("train.jsonl:6"));
        let opts = LoadOptions {
            offset: 2,
            limit: Some(5),
            shuffle_seed: Some(7),
            skip_bad_rows: true,
        };
        let a = load(dir.path(), TaskName::Gsm8k, Split::Train, &opts).unwrap();
        let b = load(dir.path(), TaskName::Gsm8k, Split::Train, &opts).unwrap();
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.samples.len(), 5);
        assert_eq!(a.bad_rows.len(), 1);
        let msg = load(dir.path(), TaskName::Gsm8k, Split::Dev, &opts)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("gsm8k") && msg.contains("dev.jsonl"), "{msg}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Arbitrary lines (garbage, or JSON of the wrong shape) give errors, never panics.
        #[test]
        fn arbitrary_rows_never_panic(lines in proptest::collection::vec(
            proptest::prop_oneof![
                "\\PC{0,80}",
                "\\{\"(id|question|choices|answerKey|problem|solution|level|query|gt_ans|answer)\": ?(\"[A-E1-9 #\\\\{}]{0,12}\"|[0-9]{1,3}|\\[\\]|\\{\\}|null)\\}",
            ], 0..6)) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.jsonl");
            std::fs::write(&p, lines.join("\n")).unwrap();
            for task in [TaskName::ArcEasy, TaskName::Dart(None), TaskName::Dart(Some(2)), TaskName::Gsm8k] {
                let _ = read_file(&p, task, |_| Ok(()));
            }
        }
    }
}
