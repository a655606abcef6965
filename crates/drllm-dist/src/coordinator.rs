//! The coordinator's core: the task list, the lease table and the dataset, driven by worker
//! requests and reports. It validates every result before accepting it, buffers accepted rows and
//! commits them as Parquet parts, records samples that cannot be searched, and counts what it
//! refused. It is synchronous and takes time as an argument, so the transport (gRPC, or an
//! in-process channel in tests) wraps it in one task that owns it.
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::lease::{Accept, Counts, Lease, LeaseConfig, LeaseError, LeaseTable};
use drllm_dataset::{Dataset, DatasetError, FailedSample, Manifest, PathRecord};

/// One entry of the run's task list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkSample {
    /// Task name (partition of the output).
    pub task: String,
    /// Split the sample comes from.
    pub split: String,
    /// Sample id in that task.
    pub sample_id: String,
}

/// What a worker reports for one sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The search finished: its row.
    Record(Box<PathRecord>),
    /// The sample cannot be searched (e.g. its prompt exceeds the context); not retried.
    Failed(String),
}

/// Why a report was refused (the run goes on; the sample stays leased until its lease expires).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Lease bookkeeping refused it (unknown/expired lease, other holder, sample not leased).
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The index is outside the task list.
    #[error("sample index {0} is outside the task list")]
    UnknownSample(usize),
    /// The row does not match the sample or the model.
    #[error("result for {task}/{sample_id} is invalid: {msg}")]
    Invalid {
        /// Task of the leased sample.
        task: String,
        /// Id of the leased sample.
        sample_id: String,
        /// What is wrong.
        msg: String,
    },
    /// Writing the dataset failed: the run must stop (everything committed before stays).
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// Counters beyond the lease table's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoordinatorCounts {
    /// Lease table counters.
    pub lease: Counts,
    /// Results refused (forged, invalid, stale lease).
    pub refused: usize,
    /// Rows accepted but not yet written to a part.
    pub buffered: usize,
    /// Samples whose search found a path (accepted rows).
    pub found: usize,
}

/// The coordinator's state.
pub struct CoordinatorCore {
    samples: Vec<WorkSample>,
    table: LeaseTable,
    dataset: Dataset,
    num_layers: usize,
    part_rows: usize,
    buffer: BTreeMap<String, Vec<PathRecord>>,
    buffered: usize,
    refused: usize,
    found: usize,
}

impl CoordinatorCore {
    /// A run over `samples` into `dataset` (samples it already holds are not handed out), for a
    /// model of `num_layers` blocks; accepted rows are written in parts of about `part_rows`.
    pub fn new(
        samples: Vec<WorkSample>,
        dataset: Dataset,
        num_layers: usize,
        lease: LeaseConfig,
        part_rows: usize,
    ) -> Self {
        let failed: HashSet<(String, String)> = dataset
            .manifest()
            .failed
            .iter()
            .map(|f| (f.task.clone(), f.sample_id.clone()))
            .collect();
        let done = samples
            .iter()
            .enumerate()
            .filter_map(|(i, s)| dataset.is_committed(&s.task, &s.sample_id).then_some(i));
        let mut table = LeaseTable::new(samples.len(), done.collect::<Vec<_>>(), lease);
        for (i, s) in samples.iter().enumerate() {
            if failed.contains(&(s.task.clone(), s.sample_id.clone())) {
                table.failed(i);
            }
        }
        CoordinatorCore {
            samples,
            table,
            dataset,
            num_layers,
            part_rows: part_rows.max(1),
            buffer: BTreeMap::new(),
            buffered: 0,
            refused: 0,
            found: 0,
        }
    }

    /// The task list.
    pub fn samples(&self) -> &[WorkSample] {
        &self.samples
    }

    /// Counters.
    pub fn counts(&self) -> CoordinatorCounts {
        CoordinatorCounts {
            lease: self.table.counts(),
            refused: self.refused,
            buffered: self.buffered,
            found: self.found,
        }
    }

    /// Whether every sample has a final outcome (rows may still be buffered: call
    /// [`CoordinatorCore::finish`]).
    pub fn is_done(&self) -> bool {
        self.table.is_done()
    }

    /// A worker asks for work (also its heartbeat).
    pub fn lease(&mut self, worker: &str, max_samples: usize, now: Duration) -> Option<Lease> {
        self.table.request(worker, max_samples, now)
    }

