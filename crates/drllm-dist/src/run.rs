//! One coordinator run from start to end: the actor and the gRPC service, the local workers, the
//! progress display, and when to stop (every sample has an outcome; a stop signal; a fatal
//! dataset error; every local worker gone with no remote one allowed). The coordinator's binary
//! only parses flags, opens the dataset and prints the outcome; tests and benchmarks drive the
//! same run in one process.
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use drllm_dataset::{DatasetError, Manifest};
use tokio::sync::oneshot;

use crate::coordinator::{CoordinatorCore, WorkSample};
use crate::server::{
    bind, serve, spawn_actor, CoordinatorHandle, Farewell, Progress, Service, ServiceConfig,
};
use crate::supervisor::{LocalWorkerSpec, LocalWorkers, SupervisorError};

/// Errors of a run. Rows committed before any of them are kept; running again resumes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listen address cannot be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A signal handler cannot be installed.
    #[error("installing the {signal} handler: {source}")]
    Signal {
        /// SIGINT or SIGTERM.
        signal: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Local workers cannot be started.
    #[error(transparent)]
    Workers(#[from] SupervisorError),
    /// The dataset failed while the run went on (e.g. the disk is full).
    #[error("the run stopped: {0} (everything committed before is kept)")]
    Fatal(String),
    /// Every local worker exited before the run finished, and no remote worker may join.
    #[error("every local worker exited before the run finished; see the logs in {}", .logs.display())]
    WorkersExited {
        /// The workers' log directory.
        logs: PathBuf,
    },
    /// Writing the last rows or the manifest failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The coordinator's task panicked (a bug).
    #[error("the coordinator task failed: {0}")]
    Task(String),
}

/// What a run needs besides the opened dataset inside `core`.
pub struct RunSpec {
    /// The lease table and dataset, resumed from what OUT holds.
    pub core: CoordinatorCore,
    /// The task list, in the order of `core`'s indices.
    pub samples: Vec<WorkSample>,
    /// What the service checks and hands out.
    pub service: ServiceConfig,
    /// Address to serve on (port 0 = any free port; [`Running::addr`] says which).
    pub listen: SocketAddr,
    /// Local workers to start (a count of 0 starts none).
    pub workers: LocalWorkerSpec,
    /// Whether workers started elsewhere may join. Without them a run whose local workers have
    /// all exited can never finish, so it stops with [`RunError::WorkersExited`].
    pub remote_workers: bool,
}

/// A finished (or interrupted) run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The dataset's final manifest.
    pub manifest: Manifest,
    /// Stopped by the stop future (e.g. SIGINT/SIGTERM) before every sample had an outcome.
    pub interrupted: bool,
    /// Wall time from [`Running::start`].
    pub elapsed: Duration,
}

/// A run in progress: serving, with its local workers started.
pub struct Running {
    addr: SocketAddr,
    handle: CoordinatorHandle,
    actor: tokio::task::JoinHandle<Result<Manifest, DatasetError>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    stop_server: oneshot::Sender<()>,
    farewell: Farewell,
    children: LocalWorkers,
    remote_workers: bool,
    lease_timeout: Duration,
    total: usize,
    started: Instant,
}

impl Running {
    /// Starts the actor, binds and serves, and starts the local workers (pointed at the bound
    /// address).
    pub async fn start(spec: RunSpec) -> Result<Running, RunError> {
        let started = Instant::now();
        let total = spec.samples.len();
        let (handle, actor) = spawn_actor(spec.core, &spec.service);
        let (listener, addr) = match bind(spec.listen).await {
            Ok(b) => b,
            Err(source) => {
                drop(handle);
                let _ = actor.await;
                return Err(RunError::Bind {
                    addr: spec.listen,
                    source,
                });
            }
        };
        let lease_timeout = spec.service.lease_timeout;
        let service = Service::new(handle.clone(), spec.service, spec.samples);
        let farewell = service.farewell();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(service, listener, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "serving");
        let children = match LocalWorkers::spawn(&spec.workers, addr) {
            Ok(c) => c,
            Err(e) => {
                let _ = stop_server.send(());
                let _ = server.await;
                drop(handle);
                let _ = actor.await;
                return Err(e.into());
            }
        };
        Ok(Running {
            addr,
            handle,
            actor,
            server,
            stop_server,
            farewell,
            children,
            remote_workers: spec.remote_workers,
            lease_timeout,
            total,
            started,
        })
    }

