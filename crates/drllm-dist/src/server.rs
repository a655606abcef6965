//! The coordinator's gRPC service. One task (the actor) owns the [`CoordinatorCore`]; RPC
//! handlers send it messages and await its replies, so the queue, leases and dataset are never
//! shared. The actor also expires leases and flushes buffered rows on a timer, and publishes
//! progress on a watch channel.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::coordinator::{CoordinatorCore, CoordinatorCounts, Outcome, ReportError};
use crate::lease::{Accept, Lease};
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::{
    sample_result, LeaseReply, LeaseRequest, RegisterReply, RegisterRequest, ReportReply,
    ReportRequest, WorkItem, PROTOCOL_VERSION,
};
use drllm_dataset::{DatasetError, Manifest};

/// What the service checks and hands out.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Shared secret (`authorization: Bearer <token>`); `None` accepts any caller.
    pub token: Option<String>,
    /// Fingerprint every worker's model must have.
    pub model_fingerprint: String,
    /// Run configuration sent to workers at registration (JSON).
    pub run_config_json: String,
    /// How often busy workers heartbeat; leases expire after `lease_timeout`.
    pub heartbeat: Duration,
    /// How long a lease stays valid without hearing from its holder (told to workers).
    pub lease_timeout: Duration,
    /// Rows buffered longer than this are written even if a part is not full.
    pub flush_every: Duration,
}

/// Progress published by the actor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Counters.
    pub counts: CoordinatorCounts,
    /// Per worker: samples accepted.
    pub per_worker: HashMap<String, usize>,
    /// Workers registered.
    pub workers: usize,
    /// Set when the run cannot go on (e.g. the disk is full).
    pub fatal: Option<String>,
}

enum Msg {
    Register(String, oneshot::Sender<()>),
    Lease(String, usize, oneshot::Sender<Option<Lease>>),
    Report(
        String,
        u64,
        Vec<(usize, Outcome)>,
        oneshot::Sender<Result<ReportReply, String>>,
    ),
    WorkerGone(String),
    Done(oneshot::Sender<bool>),
}

/// Handle to the actor.
#[derive(Clone)]
pub struct CoordinatorHandle {
    tx: mpsc::Sender<Msg>,
    progress: watch::Receiver<Progress>,
}

impl CoordinatorHandle {
    /// Progress updates.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// A local worker process exited: its leases are reissued now.
    pub async fn worker_gone(&self, worker: &str) {
        let _ = self.tx.send(Msg::WorkerGone(worker.to_string())).await;
    }

    /// Whether every sample has an outcome.
    pub async fn is_done(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Done(tx)).await.is_err() {
            return true;
        }
        rx.await.unwrap_or(true)
    }
}

