//! `drllm-infer-bench`: prefill and decode throughput of our runtime, side by side with
//! transformers on the same model, dtype, prompts and greedy KV-cached loop. Repeats alternate
//! between the two so machine noise hits both alike; medians and ratios are reported.
//!
//! With `--routers PKG`, it measures routing instead: the prefill with routers deciding each
//! block against the plain prefill along the very paths they chose (the router overhead), and
//! decode tokens/s along the routed paths against the all-execute baseline.
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use drllm_runtime::{
    argmax_tokens, GenerateRequest, LayerPath, LoadedModel, ModelSource, PathBatch, Paths,
};

/// Options of a benchmark run.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    m: drllm_cli::ModelArgs,
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
    /// Router package: measure routed against unrouted generation instead of transformers.
    /// `random`: freshly initialised routers of the model's shape (the paper's sizes, seed 0),
    /// to time routed decoding on a model without trained routers (e.g. the random 3B model of
    /// scripts/gpu-check.sh); their paths are arbitrary, their speed is what is measured.
    #[arg(long)]
    routers: Option<PathBuf>,
    /// Router budget in [-1, 1] for --routers (< 0 toward skip).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    budget: f64,
    /// With --routers: also generate for this many prompts in batches of the largest --batch,
    /// routed batches decoded as prefilled (mixed paths) and regrouped by path (0: skip).
    #[arg(long, default_value_t = 32)]
    pool: usize,
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

/// From a prefill's output `h` (the prefill started at `t0`): the first token, then
/// `new_tokens` greedy decode steps, timed.
fn decode_timed(
    lm: &LoadedModel,
    b: &mut PathBatch,
    h: &tch::Tensor,
    t0: Instant,
    new_tokens: usize,
) -> Result<Timing> {
    let t = h.size()[1];
    let mut next = argmax_tokens(&lm.model.logits(&h.select(1, t - 1)))?;
    let t1 = Instant::now();
    for _ in 0..new_tokens {
        next = argmax_tokens(&b.decode_step(&next)?)?;
    }
    Ok(Timing {
        prefill_s: (t1 - t0).as_secs_f64(),
        decode_s: t1.elapsed().as_secs_f64(),
    })
}

/// Prefill and decode along fixed paths (all blocks once when `paths` is None), timed.
fn run_ours(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    paths: Option<&[LayerPath]>,
    new_tokens: usize,
) -> Result<Timing> {
    let _g = tch::no_grad_guard();
    let default = vec![LayerPath::all_ones(lm.model.num_layers()); prompts.len()];
    let t0 = Instant::now();
    let mut b = PathBatch::new(&lm.model, paths.unwrap_or(&default))?;
    let h = b.prefill(prompts)?;
    decode_timed(lm, &mut b, &h, t0, new_tokens)
}

