//! A worker driven by `drllm-coordinator` over gRPC: connect (with backoff), register (the model
//! fingerprint must match the coordinator's), then keep its searches in flight by leasing samples
//! as searches finish, report each row as its search ends, and heartbeat while busy; exit when the
//! run has no work left.
//!
//! The model runs on the calling thread; a one-thread tokio runtime carries the RPCs and the
//! heartbeat task, so a long lease never looks like a dead worker.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use drllm_dist::proto::coordinator_client::CoordinatorClient;
use drllm_dist::proto::{
    sample_result, LeaseRequest, RegisterRequest, ReportRequest, SampleResult, SearchRecord,
    PROTOCOL_VERSION,
};
use drllm_runtime::LoadedModel;
use drllm_search::sample_seed;
use drllm_tasks::{data, LoadOptions, Sample, Split, TaskName};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::driver::{drive, DriverOptions, Evaluator, Feed, SampleOutcome};
use crate::record::path_record;
use drllm_dataset::PathRecord;
use drllm_eval::RunConfig;
use drllm_eval::{prepare, EvalError, EvalOptions, PreparedPrompt};
use drllm_search::SearchResult;
use drllm_tasks::Template;

/// What a remote worker needs from its model besides scoring candidates (the [`Evaluator`]):
/// its identity, prompt preparation, and a finished search's row. [`LoadedModel`] is the real
/// one; tests run coordinator and workers in one process with a model-free implementation.
pub trait WorkerModel {
    /// Fingerprint checked by the coordinator at registration.
    fn fingerprint(&self) -> Result<String>;

    /// Renders, tokenizes and checks one sample.
    fn prepare(
        &self,
        sample: &Sample,
        template: &Template,
        eval: &EvalOptions,
    ) -> Result<PreparedPrompt, EvalError>;

    /// The dataset row of a finished search.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        sample: &Sample,
        split: Split,
        prompt: &PreparedPrompt,
        result: &SearchResult,
        eval: &EvalOptions,
        worker: &str,
        seed: u64,
    ) -> Result<PathRecord, EvalError>;
}

impl WorkerModel for LoadedModel {
    fn fingerprint(&self) -> Result<String> {
        Ok(self.source.fingerprint()?)
    }

    fn prepare(
        &self,
        sample: &Sample,
        template: &Template,
        eval: &EvalOptions,
    ) -> Result<PreparedPrompt, EvalError> {
        prepare(self, sample, template, eval)
    }

    fn record(
        &self,
        sample: &Sample,
        split: Split,
        prompt: &PreparedPrompt,
        result: &SearchResult,
        eval: &EvalOptions,
        worker: &str,
        seed: u64,
    ) -> Result<PathRecord, EvalError> {
        path_record(self, sample, split, prompt, result, eval, worker, seed)
    }
}

/// How to reach the coordinator and how hard to work.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// `http://host:port`.
    pub addr: String,
    /// Shared secret, if the coordinator requires one.
    pub token: Option<String>,
    /// This worker's id (unique in the run).
    pub worker_id: String,
    /// Device description sent at registration.
    pub device: String,
    /// Data directory (the worker reads the leased samples from its own copy).
    pub data_dir: PathBuf,
    /// Searches in flight at once (also the most samples asked per lease).
    pub concurrency: usize,
    /// Prefix cache budget in bytes.
    pub prefix_cache_bytes: usize,
    /// Paths per search scored ahead of their turn ([`DriverOptions::lookahead`]).
    pub lookahead: usize,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct RemoteSummary {
    /// Leases worked on.
    pub leases: usize,
    /// Samples reported with a row.
    pub searched: usize,
    /// Samples reported as failed.
    pub failed: usize,
}

fn request<T>(msg: T, token: &Option<String>) -> Result<Request<T>> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}")
            .parse()
            .context("--token is not a valid header value")?;
        r.metadata_mut().insert("authorization", v);
    }
    Ok(r)
}

async fn connect(addr: &str, timeout: Duration) -> Result<CoordinatorClient<Channel>> {
    let endpoint = Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("bad coordinator address {addr:?}"))?
        .connect_timeout(Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(200);
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(CoordinatorClient::new(ch)),
            Err(e) if start.elapsed() < timeout => {
                tracing::info!(addr, error = %e, retry_in_ms = wait.as_millis() as u64, "coordinator not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot reach the coordinator at {addr}"))
            }
        }
    }
}

/// Samples of one (task, split), by id, loaded once.
type SampleIndex = HashMap<(String, String), HashMap<String, Sample>>;