/// Starts the actor owning `core`. The returned task ends when every handle is dropped (or
/// the dataset fails) and yields the final manifest.
pub fn spawn_actor(
    mut core: CoordinatorCore,
    cfg: &ServiceConfig,
) -> (
    CoordinatorHandle,
    tokio::task::JoinHandle<Result<Manifest, DatasetError>>,
) {
    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let (ptx, prx) = watch::channel(Progress {
        counts: core.counts(),
        ..Progress::default()
    });
    let flush_every = cfg.flush_every;
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let mut progress = Progress {
            counts: core.counts(),
            ..Progress::default()
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_flush = Instant::now();
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let now = start.elapsed();
                    match msg {
                        Msg::Register(w, reply) => {
                            progress.workers += 1;
                            progress.per_worker.entry(w).or_insert(0);
                            let _ = reply.send(());
                        }
                        Msg::Lease(w, max, reply) => {
                            let lease = if max == 0 {
                                core.heartbeat(&w, now);
                                None
                            } else {
                                core.lease(&w, max, now)
                            };
                            let _ = reply.send(lease);
                        }
                        Msg::Report(w, lease, results, reply) => {
                            let mut r = ReportReply::default();
                            let mut fatal = None;
                            for (index, outcome) in results {
                                match core.report(&w, lease, index, outcome) {
                                    Ok(Accept::Commit) => {
                                        r.accepted += 1;
                                        *progress.per_worker.entry(w.clone()).or_insert(0) += 1;
                                    }
                                    Ok(Accept::Duplicate) => r.duplicates += 1,
                                    Err(ReportError::Dataset(e)) => {
                                        fatal = Some(e.to_string());
                                        break;
                                    }
                                    Err(e) => {
                                        tracing::warn!(worker = %w, lease, error = %e, "result refused");
                                        r.refused.push(e.to_string());
                                    }
                                }
                            }
                            if let Some(e) = fatal {
                                let _ = reply.send(Err(e.clone()));
                                progress.fatal = Some(e);
                                progress.counts = core.counts();
                                let _ = ptx.send(progress.clone());
                                break;
                            }
                            let _ = reply.send(Ok(r));
                        }
                        Msg::WorkerGone(w) => {
                            let ids = core.worker_gone(&w);
                            if !ids.is_empty() {
                                tracing::warn!(worker = %w, leases = ?ids, "worker gone; its leases are reissued");
                            }
                        }
                        Msg::Done(reply) => {
                            let _ = reply.send(core.is_done());
                        }
                    }
                }
                _ = tick.tick() => {
                    let expired = core.tick(start.elapsed());
                    if !expired.is_empty() {
                        tracing::warn!(leases = ?expired, "leases expired; their samples are queued again");
                    }
                    if last_flush.elapsed() >= flush_every || core.is_done() {
                        last_flush = Instant::now();
                        if let Err(e) = core.flush() {
                            progress.fatal = Some(e.to_string());
                            progress.counts = core.counts();
                            let _ = ptx.send(progress.clone());
                            return Err(e);
                        }
                    }
                }
            }
            progress.counts = core.counts();
            // Only real changes wake watchers: a watcher that asks `is_done` on every wake-up
            // would otherwise spin.
            ptx.send_if_modified(|p| {
                let changed = *p != progress;
                if changed {
                    p.clone_from(&progress);
                }
                changed
            });
        }
        core.finish()
    });
    (CoordinatorHandle { tx, progress: prx }, task)
}

/// Which registered workers have been told that the run is over, so the coordinator can
/// keep serving until they know (a remote worker would otherwise find the port closed).
#[derive(Clone, Default)]
pub struct Farewell {
    registered: std::sync::Arc<std::sync::Mutex<HashMap<String, String>>>,
    told: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Farewell {
    /// A worker known gone (its process exited): nobody needs to tell it anything.
    pub fn gone(&self, worker: &str) {
        if let Ok(mut r) = self.registered.lock() {
            r.remove(worker);
        }
    }

    /// Whether every registered worker has been answered `done`.
    pub fn all_told(&self) -> bool {
        match (self.registered.lock(), self.told.lock()) {
            (Ok(r), Ok(t)) => r.keys().all(|w| t.contains(w)),
            _ => true,
        }
    }
}

/// The tonic service in front of the actor.
pub struct Service {
    handle: CoordinatorHandle,
    cfg: ServiceConfig,
    samples: std::sync::Arc<Vec<crate::coordinator::WorkSample>>,
    farewell: Farewell,
}

impl Service {
    /// A service for the actor behind `handle`, over the task list `samples`.
    pub fn new(
        handle: CoordinatorHandle,
        cfg: ServiceConfig,
        samples: Vec<crate::coordinator::WorkSample>,
    ) -> Self {
        Service {
            handle,
            cfg,
            samples: std::sync::Arc::new(samples),
            farewell: Farewell::default(),
        }
    }

    /// Tracks which workers know the run is over.
    pub fn farewell(&self) -> Farewell {
        self.farewell.clone()
    }

    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.cfg.token else {
            return Ok(());
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if got == Some(format!("Bearer {token}").as_str()) {
            return Ok(());
        }
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(%peer, "refused a caller without the run's token");
        Err(Status::unauthenticated(
            "missing or wrong token (authorization: Bearer <token>)",
        ))
    }

    fn check_registered(&self, worker: &str) -> Result<(), Status> {
        let ok = self
            .farewell
            .registered
            .lock()
            .map(|m| m.contains_key(worker))
            .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            tracing::warn!(worker, "refused a call from an unregistered worker");
            Err(Status::failed_precondition(format!(
                "worker {worker:?} is not registered"
            )))
        }
    }
}

