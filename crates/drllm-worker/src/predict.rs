//! The statistics of `drllm-search-bench predict`: does what the routers read (the pooled hidden
//! state entering each block) tell which single skips keep a prompt's answer, better than a
//! predictor that ignores the prompt (the block's and the task's keep rate)?
//!
//! Probes are ridge regressions on the 0/1 keep outcome, solved in the dual (one `N x N` system
//! per fit: prompts are far fewer than feature dimensions), cross-fitted over folds of prompts
//! with the ridge strength chosen by inner cross-validation on the training folds alone, so no
//! score is ever made by a fit that saw its prompt. Written here rather than taken from a crate:
//! the pieces (a linear solve, a rank statistic, a seeded bootstrap) are short, and no
//! maintained Rust crate does cross-fitted kernel ridge on tch tensors.

use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

/// Area under the ROC curve of `scores` for the 0/1 `labels` (Mann-Whitney, ties count half);
/// `None` when one class is absent.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks (1-based) over runs of equal scores.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg * idx[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let (p, n) = (pos as f64, neg as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * n))
}

/// Fold of each of `n` items: a seeded shuffle dealt round-robin into `folds` folds.
pub fn fold_ids(n: usize, folds: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut fold = vec![0; n];
    for (k, &i) in order.iter().enumerate() {
        fold[i] = k % folds.max(1);
    }
    fold
}

/// A linear kernel over prompts, `K = X Xᵀ / D` of column-standardised features (f64, CPU).
pub struct Kernel(Tensor);

impl Kernel {
    /// From features `[N, D]` (any float kind, any device). Columns are standardised over all
    /// `N` prompts: label-free, so it leaks nothing of the outcomes into the folds.
    pub fn new(x: &Tensor) -> Kernel {
        let x = x.to_kind(Kind::Double).to_device(Device::Cpu);
        let d = x.size()[1].max(1) as f64;
        let mean = x.mean_dim(0, true, Kind::Double);
        let std = x.std_dim(0, false, true).clamp_min(1e-6);
        let z = (x - mean) / std;
        Kernel(z.matmul(&z.tr()) / d)
    }

    /// Ridge fit on the prompts `train` with targets `y`, scores of the prompts `test`. The
    /// intercept is per group (`group[i]`, e.g. the task): the mean of `y` over the training
    /// prompts of the group (of all of them for a group absent there), so the features are asked
    /// only for what the group's rate does not already say. `lambda` is relative to the
    /// kernel's mean diagonal.
    pub fn ridge(
        &self,
        train: &[usize],
        y: &[f64],
        test: &[usize],
        lambda: f64,
        group: &[usize],
    ) -> Vec<f64> {
        if train.is_empty() {
            return vec![0.0; test.len()];
        }
        let overall = train.iter().map(|&i| y[i]).sum::<f64>() / train.len() as f64;
        let mut sums: std::collections::HashMap<usize, (f64, f64)> = Default::default();
        for &i in train {
            let e = sums.entry(group[i]).or_default();
            e.0 += y[i];
            e.1 += 1.0;
        }
        let mean = |i: usize| sums.get(&group[i]).map_or(overall, |(s, n)| s / n);
        let ti = index(train);
        let vi = index(test);
        let ktt = self.0.index_select(0, &ti).index_select(1, &ti);
        let scale = ktt
            .diagonal(0, 0, 1)
            .mean(Kind::Double)
            .double_value(&[])
            .max(1e-12);
        let n = train.len() as i64;
        let a = ktt + Tensor::eye(n, (Kind::Double, Device::Cpu)) * (lambda * scale);
        let r = Tensor::from_slice(&train.iter().map(|&i| y[i] - mean(i)).collect::<Vec<_>>())
            .view([n, 1]);
        let alpha = Tensor::linalg_solve(&a, &r, true);
        let kvt = self.0.index_select(0, &vi).index_select(1, &ti);
        let s = kvt.matmul(&alpha).view([-1]);
        Vec::<f64>::try_from(&s)
            .unwrap_or_default()
            .into_iter()
            .zip(test)
            .map(|(v, &i)| v + mean(i))
            .collect()
    }

