//! Dataset readers: ARC and OpenBookQA (AI2 original jsonl and the Hugging Face layouts), PIQA,
//! SciQ and BoolQ (upstream and Hugging Face layouts), MATH (raw layout and DART-Math's pool
//! layout), GSM8K. Rows stream one by one; a bad row is an error naming file, line and field, or
//! (with `skip_bad_rows`) is counted and skipped.
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::answer::last_boxed;
use crate::error::{Error, Result};

/// The datasets users name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// PIQA (physical commonsense, two solutions).
    Piqa,
    /// OpenBookQA (elementary science, four choices).
    OpenBookQa,
    /// SciQ (science exam questions with a supporting paragraph, four choices).
    Sciq,
    /// BoolQ (yes/no questions about a passage).
    Boolq,
}

impl TaskName {
    /// Every task name users can give, in the order help texts list them.
    pub const NAMES: [&'static str; 14] = [
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
        "piqa",
        "openbookqa",
        "sciq",
        "boolq",
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
            "piqa" => TaskName::Piqa,
            "openbookqa" => TaskName::OpenBookQa,
            "sciq" => TaskName::Sciq,
            "boolq" => TaskName::Boolq,
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
            TaskName::Piqa => f.write_str("piqa"),
            TaskName::OpenBookQa => f.write_str("openbookqa"),
            TaskName::Sciq => f.write_str("sciq"),
            TaskName::Boolq => f.write_str("boolq"),
        }
    }
}

impl TaskName {
    /// Every single-dataset task (what `stats` lists).
    pub const ALL: [TaskName; 12] = [
        TaskName::ArcEasy,
        TaskName::ArcChallenge,
        TaskName::Dart(Some(1)),
        TaskName::Dart(Some(2)),
        TaskName::Dart(Some(3)),
        TaskName::Dart(Some(4)),
        TaskName::Dart(Some(5)),
        TaskName::Gsm8k,
        TaskName::Piqa,
        TaskName::OpenBookQa,
        TaskName::Sciq,
        TaskName::Boolq,
    ];

    /// The answer family of the task.
    pub fn family(self) -> Family {
        match self {
            TaskName::ArcEasy
            | TaskName::ArcChallenge
            | TaskName::Arc
            | TaskName::Piqa
            | TaskName::OpenBookQa
            | TaskName::Sciq
            | TaskName::Boolq => Family::MultipleChoice,
            TaskName::Dart(_) => Family::Math,
            TaskName::Gsm8k => Family::Gsm8k,
        }
    }
}

/// Every `CARVE_EVERY`-th row of the upstream validation file (rows 1, 5, 9, ... counted from 1)
/// is drllm's `dev` split of PIQA, SciQ and BoolQ, and the other rows its `train` split: their
/// upstream train splits are not available offline, so both are carved from validation by this
/// fixed rule, whatever other files a data directory holds (runs stay comparable across
/// machines).
pub const CARVE_EVERY: usize = 4;

impl TaskName {
    /// The split a task's `split` is carved from ([`CARVE_EVERY`]): validation for the train and
    /// dev splits of PIQA, SciQ and BoolQ; `None` where the split is a file of its own.
    pub fn carved_from(self, split: Split) -> Option<Split> {
        match (self, split) {
            (TaskName::Piqa | TaskName::Sciq | TaskName::Boolq, Split::Train | Split::Dev) => {
                Some(Split::Dev)
            }
            _ => None,
        }
    }

