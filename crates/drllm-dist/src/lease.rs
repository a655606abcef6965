//! Leases: batches of samples handed to a worker until a deadline. A worker's lease request
//! doubles as its heartbeat (it extends that worker's open leases); a lease whose deadline
//! passes is expired and its uncommitted samples go back to the front of the queue with the
//! attempt number raised. Every lease carries a monotonic id (a fencing token): results are
//! accepted only for samples of a lease that is still open, and each sample is committed once.
//!
//! Time is passed in as the [`Duration`] since the run started, so the table never reads a clock.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

/// How work is cut into leases.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    /// Most samples per lease.
    pub samples_per_lease: usize,
    /// A lease expires this long after the holder's last request/heartbeat.
    pub timeout: Duration,
    /// A sample handed out this many times without a result is given up (recorded as failed).
    pub max_attempts: u32,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            samples_per_lease: 8,
            timeout: Duration::from_secs(120),
            max_attempts: 3,
        }
    }
}

/// Work handed to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Monotonic id (fencing token): larger = issued later.
    pub id: u64,
    /// Holder.
    pub worker: String,
    /// Sample indices (into the coordinator's task list).
    pub samples: Vec<usize>,
    /// 1 for first-time work; n when some sample is handed out for the n-th time.
    pub attempt: u32,
    /// When the lease expires unless the holder is heard from.
    pub deadline: Duration,
}

/// What became of a reported result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// First result for the sample: commit it.
    Commit,
    /// The sample was already committed (a late or repeated result): drop it.
    Duplicate,
}

/// A result the table refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No open lease has this id (expired and reissued, finished, or never issued).
    #[error("lease {0} is not open (expired, finished or unknown)")]
    UnknownLease(u64),
    /// The lease is open but belongs to another worker.
    #[error("lease {lease} belongs to worker {holder:?}, not {worker:?}")]
    WrongWorker {
        /// Lease id.
        lease: u64,
        /// Its holder.
        holder: String,
        /// The worker that reported.
        worker: String,
    },
    /// The sample is not part of the lease.
    #[error("sample {sample} is not part of lease {lease}")]
    NotInLease {
        /// Lease id.
        lease: u64,
        /// Sample index.
        sample: usize,
    },
}

/// Progress counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Samples in the run.
    pub total: usize,
    /// Samples with a committed result (including those committed by an earlier run).
    pub committed: usize,
    /// Samples given up after `max_attempts` hand-outs, or failed permanently.
    pub failed: usize,
    /// Samples waiting to be handed out.
    pub queued: usize,
    /// Samples in open leases.
    pub leased: usize,
    /// Results dropped because their sample was already committed.
    pub duplicates: usize,
    /// Leases expired (their samples were queued again).
    pub expired_leases: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Leased(u64),
    Committed,
    Failed,
}

/// The coordinator's queue and lease table.
#[derive(Debug)]
pub struct LeaseTable {
    cfg: LeaseConfig,
    state: Vec<State>,
    /// Times each sample has been handed out.
    attempts: Vec<u32>,
    queue: VecDeque<usize>,
    open: BTreeMap<u64, Lease>,
    next_id: u64,
    counts: Counts,
    /// Open lease ids per worker.
    by_worker: HashMap<String, Vec<u64>>,
}

impl LeaseTable {
    /// A table over samples `0..total`, of which `done` were committed by an earlier run.
    pub fn new(total: usize, done: impl IntoIterator<Item = usize>, cfg: LeaseConfig) -> Self {
        let mut state = vec![State::Queued; total];
        let mut committed = 0;
        for i in done {
            if let Some(s) = state.get_mut(i) {
                if *s != State::Committed {
                    *s = State::Committed;
                    committed += 1;
                }
            }
        }
        let queue: VecDeque<usize> = (0..total).filter(|&i| state[i] == State::Queued).collect();
        LeaseTable {
            counts: Counts {
                total,
                committed,
                queued: queue.len(),
                ..Counts::default()
            },
            cfg,
            state,
            attempts: vec![0; total],
            queue,
            open: BTreeMap::new(),
            next_id: 1,
            by_worker: HashMap::new(),
        }
    }