    /// Cross-fitted scores of `items` (outcomes `y`, folds `fold`, intercept groups `group`):
    /// each fold scored by a fit on the others, with the ridge strength of `lambdas` that
    /// maximises the AUC of an inner cross-validation on those others alone, for telling
    /// outcomes above `above` (0.5 for 0/1 outcomes, 0 for margins) from the rest.
    pub fn cross_fit(
        &self,
        items: &[usize],
        y: &[f64],
        above: f64,
        fold: &[usize],
        group: &[usize],
        lambdas: &[f64],
    ) -> Vec<f64> {
        let folds = items.iter().map(|&i| fold[i]).max().map_or(0, |f| f + 1);
        let mut out = vec![0.0; y.len()];
        for f in 0..folds {
            let train: Vec<usize> = items.iter().copied().filter(|&i| fold[i] != f).collect();
            let test: Vec<usize> = items.iter().copied().filter(|&i| fold[i] == f).collect();
            if test.is_empty() {
                continue;
            }
            let lambda = self.choose_lambda(&train, y, above, fold, group, lambdas);
            for (i, s) in test.iter().zip(self.ridge(&train, y, &test, lambda, group)) {
                out[*i] = s;
            }
        }
        out
    }

    /// The ridge strength of `lambdas` best by inner cross-validated AUC on `train` (the
    /// training folds of one outer fold; the inner folds are theirs).
    fn choose_lambda(
        &self,
        train: &[usize],
        y: &[f64],
        above: f64,
        fold: &[usize],
        group: &[usize],
        lambdas: &[f64],
    ) -> f64 {
        let mut best = (f64::NEG_INFINITY, lambdas.first().copied().unwrap_or(1.0));
        let inner: Vec<usize> = {
            let mut f: Vec<usize> = train.iter().map(|&i| fold[i]).collect();
            f.sort_unstable();
            f.dedup();
            f
        };
        for &lambda in lambdas {
            let mut scores = vec![];
            let mut labels = vec![];
            for &g in &inner {
                let tr: Vec<usize> = train.iter().copied().filter(|&i| fold[i] != g).collect();
                let te: Vec<usize> = train.iter().copied().filter(|&i| fold[i] == g).collect();
                scores.extend(self.ridge(&tr, y, &te, lambda, group));
                labels.extend(te.iter().map(|&i| y[i] > above));
            }
            if let Some(a) = auc(&scores, &labels) {
                if a > best.0 {
                    best = (a, lambda);
                }
            }
        }
        best.1
    }
}

fn index(items: &[usize]) -> Tensor {
    Tensor::from_slice(&items.iter().map(|&i| i as i64).collect::<Vec<_>>())
}

/// Cross-fitted keep rate of each item's group (the prompt-ignoring predictor): for an item of
/// fold `f`, the mean outcome of the items of its group in the other folds.
pub fn group_rate(items: &[usize], y: &[f64], fold: &[usize], group: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; y.len()];
    for &i in items {
        let (mut s, mut n) = (0.0, 0.0);
        for &j in items {
            if group[j] == group[i] && fold[j] != fold[i] {
                s += y[j];
                n += 1.0;
            }
        }
        out[i] = if n > 0.0 { s / n } else { 0.5 };
    }
    out
}

/// AUC of two scorings of the same pairs and their difference, each with a 95% percentile
/// bootstrap interval over resampled prompts (every pair of a drawn prompt is drawn with it).
/// `prompt[k]` is pair `k`'s prompt, of `n_prompts`.
pub struct AucComparison {
    /// (AUC, low, high) of the first scoring.
    pub a: (f64, f64, f64),
    /// (AUC, low, high) of the second scoring.
    pub b: (f64, f64, f64),
    /// (a - b, low, high), paired.
    pub diff: (f64, f64, f64),
}

/// See [`AucComparison`]; `None` when a class is absent.
pub fn compare_auc(
    a: &[f64],
    b: &[f64],
    labels: &[bool],
    prompt: &[usize],
    n_prompts: usize,
    resamples: usize,
) -> Option<AucComparison> {
    let point = (auc(a, labels)?, auc(b, labels)?);
    let mut by_prompt: Vec<Vec<usize>> = vec![vec![]; n_prompts];
    for (k, &p) in prompt.iter().enumerate() {
        by_prompt[p].push(k);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut sa, mut sb, mut sd) = (vec![], vec![], vec![]);
    for _ in 0..resamples {
        let (mut xa, mut xb, mut l) = (vec![], vec![], vec![]);
        for _ in 0..n_prompts {
            for &k in &by_prompt[rng.random_range(0..n_prompts)] {
                xa.push(a[k]);
                xb.push(b[k]);
                l.push(labels[k]);
            }
        }
        if let (Some(x), Some(y)) = (auc(&xa, &l), auc(&xb, &l)) {
            sa.push(x);
            sb.push(y);
            sd.push(x - y);
        }
    }
    let ci = |mut s: Vec<f64>, p: f64| {
        if s.is_empty() {
            return (p, f64::NAN, f64::NAN);
        }
        s.sort_by(f64::total_cmp);
        let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
        (p, q(0.025), q(0.975))
    };
    Some(AucComparison {
        a: ci(sa, point.0),
        b: ci(sb, point.1),
        diff: ci(sd, point.0 - point.1),
    })
}

