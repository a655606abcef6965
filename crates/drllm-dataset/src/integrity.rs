//! Checksums that make silent damage visible. Every committed part is recorded in the manifest
//! with the SHA-256 of its bytes, and carries in its own footer (`drllm.content_sha256`) the
//! SHA-256 of its rows as read back and of its drllm metadata, so a part can be checked with its
//! manifest (every byte) or alone (every value). The manifest carries the SHA-256 of its own
//! content. Resume, training (`read_rows`) and `drllm-data verify` check them; a damaged part is
//! named and refused, never read and never searched around.
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

use crate::{from_batch, io, read_manifest, DatasetError, Manifest, PartInfo, PathRecord};

type Result<T> = std::result::Result<T, DatasetError>;

/// Footer key of a part's content checksum.
pub const CONTENT_KEY: &str = "drllm.content_sha256";

/// Hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's bytes (hex).
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The drllm metadata of a part's footer, in the order the content checksum covers it.
pub(crate) const META_KEYS: [&str; 3] = [
    "drllm.config",
    "drllm.model_fingerprint",
    "drllm.format_version",
];

/// SHA-256 over a part's rows (as [`PathRecord`]s, task included) and its drllm metadata
/// values ([`META_KEYS`], absent ones as empty): what [`CONTENT_KEY`] holds.
pub(crate) fn content_sha256(rows: &[PathRecord], meta: &[Option<String>]) -> String {
    let mut h = Sha256::new();
    for m in meta {
        let v = m.as_deref().unwrap_or("");
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    // serde_json writes struct fields in declaration order: a stable encoding of the values.
    h.update(serde_json::to_vec(rows).unwrap_or_default());
    hex(&h.finalize())
}

/// The manifest's own checksum: SHA-256 of its compact JSON with the checksum field empty.
pub(crate) fn manifest_sha256(m: &Manifest) -> String {
    let mut m = m.clone();
    m.checksum = None;
    hex(&Sha256::digest(serde_json::to_vec(&m).unwrap_or_default()))
}

/// A part read back whole: its rows, footer metadata (values of [`META_KEYS`]) and content
/// checksum.
pub(crate) struct PartContent {
    pub rows: Vec<PathRecord>,
    pub meta: Vec<Option<String>>,
    pub content_sha256: Option<String>,
}

impl PartContent {
    /// A footer value by key.
    pub fn meta(&self, key: &str) -> Option<&str> {
        META_KEYS
            .iter()
            .position(|k| *k == key)
            .and_then(|i| self.meta[i].as_deref())
    }
}

/// Reads every row of a part of `task` and its footer (no checksum checked). A corrupt file
/// can make the `parquet` crate's decoders panic (a division by zero on a flipped length was
/// seen); that is caught and returned as an error naming the file, since a part checked alone
/// (adopted after a crash, or verified without its manifest) is untrusted input.
pub(crate) fn read_part(path: &Path, task: &str) -> Result<PartContent> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_part_inner(path, task))) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(DatasetError::Parquet {
                path: path.to_path_buf(),
                msg: format!("the Parquet reader failed on it ({why})"),
            })
        }
    }
}

fn read_part_inner(path: &Path, task: &str) -> Result<PartContent> {
    let perr = |msg: String| DatasetError::Parquet {
        path: path.to_path_buf(),
        msg,
    };
    let f = File::open(path).map_err(io(path))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| perr(e.to_string()))?;
    let kv = b.metadata().file_metadata().key_value_metadata().cloned();
    let get = |key: &str| -> Option<String> {
        kv.as_ref()?
            .iter()
            .find(|e| e.key == key)
            .and_then(|e| e.value.clone())
    };
    let meta: Vec<Option<String>> = META_KEYS.iter().map(|k| get(k)).collect();
    let content_sha256 = get(CONTENT_KEY);
    let reader = b.build().map_err(|e| perr(e.to_string()))?;
    let mut rows = vec![];
    for batch in reader {
        let batch = batch.map_err(|e| perr(e.to_string()))?;
        rows.extend(from_batch(&batch, task).map_err(perr)?);
    }
    Ok(PartContent {
        rows,
        meta,
        content_sha256,
    })
}

