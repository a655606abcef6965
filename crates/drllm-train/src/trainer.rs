//! Fitting the routers on cached features: focal loss with effective-number class weights,
//! AdamW with a cosine schedule after a linear warm-up; the epoch kept is the one whose routers
//! answer held-out prompts best when they route them (or, without that, by macro-F1).

use std::path::{Path, PathBuf};
use std::time::Instant;

use drllm_router::{EpochMetrics, RouterShape, Routers};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

use crate::features::Features;
use crate::metrics::Confusion;

/// Why training cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// One example cannot be used.
    #[error("sample {sample_id}: {msg}")]
    Example {
        /// Its sample id.
        sample_id: String,
        /// What is wrong.
        msg: String,
    },
    /// The model failed (loading a batch, a prefill).
    #[error("model: {0}")]
    Model(#[from] drllm_runtime::Error),
    /// Evaluating answers along paths failed.
    #[error("model: {0}")]
    Eval(#[from] drllm_eval::EvalError),
    /// A path is not a path of the model (wrong length, counts outside 0..=2).
    #[error("path: {0}")]
    Path(#[from] drllm_path::PathError),
    /// Features or labels are unusable (wrong shape, labels outside 0..3, NaN).
    #[error("{0}")]
    Data(String),
    /// A torch operation failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl TrainError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }
}

/// Hyper-parameters (each a `drllm-train` flag; defaults are the paper's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the training examples.
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up linearly.
    pub warmup: f64,
    /// Focal loss gamma.
    pub focal_gamma: f64,
    /// Effective-number beta of the class weights.
    pub class_beta: f64,
    /// The label proportions are scaled to this many labels before the effective-number
    /// formula (the paper's 126,812), so weights are as flat as the paper's at any dataset
    /// size; 0 uses the raw counts (inverse frequency on small datasets).
    pub class_weight_total: f64,
    /// Width of each router's hidden layer.
    pub router_hidden: usize,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 25,
            batch_size: 16,
            lr: 1e-3,
            weight_decay: 0.01,
            warmup: 0.05,
            focal_gamma: 2.0,
            class_beta: 0.999,
            class_weight_total: PAPER_LABELS,
            router_hidden: 128,
            seed: 0,
        }
    }
}

/// The outcome of training.
#[derive(Debug)]
pub struct Trained {
    /// Routers of the best epoch.
    pub routers: Routers,
    /// Metrics of every epoch.
    pub epochs: Vec<EpochMetrics>,
    /// The best epoch (1-based).
    pub best_epoch: usize,
    /// Training labels per class.
    pub label_counts: [u64; 3],
    /// Class weights used by the loss.
    pub class_weights: [f64; 3],
}

/// Labels in the paper's training set (its class weights [0.916, 0.905, 1.179] came from them).
pub const PAPER_LABELS: f64 = 126_812.0;

/// Effective-number class weights (Cui et al. 2019): `(1 - beta) / (1 - beta^n_c)`, normalised
/// to sum to the number of classes present; absent classes weigh 0. With `total > 0` the counts
/// are first scaled to sum to `total` (only the label proportions matter): on a few thousand
/// labels the raw formula is plain inverse frequency, while at the paper's size it is nearly
/// flat.
pub fn class_weights(counts: [u64; 3], beta: f64, total: f64) -> [f64; 3] {
    let sum = counts.iter().sum::<u64>() as f64;
    let scale = if total > 0.0 && sum > 0.0 {
        total / sum
    } else {
        1.0
    };
    let mut w = [0.0; 3];
    for c in 0..3 {
        if counts[c] > 0 {
            w[c] = (1.0 - beta) / (1.0 - beta.powf(counts[c] as f64 * scale));
        }
    }
    let present = counts.iter().filter(|&&n| n > 0).count() as f64;
    let sum: f64 = w.iter().sum();
    if sum > 0.0 {
        for x in &mut w {
            *x *= present / sum;
        }
    }
    w
}

/// Focal loss of `logits [M, 3]` against `labels [M]`: mean of `-w_y (1 - p_y)^gamma log p_y`.
pub fn focal_loss(logits: &Tensor, labels: &Tensor, weights: &Tensor, gamma: f64) -> Tensor {
    soft_focal_loss(logits, &one_hot(labels), weights, gamma)
}