/// Routed prefill then decode; returns the timing, the seconds spent in the routers (pooling,
/// router MLP, decision) and the chosen paths.
fn run_routed(
    lm: &LoadedModel,
    policy: &drllm_router::Policy,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<(Timing, f64, Vec<LayerPath>)> {
    let _g = tch::no_grad_guard();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let t0 = Instant::now();
    let mut b = PathBatch::new_routed(&lm.model, prompts.len());
    let mut router_s = 0.0;
    let h = b.prefill_routed(prompts, &mut |l, h| {
        let t = Instant::now();
        let d = policy.decide(l, h, &lens);
        router_s += t.elapsed().as_secs_f64();
        d
    })?;
    let timing = decode_timed(lm, &mut b, &h, t0, new_tokens)?;
    Ok((timing, router_s, b.paths().to_vec()))
}

/// Routers of `lm`'s shape as they are before training (Xavier weights, seed 0), on its device.
fn random_policy(lm: &LoadedModel, budget: f64) -> Result<drllm_router::Policy> {
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(lm.model.device());
    let shape = drllm_router::RouterShape {
        num_layers: lm.model.num_layers(),
        hidden_size: lm.model.cfg.hidden_size as usize,
        router_hidden: drllm_router::package::DR_LLM_ROUTER_HIDDEN,
    };
    let routers = drllm_router::Routers::new(&vs.root(), shape).snapshot();
    Ok(drllm_router::Policy::new(
        routers,
        drllm_router::package::DR_LLM_WINDOWS,
        budget,
    )?)
}

/// `--routers`: router overhead in prefill and routed vs baseline decode, side by side.
fn bench_routed(a: &BenchArgs, lm: &LoadedModel, dir: &std::path::Path) -> Result<()> {
    let policy = if dir.as_os_str() == "random" {
        random_policy(lm, a.budget)?
    } else {
        crate::routing::load_policy(lm, dir, a.budget)
            .with_context(|| format!("--routers {}", dir.display()))?
    };
    let n_layers = lm.model.num_layers();
    println!(
        "model {} | routers {} | budget {} | {} threads | prompt {} tokens | {} decode steps | {} repeats (medians)",
        a.m.model,
        dir.display(),
        a.budget,
        tch::get_num_threads(),
        a.prompt_tokens,
        a.new_tokens,
        a.repeats
    );
    println!(
        "{:>5} {:>7} {:>6} | {:>10} {:>12} {:>9} {:>10} | {:>14} {:>14} {:>8} {:>9}",
        "batch",
        "cost",
        "union",
        "routed ms",
        "same path ms",
        "overhead",
        "routers ms",
        "base decode/s",
        "routed dec/s",
        "speed-up",
        "cost gain"
    );
    for &bsz in &a.batch {
        let prompts = make_prompts(lm, bsz, a.prompt_tokens)?;
        // Warm-up (also fixes the paths the routers choose for these prompts).
        let (_, _, paths) = run_routed(lm, &policy, &prompts, 2)?;
        run_ours(lm, &prompts, Some(&paths), 0)?;
        run_ours(lm, &prompts, None, 2)?;
        let (mut routed, mut fixed, mut base, mut router) = (vec![], vec![], vec![], vec![]);
        for _ in 0..a.repeats {
            // Interleaved so machine noise hits all three alike.
            let (t, r, p) = run_routed(lm, &policy, &prompts, a.new_tokens)?;
            router.push(r);
            if p != paths {
                bail!("the routers chose other paths for the same prompts");
            }
            routed.push(t);
            fixed.push(run_ours(lm, &prompts, Some(&paths), 0)?.prefill_s);
            base.push(run_ours(lm, &prompts, None, a.new_tokens)?);
        }
        let cost = paths.iter().map(|p| p.cost()).sum::<usize>() as f64 / bsz as f64;
        let union = mean_union(&paths, &(0..bsz).collect::<Vec<_>>(), bsz);
        let routed_pre = median(routed.iter().map(|t| t.prefill_s).collect());
        let fixed_pre = median(fixed);
        let tok = (bsz * a.new_tokens) as f64;
        let dec = |ts: &[Timing]| median(ts.iter().map(|t| tok / t.decode_s).collect());
        let (rd, bd) = (dec(&routed), dec(&base));
        let gain = if cost > 0.0 {
            format!("{:.2}x", n_layers as f64 / cost)
        } else {
            "all skip".to_string()
        };
        println!(
            "{bsz:>5} {cost:>7.2} {union:>6.0} | {:>10.1} {:>12.1} {:>8.1}% {:>10.2} | {bd:>14.1} {rd:>14.1} {:>7.2}x {gain:>9}",
            1e3 * routed_pre,
            1e3 * fixed_pre,
            100.0 * (routed_pre / fixed_pre - 1.0),
            1e3 * median(router),
            rd / bd,
        );
    }
    if a.pool > 0 {
        pool_generation(a, lm, &policy)?;
    }
    println!(
        "overhead: routed prefill (routers decide each block) vs plain prefill along the same paths; \
         routers ms: time inside the routers (pooling, MLP, decision); union: block applications \
         of the batch per decode step (a block runs when any row uses it); cost gain: {n_layers} / average cost"
    );
    Ok(())
}

/// Block applications per decode step of each batch of `rows` (a block runs as often as its
/// most demanding row asks), averaged over the batches.
fn mean_union(paths: &[LayerPath], rows: &[usize], batch: usize) -> f64 {
    let n_layers = paths.first().map_or(0, |p| p.counts().len());
    let unions: Vec<usize> = rows
        .chunks(batch)
        .map(|g| {
            (0..n_layers)
                .map(|l| {
                    g.iter()
                        .map(|&r| paths[r].counts()[l] as usize)
                        .max()
                        .unwrap_or(0)
                })
                .sum()
        })
        .collect();
    unions.iter().sum::<usize>() as f64 / unions.len().max(1) as f64
}

/// `--pool`: end-to-end generation for many prompts in batches: the baseline, routed batches
/// decoded as they were prefilled (mixed paths), and routed prompts regrouped by path.
fn pool_generation(a: &BenchArgs, lm: &LoadedModel, policy: &drllm_router::Policy) -> Result<()> {
    let batch = a.batch.iter().copied().max().unwrap_or(8).max(1);
    let prompts = make_prompts(lm, a.pool, a.prompt_tokens)?;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    // No stop ids: every prompt generates exactly --new-tokens tokens.
    let opts = drllm_runtime::GenerateOptions {
        max_new_tokens: a.new_tokens,
        stop_ids: vec![],
    };
    let all_ones = vec![LayerPath::all_ones(lm.model.num_layers()); batch];
    let mut route = |rows: &[usize], l: usize, h: &tch::Tensor| {
        let ls: Vec<usize> = rows.iter().map(|&r| lens[r]).collect();
        policy.decide(l, h, &ls)
    };
    let (mut base, mut mixed, mut grouped) = (vec![], vec![], vec![]);
    let mut paths = vec![];
    for rep in 0..=a.repeats {
        let t = Instant::now();
        for c in prompts.chunks(batch) {
            let fixed = Paths::Fixed(&all_ones[..c.len()]);
            lm.model
                .generate(GenerateRequest::new(c, fixed, opts.clone()))?;
        }
        let tb = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for (i, c) in prompts.chunks(batch).enumerate() {
            let mut r = |rows: &[usize], l: usize, h: &tch::Tensor| {
                let rows: Vec<usize> = rows.iter().map(|&r| i * batch + r).collect();
                route(&rows, l, h)
            };
            // One chunk as one group: decoded exactly as prefilled.
            let routed = Paths::RoutedGrouped {
                route: &mut r,
                batch: c.len(),
            };
            lm.model
                .generate(GenerateRequest::new(c, routed, opts.clone()))?;
        }
        let tm = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let routed = Paths::RoutedGrouped {
            route: &mut route,
            batch,
        };
        let p = lm
            .model
            .generate(GenerateRequest::new(&prompts, routed, opts.clone()))?
            .paths;
        let tg = t.elapsed().as_secs_f64();
        paths = p;
        // The first round warms up.
        if rep > 0 {
            base.push(tb);
            mixed.push(tm);
            grouped.push(tg);
        }
    }
    let tokens = (a.pool * a.new_tokens) as f64;
    let cost = paths.iter().map(|p| p.cost()).sum::<usize>() as f64 / paths.len().max(1) as f64;
    let in_order: Vec<usize> = (0..paths.len()).collect();
    let by_path = drllm_runtime::path_order(&paths);
    let (b, m, g) = (median(base), median(mixed), median(grouped));
    println!(
        "\n{} prompts, batches of {batch}, {} new tokens each, prefill included (medians of {}); average cost {cost:.2}",
        a.pool, a.new_tokens, a.repeats
    );
    println!(
        "{:<26} {:>10} {:>9} {:>14}",
        "mode", "tokens/s", "speed-up", "union/step"
    );
    let n_layers = lm.model.num_layers() as f64;
    for (name, secs, union) in [
        ("baseline", b, n_layers),
        (
            "routed, batches as routed",
            m,
            mean_union(&paths, &in_order, batch),
        ),
        (
            "routed, grouped by path",
            g,
            mean_union(&paths, &by_path, batch),
        ),
    ] {
        println!(
            "{name:<26} {:>10.1} {:>8.2}x {:>14.2}",
            tokens / secs,
            b / secs,
            union
        );
    }
    Ok(())
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
    if let Some(dir) = &a.routers {
        return bench_routed(&a, &lm, dir);
    }
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
        run_ours(&lm, &prompts, None, 2)?;
        if let Some(h) = hf.as_mut() {
            h.run(&prompts, 2)?;
        }
        let (mut ours, mut theirs) = (vec![], vec![]);
        for _ in 0..a.repeats {
            ours.push(run_ours(&lm, &prompts, None, a.new_tokens)?);
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
