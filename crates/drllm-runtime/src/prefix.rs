//! Prefix sharing for path evaluation: candidates of one prompt whose paths agree on blocks
//! `0..l` have identical hidden states entering block `l` and identical KV caches in every slot
//! before it, so a prefill can resume at block `l` from a cached state instead of recomputing.
//!
//! Entries are keyed by (prompt token ids, counts of blocks `0..l`) and hold, for one prompt, the hidden
//! state entering block `l` (`[T, H]`) and the KV of block `l - 1`'s slots (`[kv_heads, T, d]`
//! each). Prefixes ending in a skipped block have no entry of their own (a skip changes nothing).
//! The cache has a byte budget and evicts the least recently used entry together with every
//! longer prefix through it (unreachable without it); shorter prefixes are touched last on
//! lookup, so a chain tends to be cut from its long end.
//!
//! No general-purpose LRU crate fits: entries have sizes, and eviction order must follow both
//! recency and prefix length; the bookkeeping is a map plus an ordered index, kept here.
use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use tch::Tensor;

/// What one cached prefix holds.
pub(crate) struct Entry {
    hidden: Tensor,
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    tick: u64,
}

/// Everything cached for one prompt.
struct Prompt {
    ids: Vec<u32>,
    entries: HashMap<Vec<u8>, Entry>,
}

/// Counters of a cache's use, for throughput reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Block applications the looked-up paths asked for (their costs summed).
    pub blocks_requested: u64,
    /// Of those, block applications resumed from cache instead of computed.
    pub blocks_reused: u64,
    /// Entries stored.
    pub inserted: u64,
    /// Entries evicted to stay within the budget.
    pub evicted: u64,
}

/// A resumable state found for one row.
pub(crate) struct Resume {
    /// First block to compute; `0` = from the embeddings.
    pub start: usize,
    /// Hidden state entering `start` (`[T, H]`), when `start > 0`.
    pub hidden: Option<Tensor>,
    /// For every block before `start`: the KV of each of its repetitions.
    pub kv: Vec<Vec<(Tensor, Tensor)>>,
}

/// LRU cache of path-prefix states under a memory budget.
pub struct PrefixCache {
    budget: usize,
    used: usize,
    tick: u64,
    prompts: HashMap<u64, Prompt>,
    /// tick -> (key, prefix): the recency order.
    lru: BTreeMap<u64, (u64, Vec<u8>)>,
    stats: PrefixStats,
}

