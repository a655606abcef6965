//! The jobs waiting for the running batch, and the bounds on what joins it at a step.
use tokio::sync::mpsc;

use super::{EngineConfig, Job};
use crate::metrics::Metrics;

/// The handlers' bounded channel, and the one job that did not fit the token bound at the last
/// step (it goes first at the next).
pub(super) struct Queue {
    jobs: mpsc::Receiver<Job>,
    waiting: Option<Job>,
}

impl Queue {
    pub(super) fn new(jobs: mpsc::Receiver<Job>) -> Queue {
        Queue {
            jobs,
            waiting: None,
        }
    }

    /// Blocks until a job is there (at once when one waits); `None` once every sender is gone.
    pub(super) fn wait(&mut self) -> Option<()> {
        if self.waiting.is_none() {
            self.waiting = Some(self.jobs.blocking_recv()?);
        }
        Some(())
    }

    /// Newcomers for a batch of `rows` rows holding `held` tokens (prompt + budget each), up to
    /// `cfg`'s bounds on rows and tokens; a job alone over the token bound still runs (the
    /// bound would otherwise starve it). Jobs whose client left are dropped and counted.
    pub(super) fn take(
        &mut self,
        rows: usize,
        mut held: usize,
        cfg: &EngineConfig,
        m: &Metrics,
    ) -> Vec<Job> {
        let mut new: Vec<Job> = vec![];
        while rows + new.len() < cfg.max_batch.max(1) {
            let Some(j) = self.waiting.take().or_else(|| self.jobs.try_recv().ok()) else {
                break;
            };
            if j.events.is_closed() {
                if j.cancelled() {
                    m.cancelled.inc();
                }
                continue;
            }
            let need = j.prompt.len().saturating_add(j.max_tokens);
            if held.saturating_add(need) > cfg.max_batch_tokens && !(rows == 0 && new.is_empty()) {
                self.waiting = Some(j);
                break;
            }
            held = held.saturating_add(need);
            new.push(j);
        }
        new
    }

    /// Every job queued now, the waiting one first.
    pub(super) fn drain(&mut self) -> Vec<Job> {
        let mut out: Vec<Job> = self.waiting.take().into_iter().collect();
        while let Ok(j) = self.jobs.try_recv() {
            out.push(j);
        }
        out
    }

    /// Blocks for the next job; `None` once every sender is gone.
    pub(super) fn next(&mut self) -> Option<Job> {
        self.waiting.take().or_else(|| self.jobs.blocking_recv())
    }

    /// Jobs queued or waiting.
    pub(super) fn len(&self) -> usize {
        self.jobs.len() + usize::from(self.waiting.is_some())
    }
}