/// Focal loss against soft targets `[M, 3]` (rows summing to 1): mean over rows of
/// `-sum_c t_c w_c (1 - p_c)^gamma log p_c`; with one-hot targets, [`focal_loss`].
pub fn soft_focal_loss(logits: &Tensor, targets: &Tensor, weights: &Tensor, gamma: f64) -> Tensor {
    let logp = logits.log_softmax(-1, Kind::Float);
    // Clamped away from 0: (1 - p)^gamma has an infinite slope at p = 1 when gamma < 1, and a
    // class of target weight 0 would turn it into 0 * inf = NaN.
    let focus = (logp.exp().neg() + 1.0)
        .clamp_min(1e-12)
        .pow_tensor_scalar(gamma);
    let per_class = targets * weights.view([1, 3]) * focus * logp;
    (-per_class.sum_dim_intlist(-1, false, Kind::Float)).mean(Kind::Float)
}

/// `labels [..]` (0..3) as one-hot f32 rows `[.., 3]`.
fn one_hot(labels: &Tensor) -> Tensor {
    labels.one_hot(3).to_kind(Kind::Float)
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up over `warmup` steps, then cosine
/// decay to 0.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        let span = total.saturating_sub(warmup).max(1) as f64;
        let t = ((step - warmup) as f64 / span).min(1.0);
        peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

fn label_counts(labels: &Tensor) -> [u64; 3] {
    let v: Vec<i64> = Vec::try_from(labels.flatten(0, -1)).unwrap_or_default();
    let mut c = [0u64; 3];
    for x in v {
        if (0..3).contains(&x) {
            c[x as usize] += 1;
        }
    }
    c
}

fn check(f: &Features, what: &str, num_layers: i64) -> Result<(), TrainError> {
    let s = f.x.size();
    if s.len() != 4 || s[0] != num_layers || f.labels.size() != [s[1], num_layers] {
        return Err(TrainError::Data(format!(
            "{what}: features {:?} and labels {:?} do not match ([L, N, W, H] and [N, L], L = {num_layers})",
            s,
            f.labels.size()
        )));
    }
    if f.labels.numel() > 0 {
        let (lo, hi) = (
            f.labels.min().int64_value(&[]),
            f.labels.max().int64_value(&[]),
        );
        if lo < 0 || hi > 2 {
            return Err(TrainError::Data(format!(
                "{what}: labels must be 0 (skip), 1 (execute) or 2 (repeat); found {}",
                if lo < 0 { lo } else { hi }
            )));
        }
    }
    if let Some(t) = &f.targets {
        let want = [s[1], num_layers, 3];
        let rows_ok = t.size() == want && {
            let sums = t.sum_dim_intlist(-1, false, Kind::Float);
            t.min().double_value(&[]) >= 0.0 && (sums - 1.0).abs().max().double_value(&[]) < 1e-3
        };
        if !rows_ok {
            return Err(TrainError::Data(format!(
                "{what}: soft targets {:?} must be [N, L, 3] = {want:?}, non-negative, each \
                 block's row summing to 1",
                t.size()
            )));
        }
    }
    let bad = f.x.isfinite().logical_not().any().int64_value(&[]) != 0;
    if bad {
        return Err(TrainError::Data(format!(
            "{what}: the features hold NaN or infinite values"
        )));
    }
    Ok(())
}

/// Routers' predictions `[N, L]` for `f`, in chunks.
fn predict(r: &Routers, f: &Features) -> Tensor {
    let _g = tch::no_grad_guard();
    let n = f.len() as i64;
    let chunks: Vec<Tensor> = (0..n)
        .step_by(256)
        .map(|s| {
            let x = f.x.narrow(1, s, (n - s).min(256));
            r.forward_layer_major(&x).argmax(-1, false)
        })
        .collect();
    if chunks.is_empty() {
        Tensor::zeros([0, r.shape.num_layers as i64], (Kind::Int64, Device::Cpu))
    } else {
        Tensor::cat(&chunks, 0)
    }
}

/// Validation metrics of `r` on `f` (teacher-forced): confusion, and mean predicted and gold
/// cost per prompt.
pub fn evaluate(r: &Routers, f: &Features) -> (Confusion, f64, f64) {
    let pred = predict(r, f);
    let g: Vec<i64> = Vec::try_from(f.labels.flatten(0, -1)).unwrap_or_default();
    let p: Vec<i64> = Vec::try_from(pred.flatten(0, -1)).unwrap_or_default();
    let n = f.len().max(1) as f64;
    (
        Confusion::from_pairs(&g, &p),
        p.iter().sum::<i64>() as f64 / n,
        g.iter().sum::<i64>() as f64 / n,
    )
}

/// Which epoch's routers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Select {
    /// The highest routed validation accuracy, then the lowest routed cost (epochs without a
    /// routed measurement are not candidates).
    RoutedAccuracy,
    /// The highest teacher-forced validation macro-F1.
    MacroF1,
}