/// How a part was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Its bytes against the manifest and its values against its own checksum.
    Verified,
    /// Written before checksums (format 1): readable, not verifiable.
    Unverified,
}

/// Reads a part and checks it: its bytes against `sha256` (the manifest's record, when it has
/// one), its values against its own content checksum (required from format 2 on), its row
/// count against `rows`. Any difference is [`DatasetError::Damaged`], naming the file and what
/// differs; nothing of a damaged part is returned.
pub(crate) fn check_part(
    path: &Path,
    task: &str,
    sha256: Option<&str>,
    rows: Option<usize>,
) -> Result<(PartContent, Checked)> {
    let damaged = |what: String| DatasetError::Damaged {
        path: path.to_path_buf(),
        what,
    };
    if let Some(want) = sha256 {
        let got = file_sha256(path)?;
        if got != want {
            return Err(damaged(format!(
                "its SHA-256 is {got}, the manifest recorded {want} when it was committed"
            )));
        }
    }
    let part = read_part(path, task).map_err(|e| match e {
        DatasetError::Parquet { msg, .. } => damaged(format!("unreadable ({msg})")),
        other => other,
    })?;
    // Every drllm part names its format (format 1 parts too): without it, it is none of ours
    // or its footer is damaged.
    let Some(version) = part
        .meta("drllm.format_version")
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return Err(damaged(
            "no readable drllm.format_version in its footer (not a drllm part, or a damaged footer)"
                .into(),
        ));
    };
    let version = Some(version);
    let checked = match &part.content_sha256 {
        Some(want) => {
            let got = content_sha256(&part.rows, &part.meta);
            if &got != want {
                return Err(damaged(format!(
                    "its rows and metadata hash to {got}, the part's own checksum says {want}"
                )));
            }
            Checked::Verified
        }
        None if version.is_some_and(|v| v >= 2) || sha256.is_some() => {
            return Err(damaged(format!(
                "no content checksum ({CONTENT_KEY}) in its footer, which format {} parts carry",
                version.map_or("2".to_string(), |v| v.to_string())
            )))
        }
        None => Checked::Unverified,
    };
    if let Some(n) = rows {
        if part.rows.len() != n {
            return Err(damaged(format!(
                "{} rows, the manifest recorded {n}",
                part.rows.len()
            )));
        }
    }
    Ok((part, checked))
}

/// Reads a listed part, checked against its manifest entry.
pub(crate) fn check_listed(out: &Path, p: &PartInfo) -> Result<(PartContent, Checked)> {
    check_part(
        &out.join(&p.path),
        &p.task,
        p.sha256.as_deref(),
        Some(p.rows),
    )
}

/// What `drllm-data verify` found in a dataset.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Parts listed in the manifest.
    pub parts: usize,
    /// Of those, checked byte for byte and value for value.
    pub verified: usize,
    /// Of those, written before checksums (readable, not verifiable).
    pub unverified: usize,
    /// Rows in the parts that could be read.
    pub rows: usize,
    /// Everything wrong, each naming the file (empty when the dataset is intact).
    pub problems: Vec<String>,
}

