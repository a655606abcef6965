//! Local worker processes of a coordinator: which device and how many CPU threads each gets, one
//! log file each, and which of them have exited. The coordinator's binary only says how many and
//! where they connect; a remote worker is started by the user (or SLURM) instead.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Instant;

/// Errors of starting local workers.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The log directory or a log file cannot be created.
    #[error("creating {path}: {source}")]
    Log {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The worker binary cannot be started.
    #[error("starting {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How the local workers are started (the default starts none).
#[derive(Debug, Clone, Default)]
pub struct LocalWorkerSpec {
    /// The `drllm-worker` binary.
    pub bin: PathBuf,
    /// How many to start.
    pub count: usize,
    /// `cpu`, or anything else (`auto`, `cuda`): one GPU each, round robin, when GPUs exist,
    /// else the CPU.
    pub device: String,
    /// The model flag workers load (the coordinator checks their fingerprints).
    pub model: String,
    /// The data directory workers read the prompts from.
    pub data_dir: PathBuf,
    /// Searches in flight per worker.
    pub concurrency: usize,
    /// Prefix cache per worker, MiB.
    pub prefix_cache_mb: usize,
    /// The run's shared secret, handed over in the environment (never on the command line).
    pub token: Option<String>,
    /// Directory of the workers' logs (`<id>.log` each).
    pub logs: PathBuf,
    /// Workers log JSON lines (as the coordinator does with `--log-json`).
    pub log_json: bool,
}

/// Device and CPU threads of local worker `i` of `count`: one GPU each (round robin, 2 threads)
/// when there are `gpus`, else the `cores` split evenly (at least one each).
pub fn placement(i: usize, count: usize, gpus: usize, cores: usize) -> (String, usize) {
    if gpus > 0 {
        (format!("cuda:{}", i % gpus), 2)
    } else {
        ("cpu".to_string(), (cores / count.max(1)).max(1))
    }
}

/// GPUs `nvidia-smi` lists (0 without a driver).
pub fn cuda_devices() -> usize {
    std::process::Command::new("nvidia-smi")
        .arg("--list-gpus")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
}

/// The running local workers (killed when dropped).
pub struct LocalWorkers {
    children: Vec<(String, tokio::process::Child, bool)>,
    logs: PathBuf,
}

impl LocalWorkers {
    /// Starts `spec.count` workers (none for a count of 0), ids `local-0`, `local-1`, ...,
    /// connecting to the coordinator at `addr`.
    pub fn spawn(
        spec: &LocalWorkerSpec,
        addr: SocketAddr,
    ) -> Result<LocalWorkers, SupervisorError> {
        let mut children = vec![];
        if spec.count > 0 {
            std::fs::create_dir_all(&spec.logs).map_err(|source| SupervisorError::Log {
                path: spec.logs.clone(),
                source,
            })?;
        }
        let gpus = match spec.device.as_str() {
            _ if spec.count == 0 => 0,
            "cpu" => 0,
            _ => cuda_devices(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for i in 0..spec.count {
            let id = format!("local-{i}");
            let (device, threads) = placement(i, spec.count, gpus, cores);
            let log = spec.logs.join(format!("{id}.log"));
            let f = std::fs::File::create(&log).map_err(|source| SupervisorError::Log {
                path: log.clone(),
                source,
            })?;
            let mut cmd = tokio::process::Command::new(&spec.bin);
            cmd.arg("--connect")
                .arg(format!("http://{addr}"))
                .args([
                    "--worker-id",
                    &id,
                    "--model",
                    &spec.model,
                    "--device",
                    &device,
                ])
                .args(["--threads", &threads.to_string()])
                .arg("--data")
                .arg(&spec.data_dir)
                .args(["--concurrency", &spec.concurrency.to_string()])
                .args(["--prefix-cache-mb", &spec.prefix_cache_mb.to_string()])
                .env_remove("DRLLM_TOKEN")
                .stdout(Stdio::null())
                .stderr(Stdio::from(f))
                .kill_on_drop(true);
            if spec.log_json {
                cmd.arg("--log-json");
            }
            if let Some(t) = &spec.token {
                cmd.env("DRLLM_TOKEN", t);
            }
            let child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
                bin: spec.bin.clone(),
                source,
            })?;
            children.push((id, child, false));
        }
        Ok(LocalWorkers {
            children,
            logs: spec.logs.clone(),
        })
    }

    /// How many were started.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether none was started.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The log file of worker `id`.
    pub fn log_of(&self, id: &str) -> PathBuf {
        self.logs.join(format!("{id}.log"))
    }

    /// The log directory.
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// Workers that exited since the last call, with their status.
    pub fn newly_exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut out = vec![];
        for (id, child, exited) in &mut self.children {
            if !*exited {
                if let Ok(Some(status)) = child.try_wait() {
                    *exited = true;
                    out.push((id.clone(), status));
                }
            }
        }
        out
    }

    /// Whether workers were started and every one has exited.
    pub fn all_exited(&self) -> bool {
        !self.children.is_empty() && self.children.iter().all(|(_, _, e)| *e)
    }

    /// Waits for every worker to exit, until `deadline` (at least 2 s each).
    pub async fn wait(&mut self, deadline: Instant) {
        for (_, child, _) in &mut self.children {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left.max(std::time::Duration::from_secs(2)), child.wait())
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        1,
    ));

    #[test]
    fn gpus_round_robin_and_cpus_split() {
        assert_eq!(placement(0, 3, 2, 16), ("cuda:0".into(), 2));
        assert_eq!(placement(1, 3, 2, 16), ("cuda:1".into(), 2));
        assert_eq!(placement(2, 3, 2, 16), ("cuda:0".into(), 2));
        assert_eq!(placement(0, 2, 0, 16), ("cpu".into(), 8));
        assert_eq!(placement(4, 8, 0, 2), ("cpu".into(), 1));
        assert_eq!(placement(0, 0, 0, 2), ("cpu".into(), 2));
    }

    #[tokio::test]
    async fn a_worker_that_cannot_start_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LocalWorkerSpec {
            bin: dir.path().join("no-such-worker"),
            count: 1,
            device: "cpu".into(),
            model: "embedded".into(),
            data_dir: dir.path().into(),
            concurrency: 1,
            prefix_cache_mb: 0,
            token: None,
            logs: dir.path().join("_logs"),
            log_json: false,
        };
        let err = LocalWorkers::spawn(&spec, LOOPBACK)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no-such-worker"), "{err}");
        let none = LocalWorkers::spawn(&LocalWorkerSpec { count: 0, ..spec }, LOOPBACK).unwrap();
        assert!(none.is_empty() && !none.all_exited());
    }

    #[tokio::test]
    async fn exits_are_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LocalWorkerSpec {
            bin: "/bin/true".into(),
            count: 2,
            device: "cpu".into(),
            model: "embedded".into(),
            data_dir: dir.path().into(),
            concurrency: 1,
            prefix_cache_mb: 0,
            token: Some("secret".into()),
            logs: dir.path().join("_logs"),
            log_json: false,
        };
        let mut w = LocalWorkers::spawn(&spec, LOOPBACK).unwrap();
        w.wait(Instant::now() + std::time::Duration::from_secs(5))
            .await;
        let mut seen = w.newly_exited();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "local-0");
        assert!(w.newly_exited().is_empty());
        assert!(w.all_exited());
        assert!(w.log_of("local-1").exists());
    }
}