fn lookup<'a>(
    index: &'a mut SampleIndex,
    dir: &std::path::Path,
    task: &str,
    split: &str,
    id: &str,
) -> Result<&'a Sample> {
    let key = (task.to_string(), split.to_string());
    if !index.contains_key(&key) {
        let t: TaskName = task.parse()?;
        let s: Split = split.parse()?;
        // The coordinator owns the sample list and has refused repeated ids already (or was told
        // to keep the first of each): here samples are only looked up by id, the first of a
        // repeated id being the one it kept.
        let opts = LoadOptions {
            skip_duplicate_ids: true,
            ..Default::default()
        };
        let loaded = data::load(dir, t, s, &opts)
            .with_context(|| format!("loading {task}/{split} from {}", dir.display()))?;
        let by_id = loaded
            .samples
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        index.insert(key.clone(), by_id);
    }
    index
        .get(&key)
        .and_then(|m| m.get(id))
        .with_context(|| format!("sample {id} is not in {task}/{split} of {}", dir.display()))
}

/// A leased sample waiting for its search to finish.
struct Pending {
    lease_id: u64,
    item_index: u64,
    sample: Sample,
    split: Split,
    prepared: Option<PreparedPrompt>,
}

/// The coordinator as the driver's [`Feed`]: leases are taken as searches finish (so a worker
/// always has work in flight) and each result is reported as soon as its search ends.
struct RemoteFeed<'a, M: WorkerModel> {
    rt: &'a tokio::runtime::Runtime,
    client: CoordinatorClient<Channel>,
    lm: &'a M,
    o: &'a RemoteOptions,
    cfg: RunConfig,
    eval: EvalOptions,
    index: SampleIndex,
    /// Each task family's template, read and parsed once.
    templates: Vec<(drllm_tasks::Family, drllm_tasks::Template)>,
    /// By the driver's sample index (the order this feed handed samples out).
    pending: HashMap<usize, Pending>,
    handed: usize,
    finished: bool,
    summary: RemoteSummary,
}

impl<M: WorkerModel> RemoteFeed<'_, M> {
    /// Position of `family`'s template in `self.templates` (read on first use).
    fn template(&mut self, family: drllm_tasks::Family) -> Result<usize> {
        Ok(
            match self.templates.iter().position(|(f, _)| *f == family) {
                Some(k) => k,
                None => {
                    self.templates.push((family, self.cfg.template(family)?));
                    self.templates.len() - 1
                }
            },
        )
    }
}

impl<M: WorkerModel> Feed for RemoteFeed<'_, M> {
    type Error = anyhow::Error;

    fn more(
        &mut self,
        free: usize,
        idle: bool,
    ) -> Result<Option<Vec<Result<PreparedPrompt, EvalError>>>> {
        if self.finished {
            return Ok(None);
        }
        loop {
            let lease = self
                .rt
                .block_on(self.client.lease(request(
                    LeaseRequest {
                        worker_id: self.o.worker_id.clone(),
                        max_samples: free.max(1) as u32,
                    },
                    &self.o.token,
                )?))
                .map_err(|s| anyhow::anyhow!("lease refused: {}", s.message()))?
                .into_inner();
            if lease.done {
                tracing::info!(leases = self.summary.leases, "no work left");
                self.finished = true;
                return Ok(None);
            }
            if lease.items.is_empty() {
                if !idle {
                    return Ok(Some(vec![]));
                }
                std::thread::sleep(Duration::from_millis(lease.retry_after_ms.clamp(50, 5000)));
                continue;
            }
            self.summary.leases += 1;
            tracing::debug!(
                lease = lease.lease_id,
                samples = lease.items.len(),
                "leased"
            );
            let mut prompts = Vec::with_capacity(lease.items.len());
            for it in &lease.items {
                let sample = lookup(
                    &mut self.index,
                    &self.o.data_dir,
                    &it.task,
                    &it.split,
                    &it.sample_id,
                )?
                .clone();
                let split: Split = it.split.parse()?;
                let t = self.template(sample.task.family())?;
                let prepared = self.lm.prepare(&sample, &self.templates[t].1, &self.eval);
                self.pending.insert(
                    self.handed,
                    Pending {
                        lease_id: lease.lease_id,
                        item_index: it.index,
                        sample,
                        split,
                        prepared: prepared.as_ref().ok().cloned(),
                    },
                );
                self.handed += 1;
                prompts.push(prepared);
            }
            return Ok(Some(prompts));
        }
    }

    fn done(&mut self, out: SampleOutcome) -> Result<()> {
        let Some(p) = self.pending.remove(&out.index) else {
            bail!(
                "the search of an unknown sample ({}) finished",
                out.sample_id
            );
        };
        // Every event of this sample's report carries its lease and sample ids.
        let _span =
            tracing::info_span!("sample", lease = p.lease_id, sample = %p.sample.id).entered();
        let record = out.result.and_then(|r| {
            let prepared = p
                .prepared
                .as_ref()
                .ok_or_else(|| "the prepared prompt went missing".to_string())?;
            let seed = sample_seed(self.cfg.seed, &p.sample.id);
            self.lm
                .record(
                    &p.sample,
                    p.split,
                    prepared,
                    &r,
                    &self.eval,
                    &self.o.worker_id,
                    seed,
                )
                .map_err(|e| e.to_string())
        });
        let outcome = match record {
            Ok(rec) => {
                self.summary.searched += 1;
                sample_result::Outcome::Record(SearchRecord::from(&rec))
            }
            Err(e) => {
                self.summary.failed += 1;
                sample_result::Outcome::Error(e)
            }
        };
        let reply = self
            .rt
            .block_on(self.client.report(request(
                ReportRequest {
                    worker_id: self.o.worker_id.clone(),
                    lease_id: p.lease_id,
                    results: vec![SampleResult {
                        index: p.item_index,
                        outcome: Some(outcome),
                    }],
                },
                &self.o.token,
            )?))
            .map_err(|s| anyhow::anyhow!("report refused: {}", s.message()))?
            .into_inner();
        if reply.accepted > 0 {
            tracing::info!("reported");
        }
        for r in &reply.refused {
            // E.g. the lease expired while this worker was slow and the sample went elsewhere;
            // the run goes on either way.
            tracing::warn!(reason = %r, "result refused");
        }
        Ok(())
    }
}

