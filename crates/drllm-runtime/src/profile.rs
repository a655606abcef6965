//! Where a thread's time goes, by phase of path evaluation (prefill compute, prefix-cache copies
//! in and out, batch reshaping, decode steps, grading, the search's own bookkeeping), so the
//! search benchmarks can account for the time per evaluation and the next gain is chosen from
//! data. Time is exclusive: a phase entered inside another pauses the outer one, so the phases
//! of a run add up to the time spent inside any of them; the rest of the wall time is
//! scheduling and idling.
//!
//! Off unless [`start`]ed on the thread: a span then costs one thread-local read. On a GPU,
//! kernels run asynchronously and a phase measures what its host thread waited for (a phase
//! that reads results back, such as the argmax after a decode step, absorbs the queued work);
//! on the CPU the figures are exact.
//!
//! Written by hand: `tracing` spans could carry the same timings, but only through a
//! subscriber layer that every binary would have to install next to its logging; this is a
//! counter, not a log.
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// A phase of path evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Block applications over prompt tokens (and the LM head after them).
    Prefill,
    /// Looking up cached prefixes and copying their states into a batch.
    CacheIn,
    /// Copying new prefix states out of a batch into the cache.
    CacheOut,
    /// Reshaping batches: joining prefill groups, dropping ended rows, trimming padding.
    Batch,
    /// Decode steps: one token per undecided row, and the next-token choice.
    Decode,
    /// Scoring choice continuations after a prefill (cloze).
    Choices,
    /// Deciding rewards from generated tokens (parsing and grading).
    Grade,
    /// The search's own work: choosing the next path, backing up rewards.
    Search,
}

impl Phase {
    /// Every phase, in report order.
    pub const ALL: [Phase; 8] = [
        Phase::Prefill,
        Phase::CacheIn,
        Phase::CacheOut,
        Phase::Batch,
        Phase::Decode,
        Phase::Choices,
        Phase::Grade,
        Phase::Search,
    ];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::CacheIn => "cache in",
            Phase::CacheOut => "cache out",
            Phase::Batch => "batch reshape",
            Phase::Decode => "decode",
            Phase::Choices => "choices",
            Phase::Grade => "grade",
            Phase::Search => "search",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Time and entries per phase, since [`start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Profile {
    time: [Duration; Phase::ALL.len()],
    entries: [u64; Phase::ALL.len()],
}

impl Profile {
    /// Exclusive time spent in `phase`.
    pub fn time(&self, phase: Phase) -> Duration {
        self.time[phase.index()]
    }

    /// Times `phase` was entered.
    pub fn entries(&self, phase: Phase) -> u64 {
        self.entries[phase.index()]
    }

    /// Time spent inside any phase.
    pub fn total(&self) -> Duration {
        self.time.iter().sum()
    }
}

struct State {
    profile: Profile,
    stack: Vec<Phase>,
    since: Instant,
}

impl State {
    /// Charges the time since the last change to the innermost phase.
    fn charge(&mut self, now: Instant) {
        if let Some(&top) = self.stack.last() {
            self.profile.time[top.index()] += now - self.since;
        }
        self.since = now;
    }
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Starts (or restarts from zero) profiling on this thread.
pub fn start() {
    STATE.with(|s| {
        *s.borrow_mut() = Some(State {
            profile: Profile::default(),
            stack: vec![],
            since: Instant::now(),
        })
    });
}

/// Stops profiling on this thread and returns what was measured since [`start`] (all zero if
/// it was never started). Phases still open are charged up to now.
pub fn stop() -> Profile {
    STATE.with(|s| {
        s.borrow_mut()
            .take()
            .map(|mut st| {
                st.charge(Instant::now());
                st.profile
            })
            .unwrap_or_default()
    })
}

/// Enters `phase` until the returned guard drops (exclusive of phases entered inside it).
#[must_use = "the phase ends when the guard drops"]
pub fn span(phase: Phase) -> Span {
    let on = STATE.with(|s| match s.borrow_mut().as_mut() {
        Some(st) => {
            st.charge(Instant::now());
            st.stack.push(phase);
            st.profile.entries[phase.index()] += 1;
            true
        }
        None => false,
    });
    Span { on }
}

/// Guard of an entered phase (see [`span`]).
pub struct Span {
    on: bool,
}

impl Drop for Span {
    fn drop(&mut self) {
        if !self.on {
            return;
        }
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.charge(Instant::now());
                st.stack.pop();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {}
    }

    #[test]
    fn nested_phases_are_charged_exclusively() {
        start();
        {
            let _p = span(Phase::Prefill);
            busy(Duration::from_millis(20));
            {
                let _c = span(Phase::CacheIn);
                busy(Duration::from_millis(10));
            }
        }
        busy(Duration::from_millis(10)); // outside any phase: not charged
        let p = stop();
        let ms = |ph| p.time(ph).as_secs_f64() * 1e3;
        assert!((20.0..30.0).contains(&ms(Phase::Prefill)), "{p:?}");
        assert!((10.0..20.0).contains(&ms(Phase::CacheIn)), "{p:?}");
        assert!(p.total() < Duration::from_millis(45), "{p:?}");
        assert_eq!(
            (p.entries(Phase::Prefill), p.entries(Phase::CacheIn)),
            (1, 1)
        );
        assert_eq!(p.entries(Phase::Decode), 0);
    }

    #[test]
    fn spans_cost_nothing_when_off() {
        let _ = stop();
        {
            let _p = span(Phase::Decode);
        }
        assert_eq!(stop(), Profile::default());
    }
}
