//! `drllm-infer bench`: prefill and decode throughput of our runtime, side by side with
//! transformers on the same model, dtype, prompts and greedy KV-cached loop. Repeats alternate
//! between the two so machine noise hits both alike; medians and ratios are reported.
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use drllm_runtime::{argmax_tokens, LayerPath, LoadedModel, ModelSource, PathBatch};

/// Options of a benchmark run.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    m: crate::ModelArgs,
    /// Batch sizes to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Prompt length in tokens (every row the same length).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Measurements per configuration (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Python with transformers for the side-by-side run (default: the project venv's);
    /// `none` measures our runtime alone.
    #[arg(long, env = "DRLLM_PYTHON")]
    python: Option<String>,
}

struct Timing {
    prefill_s: f64,
    decode_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The transformers side, driven over a line protocol.
struct HfSide {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    peak_rss_mib: f64,
}

impl HfSide {
    fn start(
        python: &str,
        model_file: &str,
        threads: i32,
        dtype: &str,
        device: &str,
    ) -> Result<Self> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hf_bench.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args([model_file, &threads.to_string(), dtype, device])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {python} {}", script.display()))?;
        let stdin = child.stdin.take().context("python stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("python stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.contains("ready") {
            bail!("transformers side failed to load the model (see its stderr above)");
        }
        Ok(HfSide {
            child,
            stdin,
            stdout,
            peak_rss_mib: 0.0,
        })
    }

    fn run(&mut self, prompts: &[Vec<u32>], new_tokens: usize) -> Result<Timing> {
        writeln!(
            self.stdin,
            "{}",
            serde_json::json!({"ids": prompts, "new_tokens": new_tokens})
        )?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("transformers answered {line:?}"))?;
        self.peak_rss_mib = v["peak_rss_mib"].as_f64().unwrap_or(0.0);
        Ok(Timing {
            prefill_s: v["prefill_s"].as_f64().context("prefill_s")?,
            decode_s: v["decode_s"].as_f64().context("decode_s")?,
        })
    }
}

impl Drop for HfSide {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Our side: prefill, first token, then `new_tokens` decode steps, greedy.
fn run_ours(lm: &LoadedModel, prompts: &[Vec<u32>], new_tokens: usize) -> Result<Timing> {
    let _g = tch::no_grad_guard();
    let paths = vec![LayerPath::all_ones(lm.model.num_layers()); prompts.len()];
    let t0 = Instant::now();
    let mut b = PathBatch::new(&lm.model, &paths)?;
    let h = b.prefill(prompts)?;
    let t = h.size()[1];
    let mut next = argmax_tokens(&lm.model.logits(&h.select(1, t - 1)))?;
    let t1 = Instant::now();
    for _ in 0..new_tokens {
        next = argmax_tokens(&b.decode_step(&next)?)?;
    }
    let t2 = Instant::now();
    Ok(Timing {
        prefill_s: (t1 - t0).as_secs_f64(),
        decode_s: (t2 - t1).as_secs_f64(),
    })
}

/// Equal-length prompts cut from real text (different offsets per row).
fn make_prompts(lm: &LoadedModel, batch: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    let text = "Students visited a telescope at the space grant observatory. They learned about the \
                stars, planets and the moon, and recorded that star patterns stay the same while their \
                locations in the sky seem to change. The sun, planets and moon appear to move across \
                the sky each day because Earth rotates on its axis, and the nearest star to our solar \
                system is Proxima Centauri. ";
    let ids = lm
        .tokenizer
        .encode(&text.repeat(1 + (len * batch * 2) / 60), false)?;
    if ids.len() < len + batch * 7 {
        bail!("benchmark text too short");
    }
    Ok((0..batch)
        .map(|r| ids[r * 7..r * 7 + len].to_vec())
        .collect())
}

/// Runs the benchmark and prints a table.
pub fn bench(a: BenchArgs) -> Result<()> {
    let lm = a.m.load()?;
    // transformers runs with as many threads as we do.
    let threads = tch::get_num_threads();
    let device = lm.model.device();
    let dtype_name = match lm.model.kind() {
        tch::Kind::Float => "f32",
        tch::Kind::BFloat16 => "bf16",
        _ => "f16",
    };
    let model_file = match &lm.source {
        ModelSource::Gguf(p) | ModelSource::HfDir(p) => p.display().to_string(),
    };
    let python = match a.python.as_deref() {
        Some("none") => None,
        Some(p) => Some(p.to_string()),
        None => Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../.venv/bin/python")
                .display()
                .to_string(),
        ),
    };
    let dev_name = match device {
        tch::Device::Cpu => "cpu".to_string(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    };
    let mut hf = match &python {
        Some(py) => Some(HfSide::start(
            py,
            &model_file,
            threads,
            dtype_name,
            &dev_name,
        )?),
        None => None,
    };
    println!(
        "model {} | {} | {dtype_name} | {threads} threads | prompt {} tokens | {} decode steps | {} repeats (medians)",
        a.m.model, dev_name, a.prompt_tokens, a.new_tokens, a.repeats
    );
    println!(
        "{:>5} | {:>16} {:>16} {:>7} | {:>16} {:>16} {:>7}",
        "batch", "prefill tok/s", "hf prefill", "ratio", "decode tok/s", "hf decode", "ratio"
    );
    for &b in &a.batch {
        let prompts = make_prompts(&lm, b, a.prompt_tokens)?;
        // Warm-up of both sides.
        run_ours(&lm, &prompts, 2)?;
        if let Some(h) = hf.as_mut() {
            h.run(&prompts, 2)?;
        }
        let (mut ours, mut theirs) = (vec![], vec![]);
        for _ in 0..a.repeats {
            ours.push(run_ours(&lm, &prompts, a.new_tokens)?);
            if let Some(h) = hf.as_mut() {
                theirs.push(h.run(&prompts, a.new_tokens)?);
            }
        }
        let tok_pre = (b * a.prompt_tokens) as f64;
        let tok_dec = (b * a.new_tokens) as f64;
        let rate = |ts: &[Timing], pre: bool| {
            median(
                ts.iter()
                    .map(|t| {
                        if pre {
                            tok_pre / t.prefill_s
                        } else {
                            tok_dec / t.decode_s
                        }
                    })
                    .collect(),
            )
        };
        let (op, od) = (rate(&ours, true), rate(&ours, false));
        let (hp, hd) = (rate(&theirs, true), rate(&theirs, false));
        println!(
            "{b:>5} | {op:>16.1} {hp:>16.1} {:>7.2} | {od:>16.1} {hd:>16.1} {:>7.2}",
            op / hp,
            od / hd
        );
    }
    println!(
        "peak RSS: ours {:.0} MiB, transformers {:.0} MiB",
        peak_rss_mib().unwrap_or(f64::NAN),
        hf.as_ref().map_or(f64::NAN, |h| h.peak_rss_mib)
    );
    Ok(())
}