fn gone() -> Status {
    Status::unavailable("the coordinator is shutting down")
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(worker = %r.worker_id, version = r.protocol_version, "refused a worker speaking another protocol version");
            return Err(Status::failed_precondition(format!(
                "protocol version {} (coordinator speaks {PROTOCOL_VERSION})",
                r.protocol_version
            )));
        }
        if r.model_fingerprint != self.cfg.model_fingerprint {
            tracing::warn!(worker = %r.worker_id, theirs = %r.model_fingerprint, ours = %self.cfg.model_fingerprint, "refused a worker with a different model");
            return Err(Status::failed_precondition(format!(
                "model fingerprint {} differs from the run's {}: start the worker with the same --model",
                r.model_fingerprint, self.cfg.model_fingerprint
            )));
        }
        if r.worker_id.is_empty() {
            return Err(Status::invalid_argument("empty worker_id"));
        }
        if let Ok(mut m) = self.farewell.registered.lock() {
            m.insert(r.worker_id.clone(), r.device.clone());
        }
        let (tx, rx) = oneshot::channel();
        self.handle
            .tx
            .send(Msg::Register(r.worker_id.clone(), tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?;
        tracing::info!(worker = %r.worker_id, device = %r.device, "worker registered");
        Ok(Response::new(RegisterReply {
            run_config_json: self.cfg.run_config_json.clone(),
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        self.check_registered(&r.worker_id)?;
        let (tx, rx) = oneshot::channel();
        self.handle
            .tx
            .send(Msg::Lease(r.worker_id.clone(), r.max_samples as usize, tx))
            .await
            .map_err(|_| gone())?;
        let lease = rx.await.map_err(|_| gone())?;
        let Some(l) = lease else {
            let done = r.max_samples > 0 && self.handle.is_done().await;
            if done {
                if let Ok(mut t) = self.farewell.told.lock() {
                    t.insert(r.worker_id.clone());
                }
            }
            return Ok(Response::new(LeaseReply {
                done,
                retry_after_ms: 1000,
                ..LeaseReply::default()
            }));
        };
        let items = l
            .samples
            .iter()
            .filter_map(|&i| {
                self.samples.get(i).map(|s| WorkItem {
                    index: i as u64,
                    task: s.task.clone(),
                    split: s.split.clone(),
                    sample_id: s.sample_id.clone(),
                })
            })
            .collect();
        Ok(Response::new(LeaseReply {
            lease_id: l.id,
            attempt: l.attempt,
            valid_ms: self.cfg.lease_timeout.as_millis() as u64,
            items,
            done: false,
            retry_after_ms: 0,
        }))
    }

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        self.check_registered(&r.worker_id)?;
        let mut results = vec![];
        let mut refused = vec![];
        for s in r.results {
            let outcome = match s.outcome {
                Some(sample_result::Outcome::Record(rec)) => match rec.into_row(&r.worker_id) {
                    Ok(row) => Outcome::Record(Box::new(row)),
                    Err(e) => {
                        tracing::warn!(worker = %r.worker_id, index = s.index, error = %e, "malformed result refused");
                        refused.push(format!("sample index {}: {e}", s.index));
                        continue;
                    }
                },
                Some(sample_result::Outcome::Error(e)) => Outcome::Failed(e),
                None => {
                    refused.push(format!("sample index {}: no outcome", s.index));
                    continue;
                }
            };
            results.push((s.index as usize, outcome));
        }
        let (tx, rx) = oneshot::channel();
        self.handle
            .tx
            .send(Msg::Report(r.worker_id, r.lease_id, results, tx))
            .await
            .map_err(|_| gone())?;
        let mut reply = rx
            .await
            .map_err(|_| gone())?
            .map_err(|e| Status::internal(format!("the coordinator stopped: {e}")))?;
        reply.refused.extend(refused);
        Ok(Response::new(reply))
    }
}

/// Serves `service` on `addr` until `shutdown` resolves.
pub async fn serve(
    service: Service,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Small request/reply messages: without TCP_NODELAY, delayed ACKs cost ~40 ms per RPC.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(CoordinatorServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Binds `addr` (port 0 = any free port) and returns the listener and its real address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::tests::{core, work};
    use crate::proto::SampleResult;
    use drllm_dataset::fixtures::row;

    fn with_token<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        r
    }

    fn register(id: &str) -> Request<RegisterRequest> {
        with_token(RegisterRequest {
            worker_id: id.into(),
            device: "cpu".into(),
            model_fingerprint: "fp".into(),
            code_version: "test".into(),
            protocol_version: PROTOCOL_VERSION,
        })
    }

    async fn lease(svc: &Service, id: &str, max: u32) -> LeaseReply {
        svc.lease(with_token(LeaseRequest {
            worker_id: id.into(),
            max_samples: max,
        }))
        .await
        .unwrap()
        .into_inner()
    }

    async fn report(svc: &Service, id: &str, lease_id: u64, index: u64) -> ReportReply {
        let rec = row("arc_easy", &format!("s{index}"), true);
        svc.report(with_token(ReportRequest {
            worker_id: id.into(),
            lease_id,
            results: vec![SampleResult {
                index,
                outcome: Some(sample_result::Outcome::Record((&rec).into())),
            }],
        }))
        .await
        .unwrap()
        .into_inner()
    }

    /// The actor's timers under paused time: a silent worker's lease expires and is reissued with
    /// a new fencing token, a heartbeating worker's lease survives far past the timeout, buffered
    /// rows are written after `flush_every`, and `done` is told once every sample is committed.
    #[tokio::test(start_paused = true)]
    async fn leases_expire_unless_heartbeats_arrive_and_rows_flush_on_time() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServiceConfig {
            token: Some("s3cret".into()),
            model_fingerprint: "fp".into(),
            run_config_json: "{}".into(),
            heartbeat: Duration::from_secs(2),
            lease_timeout: Duration::from_secs(10),
            flush_every: Duration::from_secs(30),
        };
        let (handle, task) = spawn_actor(core(dir.path(), 6), &cfg);
        let progress = handle.progress();
        let svc = Service::new(handle.clone(), cfg, work(6));

        // No token, another model, or not registered: refused.
        let e = svc
            .register(Request::new(register("a").into_inner()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut other = register("x");
        other.get_mut().model_fingerprint = "other".into();
        let e = svc.register(other).await.unwrap_err();
        assert!(e.message().contains("differs from the run's fp"), "{e}");
        let e = svc
            .lease(with_token(LeaseRequest {
                worker_id: "x".into(),
                max_samples: 1,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);

        svc.register(register("a")).await.unwrap();
        svc.register(register("b")).await.unwrap();
        // Asking whether the run is done changes nothing, so it wakes no progress watcher (the
        // coordinator's main loop asks on every wake-up).
        let mut watcher = handle.progress();
        watcher.borrow_and_update();
        assert!(!handle.is_done().await);
        assert!(!watcher.has_changed().unwrap());
        let la = lease(&svc, "a", 8).await;
        let lb = lease(&svc, "b", 8).await;
        let idx = |l: &LeaseReply| l.items.iter().map(|i| i.index).collect::<Vec<_>>();
        assert_eq!((idx(&la), idx(&lb)), (vec![0, 1, 2], vec![3, 4, 5]));
        assert_eq!(la.valid_ms, 10_000);

        // 20 s pass: a heartbeats every 2 s, b says nothing.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(!lease(&svc, "a", 0).await.done);
        }
        assert_eq!(report(&svc, "a", la.lease_id, 0).await.accepted, 1);
        let again = lease(&svc, "a", 8).await;
        assert_eq!(idx(&again), [3, 4, 5]);
        assert_eq!(again.attempt, 2);
        assert!(again.lease_id > lb.lease_id);
        // b's late result under its expired lease is refused, not committed.
        let late = report(&svc, "b", lb.lease_id, 3).await;
        assert_eq!(late.accepted, 0);
        assert_eq!(late.refused.len(), 1, "{:?}", late.refused);

        for i in [1, 2] {
            assert_eq!(report(&svc, "a", la.lease_id, i).await.accepted, 1);
        }
        for i in [3, 4, 5] {
            assert_eq!(report(&svc, "a", again.lease_id, i).await.accepted, 1);
        }
        // 6 rows, parts of 4: 2 wait in the buffer until the flush timer (or the end).
        assert_eq!(progress.borrow().counts.buffered, 2);
        let done = lease(&svc, "a", 8).await;
        assert!(done.done);
        assert!(!svc.farewell().all_told(), "b has not been told yet");
        assert!(lease(&svc, "b", 8).await.done);
        assert!(svc.farewell().all_told());
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(progress.borrow().counts.buffered, 0);

        drop((svc, handle));
        let m = task.await.unwrap().unwrap();
        assert!(m.complete);
        assert_eq!(m.rows, 6);
    }
}