/// Runs as a coordinator's worker until the run has no work left.
pub fn run_remote(lm: &LoadedModel, o: &RemoteOptions) -> Result<RemoteSummary> {
    // How candidates are scored comes from the coordinator at registration.
    run_remote_with(lm, |opts| opts.evaluator(lm), o)
}

/// [`run_remote`] with any model and evaluator: `evaluator` makes the evaluator once the run
/// configuration (how candidates are scored) is known.
pub fn run_remote_with<M: WorkerModel, E: Evaluator>(
    lm: &M,
    evaluator: impl FnOnce(&DriverOptions) -> E,
    o: &RemoteOptions,
) -> Result<RemoteSummary> {
    // Every event of this worker (in its log or a cluster's JSON logs) carries its id.
    let _span = tracing::info_span!("worker", worker = %o.worker_id).entered();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut client = rt.block_on(connect(&o.addr, o.connect_timeout))?;
    let fingerprint = lm.fingerprint()?;
    let reg = rt
        .block_on(client.register(request(
            RegisterRequest {
                worker_id: o.worker_id.clone(),
                device: o.device.clone(),
                model_fingerprint: fingerprint,
                code_version: env!("CARGO_PKG_VERSION").into(),
                protocol_version: PROTOCOL_VERSION,
            },
            &o.token,
        )?))
        .map_err(|s| anyhow::anyhow!("the coordinator refused this worker: {}", s.message()))?
        .into_inner();
    let cfg: RunConfig = serde_json::from_str(&reg.run_config_json)
        .context("the coordinator sent a run configuration this worker cannot read")?;
    let eval = cfg.eval();
    let heartbeat = Duration::from_millis(reg.heartbeat_ms.max(100));
    tracing::info!(addr = %o.addr, "registered");
    // Heartbeats while the model works on this thread (a batch, or regenerating a best
    // response, can outlast the lease timeout's fraction between lease requests).
    let hb = {
        let (mut c, token, id) = (client.clone(), o.token.clone(), o.worker_id.clone());
        rt.spawn(async move {
            loop {
                tokio::time::sleep(heartbeat).await;
                if let Ok(r) = request(
                    LeaseRequest {
                        worker_id: id.clone(),
                        max_samples: 0,
                    },
                    &token,
                ) {
                    let _ = c.lease(r).await;
                }
            }
        })
    };
    let opts = DriverOptions {
        search: cfg.search.clone(),
        seed: cfg.seed,
        concurrency: o.concurrency.max(1),
        eval: eval.clone(),
        prefix_cache_bytes: o.prefix_cache_bytes,
        lookahead: o.lookahead,
    };
    let mut feed = RemoteFeed {
        rt: &rt,
        client,
        lm,
        o,
        cfg,
        eval,
        index: SampleIndex::new(),
        templates: vec![],
        pending: HashMap::new(),
        handed: 0,
        finished: false,
        summary: RemoteSummary::default(),
    };
    let mut evaluator = evaluator(&opts);
    let result = drive(&mut evaluator, &mut feed, &opts);
    hb.abort();
    result?;
    tracing::info!(leases = feed.summary.leases, "no work left; exiting");
    Ok(feed.summary)
}