/// Checks a whole dataset on demand (after copying it between filesystems, say): the
/// manifest's own checksum, every listed part (bytes, values, row count), sample ids unique
/// within each task across parts, and no part under `data/` that the manifest does not list.
/// Damage is reported, not raised: the report names every problem.
pub fn verify(out: &Path) -> Result<VerifyReport> {
    let m = read_manifest(out)?;
    let mut r = VerifyReport {
        parts: m.parts.len(),
        ..Default::default()
    };
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for p in &m.parts {
        match check_listed(out, p) {
            Ok((part, checked)) => {
                match checked {
                    Checked::Verified => r.verified += 1,
                    Checked::Unverified => r.unverified += 1,
                }
                r.rows += part.rows.len();
                for row in &part.rows {
                    if !seen.insert((row.task.clone(), row.sample_id.clone())) {
                        r.problems.push(format!(
                            "{}: sample {} of task {} is committed twice",
                            out.join(&p.path).display(),
                            row.sample_id,
                            row.task
                        ));
                    }
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    let listed: HashSet<PathBuf> = m.parts.iter().map(|p| out.join(&p.path)).collect();
    let data = out.join("data");
    if let Ok(dirs) = std::fs::read_dir(&data) {
        for d in dirs.flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let f = f.path();
                if f.extension().is_some_and(|e| e == "parquet") && !listed.contains(&f) {
                    r.problems.push(format!(
                        "{}: a part the manifest does not list (a run that crashed between \
                         commit steps; the next run adopts it if it is this run's)",
                        f.display()
                    ));
                }
            }
        }
    }
    if r.rows != m.rows && r.problems.is_empty() {
        r.problems.push(format!(
            "{}: the manifest counts {} rows, its parts hold {}",
            out.join("_manifest.json").display(),
            m.rows,
            r.rows
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::row;
    use crate::Dataset;

    /// What a damaged copy gave: an error, the very same content, or different content
    /// without an error (the failure this module exists to prevent).
    #[derive(Debug, Default)]
    struct Tally {
        probed: usize,
        detected: usize,
        harmless: usize,
        silent: Vec<String>,
    }

    /// Flips one bit at every byte offset of `file` in turn (bit `offset % 8`, so every bit
    /// position is exercised across the file) and asks `check` for the content; `want` is the
    /// intact content.
    fn flip_every_offset<T: PartialEq>(
        file: &Path,
        want: &T,
        check: impl Fn() -> Result<T>,
    ) -> Tally {
        let orig = std::fs::read(file).unwrap();
        let mut t = Tally::default();
        for at in 0..orig.len() {
            {
                let bit = at % 8;
                let mut bytes = orig.clone();
                bytes[at] ^= 1 << bit;
                std::fs::write(file, &bytes).unwrap();
                t.probed += 1;
                match check() {
                    Err(_) => t.detected += 1,
                    Ok(got) if &got == want => t.harmless += 1,
                    Ok(_) => {
                        let ctx = &bytes[at.saturating_sub(24)..(at + 24).min(bytes.len())];
                        t.silent.push(format!(
                            "byte {at} bit {bit}: {:?}",
                            String::from_utf8_lossy(ctx)
                        ))
                    }
                }
            }
        }
        std::fs::write(file, &orig).unwrap();
        t
    }

    /// The fault-injection tier: a bit flipped at every byte offset of a committed part and of
    /// the manifest.
    /// With the manifest every flip of a part is detected; a part checked alone (its own content
    /// checksum) detects every flip that changes a value; the manifest detects every flip that
    /// changes it. The figures are printed (README, reliability section).
    #[test]
    fn every_bit_flip_is_detected_or_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(
            &out,
            "fp",
            serde_json::json!({"tasks": ["arc_easy"], "seed": 7}),
            false,
        )
        .unwrap();
        let rows: Vec<PathRecord> = ["MCAS_2004_8_27", "Mercury_7220990", "MEA_2016_8_8"]
            .iter()
            .enumerate()
            .map(|(i, id)| row("arc_easy", id, i != 1))
            .collect();
        ds.commit("arc_easy", &rows).unwrap();
        ds.finish().unwrap();
        drop(ds);
        let m = read_manifest(&out).unwrap();
        let p = m.parts[0].clone();
        let file = out.join(&p.path);
        let content = |c: PartContent| (c.rows, c.meta, c.content_sha256);
        let intact = content(check_listed(&out, &p).unwrap().0);
        assert_eq!(intact.0, rows);

        // The parquet crate panics on some corrupt files (caught, see read_part): keep the
        // test's output readable.
        std::panic::set_hook(Box::new(|_| {}));
        let with_manifest = flip_every_offset(&file, &intact, || {
            check_listed(&out, &p).map(|(c, _)| content(c))
        });
        let alone = flip_every_offset(&file, &intact, || {
            check_part(&file, "arc_easy", None, None).map(|(c, _)| content(c))
        });
        let mfile = out.join("_manifest.json");
        let manifest = flip_every_offset(&mfile, &m, || read_manifest(&out));
        let _ = std::panic::take_hook();
        assert_eq!(
            with_manifest.detected, with_manifest.probed,
            "{with_manifest:?}"
        );
        assert!(alone.silent.is_empty(), "{alone:?}");
        assert!(manifest.silent.is_empty(), "{manifest:?}");
        // The dataset reads back whole afterwards, and verify says so.
        let v = verify(&out).unwrap();
        assert!(
            v.problems.is_empty() && v.verified == 1 && v.rows == 3,
            "{v:?}"
        );
        eprintln!(
            "part of {} bytes: {} flips, {} detected with the manifest; alone {} detected, {} harmless, {} silent; \
             manifest of {} bytes: {} flips, {} detected, {} harmless, {} silent",
            std::fs::metadata(&file).unwrap().len(),
            with_manifest.probed,
            with_manifest.detected,
            alone.detected,
            alone.harmless,
            alone.silent.len(),
            std::fs::metadata(&mfile).unwrap().len(),
            manifest.probed,
            manifest.detected,
            manifest.harmless,
            manifest.silent.len(),
        );
    }

    /// `verify` names each kind of damage: an altered part, a missing one, a stray one, a
    /// manifest edited by hand.
    #[test]
    fn verify_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut ds = Dataset::open(&out, "fp", serde_json::json!({}), false).unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap();
        ds.commit("arc_easy", &[row("arc_easy", "b", true)])
            .unwrap();
        // The same id twice is refused at commit.
        let e = ds
            .commit("arc_easy", &[row("arc_easy", "a", true)])
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("sample a of task arc_easy is already committed"),
            "{e}"
        );
        ds.finish().unwrap();
        drop(ds);
        let m = read_manifest(&out).unwrap();
        let (a, b) = (out.join(&m.parts[0].path), out.join(&m.parts[1].path));
        let mut bytes = std::fs::read(&a).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&a, &bytes).unwrap();
        std::fs::copy(&b, out.join("data/task=arc_easy/part-09999-x.parquet")).unwrap();
        let v = verify(&out).unwrap();
        assert_eq!((v.parts, v.verified), (2, 1), "{v:?}");
        let all = v.problems.join("\n");
        assert!(
            all.contains(a.to_str().unwrap()) && all.contains("damaged part"),
            "{all}"
        );
        assert!(
            all.contains("part-09999-x.parquet: a part the manifest does not list"),
            "{all}"
        );
        // Training refuses the dataset, naming the part.
        let e = crate::read_rows(&out).unwrap_err().to_string();
        assert!(e.contains(a.to_str().unwrap()), "{e}");
        std::fs::remove_file(&b).unwrap();
        let all = verify(&out).unwrap().problems.join("\n");
        assert!(all.contains(b.to_str().unwrap()), "{all}");
        // A hand-edited manifest (a row count changed) fails its own checksum.
        let mpath = out.join("_manifest.json");
        let text = std::fs::read_to_string(&mpath).unwrap();
        std::fs::write(&mpath, text.replace("\"rows\": 2", "\"rows\": 3")).unwrap();
        let e = read_manifest(&out).unwrap_err().to_string();
        assert!(
            e.contains("_manifest.json") && e.contains("checksum"),
            "{e}"
        );
    }
}
