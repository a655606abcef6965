//! A worker driven by `drllm-coordinator` over gRPC: connect (with backoff), register (the model
//! fingerprint must match the coordinator's), then ask for leases, search their samples with the
//! batched engine, report the rows, and heartbeat while busy; exit when the run has no work left.
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

use crate::config::RunConfig;
use crate::driver::{run_searches, DriverOptions};
use crate::eval::prepare;
use crate::record::path_record;

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
        let loaded = data::load(dir, t, s, &LoadOptions::default())
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

/// Runs as a coordinator's worker until the run has no work left.
pub fn run_remote(lm: &LoadedModel, o: &RemoteOptions) -> Result<RemoteSummary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut client = rt.block_on(connect(&o.addr, o.connect_timeout))?;
    let fingerprint = lm.source.fingerprint()?;
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
    let eval = cfg.eval()?;
    let heartbeat = Duration::from_millis(reg.heartbeat_ms.max(100));
    tracing::info!(worker = %o.worker_id, addr = %o.addr, "registered");
    let mut index = SampleIndex::new();
    // Each task family's template, read and parsed once.
    let mut templates: Vec<(drllm_tasks::Family, drllm_tasks::Template)> = vec![];
    let mut summary = RemoteSummary::default();
    loop {
        let lease = rt
            .block_on(client.lease(request(
                LeaseRequest {
                    worker_id: o.worker_id.clone(),
                    max_samples: o.concurrency.max(1) as u32,
                },
                &o.token,
            )?))
            .map_err(|s| anyhow::anyhow!("lease refused: {}", s.message()))?
            .into_inner();
        if lease.done {
            tracing::info!(worker = %o.worker_id, leases = summary.leases, "no work left; exiting");
            return Ok(summary);
        }
        if lease.items.is_empty() {
            std::thread::sleep(Duration::from_millis(lease.retry_after_ms.clamp(50, 5000)));
            continue;
        }
        summary.leases += 1;
        // Heartbeats while the model works on this thread; aborted once the lease is searched.
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
        let mut samples = Vec::with_capacity(lease.items.len());
        for it in &lease.items {
            samples
                .push(lookup(&mut index, &o.data_dir, &it.task, &it.split, &it.sample_id)?.clone());
        }
        let mut prompts = Vec::with_capacity(samples.len());
        for s in &samples {
            let family = s.task.family();
            let t = match templates.iter().find(|(f, _)| *f == family) {
                Some((_, t)) => t,
                None => {
                    templates.push((family, cfg.template(family)?));
                    &templates[templates.len() - 1].1
                }
            };
            prompts.push(prepare(lm, s, t, &eval));
        }
        let prepared: HashMap<String, _> = prompts
            .iter()
            .filter_map(|p| p.as_ref().ok().map(|p| (p.sample_id.clone(), p.clone())))
            .collect();
        let opts = DriverOptions {
            search: cfg.search.clone(),
            seed: cfg.seed,
            concurrency: o.concurrency.max(1),
            eval: eval.clone(),
            prefix_cache_bytes: o.prefix_cache_bytes,
        };
        let mut results = vec![];
        let mut outcomes = vec![];
        run_searches(lm, prompts, &opts, |out| outcomes.push(out));
        for out in outcomes {
            let Some((k, it)) = lease
                .items
                .iter()
                .enumerate()
                .find(|(_, it)| it.sample_id == out.sample_id)
            else {
                continue;
            };
            let record = out.result.and_then(|r| {
                let p = prepared
                    .get(&it.sample_id)
                    .ok_or_else(|| "the prepared prompt went missing".to_string())?;
                let split: Split = it.split.parse().map_err(|e| format!("{e}"))?;
                let seed = sample_seed(cfg.seed, &it.sample_id);
                path_record(lm, &samples[k], split, p, &r, &eval, &o.worker_id, seed)
                    .map_err(|e| e.to_string())
            });
            let outcome = match record {
                Ok(rec) => {
                    summary.searched += 1;
                    sample_result::Outcome::Record(SearchRecord::from(&rec))
                }
                Err(e) => {
                    summary.failed += 1;
                    sample_result::Outcome::Error(e)
                }
            };
            results.push(SampleResult {
                index: it.index,
                outcome: Some(outcome),
            });
        }
        hb.abort();
        let reply = rt
            .block_on(client.report(request(
                ReportRequest {
                    worker_id: o.worker_id.clone(),
                    lease_id: lease.lease_id,
                    results,
                },
                &o.token,
            )?))
            .map_err(|s| anyhow::anyhow!("report refused: {}", s.message()))?
            .into_inner();
        for r in &reply.refused {
            tracing::warn!(worker = %o.worker_id, reason = %r, "result refused");
        }
        if !reply.refused.is_empty() && reply.accepted == 0 && reply.duplicates == 0 {
            bail!(
                "the coordinator refused every result of lease {}",
                lease.lease_id
            );
        }
    }
}
