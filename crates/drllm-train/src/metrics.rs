//! Classification metrics of routing decisions (skip / execute / repeat).

/// A 3x3 confusion matrix: `m[gold][predicted]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confusion {
    /// Counts by (gold, predicted) class.
    pub m: [[u64; 3]; 3],
}

impl Confusion {
    /// Counts pairs of gold and predicted classes (values outside 0..3 are ignored).
    pub fn from_pairs(gold: &[i64], pred: &[i64]) -> Self {
        let mut m = [[0u64; 3]; 3];
        for (&g, &p) in gold.iter().zip(pred) {
            if (0..3).contains(&g) && (0..3).contains(&p) {
                m[g as usize][p as usize] += 1;
            }
        }
        Confusion { m }
    }

    /// Gold labels of class `c`.
    pub fn support(&self, c: usize) -> u64 {
        self.m[c].iter().sum()
    }

    /// Recall of class `c` (0 when it has no gold labels).
    pub fn recall(&self, c: usize) -> f64 {
        ratio(self.m[c][c], self.support(c))
    }

    /// Precision of class `c` (0 when it is never predicted).
    pub fn precision(&self, c: usize) -> f64 {
        ratio(self.m[c][c], (0..3).map(|g| self.m[g][c]).sum())
    }

    /// F1 of class `c`.
    pub fn f1(&self, c: usize) -> f64 {
        let (p, r) = (self.precision(c), self.recall(c));
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    /// Mean F1 over the classes with gold labels (a class absent from the labels cannot be
    /// scored, and counting it as 0 would punish every model equally).
    pub fn macro_f1(&self) -> f64 {
        let present: Vec<usize> = (0..3).filter(|&c| self.support(c) > 0).collect();
        if present.is_empty() {
            return 0.0;
        }
        present.iter().map(|&c| self.f1(c)).sum::<f64>() / present.len() as f64
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_scores() {
        // gold: 0 0 1 1 1 2; pred: 0 1 1 1 0 1
        let c = Confusion::from_pairs(&[0, 0, 1, 1, 1, 2], &[0, 1, 1, 1, 0, 1]);
        assert_eq!(c.recall(0), 0.5);
        assert_eq!(c.precision(0), 0.5);
        assert!((c.recall(1) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.precision(1), 0.5);
        let f1_1 = 2.0 * 0.5 * (2.0 / 3.0) / (0.5 + 2.0 / 3.0);
        assert!((c.f1(1) - f1_1).abs() < 1e-12);
        assert_eq!(c.f1(2), 0.0);
        assert!((c.macro_f1() - (0.5 + f1_1 + 0.0) / 3.0).abs() < 1e-12);
        // Only classes with gold labels count.
        let c = Confusion::from_pairs(&[1, 1], &[1, 1]);
        assert_eq!(c.macro_f1(), 1.0);
    }
}