    /// The address workers connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shows progress until every sample has an outcome or `stop` resolves, then lets every
    /// worker hear that the run is over, stops serving and returns the final manifest.
    pub async fn finish(mut self, stop: impl Future<Output = ()>) -> Result<RunOutcome, RunError> {
        let mut view = ProgressView::new(self.total, self.handle.progress().borrow().clone());
        let mut progress = self.handle.progress();
        tokio::pin!(stop);
        let mut interrupted = false;
        loop {
            let p = progress.borrow_and_update().clone();
            if let Some(e) = &p.fatal {
                view.abandon();
                return Err(self.abort(RunError::Fatal(e.clone())).await);
            }
            view.show(&p, self.started.elapsed());
            if self.handle.is_done().await {
                break;
            }
            for (id, status) in self.children.newly_exited() {
                tracing::warn!(worker = %id, %status, log = %self.children.log_of(&id).display(), "local worker exited");
                self.handle.worker_gone(&id).await;
                self.farewell.gone(&id);
            }
            if self.children.all_exited() && !self.remote_workers {
                view.abandon();
                let logs = self.children.logs().to_path_buf();
                return Err(self.abort(RunError::WorkersExited { logs }).await);
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = &mut stop => {
                    interrupted = true;
                    break;
                }
            }
        }
        view.finish();
        if !interrupted {
            // Keep serving until every registered worker has heard that the run is over (a
            // worker busy on a lease whose samples others finished asks once it is done).
            let deadline = Instant::now()
                + self
                    .lease_timeout
                    .clamp(Duration::from_secs(10), Duration::from_secs(120));
            while !self.farewell.all_told() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            self.children.wait(deadline).await;
        }
        let _ = self.stop_server.send(());
        let _ = self.server.await;
        drop(self.handle);
        drop(self.children);
        let manifest = self
            .actor
            .await
            .map_err(|e| RunError::Task(e.to_string()))??;
        Ok(RunOutcome {
            manifest,
            interrupted,
            elapsed: self.started.elapsed(),
        })
    }

    /// Stops serving and the actor after an error, and returns the error.
    async fn abort(self, err: RunError) -> RunError {
        let _ = self.stop_server.send(());
        drop(self.handle);
        let _ = self.actor.await;
        err
    }
}