    /// A worker is alive and busy.
    pub fn heartbeat(&mut self, worker: &str, now: Duration) {
        self.table.heartbeat(worker, now);
    }

    /// Expires overdue leases; returns their ids.
    pub fn tick(&mut self, now: Duration) -> Vec<u64> {
        self.table.expire(now)
    }

    /// A worker is known gone: its leases are reissued now.
    pub fn worker_gone(&mut self, worker: &str) -> Vec<u64> {
        self.table.worker_gone(worker)
    }

    /// A worker's result for sample `index` under lease `lease`. Returns whether it was new
    /// (`Accept::Commit`) or a late duplicate (dropped).
    pub fn report(
        &mut self,
        worker: &str,
        lease: u64,
        index: usize,
        outcome: Outcome,
    ) -> Result<Accept, ReportError> {
        let refuse = |s: &mut Self, e: ReportError| {
            s.refused += 1;
            Err(e)
        };
        let Some(sample) = self.samples.get(index).cloned() else {
            return refuse(self, ReportError::UnknownSample(index));
        };
        let accept = match self.table.check(worker, lease, index) {
            Ok(a) => a,
            Err(e) => return refuse(self, e.into()),
        };
        if accept == Accept::Duplicate {
            self.table.committed(index);
            return Ok(Accept::Duplicate);
        }
        match outcome {
            Outcome::Record(rec) => {
                let invalid = |msg: String| ReportError::Invalid {
                    task: sample.task.clone(),
                    sample_id: sample.sample_id.clone(),
                    msg,
                };
                if rec.task != sample.task || rec.sample_id != sample.sample_id {
                    return refuse(
                        self,
                        invalid(format!(
                            "the row is for {}/{}, not the leased sample",
                            rec.task, rec.sample_id
                        )),
                    );
                }
                if let Err(e) = rec.validate(self.num_layers) {
                    return refuse(self, invalid(e.to_string()));
                }
                self.found += rec.found as usize;
                self.table.committed(index);
                self.buffered += 1;
                let part = self.buffer.entry(sample.task.clone()).or_default();
                part.push(*rec);
                if part.len() >= self.part_rows {
                    self.flush_task(&sample.task)?;
                }
            }
            Outcome::Failed(error) => {
                self.table.failed(index);
                self.dataset.record_failure(FailedSample {
                    task: sample.task,
                    sample_id: sample.sample_id,
                    error,
                })?;
            }
        }
        Ok(Accept::Commit)
    }

    fn flush_task(&mut self, task: &str) -> Result<(), DatasetError> {
        if let Some(rows) = self.buffer.remove(task) {
            if let Err(e) = self.dataset.commit(task, &rows) {
                // Keep the rows: a later flush may succeed (e.g. after space is freed).
                self.buffer.insert(task.to_string(), rows);
                return Err(e);
            }
            self.buffered -= rows.len();
        }
        Ok(())
    }

    /// Writes every buffered row (one part per task).
    pub fn flush(&mut self) -> Result<(), DatasetError> {
        let tasks: Vec<String> = self.buffer.keys().cloned().collect();
        for t in tasks {
            self.flush_task(&t)?;
        }
        Ok(())
    }