    /// Progress counters.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Whether every sample is committed or given up.
    pub fn is_done(&self) -> bool {
        self.counts.committed + self.counts.failed == self.counts.total
    }

    /// An open lease by id.
    pub fn lease(&self, id: u64) -> Option<&Lease> {
        self.open.get(&id)
    }

    /// Hears from `worker` at `now`: its open leases get a new deadline.
    pub fn heartbeat(&mut self, worker: &str, now: Duration) {
        let deadline = now + self.cfg.timeout;
        for id in self.by_worker.get(worker).into_iter().flatten() {
            if let Some(l) = self.open.get_mut(id) {
                l.deadline = deadline;
            }
        }
    }

    /// A worker asks for work at `now` (also a heartbeat). `None` when nothing is queued (the
    /// worker should ask again later unless [`LeaseTable::is_done`]).
    pub fn request(&mut self, worker: &str, max_samples: usize, now: Duration) -> Option<Lease> {
        self.expire(now);
        self.heartbeat(worker, now);
        let n = max_samples.min(self.cfg.samples_per_lease).max(1);
        let mut samples = Vec::with_capacity(n);
        while samples.len() < n {
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            if self.state[i] != State::Queued {
                continue;
            }
            if self.attempts[i] >= self.cfg.max_attempts {
                self.state[i] = State::Failed;
                self.counts.failed += 1;
                self.counts.queued -= 1;
                continue;
            }
            samples.push(i);
        }
        if samples.is_empty() {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        for &i in &samples {
            self.state[i] = State::Leased(id);
            self.attempts[i] += 1;
        }
        self.counts.queued -= samples.len();
        self.counts.leased += samples.len();
        let attempt = samples.iter().map(|&i| self.attempts[i]).max().unwrap_or(1);
        let lease = Lease {
            id,
            worker: worker.to_string(),
            samples,
            attempt,
            deadline: now + self.cfg.timeout,
        };
        self.open.insert(id, lease.clone());
        self.by_worker
            .entry(worker.to_string())
            .or_default()
            .push(id);
        Some(lease)
    }

    /// Checks a result of `worker` for `sample` under lease `lease` before anything is written:
    /// [`Accept::Commit`] for the first result of an open lease's sample. Call
    /// [`LeaseTable::committed`] once the result is durably written.
    pub fn check(&self, worker: &str, lease: u64, sample: usize) -> Result<Accept, LeaseError> {
        if self.state.get(sample) == Some(&State::Committed) {
            return Ok(Accept::Duplicate);
        }
        let l = self
            .open
            .get(&lease)
            .ok_or(LeaseError::UnknownLease(lease))?;
        if l.worker != worker {
            return Err(LeaseError::WrongWorker {
                lease,
                holder: l.worker.clone(),
                worker: worker.to_string(),
            });
        }
        if self.state.get(sample) != Some(&State::Leased(lease)) {
            return Err(LeaseError::NotInLease { lease, sample });
        }
        Ok(Accept::Commit)
    }

    /// Records that `sample`'s result is durably committed; a lease with no samples left closes.
    /// A repeated call counts a duplicate.
    pub fn committed(&mut self, sample: usize) {
        match self.state.get(sample).copied() {
            Some(State::Committed) => self.counts.duplicates += 1,
            Some(s) => {
                if let State::Leased(id) = s {
                    self.counts.leased -= 1;
                    self.release(id, sample);
                } else if s == State::Queued {
                    self.counts.queued -= 1;
                } else {
                    self.counts.failed -= 1;
                }
                self.state[sample] = State::Committed;
                self.counts.committed += 1;
            }
            None => {}
        }
    }

    /// Gives `sample` up (the worker reported an error that retrying cannot fix, e.g. a prompt
    /// longer than the model's context, or an earlier run recorded it failed); it is not handed
    /// out again.
    pub fn failed(&mut self, sample: usize) {
        match self.state.get(sample).copied() {
            Some(State::Leased(id)) => {
                self.counts.leased -= 1;
                self.release(id, sample);
            }
            // Left in the queue; `request` skips it.
            Some(State::Queued) => self.counts.queued -= 1,
            _ => return,
        }
        self.state[sample] = State::Failed;
        self.counts.failed += 1;
    }

    /// Drops `sample` from lease `id`, closing the lease when it is empty.
    fn release(&mut self, id: u64, sample: usize) {
        let Some(l) = self.open.get_mut(&id) else {
            return;
        };
        l.samples.retain(|&s| s != sample);
        if l.samples.is_empty() {
            let worker = l.worker.clone();
            self.open.remove(&id);
            if let Some(ids) = self.by_worker.get_mut(&worker) {
                ids.retain(|&x| x != id);
            }
        }
    }

    /// Expires every lease whose deadline is before `now`; their uncommitted samples go to the
    /// front of the queue. Returns the expired lease ids.
    pub fn expire(&mut self, now: Duration) -> Vec<u64> {
        let dead: Vec<u64> = self
            .open
            .values()
            .filter(|l| l.deadline < now)
            .map(|l| l.id)
            .collect();
        for id in &dead {
            self.drop_lease(*id);
        }
        dead
    }

    /// A worker is known gone (its process exited, or it said goodbye): its open leases expire
    /// now. Returns their ids.
    pub fn worker_gone(&mut self, worker: &str) -> Vec<u64> {
        let ids = self.by_worker.remove(worker).unwrap_or_default();
        for &id in &ids {
            self.drop_lease(id);
        }
        ids
    }

    fn drop_lease(&mut self, id: u64) {
        let Some(l) = self.open.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_worker.get_mut(&l.worker) {
            ids.retain(|&x| x != id);
        }
        // Back to the front, in their original order.
        for &i in l.samples.iter().rev() {
            if self.state[i] == State::Leased(id) {
                self.state[i] = State::Queued;
                self.queue.push_front(i);
                self.counts.leased -= 1;
                self.counts.queued += 1;
            }
        }
        self.counts.expired_leases += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn cfg(per: usize) -> LeaseConfig {
        LeaseConfig {
            samples_per_lease: per,
            timeout: secs(10),
            max_attempts: 3,
        }
    }

    fn commit(t: &mut LeaseTable, w: &str, lease: u64, s: usize) -> Result<Accept, LeaseError> {
        let a = t.check(w, lease, s)?;
        t.committed(s);
        Ok(a)
    }

    #[test]
    fn resumed_runs_skip_committed_samples() {
        let mut t = LeaseTable::new(5, [1, 3, 3, 9], cfg(10));
        assert_eq!(t.counts().committed, 2);
        let l = t.request("w", 10, secs(0)).unwrap();
        assert_eq!(l.samples, [0, 2, 4]);
        assert_eq!(l.attempt, 1);
        assert!(t.request("w", 10, secs(0)).is_none());
    }

    #[test]
    fn expired_leases_are_reissued_with_a_new_fencing_token() {
        let mut t = LeaseTable::new(4, [], cfg(2));
        let a = t.request("a", 8, secs(0)).unwrap();
        assert_eq!(a.samples, [0, 1]);
        assert_eq!(commit(&mut t, "a", a.id, 0), Ok(Accept::Commit));
        // b heartbeats (asks) while a stays silent past its deadline.
        let b = t.request("b", 8, secs(5)).unwrap();
        assert_eq!(b.samples, [2, 3]);
        t.heartbeat("b", secs(9));
        let c = t.request("c", 8, secs(11)).unwrap();
        assert_eq!(c.samples, [1], "a's unfinished sample comes back first");
        assert_eq!(c.attempt, 2);
        assert!(c.id > b.id && b.id > a.id);
        // a's late result: its lease is gone; the sample belongs to c now.
        assert_eq!(t.check("a", a.id, 1), Err(LeaseError::UnknownLease(a.id)));
        assert_eq!(
            t.check("b", c.id, 1),
            Err(LeaseError::WrongWorker {
                lease: c.id,
                holder: "c".into(),
                worker: "b".into()
            })
        );
        assert_eq!(
            t.check("b", b.id, 1),
            Err(LeaseError::NotInLease {
                lease: b.id,
                sample: 1
            })
        );
        assert_eq!(commit(&mut t, "c", c.id, 1), Ok(Accept::Commit));
        // b kept its lease thanks to the heartbeat (deadline 19).
        assert_eq!(commit(&mut t, "b", b.id, 2), Ok(Accept::Commit));
        assert_eq!(commit(&mut t, "b", b.id, 3), Ok(Accept::Commit));
        assert!(t.is_done());
        // Late duplicate of a committed sample: dropped and counted.
        assert_eq!(t.check("a", a.id, 0), Ok(Accept::Duplicate));
        t.committed(0);
        let n = t.counts();
        assert_eq!((n.committed, n.duplicates, n.expired_leases), (4, 1, 1));
        assert_eq!((n.queued, n.leased), (0, 0));
    }

    #[test]
    fn poison_samples_are_given_up_after_max_attempts() {
        let mut t = LeaseTable::new(1, [], cfg(1));
        for k in 0..3u64 {
            let l = t.request("w", 1, secs(100 * k)).unwrap();
            assert_eq!(l.attempt, k as u32 + 1);
            t.worker_gone("w");
        }
        assert!(t.request("w", 1, secs(400)).is_none());
        assert!(t.is_done());
        assert_eq!(t.counts().failed, 1);
        let mut t = LeaseTable::new(2, [], cfg(2));
        let l = t.request("w", 2, secs(0)).unwrap();
        t.failed(0);
        assert_eq!(commit(&mut t, "w", l.id, 1), Ok(Accept::Commit));
        assert!(t.is_done());
        assert!(t.lease(l.id).is_none(), "an emptied lease closes");
    }

    proptest! {
        /// Whatever workers do (ask, finish some samples, go silent, die), every sample ends
        /// committed exactly once or given up, and the counters add up at every step.
        #[test]
        fn every_sample_ends_exactly_once(
            total in 0usize..40,
            per in 1usize..6,
            ops in proptest::collection::vec((0u8..4, 0usize..3, 0u64..30), 1..200),
        ) {
            let mut t = LeaseTable::new(total, [], LeaseConfig { samples_per_lease: per, timeout: secs(10), max_attempts: 1000 });
            let workers = ["w0", "w1", "w2"];
            let mut held: Vec<Vec<Lease>> = vec![vec![]; 3];
            let mut now = secs(0);
            let mut commits = vec![0u32; total];
            let step = |t: &mut LeaseTable, op: u8, w: usize, dt: u64, held: &mut Vec<Vec<Lease>>, now: &mut Duration, commits: &mut Vec<u32>| {
                *now += secs(dt);
                match op {
                    0 => if let Some(l) = t.request(workers[w], per, *now) { held[w].push(l) },
                    1 => if let Some(l) = held[w].pop() {
                        for &s in &l.samples {
                            if t.check(workers[w], l.id, s) == Ok(Accept::Commit) {
                                t.committed(s);
                                commits[s] += 1;
                            }
                        }
                    },
                    2 => { t.worker_gone(workers[w]); held[w].clear(); }
                    _ => { t.expire(*now); }
                }
                let c = t.counts();
                assert_eq!(c.committed + c.failed + c.queued + c.leased, c.total);
            };
            for (op, w, dt) in ops {
                step(&mut t, op, w, dt, &mut held, &mut now, &mut commits);
            }
            // Drain: one well-behaved worker finishes everything.
            for _ in 0..total + 1 {
                now += secs(100);
                if let Some(l) = t.request("final", per, now) {
                    for &s in &l.samples {
                        prop_assert_eq!(t.check("final", l.id, s), Ok(Accept::Commit));
                        t.committed(s);
                        commits[s] += 1;
                    }
                }
            }
            prop_assert!(t.is_done());
            prop_assert!(commits.iter().all(|&c| c == 1), "{:?}", commits);
        }
    }
}