/// The epoch `select` keeps among `epochs` (1-based; the last when nothing qualifies).
pub fn best_epoch(epochs: &[EpochMetrics], select: Select) -> usize {
    let key = |m: &EpochMetrics| -> Option<(f64, f64)> {
        match select {
            Select::MacroF1 => Some((m.val_macro_f1, 0.0)),
            Select::RoutedAccuracy => Some((m.val_routed_accuracy?, -m.val_routed_cost?)),
        }
    };
    let mut best: Option<(f64, f64, usize)> = None;
    for m in epochs {
        if let Some((a, c)) = key(m) {
            if best.is_none_or(|(ba, bc, _)| a > ba || (a == ba && c > bc)) {
                best = Some((a, c, m.epoch));
            }
        }
    }
    best.map_or(epochs.last().map_or(0, |m| m.epoch), |b| b.2)
}

/// Trains routers of width `cfg.router_hidden` on `train`, scoring every epoch on `val` (on
/// `train` when `val` is empty). `routed(epoch, routers)` may measure (accuracy, cost) of the
/// routers actually routing held-out prompts; `select` picks the epoch kept. `on_step(step,
/// total)` and `on_epoch` report progress.
#[allow(clippy::too_many_arguments)]
pub fn train(
    train: &Features,
    val: &Features,
    cfg: &TrainConfig,
    select: Select,
    mut routed: impl FnMut(usize, &Routers) -> Result<Option<(f64, f64)>, TrainError>,
    mut on_step: impl FnMut(usize, usize),
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<Trained, TrainError> {
    if train.is_empty() {
        return Err(TrainError::Data("no training examples".into()));
    }
    if cfg.epochs == 0 {
        return Err(TrainError::Data("epochs must be positive".into()));
    }
    let s = train.x.size();
    if s.len() != 4 {
        return Err(TrainError::Data(format!(
            "training features have shape {s:?}, expected [L, N, W, H]"
        )));
    }
    let shape = RouterShape {
        num_layers: s[0] as usize,
        hidden_size: s[3] as usize,
        router_hidden: cfg.router_hidden.max(1),
    };
    check(train, "training set", s[0])?;
    if !val.is_empty() {
        check(val, "validation set", s[0])?;
        if val.x.size()[2..] != s[2..] {
            return Err(TrainError::Data(format!(
                "validation features {:?} differ from training features {:?}",
                val.x.size(),
                s
            )));
        }
    }
    let scored = if val.is_empty() { train } else { val };
    let counts = label_counts(&train.labels);
    let weights = class_weights(counts, cfg.class_beta, cfg.class_weight_total);
    let wt = Tensor::from_slice(&weights.map(|w| w as f32));
    tch::manual_seed(cfg.seed as i64);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let routers = Routers::new(&vs.root(), shape);
    let mut opt = tch::nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(&vs, cfg.lr)?;
    let n = train.len();
    let bs = cfg.batch_size.max(1);
    let per_epoch = n.div_ceil(bs);
    let total = per_epoch * cfg.epochs;
    let warmup = ((cfg.warmup * total as f64).round() as usize).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut epochs: Vec<EpochMetrics> = vec![];
    let mut snapshots: Vec<Routers> = vec![];
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        let t0 = Instant::now();
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut lr = cfg.lr;
        for chunk in order.chunks(bs) {
            lr = lr_at(step, total, warmup, cfg.lr);
            opt.set_lr(lr);
            let b = train.select(chunk);
            let logits = routers.forward_layer_major(&b.x).reshape([-1, 3]);
            let targets = match &b.targets {
                Some(t) => t.view([-1, 3]),
                None => one_hot(&b.labels.view([-1])),
            };
            let loss = soft_focal_loss(&logits, &targets, &wt, cfg.focal_gamma);
            opt.backward_step(&loss);
            loss_sum += loss.double_value(&[]);
            step += 1;
            on_step(step, total);
        }
        let (conf, avg_cost, gold_cost) = evaluate(&routers, scored);
        let snap = routers.snapshot();
        let measured = routed(epoch, &snap)?;
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / per_epoch as f64,
            val_macro_f1: conf.macro_f1(),
            val_f1: [conf.f1(0), conf.f1(1), conf.f1(2)],
            val_recall: [conf.recall(0), conf.recall(1), conf.recall(2)],
            val_avg_cost: avg_cost,
            val_gold_cost: gold_cost,
            val_routed_accuracy: measured.map(|m| m.0),
            val_routed_cost: measured.map(|m| m.1),
            lr,
            secs: t0.elapsed().as_secs_f64(),
        };
        if !m.train_loss.is_finite() {
            return Err(TrainError::Data(format!(
                "the training loss became {} in epoch {epoch}; lower --lr",
                m.train_loss
            )));
        }
        on_epoch(&m);
        epochs.push(m);
        snapshots.push(snap);
    }
    let best_epoch = best_epoch(&epochs, select);
    let routers = snapshots.swap_remove(best_epoch - 1);
    Ok(Trained {
        routers,
        epochs,
        best_epoch,
        label_counts: counts,
        class_weights: weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_weights_favour_rare_classes_and_sum_to_the_classes_present() {
        let w = class_weights([100, 1000, 10], 0.999, 0.0);
        assert!(w[2] > w[0] && w[0] > w[1]);
        assert!((w.iter().sum::<f64>() - 3.0).abs() < 1e-9);
        let w = class_weights([0, 50, 5], 0.999, 0.0);
        assert_eq!(w[0], 0.0);
        assert!((w[1] + w[2] - 2.0).abs() < 1e-9);
    }

    #[test]
    fn scaled_class_weights_are_the_papers_at_any_dataset_size() {
        // Proportions as the paper's labels: ~3.5% skip, ~95% execute, ~1.1% repeat.
        let paper = [4_420u64, 120_936, 1_456];
        let w = class_weights(paper, 0.999, PAPER_LABELS);
        let want = [0.916, 0.905, 1.179];
        for c in 0..3 {
            assert!((w[c] - want[c]).abs() < 0.01, "{w:?}");
        }
        // The same proportions on a quickstart-sized set give the same weights...
        let small = [44u64, 1_209, 15];
        let ws = class_weights(small, 0.999, PAPER_LABELS);
        for c in 0..3 {
            assert!((ws[c] - w[c]).abs() < 0.02, "{ws:?} vs {w:?}");
        }
        // ... where the raw formula is nearly inverse frequency.
        let raw = class_weights(small, 0.999, 0.0);
        assert!(raw[2] / raw[1] > 40.0, "{raw:?}");
        // A quickstart-sized set with more skips stays within a factor of 2.
        let q = class_weights([600, 2_300, 50], 0.999, PAPER_LABELS);
        assert!(q.iter().all(|&x| x > 0.5 && x < 2.0), "{q:?}");
    }

    fn epoch(n: usize, f1: f64, acc: Option<f64>, cost: f64) -> EpochMetrics {
        EpochMetrics {
            epoch: n,
            train_loss: 0.0,
            val_macro_f1: f1,
            val_f1: [0.0; 3],
            val_recall: [0.0; 3],
            val_avg_cost: cost,
            val_gold_cost: cost,
            val_routed_accuracy: acc,
            val_routed_cost: acc.map(|_| cost),
            lr: 0.0,
            secs: 0.0,
        }
    }

    #[test]
    fn the_kept_epoch_is_chosen_by_routed_accuracy_then_cost() {
        let e = [
            epoch(1, 0.9, Some(0.40), 25.0),
            epoch(2, 0.5, Some(0.48), 28.0),
            epoch(3, 0.6, Some(0.48), 27.0),
            epoch(4, 0.95, None, 20.0),
        ];
        assert_eq!(best_epoch(&e, Select::RoutedAccuracy), 3);
        assert_eq!(best_epoch(&e, Select::MacroF1), 4);
        // No routed measurement at all: the last epoch.
        assert_eq!(best_epoch(&e[3..], Select::RoutedAccuracy), 4);
    }

    #[test]
    fn focal_loss_with_gamma_zero_is_weighted_cross_entropy() {
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0]).view([2, 3]);
        let labels = Tensor::from_slice(&[1i64, 0]);
        let w = Tensor::from_slice(&[2.0f32, 1.0, 1.0]);
        let got = focal_loss(&logits, &labels, &w, 0.0).double_value(&[]);
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want =
            ((lse(&[1.0, 2.0, 0.5]) - 2.0) * 1.0 + (lse(&[-1.0, 0.0, 3.0]) + 1.0) * 2.0) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // gamma > 0 down-weights the confident example.
        let g2 = focal_loss(&logits, &labels, &w, 2.0).double_value(&[]);
        assert!(g2 < got);
    }

    #[test]
    fn soft_focal_loss_is_the_target_weighted_mix_of_the_hard_losses() {
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 0.5]).view([1, 3]);
        let w = Tensor::from_slice(&[2.0f32, 1.0, 1.5]);
        let hard =
            |c: i64| focal_loss(&logits, &Tensor::from_slice(&[c]), &w, 2.0).double_value(&[]);
        let t = Tensor::from_slice(&[0.25f32, 0.75, 0.0]).view([1, 3]);
        let got = soft_focal_loss(&logits, &t, &w, 2.0).double_value(&[]);
        let want = 0.25 * hard(0) + 0.75 * hard(1);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lrs: Vec<f64> = (0..100).map(|s| lr_at(s, 100, 10, 1e-3)).collect();
        assert!((lrs[9] - 1e-3).abs() < 1e-12);
        assert!(lrs[..10].windows(2).all(|w| w[0] < w[1]));
        assert!(lrs[10..].windows(2).all(|w| w[0] >= w[1]));
        assert!(lrs[99] < 1e-5);
    }

    /// Labels that are a known function of the pooled features: the routers must learn it.
    fn synthetic(n: usize, seed: i64) -> Features {
        tch::manual_seed(seed);
        let (l, w, h) = (6, 4, 16);
        let x = Tensor::randn([n as i64, l, w, h], (Kind::Float, Device::Cpu));
        // Block l's label is decided by the window-mean of feature l (0: low, 1: mid, 2: high).
        let m = x.mean_dim(2, false, Kind::Float); // [N, L, H]
        let idx = Tensor::arange(l, (Kind::Int64, Device::Cpu))
            .view([1, l, 1])
            .expand([n as i64, l, 1], false);
        let v = m.gather(2, &idx, false).squeeze_dim(2); // [N, L]
        let labels = v.gt(0.25).to_kind(Kind::Int64) + v.gt(-0.25).to_kind(Kind::Int64);
        Features {
            x: x.permute([1, 0, 2, 3]).contiguous(),
            labels,
            targets: None,
        }
    }

    #[test]
    fn learns_a_known_function_of_the_features() {
        let tr = synthetic(4000, 1);
        let va = synthetic(300, 2);
        let cfg = TrainConfig {
            epochs: 30,
            batch_size: 32,
            lr: 3e-3,
            router_hidden: 32,
            seed: 5,
            ..TrainConfig::default()
        };
        let none = |_: usize, _: &Routers| Ok(None);
        let t = train(&tr, &va, &cfg, Select::MacroF1, none, |_, _| {}, |_| {}).unwrap();
        let best = &t.epochs[t.best_epoch - 1];
        assert!(best.val_macro_f1 >= 0.95, "{:?}", t.epochs.last());
        // The kept routers are the best epoch's.
        let (conf, _, _) = evaluate(&t.routers, &va);
        assert_eq!(conf.macro_f1(), best.val_macro_f1);
        // Deterministic with the seed.
        let again = train(&tr, &va, &cfg, Select::MacroF1, none, |_, _| {}, |_| {}).unwrap();
        assert!(again.routers.w1.equal(&t.routers.w1));
        assert_eq!(again.epochs.len(), t.epochs.len());
        // Soft targets that are the labels' one-hot rows train the same routers.
        let soft = Features {
            x: tr.x.shallow_clone(),
            labels: tr.labels.shallow_clone(),
            targets: Some(one_hot(&tr.labels)),
        };
        let s = train(&soft, &va, &cfg, Select::MacroF1, none, |_, _| {}, |_| {}).unwrap();
        assert!(s.routers.w1.allclose(&t.routers.w1, 1e-5, 1e-6, false));
    }

    #[test]
    fn bad_features_and_labels_are_refused() {
        let ok = synthetic(10, 1);
        let refused = |tr: &Features| {
            let none = |_: usize, _: &Routers| Ok(None);
            let cfg = TrainConfig::default();
            train(tr, &ok, &cfg, Select::MacroF1, none, |_, _| {}, |_| {})
                .unwrap_err()
                .to_string()
        };
        let bad = synthetic(10, 1);
        let _ = bad.labels.get(0).get(0).fill_(3);
        let e = refused(&bad);
        assert!(
            e.contains("labels must be 0 (skip), 1 (execute) or 2 (repeat); found 3"),
            "{e}"
        );
        let nan = synthetic(10, 1);
        let _ = nan.x.get(1).get(3).get(0).get(2).fill_(f64::NAN);
        let e = refused(&nan);
        assert!(e.contains("NaN"), "{e}");
        let short = Features {
            x: ok.x.shallow_clone(),
            labels: ok.labels.narrow(1, 0, 5),
            targets: None,
        };
        let e = refused(&short);
        assert!(e.contains("do not match"), "{e}");
        let unnormalised = Features {
            x: ok.x.shallow_clone(),
            labels: ok.labels.shallow_clone(),
            targets: Some(Tensor::ones([10, 6, 3], (Kind::Float, Device::Cpu))),
        };
        let e = refused(&unnormalised);
        assert!(e.contains("summing to 1"), "{e}");
    }
}