    /// Flushes; when every sample has its outcome, marks the dataset complete. Returns the
    /// manifest.
    pub fn finish(mut self) -> Result<Manifest, DatasetError> {
        self.flush()?;
        if self.table.is_done() {
            self.dataset.finish()?;
        }
        Ok(self.dataset.manifest().clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use drllm_dataset::fixtures::row;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    pub(crate) fn work(n: usize) -> Vec<WorkSample> {
        (0..n)
            .map(|i| WorkSample {
                task: "arc_easy".into(),
                split: "train".into(),
                sample_id: format!("s{i}"),
            })
            .collect()
    }

    /// A core over `n` samples: 3 samples per lease, 10 s lease timeout, parts of 4 rows.
    pub(crate) fn core(out: &std::path::Path, n: usize) -> CoordinatorCore {
        let ds = Dataset::open(out, "fp", serde_json::json!({"n": n}), false).unwrap();
        let cfg = LeaseConfig {
            samples_per_lease: 3,
            timeout: secs(10),
            max_attempts: 3,
        };
        CoordinatorCore::new(work(n), ds, 30, cfg, 4)
    }

    fn result(i: usize) -> Outcome {
        Outcome::Record(Box::new(row(
            "arc_easy",
            &format!("s{i}"),
            i.is_multiple_of(2),
        )))
    }

    #[test]
    fn forged_invalid_and_late_results_are_refused_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = core(dir.path(), 6);
        let a = c.lease("a", 8, secs(0)).unwrap();
        let b = c.lease("b", 8, secs(0)).unwrap();
        assert_eq!(
            (a.samples.clone(), b.samples.clone()),
            (vec![0, 1, 2], vec![3, 4, 5])
        );
        // b reports a's sample under its own lease, and under a's lease.
        assert!(matches!(
            c.report("b", b.id, 0, result(0)),
            Err(ReportError::Lease(LeaseError::NotInLease { .. }))
        ));
        assert!(matches!(
            c.report("b", a.id, 0, result(0)),
            Err(ReportError::Lease(LeaseError::WrongWorker { .. }))
        ));
        // A row for another sample, or with a path of the wrong length.
        let e = c.report("a", a.id, 0, result(1)).unwrap_err();
        assert!(e.to_string().contains("not the leased sample"), "{e}");
        let mut bad = row("arc_easy", "s0", true);
        bad.best_path = Some(drllm_path::LayerPath::all_ones(12));
        let e = c
            .report("a", a.id, 0, Outcome::Record(Box::new(bad)))
            .unwrap_err();
        assert!(e.to_string().contains("12 counts"), "{e}");
        assert!(matches!(
            c.report("a", a.id, 99, result(0)),
            Err(ReportError::UnknownSample(99))
        ));
        assert_eq!(c.counts().refused, 5);
        // Honest results; a repeated one is a duplicate.
        for i in 0..3 {
            assert_eq!(c.report("a", a.id, i, result(i)).unwrap(), Accept::Commit);
        }
        assert_eq!(
            c.report("a", a.id, 1, result(1)).unwrap(),
            Accept::Duplicate
        );
        // b dies silently; its samples come back to a after the timeout.
        assert!(c.lease("a", 8, secs(5)).is_none());
        let again = c.lease("a", 8, secs(11)).unwrap();
        assert_eq!(again.samples, [3, 4, 5]);
        assert_eq!(again.attempt, 2);
        c.report("a", again.id, 3, Outcome::Failed("prompt too long".into()))
            .unwrap();
        for i in 4..6 {
            c.report("a", again.id, i, result(i)).unwrap();
        }
        // b's late result for a committed sample: dropped.
        assert!(c.report("b", b.id, 4, result(4)).is_ok());
        assert!(c.is_done());
        let n = c.counts();
        assert_eq!((n.lease.committed, n.lease.failed), (5, 1));
        assert_eq!(n.lease.duplicates, 2);
        let m = c.finish().unwrap();
        assert!(m.complete);
        assert_eq!(m.rows, 5);
        assert_eq!(m.failed[0].sample_id, "s3");
        assert!(dir.path().join("_SUCCESS").exists());
    }

    #[test]
    fn a_restart_resumes_without_searching_committed_or_failed_samples_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = core(dir.path(), 10);
        let l = c.lease("a", 3, secs(0)).unwrap();
        for &i in &l.samples[..2] {
            c.report("a", l.id, i, result(i)).unwrap();
        }
        c.report("a", l.id, l.samples[2], Outcome::Failed("too long".into()))
            .unwrap();
        // Flushed rows survive; a crash loses only what was never written (searched again).
        c.flush().unwrap();
        let l2 = c.lease("a", 3, secs(1)).unwrap();
        c.report("a", l2.id, l2.samples[0], result(l2.samples[0]))
            .unwrap();
        drop(c);
        let mut c = core(dir.path(), 10);
        assert_eq!(c.counts().lease.committed, 2);
        assert_eq!(c.counts().lease.failed, 1);
        let mut seen = vec![];
        while let Some(l) = c.lease("b", 3, secs(0)) {
            for &i in &l.samples {
                c.report("b", l.id, i, result(i)).unwrap();
                seen.push(i);
            }
        }
        assert_eq!(seen, (3..10).collect::<Vec<_>>());
        let m = c.finish().unwrap();
        assert_eq!(m.rows, 9);
        assert!(m.complete);
    }
}
