//! The coordinator, two workers and the Parquet dataset in one process, with a model-free worker
//! model and a reward function in place of the evaluator: leases, reports, fencing and commits end
//! to end in about a second, beside the real-process tests (tests/coordinator.rs at the
//! workspace root) that run the real binaries and model.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drllm_dataset::{read_manifest, read_rows, Manifest, PathRecord};
use drllm_dist::run::{RunSpec, Running};
use drllm_dist::server::ServiceConfig;
use drllm_dist::supervisor::LocalWorkerSpec;
use drllm_dist::{CoordinatorCore, Dataset, LeaseConfig, WorkSample};
use drllm_eval::{EvalError, EvalOptions, PreparedPrompt, RunConfig, Scoring};
use drllm_path::LayerPath;
use drllm_search::{sample_seed, Search, SearchConfig, SearchResult};
use drllm_tasks::{data, LoadOptions, RewardMode, Sample, Split, Style, TaskName, Template};
use drllm_worker::{
    row, run_remote_with, RemoteOptions, RemoteSummary, RewardFn, RowModel, WorkerModel,
};

const LAYERS: usize = 10;
const TOKEN: &str = "s3cret";

fn data_dir() -> PathBuf {
    std::env::var_os("DRLLM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// Reward 1 iff every skipped block is one of two blocks that depend on the sample id, and
/// nothing is repeated.
fn reward(id: &str, p: &LayerPath) -> f64 {
    let h: usize = id.bytes().map(usize::from).sum();
    let skippable = [h % LAYERS, (h / 3 + 1) % LAYERS];
    let ok = p
        .counts()
        .iter()
        .enumerate()
        .all(|(l, &c)| c == 1 || (c == 0 && skippable.contains(&l)));
    ok as u8 as f64
}

/// A worker model without weights: prompts are the sample ids, rows carry no response.
struct Fake {
    fingerprint: &'static str,
}

impl WorkerModel for Fake {
    fn fingerprint(&self) -> anyhow::Result<String> {
        Ok(self.fingerprint.into())
    }

    fn prepare(
        &self,
        sample: &Sample,
        template: &Template,
        _eval: &EvalOptions,
    ) -> Result<PreparedPrompt, EvalError> {
        Ok(PreparedPrompt {
            sample_id: sample.id.clone(),
            family: sample.task.family(),
            gold: sample.gold.clone(),
            text: sample.id.clone(),
            add_special: false,
            ids: vec![1, 2, 3],
            template: template.clone(),
            scoring: Scoring::Generate,
        })
    }

    fn record(
        &self,
        sample: &Sample,
        split: Split,
        prompt: &PreparedPrompt,
        result: &SearchResult,
        _eval: &EvalOptions,
        worker: &str,
        seed: u64,
    ) -> Result<PathRecord, EvalError> {
        Ok(row(
            sample,
            split,
            prompt,
            result,
            &model(),
            worker,
            seed,
            None,
        ))
    }
}

fn model() -> RowModel {
    RowModel {
        name: "fake".into(),
        num_layers: LAYERS,
    }
}

fn run_config() -> RunConfig {
    RunConfig {
        style: Style::Base,
        template: None,
        reward: RewardMode::Strict,
        max_new_tokens: 4,
        seed: 11,
        search: SearchConfig {
            num_simulations: 25,
            ..SearchConfig::default()
        },
    }
}

/// Serves a run over `samples` into `out` (the coordinator's library run, without local workers)
/// until every sample has an outcome and every worker has heard so; returns the address (as soon
/// as it is bound) and the final manifest.
fn coordinator(
    out: PathBuf,
    samples: Vec<WorkSample>,
) -> (SocketAddr, std::thread::JoinHandle<Manifest>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let run = serde_json::to_value(run_config()).unwrap();
            let config =
                serde_json::json!({"datasets": ["arc_easy"], "split": "train", "run": run});
            let dataset = Dataset::open(&out, "fake-model", config, false).unwrap();
            let lease = LeaseConfig {
                samples_per_lease: 3,
                timeout: Duration::from_secs(30),
                max_attempts: 3,
            };
            let core = CoordinatorCore::new(samples.clone(), dataset, LAYERS, lease, 4);
            let cfg = ServiceConfig {
                token: Some(TOKEN.into()),
                model_fingerprint: "fake-model".into(),
                run_config_json: run.to_string(),
                heartbeat: Duration::from_millis(200),
                lease_timeout: Duration::from_secs(30),
                flush_every: Duration::from_secs(1),
            };
            let spec = RunSpec {
                core,
                samples,
                service: cfg,
                listen: "127.0.0.1:0".parse().unwrap(),
                workers: LocalWorkerSpec {
                    count: 0,
                    ..LocalWorkerSpec::default()
                },
                remote_workers: true,
            };
            let running = Running::start(spec).await.unwrap();
            tx.send(running.addr()).unwrap();
            let stop = tokio::time::sleep(Duration::from_secs(60));
            let outcome = running.finish(stop).await.unwrap();
            assert!(!outcome.interrupted, "the run did not finish in 60 s");
            outcome.manifest
        })
    });
    (rx.recv().unwrap(), thread)
}