/// A future that resolves on the first SIGINT or SIGTERM: Ctrl-C, `kill`, and SLURM's warning
/// before preemption or the time limit all stop a run the same way (accepted rows committed;
/// running again resumes). The handlers are installed when this is called.
pub fn stop_signals() -> Result<impl Future<Output = ()>, RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(|source| RunError::Signal {
        signal: "SIGINT",
        source,
    })?;
    let mut term = signal(SignalKind::terminate()).map_err(|source| RunError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Progress on stderr: a bar with one line per worker on a terminal, else a log line every 10 s.
struct ProgressView {
    interactive: bool,
    multi: indicatif::MultiProgress,
    bar: indicatif::ProgressBar,
    workers: HashMap<String, indicatif::ProgressBar>,
    /// Outcomes and commits known at the start (a resumed run's rate counts only new ones).
    base_done: usize,
    base_committed: usize,
    last_log: Option<Instant>,
}

impl ProgressView {
    fn new(total: usize, at_start: Progress) -> ProgressView {
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let multi = indicatif::MultiProgress::new();
        let bar = multi.add(
            indicatif::ProgressBar::new(total as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} samples [{elapsed} < {eta}] {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            ),
        );
        if !interactive {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let c = at_start.counts.lease;
        ProgressView {
            interactive,
            multi,
            bar,
            workers: HashMap::new(),
            base_done: c.committed + c.failed,
            base_committed: c.committed,
            last_log: None,
        }
    }

    fn show(&mut self, p: &Progress, elapsed: Duration) {
        let c = p.counts.lease;
        let done = c.committed + c.failed;
        self.bar.set_position(done as u64);
        let rate = done.saturating_sub(self.base_done) as f64 / elapsed.as_secs_f64().max(1e-9);
        let found =
            p.counts.found as f64 / c.committed.saturating_sub(self.base_committed).max(1) as f64;
        self.bar.set_message(format!(
            "{rate:.2} samples/s, found {:.0}%, failed {}, leased {}, refused {}",
            100.0 * found,
            c.failed,
            c.leased,
            p.counts.refused
        ));
        for (w, n) in &p.per_worker {
            let line = self.workers.entry(w.clone()).or_insert_with(|| {
                let pb = self.multi.add(indicatif::ProgressBar::new_spinner());
                if !self.interactive {
                    pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                }
                pb
            });
            line.set_message(format!("{w}: {n} samples"));
        }
        let due = self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if !self.interactive && due {
            self.last_log = Some(Instant::now());
            tracing::info!(
                done,
                total = self.bar.length().unwrap_or(0),
                failed = c.failed,
                rate = format!("{rate:.2}"),
                workers = p.workers,
                "progress"
            );
        }
    }

    fn abandon(&self) {
        self.bar.abandon();
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::tests::{core, work};

    fn spec(out: &std::path::Path, n: usize, workers: LocalWorkerSpec, remote: bool) -> RunSpec {
        RunSpec {
            core: core(out, n),
            samples: work(n),
            service: ServiceConfig {
                token: None,
                model_fingerprint: "fp".into(),
                run_config_json: "{}".into(),
                heartbeat: Duration::from_secs(1),
                lease_timeout: Duration::from_secs(10),
                flush_every: Duration::from_secs(1),
            },
            listen: "127.0.0.1:0".parse().unwrap(),
            workers,
            remote_workers: remote,
        }
    }

    #[tokio::test]
    async fn a_stop_ends_the_run_as_interrupted_with_the_dataset_closed() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(spec(dir.path(), 5, LocalWorkerSpec::default(), true))
            .await
            .unwrap();
        assert_ne!(running.addr().port(), 0, "the bound port is reported");
        let out = running.finish(std::future::ready(())).await.unwrap();
        assert!(out.interrupted);
        assert!(!out.manifest.complete);
        assert_eq!(out.manifest.rows, 0);
        assert_eq!(drllm_dataset::read_manifest(dir.path()).unwrap().rows, 0);
    }

    #[tokio::test]
    async fn a_run_with_nothing_to_search_finishes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(spec(dir.path(), 0, LocalWorkerSpec::default(), false))
            .await
            .unwrap();
        let out = running.finish(std::future::pending()).await.unwrap();
        assert!(!out.interrupted && out.manifest.complete);
    }

    #[tokio::test]
    async fn local_workers_all_gone_stop_a_run_no_remote_worker_may_join() {
        let dir = tempfile::tempdir().unwrap();
        let workers = LocalWorkerSpec {
            bin: "/bin/true".into(),
            count: 2,
            device: "cpu".into(),
            logs: dir.path().join("_logs"),
            ..LocalWorkerSpec::default()
        };
        let running = Running::start(spec(dir.path(), 5, workers, false))
            .await
            .unwrap();
        let err = running.finish(std::future::pending()).await.unwrap_err();
        assert!(matches!(err, RunError::WorkersExited { .. }), "{err}");
        assert!(err.to_string().contains("_logs"), "{err}");
    }

    #[tokio::test]
    async fn an_address_in_use_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = spec(dir.path(), 1, LocalWorkerSpec::default(), true);
        s.listen = taken.local_addr().unwrap();
        let err = Running::start(s).await.err().unwrap();
        assert!(matches!(err, RunError::Bind { .. }));
        assert!(
            err.to_string()
                .contains(&taken.local_addr().unwrap().to_string()),
            "{err}"
        );
    }
}
