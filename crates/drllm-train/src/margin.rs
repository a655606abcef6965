//! Margin-aware labels. A 0/1 reward accepts a path that keeps the gold answer by 0.01 nats as
//! readily as one that keeps it by 5, and with a small model which cheaper path keeps a given
//! answer is then mostly chance (one skipped block flips about a fifth of correct answers). A
//! margin rule asks more of a label: a default-correct prompt is labelled with its cheapest
//! correct path only when that path keeps at least a share of the default path's cloze margin
//! (the gold choice's score minus the best other's), else with the cheapest of its other
//! correct paths that does, else with the default path: the prompt is fragile, run every block.
//! Improved rows (default wrong) keep their labels; the improved cap decides those.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use drllm_eval::{answer_batch, PathChoice, PreparedPrompt, Scoring};
use drllm_path::LayerPath;
use drllm_runtime::LoadedModel;
use drllm_tasks::RewardMode;
use sha2::{Digest, Sha256};

use crate::examples::{ExampleSet, RowKind};
use crate::trainer::TrainError;
use crate::validate::prepare_examples;

/// Which cheaper paths may stand for the default path of a default-correct prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginRule {
    /// Least share of the default path's margin a path must keep (0: any correct path, as the
    /// search's reward; 1: at least the default's margin).
    pub share: f64,
}

impl MarginRule {
    /// Whether a path whose gold margin is `margin` may label a prompt whose default path has
    /// margin `baseline`: it must be correct (margin > 0) and keep `share` of the baseline.
    pub fn keeps(&self, baseline: f64, margin: f64) -> bool {
        margin > 0.0 && margin >= self.share * baseline
    }

    /// The label among `candidates` (cheapest first) given each one's margin (None: not
    /// measured, which stops the scan, as candidates are measured in order): the index of the
    /// first one kept.
    pub fn choose(&self, baseline: f64, margins: &[Option<f64>]) -> Option<usize> {
        for (i, m) in margins.iter().enumerate() {
            match m {
                Some(m) if self.keeps(baseline, *m) => return Some(i),
                Some(_) => {}
                None => return None,
            }
        }
        None
    }
}

/// What relabelling did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Relabelled {
    /// Default-correct rows with a cheaper correct path (those the rule applies to).
    pub rows: usize,
    /// Labelled with their cheapest correct path, as without the rule.
    pub cheapest: usize,
    /// Labelled with a dearer correct path than the cheapest (e.g. fewer skips).
    pub dearer: usize,
    /// Labelled all-execute ([`RowKind::Fragile`]).
    pub fragile: usize,
    /// Margins computed now (the others came from the cache).
    pub computed: usize,
    /// Median margin of the default path over `rows`.
    pub median_baseline_margin: f64,
}

/// Margins measured before, kept on disk (one JSON line per prompt and path), so that trying
/// another share costs no model time.
#[derive(Debug, Default)]
pub struct MarginCache {
    file: Option<PathBuf>,
    map: HashMap<String, f64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheLine {
    key: String,
    margin: f64,
}

impl MarginCache {
    /// The cache in `file` (created on the first store); unreadable lines are skipped with a
    /// warning. `None`: in memory only.
    pub fn open(file: Option<PathBuf>) -> Result<Self, TrainError> {
        let mut map = HashMap::new();
        if let Some(f) = file.as_deref().filter(|f| f.is_file()) {
            let r = std::fs::File::open(f).map_err(|e| TrainError::io(f, e))?;
            for (i, line) in std::io::BufReader::new(r).lines().enumerate() {
                let line = line.map_err(|e| TrainError::io(f, e))?;
                match serde_json::from_str::<CacheLine>(&line) {
                    Ok(l) if l.margin.is_finite() => {
                        map.insert(l.key, l.margin);
                    }
                    _ => {
                        tracing::warn!(file = %f.display(), line = i + 1, "unreadable margin cache line; skipped")
                    }
                }
            }
        }
        Ok(MarginCache { file, map })
    }