fn worker(addr: SocketAddr, id: &str, fake: Fake) -> anyhow::Result<RemoteSummary> {
    let o = RemoteOptions {
        addr: format!("http://{addr}"),
        token: Some(TOKEN.into()),
        worker_id: id.into(),
        device: "cpu".into(),
        data_dir: data_dir(),
        concurrency: 3,
        prefix_cache_bytes: 0,
        lookahead: 2,
        connect_timeout: Duration::from_secs(10),
    };
    run_remote_with(&fake, |_| RewardFn::new(LAYERS, reward), &o)
}

#[test]
fn coordinator_and_two_workers_write_each_sample_once_as_its_search_alone() {
    let loaded = data::load(
        &data_dir(),
        TaskName::ArcEasy,
        Split::Train,
        &LoadOptions {
            limit: Some(14),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let samples: Vec<WorkSample> = loaded
        .samples
        .iter()
        .map(|s| WorkSample {
            task: s.task.to_string(),
            split: "train".into(),
            sample_id: s.id.clone(),
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let (addr, coord) = coordinator(out.path().to_path_buf(), samples);

    // A worker with another model is refused at registration and takes no work.
    let other = worker(
        addr,
        "intruder",
        Fake {
            fingerprint: "other-model",
        },
    )
    .unwrap_err();
    assert!(format!("{other:#}").contains("refused"), "{other:#}");

    let workers: Vec<_> = ["w0", "w1"]
        .into_iter()
        .map(|id| {
            std::thread::spawn(move || {
                let fake = Fake {
                    fingerprint: "fake-model",
                };
                worker(addr, id, fake).unwrap()
            })
        })
        .collect();
    let summaries: Vec<RemoteSummary> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let manifest = coord.join().unwrap();
    assert_eq!(
        summaries.iter().map(|s| s.searched).sum::<usize>(),
        loaded.samples.len()
    );
    assert!(summaries.iter().all(|s| s.failed == 0));
    assert!(manifest.complete && manifest.failed.is_empty());
    assert_eq!(manifest.rows, loaded.samples.len());
    assert_eq!(read_manifest(out.path()).unwrap().rows, manifest.rows);

    let rows = read_rows(out.path()).unwrap();
    assert_eq!(rows.len(), loaded.samples.len(), "each sample exactly once");
    let cfg = run_config();
    let mut found = 0;
    for s in &loaded.samples {
        let got: Vec<&PathRecord> = rows.iter().filter(|r| r.sample_id == s.id).collect();
        assert_eq!(got.len(), 1, "sample {}", s.id);
        let got = got[0];
        assert!(["w0", "w1"].contains(&got.worker.as_str()));
        // The same search run alone with a sequential evaluator.
        let seed = sample_seed(cfg.seed, &s.id);
        let search = Search::new(LAYERS, cfg.search.clone(), seed);
        let alone = drllm_search::run(search, |p| Ok::<_, ()>(reward(&s.id, p))).unwrap();
        let prompt = Fake {
            fingerprint: "fake-model",
        }
        .prepare(s, &cfg.template(s.task.family()).unwrap(), &cfg.eval())
        .unwrap();
        let want = row(
            s,
            Split::Train,
            &prompt,
            &alone,
            &model(),
            &got.worker,
            seed,
            None,
        );
        let strip = |r: &PathRecord| PathRecord {
            search_ms: 0,
            ..r.clone()
        };
        assert_eq!(strip(got), strip(&want), "sample {}", s.id);
        found += got.found as usize;
    }
    assert!(found > 0, "the oracle leaves blocks to skip");
}
