//! Layer paths: how many times each block runs (0 = skip, 1 = execute, 2 = repeat). A path is
//! equally the non-decreasing list of executed layer indices; both forms convert losslessly.
#![warn(missing_docs)]
use std::fmt;
use std::str::FromStr;

/// A path that does not fit the rules or the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid layer path: {0}")]
pub struct PathError(pub String);

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, PathError>;

/// Most repetitions of one block a path may ask for.
pub const MAX_REPEAT: u8 = 2;

/// `counts[l]` in {0, 1, 2} for every block `l` of the model.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct LayerPath {
    counts: Vec<u8>,
}

impl LayerPath {
    /// The default path: every block once.
    pub fn all_ones(num_layers: usize) -> Self {
        LayerPath {
            counts: vec![1; num_layers],
        }
    }

    /// A path from per-block counts; each must be at most [`MAX_REPEAT`].
    pub fn from_counts(counts: Vec<u8>) -> Result<Self> {
        if let Some((l, c)) = counts.iter().enumerate().find(|(_, &c)| c > MAX_REPEAT) {
            return Err(PathError(format!(
                "block {l} has count {c}; counts must be 0, 1 or 2"
            )));
        }
        Ok(LayerPath { counts })
    }

    /// A path from the non-decreasing list of executed layer indices (the original code's form),
    /// for a model of `num_layers` blocks.
    pub fn from_layer_list(layers: &[usize], num_layers: usize) -> Result<Self> {
        let mut counts = vec![0u8; num_layers];
        let mut prev = 0usize;
        for (i, &l) in layers.iter().enumerate() {
            if l >= num_layers {
                return Err(PathError(format!(
                    "layer {l} at position {i} is out of range 0..{num_layers}"
                )));
            }
            if l < prev {
                return Err(PathError(format!(
                    "layer list is not non-decreasing at position {i} ({prev} then {l})"
                )));
            }
            prev = l;
            counts[l] += 1;
            if counts[l] > MAX_REPEAT {
                return Err(PathError(format!(
                    "layer {l} appears more than {MAX_REPEAT} times"
                )));
            }
        }
        Ok(LayerPath { counts })
    }

    /// The non-decreasing list of executed layer indices.
    pub fn layer_list(&self) -> Vec<usize> {
        self.counts
            .iter()
            .enumerate()
            .flat_map(|(l, &c)| std::iter::repeat_n(l, c as usize))
            .collect()
    }

    /// Per-block counts.
    pub fn counts(&self) -> &[u8] {
        &self.counts
    }

    /// Number of blocks of the model this path is for.
    pub fn num_layers(&self) -> usize {
        self.counts.len()
    }

    /// Block applications: the sum of counts.
    pub fn cost(&self) -> usize {
        self.counts.iter().map(|&c| c as usize).sum()
    }

    /// Number of blocks executed at least once.
    pub fn distinct_layers(&self) -> usize {
        self.counts.iter().filter(|&&c| c > 0).count()
    }

    /// Checks the path fits a model of `num_layers` blocks.
    pub fn check_len(&self, num_layers: usize) -> Result<()> {
        if self.counts.len() != num_layers {
            return Err(PathError(format!(
                "path has {} entries but the model has {num_layers} blocks",
                self.counts.len()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.counts.iter().map(|c| c.to_string()).collect();
        f.write_str(&s.join(","))
    }
}

impl FromStr for LayerPath {
    type Err = PathError;
    /// Parses `1,1,0,2,...` (commas, spaces allowed).
    fn from_str(s: &str) -> Result<Self> {
        let counts = s
            .split(',')
            .map(str::trim)
            .enumerate()
            .map(|(i, p)| {
                p.parse::<u8>()
                    .map_err(|_| PathError(format!("entry {i} is {p:?}; expected 0, 1 or 2")))
            })
            .collect::<Result<Vec<u8>>>()?;
        LayerPath::from_counts(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn counts_and_layer_lists_convert_losslessly(counts in proptest::collection::vec(0u8..=2, 1..40)) {
            let p = LayerPath::from_counts(counts.clone()).unwrap();
            let list = p.layer_list();
            prop_assert_eq!(list.len(), p.cost());
            prop_assert!(list.windows(2).all(|w| w[0] <= w[1]));
            let back = LayerPath::from_layer_list(&list, counts.len()).unwrap();
            prop_assert_eq!(&back, &p);
            let text: LayerPath = p.to_string().parse().unwrap();
            prop_assert_eq!(text, p);
        }
    }

    #[test]
    fn rejects_bad_paths() {
        assert!(LayerPath::from_counts(vec![1, 3])
            .unwrap_err()
            .to_string()
            .contains("block 1 has count 3"));
        assert!("1,x"
            .parse::<LayerPath>()
            .unwrap_err()
            .to_string()
            .contains("entry 1"));
        assert!(LayerPath::from_layer_list(&[0, 2, 1], 3).is_err());
        assert!(LayerPath::from_layer_list(&[0, 0, 0], 3).is_err());
        assert!(LayerPath::from_layer_list(&[5], 3).is_err());
        let p = LayerPath::all_ones(4);
        assert!(p
            .check_len(5)
            .unwrap_err()
            .to_string()
            .contains("4 entries but the model has 5"));
    }
}
