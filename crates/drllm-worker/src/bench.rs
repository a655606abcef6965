//! `drllm-worker-bench`: path-search throughput, batched engine vs the paper code's one-at-a-time
//! method, side by side in one run on the same prompts, with compute efficiency.
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Parser;
use drllm_cli::{reward_parser, DataDirArgs, LogArgs, ModelArgs};
use drllm_eval::{evaluate_alone, prepare, EvalOptions, PreparedPrompt};
use drllm_runtime::ModelConfig;
use drllm_search::{run, sample_seed, Search, SearchConfig, SearchResult};
use drllm_tasks::{data, Family, LoadOptions, RewardMode, Split, Style, TaskName, Template};
use drllm_worker::{run_searches, DriverOptions, RunStats};

#[derive(Parser)]
#[command(
    name = "drllm-worker-bench",
    version,
    about = "Search throughput: batched + early-stop evaluation vs one full generate per path, side by side.",
    after_help = "Examples:
  drllm-worker-bench --limit 20 --reward strict           # the paper's generate mode
  drllm-worker-bench --limit 20 --reward choice-logits
  drllm-worker-bench --limit 20 --reward cloze            # log-likelihood of each choice
  drllm-worker-bench --limit 8 --skip-alone               # batched engine only"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    d: DataDirArgs,
    /// ARC-Easy train prompts searched.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Simulations per prompt.
    #[arg(long, default_value_t = 50)]
    num_simulations: usize,
    /// Run seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Reward mode.
    #[arg(long, default_value = "strict", value_parser = reward_parser())]
    reward: RewardMode,
    /// Prompt style: instruct (chat template), base (plain text; for models without a chat
    /// template), or auto (base for the cloze rewards, else instruct).
    #[arg(long, default_value = "auto")]
    style: String,
    /// Token budget per evaluation (the paper code's is 10).
    #[arg(long, default_value_t = 10)]
    max_new_tokens: usize,
    /// Concurrent searches of the batched engine.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Prefix cache budget of the shared engine, in MiB.
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// Paths per search scored ahead by the last engine (see drllm-worker --lookahead).
    #[arg(long, default_value_t = 4)]
    lookahead: usize,
    /// Measure only the batched engines.
    #[arg(long)]
    skip_alone: bool,
}

/// Matmul FLOP/s of the model's device and dtype (median of 5 square 1024 products).
fn matmul_flops(dev: tch::Device, kind: tch::Kind) -> f64 {
    let _g = tch::no_grad_guard();
    let n = 1024i64;
    let a = tch::Tensor::randn([n, n], (kind, dev));
    let b = tch::Tensor::randn([n, n], (kind, dev));
    let _ = a.matmul(&b);
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = a.matmul(&b);
            let _ = c.double_value(&[0, 0]);
            2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(|x, y| x.total_cmp(y));
    rates[2]
}