    /// Whether the row numbered `row` (from 1, in file order) of the file a carved split is
    /// read from belongs to `split`.
    pub fn keeps_row(self, split: Split, row: usize) -> bool {
        match self.carved_from(split) {
            None => true,
            Some(_) => row.saturating_sub(1).is_multiple_of(CARVE_EVERY) == (split == Split::Dev),
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
        /// Text the question is about, shown before it (SciQ's support paragraph, BoolQ's
        /// passage).
        context: Option<String>,
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
     DIR/math/{train,test}.jsonl (MATH, or DART-Math pool rows), DIR/gsm8k/{train,test}.jsonl, \
     DIR/piqa/valid.jsonl with valid-labels.lst, DIR/openbookqa/{train,dev,test}.jsonl, \
     DIR/sciq/valid.json, DIR/boolq/val.jsonl (or Hugging Face parquet shards in those folders)";

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

/// Files holding `task`'s `split` under `dir` (jsonl, JSON, or Hugging Face parquet shards), and
/// the sub-task each belongs to. A carved split ([`TaskName::carved_from`]) names the file it is
/// carved from; [`load`] keeps its rows.
pub fn task_files(dir: &Path, task: TaskName, split: Split) -> Result<Vec<(TaskName, PathBuf)>> {
    let split = task.carved_from(split).unwrap_or(split);
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
        TaskName::Piqa | TaskName::OpenBookQa | TaskName::Sciq | TaskName::Boolq => {
            // Upstream file names per split, then the Hugging Face shard folders.
            let (folder, upstream, hf_dirs): (&str, [&str; 3], &[&str]) = match task {
                TaskName::Piqa => (
                    "piqa",
                    ["train.jsonl", "valid.jsonl", "test.jsonl"],
                    &["", "data", "plain_text"],
                ),
                TaskName::OpenBookQa => (
                    "openbookqa",
                    ["train.jsonl", "dev.jsonl", "test.jsonl"],
                    &["main", "", "data"],
                ),
                TaskName::Sciq => (
                    "sciq",
                    ["train.json", "valid.json", "test.json"],
                    &["", "data"],
                ),
                _ => (
                    "boolq",
                    ["train.jsonl", "val.jsonl", "test.jsonl"],
                    &["", "data", "boolq"],
                ),
            };
            let base = dir.join(folder);
            let file = upstream[match split {
                Split::Train => 0,
                Split::Dev => 1,
                Split::Test => 2,
            }];
            let mut c = vec![Candidate::File(base.join(file))];
            c.extend(
                hf_dirs
                    .iter()
                    .map(|d| Candidate::Shards(base.join(d), hf_split.into())),
            );
            if task == TaskName::Boolq {
                c.push(Candidate::Shards(
                    dir.join("super_glue").join("boolq"),
                    hf_split.into(),
                ));
            }
            find(task, c)?
        }
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
    /// Keep the first of rows that share a sample id within a task (and report the others)
    /// instead of failing: ids name samples in the paths dataset, so each must be unique.
    pub skip_duplicate_ids: bool,
}

/// Samples plus what was skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The samples, in file order or shuffled.
    pub samples: Vec<Sample>,
    /// Malformed rows skipped (only with `skip_bad_rows`), with their errors.
    pub bad_rows: Vec<Error>,
    /// Rows skipped for repeating an earlier row's sample id (only with `skip_duplicate_ids`),
    /// each as the [`Error::DuplicateId`] it would have raised.
    pub duplicates: Vec<Error>,
}

/// Streams the rows of one file (jsonl, or parquet by extension) as samples of `task` (a
/// single-dataset task or `Dart`).
pub fn read_file(
    path: &Path,
    task: TaskName,
    mut on_row: impl FnMut(usize, Result<Sample>) -> Result<()>,
) -> Result<()> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    // PIQA's upstream layout keeps the labels in a file of their own, one line per row.
    let labels = if task == TaskName::Piqa && path.extension().is_some_and(|e| e == "jsonl") {
        Some(piqa_labels(path)?)
    } else {
        None
    };
    let mut handle = |line_no: usize, value: Result<Value>| -> Result<()> {
        let label = labels
            .as_ref()
            .map(|l| l.get(line_no - 1).map(String::as_str));
        match value.and_then(|v| parse_row(path, line_no, &stem, task, &v, label)) {
            Ok(Some(s)) => on_row(line_no, Ok(s)),
            Ok(None) => Ok(()),
            Err(e) => on_row(line_no, Err(e)),
        }
    };
    if path.extension().is_some_and(|e| e == "json") {
        // One JSON array of rows (SciQ's upstream layout); rows are numbered from 1.
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let rows: Vec<Value> = match serde_json::from_str(text.trim_start_matches('\u{feff}')) {
            Ok(Value::Array(rows)) => rows,
            Ok(_) => {
                return Err(Error::BadFile {
                    path: path.to_path_buf(),
                    msg: "expected one JSON array of rows".into(),
                })
            }
            Err(e) => {
                return Err(Error::BadFile {
                    path: path.to_path_buf(),
                    msg: format!("not valid JSON: {e}"),
                })
            }
        };
        for (i, v) in rows.into_iter().enumerate() {
            handle(i + 1, Ok(v))?;
        }
        return Ok(());
    }
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

/// Loads `task`'s `split` from `dir` with limit, offset and seeded shuffle. The offset and limit
/// apply to each constituent of a composite task (`arc --limit 8` is 8 ARC-Easy and 8
/// ARC-Challenge samples; `dart` has one constituent per level), so a slice never cuts a
/// composite down to its first part; samples keep their file (or shuffled) order.
pub fn load(dir: &Path, task: TaskName, split: Split, opts: &LoadOptions) -> Result<Loaded> {
    let mut out = Loaded::default();
    // Where each (task, id) was first read, to name both rows of a duplicate.
    let mut first: std::collections::HashMap<(TaskName, String), String> = Default::default();
    for (sub, path) in task_files(dir, task, split)? {
        read_file(&path, sub, |row_no, row| {
            if !sub.keeps_row(split, row_no) {
                return Ok(());
            }
            match row {
                Ok(s) => {
                    let here = format!("{}:{row_no}", path.display());
                    match first.entry((s.task, s.id.clone())) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            let dup = Error::DuplicateId {
                                task: s.task.to_string(),
                                id: s.id,
                                first: e.get().clone(),
                                second: here,
                            };
                            if !opts.skip_duplicate_ids {
                                return Err(dup);
                            }
                            out.duplicates.push(dup);
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(here);
                            out.samples.push(s);
                        }
                    }
                }
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
    // Each constituent's samples keep their order (file or shuffled); a sample is kept when
    // its position among its own constituent's falls in offset..offset+limit.
    let mut seen: Vec<(TaskName, usize)> = vec![];
    out.samples.retain(|s| {
        let k = match seen.iter_mut().find(|(t, _)| *t == s.task) {
            Some((_, k)) => k,
            None => {
                seen.push((s.task, 0));
                &mut seen.last_mut().expect("just pushed").1
            }
        };
        let pos = *k;
        *k += 1;
        pos >= opts.offset && opts.limit.is_none_or(|l| pos - opts.offset < l)
    });
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
    piqa_label: Option<Option<&str>>,
) -> Result<Option<Sample>> {
    let id = v.get("id").and_then(|x| {
        x.as_str()
            .map(String::from)
            .or_else(|| x.as_u64().map(|n| n.to_string()))
    });
    let id = v
        .get("idx")
        .and_then(|x| x.as_u64().map(|n| n.to_string()))
        .filter(|_| task == TaskName::Boolq)
        .or(id)
        .unwrap_or_else(|| format!("{stem}:{line}"));
    match task {
        TaskName::Piqa => return parse_piqa(path, line, id, v, piqa_label).map(Some),
        TaskName::Sciq => return parse_sciq(path, line, id, v).map(Some),
        TaskName::Boolq => return parse_boolq(path, line, id, v).map(Some),
        _ => {}
    }
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
    // OpenBookQA's Hugging Face layout names the stem `question_stem`.
    let q = v
        .get("question")
        .or_else(|| v.get("question_stem"))
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
            context: None,
        },
        gold: Gold::Letter(gold),
        level: None,
    })
}

/// The labels of PIQA's upstream layout: `<split>-labels.lst` beside `<split>.jsonl`, one 0/1 a
/// line, aligned with the rows.
fn piqa_labels(jsonl: &Path) -> Result<Vec<String>> {
    let stem = jsonl
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let path = jsonl.with_file_name(format!("{stem}-labels.lst"));
    let text = std::fs::read_to_string(&path).map_err(|e| Error::BadFile {
        path: path.clone(),
        msg: format!(
            "PIQA's labels for {} are expected here, one 0 or 1 a line ({e})",
            jsonl.display()
        ),
    })?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}

/// Lettered choices from texts in order (`A`, `B`, ...).
fn lettered(texts: Vec<String>) -> Vec<Choice> {
    texts
        .into_iter()
        .zip('A'..='Z')
        .map(|(text, label)| Choice { label, text })
        .collect()
}

/// A PIQA row (`goal`, `sol1`, `sol2`; `label` 0 or 1 in the row or, upstream, in the labels
/// file): choices A = sol1, B = sol2, as lm-evaluation-harness orders them.
fn parse_piqa(
    path: &Path,
    line: usize,
    id: String,
    v: &Value,
    file_label: Option<Option<&str>>,
) -> Result<Sample> {
    let goal = str_field(path, line, v, "goal")?;
    let sols = ["sol1", "sol2"]
        .iter()
        .map(|f| str_field(path, line, v, f).map(String::from))
        .collect::<Result<Vec<_>>>()?;
    let label = match file_label {
        Some(Some(l)) => l.parse::<u64>().ok(),
        Some(None) => {
            return Err(Error::bad_row(
                path,
                line,
                "label",
                "no line for this row in the labels file (fewer labels than rows)",
            ))
        }
        None => v.get("label").and_then(Value::as_u64),
    };
    let gold = match label {
        Some(0) => 'A',
        Some(1) => 'B',
        _ => {
            return Err(Error::bad_row(
                path,
                line,
                "label",
                format!(
                    "expected 0 (sol1) or 1 (sol2), got {}",
                    match file_label {
                        Some(Some(l)) => format!("{l:?} in the labels file"),
                        _ => v.get("label").map(|x| x.to_string()).unwrap_or_default(),
                    }
                ),
            ))
        }
    };
    Ok(Sample {
        id,
        task: TaskName::Piqa,
        question: Question::MultipleChoice {
            stem: goal.to_string(),
            choices: lettered(sols),
            context: None,
        },
        gold: Gold::Letter(gold),
        level: None,
    })
}

/// A SciQ row (`question`, `distractor1..3`, `correct_answer`, `support`): choices in
/// lm-evaluation-harness's order, the three distractors then the answer (so the gold is D), and
/// the support paragraph (left-trimmed, as lm-eval renders it) as context.
fn parse_sciq(path: &Path, line: usize, id: String, v: &Value) -> Result<Sample> {
    let question = str_field(path, line, v, "question")?;
    let texts = [
        "distractor1",
        "distractor2",
        "distractor3",
        "correct_answer",
    ]
    .iter()
    .map(|f| str_field(path, line, v, f).map(String::from))
    .collect::<Result<Vec<_>>>()?;
    let support = match v.get("support") {
        None | Some(Value::Null) => "",
        Some(s) => s
            .as_str()
            .ok_or_else(|| Error::bad_row(path, line, "support", "expected a string"))?,
    };
    Ok(Sample {
        id,
        task: TaskName::Sciq,
        question: Question::MultipleChoice {
            stem: question.to_string(),
            choices: lettered(texts),
            context: Some(support.trim_start().to_string()),
        },
        gold: Gold::Letter('D'),
        level: None,
    })
}

/// A BoolQ row (`question`, `passage`, `label` true/false or 1/0): choices A = "no", B = "yes"
/// (lm-evaluation-harness's), the passage as context.
fn parse_boolq(path: &Path, line: usize, id: String, v: &Value) -> Result<Sample> {
    let question = str_field(path, line, v, "question")?;
    let passage = str_field(path, line, v, "passage")?;
    let yes = match v.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) if n.as_u64() == Some(1) => true,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => false,
        other => {
            return Err(Error::bad_row(
                path,
                line,
                "label",
                format!(
                    "expected true/false (or 1/0), got {}",
                    other.map(|x| x.to_string()).unwrap_or("nothing".into())
                ),
            ))
        }
    };
    Ok(Sample {
        id,
        task: TaskName::Boolq,
        question: Question::MultipleChoice {
            stem: question.to_string(),
            choices: lettered(vec!["no".into(), "yes".into()]),
            context: Some(passage.to_string()),
        },
        gold: Gold::Letter(if yes { 'B' } else { 'A' }),
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
        read_file(p, task, |_, r| {
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
            skip_duplicate_ids: false,
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

    /// PIQA, OpenBookQA, SciQ and BoolQ in their upstream layouts and with the Hugging Face
    /// datasets' fields; PIQA, SciQ and BoolQ's train and dev carved from validation.
    #[test]
    fn commonsense_tasks_read_both_layouts_and_carve_validation() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let piqa: Vec<String> = (0..6)
            .map(|i| {
                serde_json::json!({"goal": format!("g{i}"), "sol1": "a", "sol2": "b"}).to_string()
            })
            .collect();
        let refs: Vec<&str> = piqa.iter().map(String::as_str).collect();
        write(d, "piqa/valid.jsonl", &refs);
        write(d, "piqa/valid-labels.lst", &["0", "1", "1", "0", "1", "0"]);
        write(d, "openbookqa/dev.jsonl", &[&serde_json::json!({"id": "7-1", "question": {"stem": "s",
            "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "B"}).to_string()]);
        // SciQ: one JSON array.
        let sciq: Vec<serde_json::Value> = (0..5)
            .map(|i| serde_json::json!({"question": format!("q{i}"), "distractor1": "d1", "distractor2": "d2",
                "distractor3": "d3", "correct_answer": "c", "support": "  Some support."}))
            .collect();
        std::fs::create_dir_all(d.join("sciq")).unwrap();
        std::fs::write(
            d.join("sciq/valid.json"),
            serde_json::to_string(&sciq).unwrap(),
        )
        .unwrap();
        let boolq: Vec<String> = (0..5)
            .map(|i| serde_json::json!({"question": "is it", "passage": "P", "idx": i, "label": i % 2 == 0}).to_string())
            .collect();
        let refs: Vec<&str> = boolq.iter().map(String::as_str).collect();
        write(d, "boolq/val.jsonl", &refs);
        let get = |task: TaskName, split: Split| {
            load(d, task, split, &LoadOptions::default())
                .unwrap()
                .samples
        };

        let dev = get(TaskName::Piqa, Split::Dev);
        let ids: Vec<&str> = dev.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["valid:1", "valid:5"]);
        assert_eq!(dev[0].gold, Gold::Letter('A'));
        assert_eq!(get(TaskName::Piqa, Split::Train).len(), 4);
        assert_eq!(get(TaskName::Piqa, Split::Train)[0].gold, Gold::Letter('B'));

        let o = get(TaskName::OpenBookQa, Split::Dev);
        assert_eq!((o[0].id.as_str(), &o[0].gold), ("7-1", &Gold::Letter('B')));
        assert!(load(
            d,
            TaskName::OpenBookQa,
            Split::Train,
            &LoadOptions::default()
        )
        .is_err());

        let sq = get(TaskName::Sciq, Split::Dev);
        assert_eq!(sq.len(), 2);
        let Question::MultipleChoice {
            choices, context, ..
        } = &sq[1].question
        else {
            panic!()
        };
        assert_eq!(
            (sq[1].id.as_str(), &sq[1].gold),
            ("valid:5", &Gold::Letter('D'))
        );
        assert_eq!(choices[3].text, "c");
        assert_eq!(context.as_deref(), Some("Some support."));
        assert_eq!(get(TaskName::Sciq, Split::Train).len(), 3);

        let bq = get(TaskName::Boolq, Split::Train);
        let ids: Vec<&str> = bq.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "3"]);
        assert_eq!(bq[0].gold, Gold::Letter('A'));
        assert_eq!(bq[1].gold, Gold::Letter('B'));

        // The Hugging Face fields: labels inside PIQA rows, OpenBookQA's question_stem and
        // choice lists, BoolQ's 0/1 labels.
        let hf = dir.path().join("hf.jsonl");
        std::fs::write(
            &hf,
            serde_json::json!({"goal": "g", "sol1": "a", "sol2": "b", "label": 1}).to_string(),
        )
        .unwrap();
        let p = read_all(&hf, TaskName::Piqa);
        assert!(p.is_err(), "a jsonl without labels file: {p:?}");
        let hf = dir.path().join("hf.parquet.jsonl");
        std::fs::write(&hf, [
            serde_json::json!({"id": "o1", "question_stem": "s", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"}).to_string(),
        ].join("\n")).unwrap();
        assert_eq!(
            read_all(&hf, TaskName::OpenBookQa).unwrap()[0].gold,
            Gold::Letter('A')
        );
        std::fs::write(
            &hf,
            serde_json::json!({"question": "q", "passage": "p", "idx": 9, "label": 1}).to_string(),
        )
        .unwrap();
        let b = read_all(&hf, TaskName::Boolq).unwrap();
        assert_eq!((b[0].id.as_str(), &b[0].gold), ("9", &Gold::Letter('B')));

        // Bad rows name the file, row and field.
        write(d, "piqa/valid-labels.lst", &["2"]);
        let e = load(d, TaskName::Piqa, Split::Dev, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("valid.jsonl:1: field label") && e.contains("\"2\" in the labels file"),
            "{e}"
        );
        write(d, "piqa/valid-labels.lst", &["0", "1"]);
        let e = load(d, TaskName::Piqa, Split::Train, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("valid.jsonl:3: field label") && e.contains("fewer labels"),
            "{e}"
        );
        std::fs::write(d.join("sciq/valid.json"), "{\"question\": 1}").unwrap();
        let e = load(d, TaskName::Sciq, Split::Dev, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid.json") && e.contains("JSON array"), "{e}");
        write(
            d,
            "boolq/val.jsonl",
            &[r#"{"question": "q", "passage": "p", "label": "yes"}"#],
        );
        let e = load(d, TaskName::Boolq, Split::Dev, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("val.jsonl:1: field label"), "{e}");
    }

    /// A repeated sample id is refused naming both rows, or skipped (keeping the first) when
    /// asked; the same id in two tasks is no repeat.
    #[test]
    fn duplicate_ids_are_refused_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let line = |id: &str, key: &str| {
            serde_json::json!({"id": id, "question": {"stem": "q", "choices": [
                {"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": key})
            .to_string()
        };
        let (a, b, a2) = (line("x1", "A"), line("x2", "A"), line("x1", "B"));
        write(dir.path(), "arc/ARC-Easy-Train.jsonl", &[&a, &b, &a2]);
        write(dir.path(), "arc/ARC-Challenge-Train.jsonl", &[&a]);
        let e = load(
            dir.path(),
            TaskName::Arc,
            Split::Train,
            &LoadOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("duplicate sample id \"x1\" in arc_easy")
                && e.contains("ARC-Easy-Train.jsonl:1")
                && e.contains("ARC-Easy-Train.jsonl:3")
                && e.contains("--skip-duplicate-ids"),
            "{e}"
        );
        let opts = LoadOptions {
            skip_duplicate_ids: true,
            ..Default::default()
        };
        let l = load(dir.path(), TaskName::Arc, Split::Train, &opts).unwrap();
        let got: Vec<(TaskName, &str, &Gold)> = l
            .samples
            .iter()
            .map(|s| (s.task, s.id.as_str(), &s.gold))
            .collect();
        assert_eq!(
            got,
            [
                (TaskName::ArcEasy, "x1", &Gold::Letter('A')),
                (TaskName::ArcEasy, "x2", &Gold::Letter('A')),
                (TaskName::ArcChallenge, "x1", &Gold::Letter('A')),
            ]
        );
        assert_eq!(l.duplicates.len(), 1);
    }

    /// `--limit` and `--offset` slice each constituent of a composite task, not the
    /// concatenation (which would search `arc`'s ARC-Easy part alone).
    #[test]
    fn composite_tasks_are_sliced_per_constituent() {
        let dir = tempfile::tempdir().unwrap();
        let arc_line = |id: &str| {
            serde_json::json!({"id": id, "question": {"stem": "q", "choices": [
                {"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "A"})
            .to_string()
        };
        for (name, n) in [("ARC-Easy", 5), ("ARC-Challenge", 4)] {
            let lines: Vec<String> = (0..n).map(|i| arc_line(&format!("{name}-{i}"))).collect();
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            write(dir.path(), &format!("arc/{name}-Train.jsonl"), &refs);
        }
        let ids = |offset, limit| {
            let opts = LoadOptions {
                offset,
                limit,
                ..Default::default()
            };
            load(dir.path(), TaskName::Arc, Split::Train, &opts)
                .unwrap()
                .samples
                .into_iter()
                .map(|s| (s.task, s.id))
                .collect::<Vec<_>>()
        };
        let got = ids(1, Some(2));
        let want = [
            (TaskName::ArcEasy, "ARC-Easy-1"),
            (TaskName::ArcEasy, "ARC-Easy-2"),
            (TaskName::ArcChallenge, "ARC-Challenge-1"),
            (TaskName::ArcChallenge, "ARC-Challenge-2"),
        ];
        assert_eq!(got.len(), want.len());
        for ((t, id), (wt, wid)) in got.iter().zip(want) {
            assert_eq!((*t, id.as_str()), (wt, wid));
        }
        // A limit beyond one constituent's rows takes all of it and the other's slice.
        assert_eq!(ids(3, Some(10)).len(), 2 + 1);
        assert_eq!(ids(0, None).len(), 9);

        // `dart`: one constituent per level.
        let math: Vec<String> = (0..6)
            .map(|i| {
                serde_json::json!({"problem": format!("p{i}"), "solution": "\\boxed{1}",
                    "level": format!("Level {}", 1 + i % 2)})
                .to_string()
            })
            .collect();
        let refs: Vec<&str> = math.iter().map(String::as_str).collect();
        write(dir.path(), "math/train.jsonl", &refs);
        let opts = LoadOptions {
            limit: Some(2),
            ..Default::default()
        };
        let got = load(dir.path(), TaskName::Dart(None), Split::Train, &opts).unwrap();
        let levels: Vec<Option<u8>> = got.samples.iter().map(|s| s.level).collect();
        // In file order (levels alternate there), two of each level.
        assert_eq!(levels, [Some(1), Some(2), Some(1), Some(2)]);
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
            for task in [TaskName::ArcEasy, TaskName::Dart(None), TaskName::Dart(Some(2)), TaskName::Gsm8k,
                         TaskName::Piqa, TaskName::OpenBookQa, TaskName::Sciq, TaskName::Boolq] {
                let _ = read_file(&p, task, |_, _| Ok(()));
            }
            // The same lines as a PIQA file with its labels, and as a JSON array (SciQ's layout).
            std::fs::write(dir.path().join("f-labels.lst"), "0\n1\nx\n").unwrap();
            let _ = read_file(&p, TaskName::Piqa, |_, _| Ok(()));
            let a = dir.path().join("a.json");
            std::fs::write(&a, format!("[{}]", lines.join(","))).unwrap();
            for task in [TaskName::Sciq, TaskName::Boolq, TaskName::Piqa] {
                let _ = read_file(&a, task, |_, _| Ok(()));
            }
        }
    }
}
