//! Seeded bootstrap intervals, shared by validation runs (`drllm-infer eval`) and the routing
//! diagnostic (`drllm-search-bench predict`), so both quote intervals computed the same way.

use rand::{Rng, SeedableRng};

/// Mean of `x` and its 95% percentile-bootstrap interval over resampled rows (seeded, so reruns
/// agree); `(0, 0, 0)` for no rows. Applied to per-prompt differences of two modes on the same
/// prompts it is the paired interval.
pub fn mean_ci(x: &[f64], resamples: usize) -> (f64, f64, f64) {
    let n = x.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut stats: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| x[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |f: f64| stats[((stats.len() - 1) as f64 * f).round() as usize];
    (mean, q(0.025), q(0.975))
}