/// Model FLOPs executed for one candidate: every block application on every prompt token (less
/// the `reused` ones resumed from the prefix cache) and decoded token (projections, MLP and
/// attention over the context so far), plus the LM head per token scored.
fn candidate_flops(
    cfg: &ModelConfig,
    prompt: usize,
    cost: usize,
    decoded: usize,
    reused: usize,
) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let (nh, nkv, hd) = (
        cfg.num_heads as f64,
        cfg.num_kv_heads as f64,
        cfg.head_dim as f64,
    );
    let linear = 2.0 * (h * nh * hd + 2.0 * h * nkv * hd + nh * hd * h + 3.0 * h * i);
    let attn_per_ctx = 4.0 * nh * hd;
    let p = prompt as f64;
    // Prefill: token t attends to t+1 keys; decode token k attends to prompt + k keys.
    let prefill = p * linear + attn_per_ctx * p * (p + 1.0) / 2.0;
    let decode: f64 = (0..decoded)
        .map(|k| linear + attn_per_ctx * (p + k as f64 + 1.0))
        .sum();
    let head = 2.0 * h * cfg.vocab_size as f64 * (decoded.max(1)) as f64;
    (cost - reused.min(cost)) as f64 * prefill + cost as f64 * decode + head
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<()> {
    let a = Cli::parse();
    a.log.init("warn");
    let lm = a.m.load()?;
    let mode = a.reward;
    let dir = a.d.dir()?;
    let samples = data::load(
        &dir,
        TaskName::ArcEasy,
        Split::Train,
        &LoadOptions {
            limit: Some(a.limit),
            ..Default::default()
        },
    )?
    .samples;
    let eval = EvalOptions {
        mode,
        max_new_tokens: a.max_new_tokens,
    };
    // The prompts the reward mode is searched with (cloze: the question alone, as plain text).
    let style = Style::resolve(&a.style, mode)?;
    let template = Template::builtin_for(Family::MultipleChoice, style, mode);
    let prompts: Vec<PreparedPrompt> = samples
        .iter()
        .map(|s| prepare(&lm, s, &template, &eval))
        .collect::<Result<_, _>>()?;
    let mean_len =
        prompts.iter().map(|p| p.ids.len()).sum::<usize>() as f64 / prompts.len().max(1) as f64;
    let search = SearchConfig {
        num_simulations: a.num_simulations,
        ..Default::default()
    };
    let peak = matmul_flops(lm.model.device(), lm.model.kind());
    println!(
        "{} ARC-Easy train prompts (mean {mean_len:.0} tokens) | {} simulations | reward {} | {} new tokens | {} threads | {:?} matmul {:.1} GFLOP/s",
        prompts.len(),
        a.num_simulations,
        a.reward,
        a.max_new_tokens,
        tch::get_num_threads(),
        lm.model.kind(),
        peak / 1e9
    );

    // Batched engines: concurrent searches, layer-synchronous batches, early decision; without
    // and with prefix sharing.
    // (seconds, evaluations, results by sample id) of each batched engine.
    type Run = (f64, usize, Vec<(String, SearchResult)>);
    let mut runs: Vec<Run> = vec![];
    let ahead_name = format!(
        "batched + shared prefixes + early stop + {} paths ahead",
        a.lookahead
    );
    for (name, cache_mb, lookahead) in [
        ("batched + early stop", 0, 0),
        (
            "batched + shared prefixes + early stop",
            a.prefix_cache_mb,
            0,
        ),
        (ahead_name.as_str(), a.prefix_cache_mb, a.lookahead),
    ] {
        let opts = DriverOptions {
            search: search.clone(),
            seed: a.seed,
            concurrency: a.concurrency,
            eval: eval.clone(),
            prefix_cache_bytes: cache_mb << 20,
            lookahead,
        };
        let mut results: Vec<(String, SearchResult)> = vec![];
        let t0 = Instant::now();
        let stats: RunStats =
            run_searches(&lm, prompts.iter().cloned().map(Ok).collect(), &opts, |o| {
                if let Ok(r) = o.result {
                    results.push((o.sample_id, r));
                }
            });
        let secs = t0.elapsed().as_secs_f64();
        ensure!(results.len() == prompts.len(), "some searches failed");
        let flops: f64 = stats
            .work
            .iter()
            .map(|&(p, c, d, r)| candidate_flops(&lm.model.cfg, p, c, d, r))
            .sum();
        let n = stats.evaluations.max(1) as f64;
        let used = stats.useful_evaluations();
        let decoded = stats.work.iter().map(|w| w.2).sum::<usize>() as f64 / n;
        let shared = if cache_mb > 0 {
            format!(
                ", {:.0}% of prefill block applications resumed from cache (peak {:.0} MiB)",
                100.0 * stats.prefix.blocks_reused as f64
                    / stats.prefix.blocks_requested.max(1) as f64,
                stats.prefix_peak_bytes as f64 / (1u64 << 20) as f64
            )
        } else {
            String::new()
        };
        println!(
            "{name}: {used} evaluations used ({} scored) in {secs:.1}s = {:.2} evals/s ({} batches, {decoded:.2} tokens decoded per evaluation, {} decode steps{shared}), compute {:.0}% of matmul peak",
            stats.evaluations,
            used as f64 / secs,
            stats.batches,
            stats.decode_steps,
            100.0 * flops / secs / peak
        );
        println!("  {}", stats.breakdown());
        results.sort_by(|x, y| x.0.cmp(&y.0));
        runs.push((secs, used, results));
    }
    let rate = |r: &Run| r.1 as f64 / r.0;
    let same_results = |x: &[(String, SearchResult)], y: &[(String, SearchResult)]| {
        x.len() == y.len()
            && x.iter().zip(y).all(|((ia, ra), (ib, rb))| {
                ia == ib
                    && ra.good_paths == rb.good_paths
                    && ra.simulations == rb.simulations
                    && ra.evaluations == rb.evaluations
                    && ra.default_reward == rb.default_reward
            })
    };
    let ahead_same = same_results(&runs[2].2, &runs[1].2);
    println!(
        "prefix sharing: {:.2}x (evals/s, shared vs unshared batched); scoring ahead: {:.2}x over shared (identical search results: {})",
        rate(&runs[1]) / rate(&runs[0]),
        rate(&runs[2]) / rate(&runs[1]),
        if ahead_same { "yes" } else { "NO" }
    );
    ensure!(ahead_same, "scoring ahead changed search results");
    if a.skip_alone {
        println!("peak RSS {:.0} MiB", peak_rss_mib());
        return Ok(());
    }

    // The paper code's method: one search after another, one full generate call per path.
    let t1 = Instant::now();
    let (mut evals_a, mut flops_a, mut decoded_a) = (0usize, 0.0f64, 0usize);
    let mut alone: Vec<(String, SearchResult)> = vec![];
    for p in &prompts {
        let s = Search::new(
            lm.model.num_layers(),
            search.clone(),
            sample_seed(a.seed, &p.sample_id),
        );
        let r = run(s, |path| {
            let e = evaluate_alone(&lm, p, path, &eval)?;
            evals_a += 1;
            decoded_a += e.tokens.len();
            flops_a += candidate_flops(&lm.model.cfg, p.ids.len(), path.cost(), e.tokens.len(), 0);
            Ok::<_, drllm_eval::EvalError>(e.reward)
        })?;
        alone.push((p.sample_id.clone(), r));
    }
    let secs_a = t1.elapsed().as_secs_f64();
    println!(
        "one at a time, full generate: {evals_a} evaluations in {secs_a:.1}s = {:.2} evals/s ({:.2} tokens decoded per evaluation), compute {:.0}% of matmul peak",
        evals_a as f64 / secs_a,
        decoded_a as f64 / evals_a.max(1) as f64,
        100.0 * flops_a / secs_a / peak
    );
    // Same searches, same answers: the speed-up is not bought with different results.
    alone.sort_by(|x, y| x.0.cmp(&y.0));
    let same = runs.iter().all(|r| same_results(&r.2, &alone));
    let rate_a = evals_a as f64 / secs_a;
    println!(
        "speed-up vs one at a time (evals/s): batched {:.2}x, batched + shared {:.2}x, + ahead {:.2}x; identical search results: {}; peak RSS {:.0} MiB",
        rate(&runs[0]) / rate_a,
        rate(&runs[1]) / rate_a,
        rate(&runs[2]) / rate_a,
        if same { "yes" } else { "NO" },
        peak_rss_mib()
    );
    ensure!(same, "batched and one-at-a-time searches differ");
    Ok(())
}