/// The map key of a prompt (the ids themselves are compared on every use, so a collision costs
/// a rebuild, never a wrong state).
fn prompt_key(ids: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    ids.hash(&mut h);
    h.finish()
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl PrefixCache {
    /// An empty cache holding at most `budget_bytes` of tensors (0 disables caching).
    pub fn new(budget_bytes: usize) -> Self {
        PrefixCache {
            budget: budget_bytes,
            used: 0,
            tick: 0,
            prompts: HashMap::new(),
            lru: BTreeMap::new(),
            stats: PrefixStats::default(),
        }
    }

    /// Bytes held now.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// Use counters so far.
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// Drops everything cached for the prompt `ids` (e.g. when its search ends).
    pub fn forget(&mut self, ids: &[u32]) {
        self.forget_key(prompt_key(ids));
    }

    fn forget_key(&mut self, key: u64) {
        if let Some(p) = self.prompts.remove(&key) {
            for e in p.entries.values() {
                self.used -= e.bytes;
                self.lru.remove(&e.tick);
            }
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The longest cached prefix of `counts` for the prompt `ids`. Touches the entries it
    /// returns.
    pub(crate) fn lookup(&mut self, ids: &[u32], counts: &[u8]) -> Resume {
        let key = prompt_key(ids);
        let cost: u64 = counts.iter().map(|&c| c as u64).sum();
        self.stats.blocks_requested += cost;
        let none = Resume {
            start: 0,
            hidden: None,
            kv: vec![],
        };
        if self.prompts.get(&key).is_some_and(|p| p.ids != ids) {
            self.forget_key(key);
        }
        let Some(p) = self.prompts.get(&key) else {
            return none;
        };
        // `found[l]`: the entry for prefix `counts[..l + 1]` (None for skipped blocks).
        let mut found: Vec<Option<&Entry>> = vec![];
        let mut start = 0;
        for l in 0..counts.len() {
            if counts[l] == 0 {
                found.push(None);
                if start == l && start > 0 {
                    start = l + 1;
                }
                continue;
            }
            match p.entries.get(&counts[..=l]) {
                Some(e) if start == l => {
                    found.push(Some(e));
                    start = l + 1;
                }
                _ => break,
            }
        }
        found.truncate(start);
        let Some(last) = found.iter().rev().flatten().next() else {
            return none;
        };
        let hidden = Some(last.hidden.shallow_clone());
        let kv: Vec<Vec<(Tensor, Tensor)>> = found
            .iter()
            .map(|e| {
                e.map_or_else(Vec::new, |e| {
                    e.kv.iter()
                        .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                        .collect()
                })
            })
            .collect();
        let reused: u64 = counts[..start].iter().map(|&c| c as u64).sum();
        self.stats.blocks_reused += reused;
        // Touch from the long end to the short one: shorter prefixes end up most recent.
        let touched: Vec<usize> = (0..start).rev().filter(|&l| counts[l] > 0).collect();
        for l in touched {
            let tick = self.next_tick();
            let Some(e) = self
                .prompts
                .get_mut(&key)
                .and_then(|p| p.entries.get_mut(&counts[..=l]))
            else {
                continue;
            };
            if let Some(v) = self.lru.remove(&e.tick) {
                self.lru.insert(tick, v);
            }
            e.tick = tick;
        }
        Resume { start, hidden, kv }
    }

    /// Whether the prefix `counts` of the prompt `ids` is cached.
    pub fn contains(&self, ids: &[u32], counts: &[u8]) -> bool {
        self.prompts
            .get(&prompt_key(ids))
            .is_some_and(|p| p.ids == ids && p.entries.contains_key(counts))
    }

    /// Stores the state after prefix `counts` (non-empty, last count > 0) of the prompt `ids`,
    /// then evicts down to the budget. Entries larger than the whole budget are not kept.
    pub(crate) fn insert(
        &mut self,
        ids: &[u32],
        counts: &[u8],
        hidden: Tensor,
        kv: Vec<(Tensor, Tensor)>,
    ) {
        let bytes = tensor_bytes(&hidden)
            + kv.iter()
                .map(|(k, v)| tensor_bytes(k) + tensor_bytes(v))
                .sum::<usize>();
        if bytes > self.budget || self.contains(ids, counts) {
            return;
        }
        let key = prompt_key(ids);
        if self.prompts.get(&key).is_some_and(|p| p.ids != ids) {
            self.forget_key(key);
        }
        let tick = self.next_tick();
        let p = self.prompts.entry(key).or_insert_with(|| Prompt {
            ids: ids.to_vec(),
            entries: HashMap::new(),
        });
        p.entries.insert(
            counts.to_vec(),
            Entry {
                hidden,
                kv,
                bytes,
                tick,
            },
        );
        self.lru.insert(tick, (key, counts.to_vec()));
        self.used += bytes;
        self.stats.inserted += 1;
        while self.used > self.budget {
            let Some((_, (k, prefix))) = self.lru.pop_first() else {
                break;
            };
            if let Some(p) = self.prompts.get_mut(&k) {
                // The entry and every longer prefix through it (unreachable without it).
                let dead: Vec<Vec<u8>> = p
                    .entries
                    .keys()
                    .filter(|q| q.starts_with(&prefix))
                    .cloned()
                    .collect();
                for q in dead {
                    if let Some(e) = p.entries.remove(&q) {
                        self.used -= e.bytes;
                        self.lru.remove(&e.tick);
                        self.stats.evicted += 1;
                    }
                }
                if p.entries.is_empty() {
                    self.prompts.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(n: i64) -> Tensor {
        Tensor::zeros([n], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn longest_prefix_skips_zero_blocks_and_needs_every_entry() {
        let mut c = PrefixCache::new(1 << 20);
        let ids = [1, 2, 3];
        c.insert(&ids, &[1], t(4), vec![(t(1), t(1))]);
        c.insert(&ids, &[1, 0, 2], t(4), vec![(t(1), t(1)), (t(1), t(1))]);
        let r = c.lookup(&ids, &[1, 0, 2, 1]);
        assert_eq!(r.start, 3);
        assert_eq!(r.kv.iter().map(Vec::len).collect::<Vec<_>>(), [1, 0, 2]);
        // A skip right after a cached prefix is free.
        assert_eq!(c.lookup(&ids, &[1, 0, 0, 1]).start, 3);
        // Nothing for another prompt.
        assert_eq!(c.lookup(&[1, 2], &[1, 0, 2]).start, 0);
        // Without the entry for [1], [1, 0, 2] is unreachable.
        let mut c2 = PrefixCache::new(1 << 20);
        c2.insert(&ids, &[1, 0, 2], t(4), vec![]);
        assert_eq!(c2.lookup(&ids, &[1, 0, 2]).start, 0);
        let s = c.stats();
        assert_eq!((s.blocks_requested, s.blocks_reused), (4 + 2 + 3, 3 + 1));
        c.forget(&ids);
        assert!(c.is_empty());
        assert_eq!(c.used_bytes(), 0);
    }

    #[test]
    fn evicts_least_recent_within_budget() {
        // Each entry: hidden 4 f32 + no kv = 16 bytes; room for 3.
        let mut c = PrefixCache::new(48);
        let (a, b, d, e) = ([1], [2], [3], [4]);
        c.insert(&a, &[1], t(4), vec![]);
        c.insert(&a, &[1, 1], t(4), vec![]);
        c.insert(&b, &[1], t(4), vec![]);
        assert_eq!(c.len(), 3);
        // Touch a's chain; b's entry becomes the oldest.
        assert_eq!(c.lookup(&a, &[1, 1, 1]).start, 2);
        c.insert(&a, &[1, 1, 1], t(4), vec![]);
        assert_eq!(c.len(), 3);
        assert!(!c.contains(&b, &[1]));
        assert_eq!(c.used_bytes(), 48);
        // Evicting [1, 1] also drops [1, 1, 1], unreachable without it.
        c.insert(&d, &[1], t(4), vec![]);
        assert!(c.contains(&a, &[1]) && !c.contains(&a, &[1, 1]));
        assert!(!c.contains(&a, &[1, 1, 1]));
        assert_eq!(c.stats().evicted, 3);
        assert_eq!(c.used_bytes(), 32);
        // Larger than the budget: not kept. Forget frees everything of a prompt.
        c.insert(&e, &[1], t(100), vec![]);
        assert!(!c.contains(&e, &[1]));
        c.forget(&a);
        assert_eq!(c.used_bytes(), 16);
        assert_eq!(c.len(), 1);
        assert_eq!(PrefixCache::new(0).budget_bytes(), 0);
    }
}