pub use drllm_eval::stats::mean_ci;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_pairs_and_ties() {
        assert_eq!(
            auc(&[0.1, 0.2, 0.3, 0.4], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auc(&[0.4, 0.3, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert_eq!(auc(&[0.5; 4], &[false, true, false, true]), Some(0.5));
        // 3 positive-negative pairs won, 1 tied, of 4: (3 + 0.5) / 4.
        assert_eq!(
            auc(&[0.1, 0.5, 0.5, 0.9], &[false, false, true, true]),
            Some(0.875)
        );
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn folds_are_balanced_and_seeded() {
        let f = fold_ids(103, 5, 1);
        for k in 0..5 {
            let n = f.iter().filter(|&&x| x == k).count();
            assert!(n == 20 || n == 21, "{n}");
        }
        assert_eq!(f, fold_ids(103, 5, 1));
        assert_ne!(f, fold_ids(103, 5, 2));
    }

    /// A feature that carries the outcome is found by the cross-fitted probe; pure noise is not
    /// (its AUC stays near 0.5): the probe cannot see its own test prompts.
    #[test]
    fn cross_fitting_finds_signal_and_not_noise() {
        let n = 200;
        tch::manual_seed(3);
        let noise = Tensor::randn([n as i64, 64], (Kind::Float, Device::Cpu));
        let y: Vec<f64> = (0..n).map(|i| (i % 2) as f64).collect();
        let labels: Vec<bool> = y.iter().map(|&v| v > 0.5).collect();
        let signal = noise.copy();
        signal.narrow(1, 0, 1).copy_(
            &(Tensor::from_slice(&y)
                .to_kind(Kind::Float)
                .view([n as i64, 1])
                * 2.0),
        );
        let fold = fold_ids(n, 5, 0);
        let items: Vec<usize> = (0..n).collect();
        let lambdas = [0.1, 1.0, 10.0, 100.0];
        let one = vec![0; n];
        let s = Kernel::new(&signal).cross_fit(&items, &y, 0.5, &fold, &one, &lambdas);
        assert!(auc(&s, &labels).unwrap() > 0.9, "{:?}", auc(&s, &labels));
        let s = Kernel::new(&noise).cross_fit(&items, &y, 0.5, &fold, &one, &lambdas);
        let a = auc(&s, &labels).unwrap();
        assert!((0.3..0.7).contains(&a), "{a}");
        // With group intercepts, an outcome that is the group alone is scored by its rate,
        // from noise features.
        let group: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let s = Kernel::new(&noise).cross_fit(&items, &y, 0.5, &fold, &group, &lambdas);
        assert_eq!(auc(&s, &labels), Some(1.0));
    }

    #[test]
    fn group_rates_leave_the_items_fold_out() {
        // Two groups; fold of item 0 holds its group's only positive.
        let y = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let group = [0, 0, 0, 1, 1, 1];
        let fold = [0, 1, 2, 0, 1, 2];
        let items: Vec<usize> = (0..6).collect();
        let r = group_rate(&items, &y, &fold, &group);
        assert_eq!(r[0], 0.0);
        assert_eq!(r[1], 0.5);
        assert_eq!(r[3], 1.0);
    }

    #[test]
    fn compared_aucs_are_paired() {
        let labels = [false, true, false, true, false, true];
        let a = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7];
        let b = [0.5; 6];
        let c = compare_auc(&a, &b, &labels, &[0, 0, 1, 1, 2, 2], 3, 200).unwrap();
        assert_eq!(c.a.0, 1.0);
        assert_eq!(c.b.0, 0.5);
        assert!(c.diff.1 <= 0.5 && c.diff.2 >= 0.5 - 1e-12);
        let (m, lo, hi) = mean_ci(&[1.0, 0.0, 1.0, 1.0], 500);
        assert!(lo <= m && m <= hi && m == 0.75);
    }
}