    /// Margins held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn key(fingerprint: &str, mode: RewardMode, p: &PreparedPrompt, path: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(b"drllm-margin-v1\0");
        for part in [
            fingerprint.as_bytes(),
            mode.name().as_bytes(),
            p.text.as_bytes(),
            path,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update([p.add_special as u8]);
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn store(&mut self, new: Vec<(String, f64)>) -> Result<(), TrainError> {
        if let Some(f) = &self.file {
            if let Some(dir) = f.parent() {
                std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
            }
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .map_err(|e| TrainError::io(f, e))?;
            let mut buf = String::new();
            for (key, margin) in &new {
                let line = serde_json::to_string(&CacheLine {
                    key: key.clone(),
                    margin: *margin,
                })
                .map_err(|e| TrainError::Data(e.to_string()))?;
                buf.push_str(&line);
                buf.push('\n');
            }
            out.write_all(buf.as_bytes())
                .map_err(|e| TrainError::io(f, e))?;
        }
        self.map.extend(new);
        Ok(())
    }
}

/// Relabels the default-correct examples of `set` that have a cheaper correct path by `rule`
/// (see the module doc), measuring margins along the default path and then the candidates
/// cheapest first, only as far as each prompt needs; prompts come from the task data in
/// `data_dir`. Needs datasets searched with a cloze reward. `progress(done, planned)` reports
/// the margins measured so far and those planned so far (the rounds after the first depend on
/// what the first found).
pub fn relabel_by_margin(
    lm: &LoadedModel,
    set: &mut ExampleSet,
    data_dir: &Path,
    rule: &MarginRule,
    batch: usize,
    cache: &mut MarginCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<Relabelled, TrainError> {
    let targets: Vec<usize> = (0..set.examples.len())
        .filter(|&i| {
            set.examples[i].kind == RowKind::Shortened && !set.examples[i].candidates.is_empty()
        })
        .collect();
    if targets.is_empty() {
        return Ok(Relabelled::default());
    }
    let refs: Vec<_> = targets.iter().map(|&i| &set.examples[i]).collect();
    let (prompts, opts) = prepare_examples(lm, set, &refs, data_dir, "margin labels")?;
    if !matches!(opts.mode, RewardMode::Cloze | RewardMode::ClozeNorm) {
        return Err(TrainError::Data(format!(
            "--label-margin needs datasets searched with a cloze reward (the gold choice's \
             log-likelihood margin); these were searched with {}",
            opts.mode
        )));
    }
    let fp = set.model_fingerprint.clone();
    let n = lm.model.num_layers();
    let all_ones = vec![1u8; n];
    // Margins of (target, path): measured in batches of prompts, each along its own path.
    let mut measure = |jobs: &[(usize, &[u8])],
                       cache: &mut MarginCache,
                       computed: &mut usize|
     -> Result<Vec<f64>, TrainError> {
        let keys: Vec<String> = jobs
            .iter()
            .map(|&(j, path)| MarginCache::key(&fp, opts.mode, &prompts[j], path))
            .collect();
        let todo: Vec<usize> = (0..jobs.len())
            .filter(|&k| !cache.map.contains_key(&keys[k]))
            .collect();
        let planned = *computed + todo.len();
        for chunk in todo.chunks(batch.max(1) * 8) {
            let ps: Vec<PreparedPrompt> =
                chunk.iter().map(|&k| prompts[jobs[k].0].clone()).collect();
            let paths = chunk
                .iter()
                .map(|&k| LayerPath::from_counts(jobs[k].1.to_vec()))
                .collect::<Result<Vec<_>, _>>()?;
            let answers = answer_batch(lm, &ps, &PathChoice::Each(paths), batch, &opts)?;
            let mut new = vec![];
            for (&k, a) in chunk.iter().zip(&answers) {
                let p = &prompts[jobs[k].0];
                let Scoring::Cloze {
                    chars, gold, norm, ..
                } = &p.scoring
                else {
                    return Err(TrainError::Data(format!(
                        "sample {}: not scored by cloze",
                        p.sample_id
                    )));
                };
                // A NaN score counts as lost: the path cannot stand for the default.
                let m = drllm_tasks::cloze_margin(&a.logliks, chars, *norm, *gold)
                    .unwrap_or(f64::NEG_INFINITY);
                new.push((keys[k].clone(), m.max(-1e9)));
            }
            *computed += new.len();
            cache.store(new)?;
            progress(*computed, planned);
        }
        Ok(keys.iter().map(|k| cache.map[k]).collect())
    };
    let mut computed = 0;
    let base_jobs: Vec<(usize, &[u8])> = (0..targets.len())
        .map(|j| (j, all_ones.as_slice()))
        .collect();
    let baseline = measure(&base_jobs, cache, &mut computed)?;
    let mut margins: Vec<Vec<Option<f64>>> = targets
        .iter()
        .map(|&i| vec![None; set.examples[i].candidates.len()])
        .collect();
    let mut decided: Vec<bool> = vec![false; targets.len()];
    let rounds = margins.iter().map(Vec::len).max().unwrap_or(0);
    for r in 0..rounds {
        let pending: Vec<usize> = (0..targets.len())
            .filter(|&j| !decided[j] && r < margins[j].len())
            .collect();
        let jobs: Vec<(usize, &[u8])> = pending
            .iter()
            .map(|&j| (j, set.examples[targets[j]].candidates[r].as_slice()))
            .collect();
        let got = measure(&jobs, cache, &mut computed)?;
        for (&j, m) in pending.iter().zip(got) {
            margins[j][r] = Some(m);
            decided[j] = rule.keeps(baseline[j], m);
        }
    }
    let mut out = Relabelled {
        rows: targets.len(),
        computed,
        median_baseline_margin: median(&baseline),
        ..Relabelled::default()
    };
    for (j, &i) in targets.iter().enumerate() {
        let e = &mut set.examples[i];
        match rule.choose(baseline[j], &margins[j]) {
            Some(0) => out.cheapest += 1,
            Some(c) => {
                out.dearer += 1;
                e.path = e.candidates[c].clone();
            }
            None => {
                out.fragile += 1;
                e.path = all_ones.clone();
                e.kind = RowKind::Fragile;
            }
        }
    }
    for (k, count) in set.kinds.iter_mut() {
        match k {
            RowKind::Shortened => *count -= out.fragile.min(*count),
            RowKind::Fragile => *count += out.fragile,
            _ => {}
        }
    }
    Ok(out)
}

fn median(x: &[f64]) -> f64 {
    let mut v: Vec<f64> = x.iter().copied().filter(|m| m.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_must_be_correct_and_keep_the_share() {
        let r = MarginRule { share: 0.5 };
        assert!(r.keeps(4.0, 2.0));
        assert!(!r.keeps(4.0, 1.99));
        assert!(!r.keeps(4.0, 0.0), "a tie is not correct");
        // Share 0 is the search's 0/1 reward: any correct path.
        let any = MarginRule { share: 0.0 };
        assert!(any.keeps(4.0, 1e-6));
        assert!(!any.keeps(4.0, -1e-6));
        // A default margin that is not positive (measured drift) asks only for correctness.
        assert!(r.keeps(-1.0, 0.1));
    }

    #[test]
    fn the_first_candidate_kept_is_chosen_and_unmeasured_ones_stop_the_scan() {
        let r = MarginRule { share: 0.5 };
        assert_eq!(r.choose(2.0, &[Some(0.5), Some(1.5), Some(3.0)]), Some(1));
        assert_eq!(r.choose(2.0, &[Some(1.0)]), Some(0));
        assert_eq!(r.choose(2.0, &[Some(0.9), Some(-1.0)]), None);
        assert_eq!(r.choose(2.0, &[Some(0.9), None, Some(5.0)]), None);
        assert_eq!(r.choose(2.0, &[]), None);
        // A larger share never labels a prompt with a cheaper path than a smaller one does.
        let margins = [Some(0.3), Some(1.1), Some(1.9), Some(2.5)];
        let mut last = 0;
        for share in [0.0, 0.25, 0.5, 0.75, 1.0, 1.5] {
            let c = MarginRule { share }
                .choose(2.0, &margins)
                .unwrap_or(margins.len());
            assert!(c >= last, "share {share}: {c} < {last}");
            last = c;
        }
    }

    #[test]
    fn the_cache_reads_back_what_it_stored_and_skips_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub").join("margins.jsonl");
        let mut c = MarginCache::open(Some(f.clone())).unwrap();
        assert!(c.is_empty());
        c.store(vec![("a".into(), 1.5), ("b".into(), -2.0)])
            .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .unwrap()
            .write_all(b"{not json\n{\"key\":\"c\",\"margin\":0.25}\n")
            .unwrap();
        let again = MarginCache::open(Some(f)).unwrap();
        assert_eq!(again.len(), 3);
        assert_eq!(again.map["a"], 1.5);
        assert_eq!(again.map["c"], 0.25);
    }
}
