//! Windowed mean pooling of a prompt's hidden states: the router input.

use tch::{Kind, Tensor};

/// Token ranges `[start, end)` of `windows` windows over `n` tokens. Every token belongs to
/// exactly one window (the remainder is spread over windows, never dropped); when `n < windows`
/// the empty windows take the single token where they would start, so every window has at least
/// one token. `n` must be at least 1.
pub fn window_bounds(n: usize, windows: usize) -> Vec<(usize, usize)> {
    let w = windows.max(1);
    (0..w)
        .map(|i| {
            let start = i * n / w;
            let end = (i + 1) * n / w;
            if end > start {
                (start, end)
            } else {
                let s = start.min(n.saturating_sub(1));
                (s, s + 1)
            }
        })
        .collect()
}

/// Mean-pools hidden states `h` `[B, T, H]` into `[B, windows, H]` (f32). Row `r` holds
/// `lens[r]` real tokens at its end (left padding before them is ignored).
pub fn pool_windows(h: &Tensor, lens: &[usize], windows: usize) -> Tensor {
    let t = h.size()[1] as usize;
    debug_assert_eq!(h.size()[0] as usize, lens.len());
    pool_weights(lens, t, windows, h.device()).bmm(&h.to_kind(Kind::Float))
}

/// The pooling as a matrix: `[B, windows, T]` (f32) weights such that `weights.bmm(h)` is
/// [`pool_windows`] of `h` `[B, T, H]`.
pub fn pool_weights(lens: &[usize], t: usize, windows: usize, device: tch::Device) -> Tensor {
    let b = lens.len();
    let w = windows.max(1);
    let mut weights = vec![0f32; b * w * t];
    for (r, &len) in lens.iter().enumerate() {
        let len = len.clamp(1, t);
        let pad = t - len;
        for (k, (s, e)) in window_bounds(len, w).into_iter().enumerate() {
            let v = 1.0 / (e - s) as f32;
            for j in s..e {
                weights[(r * w + k) * t + pad + j] = v;
            }
        }
    }
    Tensor::from_slice(&weights)
        .view([b as i64, w as i64, t as i64])
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn windows_cover_every_token_once(n in 1usize..500, w in 1usize..17) {
            let b = window_bounds(n, w);
            prop_assert_eq!(b.len(), w);
            for &(s, e) in &b {
                prop_assert!(s < e && e <= n);
            }
            if n >= w {
                // A partition of 0..n in order, sizes differing by at most one.
                prop_assert_eq!(b[0].0, 0);
                prop_assert_eq!(b[w - 1].1, n);
                for k in 1..w {
                    prop_assert_eq!(b[k - 1].1, b[k].0);
                }
                let sizes: Vec<usize> = b.iter().map(|(s, e)| e - s).collect();
                prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            } else {
                // Every token is in some window.
                for j in 0..n {
                    prop_assert!(b.iter().any(|&(s, e)| s <= j && j < e));
                }
            }
        }
    }

    #[test]
    fn pooling_ignores_left_padding_and_averages_each_window() {
        // Row 0: 5 real tokens after 1 pad; row 1: 6 real tokens. Token j has value j+1 in
        // every feature.
        let mut v = vec![];
        for r in 0..2 {
            for j in 0..6 {
                let x = if r == 0 && j == 0 {
                    1000.0
                } else {
                    (j + 1 - usize::from(r == 0)) as f32
                };
                v.extend([x, x]);
            }
        }
        let h = Tensor::from_slice(&v).view([2, 6, 2]);
        let p = pool_windows(&h, &[5, 6], 2);
        let got: Vec<f32> = Vec::try_from(p.flatten(0, -1)).unwrap();
        // Row 0: windows [0,2) -> mean(1,2), [2,5) -> mean(3,4,5); row 1: [0,3), [3,6).
        assert_eq!(got, [1.5, 1.5, 4.0, 4.0, 2.0, 2.0, 5.0, 5.0]);
    }
}
