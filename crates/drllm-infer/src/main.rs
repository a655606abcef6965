//! `drllm-infer`: generation along a layer path or routed by a router package, logits dumps and
//! validation runs; flags and printing only (the work is in the `drllm_infer` library; the
//! throughput benchmark is `drllm-infer-bench`).
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use drllm_cli::{LogArgs, ModelArgs};
use drllm_infer::eval;
use drllm_infer::generate::{complete, encode_prompt, Routing};
use drllm_infer::routing::{load_policies, open_package, parse_path, path_for};
use drllm_runtime::LayerPath;

#[derive(Parser)]
#[command(
    name = "drllm-infer",
    version,
    about = "Run a frozen LLM along a layer path (skip / execute / repeat per block).",
    after_help = "Examples:
  drllm-infer generate --prompt \"What is the capital of France?\" --chat
  drllm-infer generate --prompt Hello --path 1,1,0,2,...     # one count per block
  drllm-infer eval --routers embedded --dataset arc_easy --split dev --limit 50
Run `drllm-infer <command> --help` for each command's flags."
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Greedy generation for one or more prompts (batched) along one layer path.
    #[command(after_help = "Examples:
  drllm-infer generate --prompt 'What is 2+3?' --chat
  drllm-infer generate --model path/to/Llama-3.2-3B-Instruct --device cuda --prompt 'Hi' --chat
  drllm-infer generate --prompt 'The capital of France is' --path 1,1,0,1,2,1,...  # one entry per block
  drllm-infer generate --prompt A --prompt B --max-new-tokens 32 --json
  drllm-infer generate --routers PKG --chat --prompt 'Which gas do plants take in?' --budget -0.3")]
    Generate(GenerateArgs),
    /// Writes the logits at every prompt position (f32) to a safetensors file, for parity checks.
    #[command(after_help = "Examples:
  drllm-infer logits --ids-file prompts.json --out logits.safetensors     # prompts.json: [[1, 2, 3], [4, 5]]
  drllm-infer logits --model dir --device cuda --dtype bf16 --ids-file p.json --path 1,0,2,... --out l.safetensors")]
    Logits(LogitsArgs),
    /// Validation run: routed vs all-execute baseline, fixed paths and controls on the same task
    /// prompts.
    #[command(after_help = "Examples:
  drllm-infer eval --routers PKG --dataset arc_easy --split dev --limit 50
  drllm-infer eval --routers PKG --dataset arc_challenge --split dev --budget -0.3 --json s.json --out samples.parquet
  drllm-infer eval --routers PKG --dataset arc_easy,arc_challenge --budget 0,-0.2,-0.4 --plot routing.png   # budget sweep
  drllm-infer eval --dataset piqa,boolq --path 1,1,0,... --task-path piqa=1,0,1,... --task-path boolq=0,1,1,...   # fixed paths alone
  drllm-infer eval --routers PKG --dataset piqa,sciq --control permuted,random   # routes permuted across prompts, random paths of equal cost")]
    Eval(Box<eval::EvalArgs>),
    /// Merge `eval --json` summaries (e.g. one per task and budget of an array job) into one
    /// table, CSV and plot.
    #[command(after_help = "Examples:
  drllm-infer merge evals/*.json
  drllm-infer merge evals/*.json --csv evals.csv --plot evals.png")]
    Merge(drllm_infer::merge::MergeArgs),
    /// Pool the per-sample files of split `eval --out` runs (one per task, say): every mode per
    /// task and over all tasks, paired with the baseline and with the routers on the same
    /// prompts, and the oracle over every mode but the baseline.
    #[command(after_help = "Examples:
  drllm-infer pool arc_easy.parquet arc_challenge.parquet
  drllm-infer pool evals/*.parquet --json pooled.json")]
    Pool(drllm_infer::pool::PoolArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt text; repeat the flag to generate for several prompts in one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Layer path: one count per block, each 0 (skip), 1 (execute) or 2 (repeat), comma
    /// separated. Default: every block once.
    #[arg(long, conflicts_with = "routers")]
    path: Option<String>,
    /// Router package (drllm-train --out), or `embedded` (the embedded model's reference
    /// routers): each prompt's path is chosen by the routers during prefill, then decoding
    /// follows it.
    #[arg(long, env = "DRLLM_ROUTERS")]
    routers: Option<std::path::PathBuf>,
    /// Bias of the routers toward skip (< 0) or toward execute (> 0), in [-1, 1]: -1 skips every
    /// block, 0 = the plain routers, 1 = every block once (the baseline).
    #[arg(
        long,
        default_value_t = 0.0,
        allow_hyphen_values = true,
        requires = "routers"
    )]
    budget: f64,
    /// With --routers: ignore them and run every block once (the baseline), after checking the
    /// package.
    #[arg(long, requires = "routers")]
    no_routing: bool,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Print one JSON object per prompt instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LogitsArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// JSON file holding a list of prompts, each a list of token ids.
    #[arg(long)]
    ids_file: std::path::PathBuf,
    /// Layer path (as for `generate`); default every block once.
    #[arg(long)]
    path: Option<String>,
    /// Output safetensors file: tensor `logits.{i}` of shape [len_i, vocab] per prompt.
    #[arg(long)]
    out: std::path::PathBuf,
}

fn generate(a: GenerateArgs) -> Result<()> {
    let path = parse_path(a.path.as_deref())?;
    let pkg = a.routers.as_deref().map(open_package).transpose()?;
    let lm = a.m.load()?;
    let n_layers = lm.model.num_layers();
    let policy = match (&a.routers, pkg) {
        (Some(dir), Some(pkg)) => {
            let (mut v, _) = load_policies(&lm, dir, pkg, &[a.budget])
                .with_context(|| format!("--routers {}", dir.display()))?;
            Some(v.pop().context("no policy")?)
        }
        _ => None,
    };
    let path = path_for(path, n_layers)?;
    let prompts = a
        .prompt
        .iter()
        .map(|text| encode_prompt(&lm, text, a.chat.then_some(a.system.as_deref())))
        .collect::<Result<Vec<_>>>()?;
    let routing = match policy.as_ref().filter(|_| !a.no_routing) {
        Some(p) => Routing::Routers(p),
        None => Routing::Path(path),
    };
    let t1 = Instant::now();
    let out = complete(&lm, &prompts, &routing, a.max_new_tokens)?;
    let secs = t1.elapsed().as_secs_f64();
    let new_tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
    let paths: Vec<&LayerPath> = out.iter().map(|g| &g.path).collect();
    for (i, g) in out.iter().enumerate() {
        let text = lm.tokenizer.decode(&g.tokens)?;
        if a.json {
            let v = serde_json::json!({
                "prompt": a.prompt[i], "text": text, "tokens": g.tokens, "stopped": g.stopped,
                "path": paths[i].to_string(), "cost": paths[i].cost(), "layers": n_layers,
            });
            println!("{v}");
        } else {
            if out.len() > 1 {
                println!("--- [{i}] {}", a.prompt[i]);
            }
            if a.routers.is_some() {
                println!("[path {} | cost {}/{n_layers}]", paths[i], paths[i].cost());
            }
            println!("{text}");
        }
    }
    let costs: Vec<usize> = paths.iter().map(|p| p.cost()).collect();
    let cost = if costs.windows(2).all(|w| w[0] == w[1]) {
        format!(
            "path cost {}/{n_layers} blocks",
            costs.first().copied().unwrap_or(0)
        )
    } else {
        let mean = costs.iter().sum::<usize>() as f64 / costs.len().max(1) as f64;
        format!("mean path cost {mean:.1}/{n_layers} blocks")
    };
    eprintln!(
        "{new_tokens} new tokens in {secs:.2}s ({:.1} tokens/s, batch {}); {cost}{}",
        new_tokens as f64 / secs.max(1e-9),
        prompts.len(),
        match (&a.routers, a.no_routing) {
            (Some(_), false) => format!(" (routed, budget {})", a.budget),
            (Some(_), true) => " (routing off)".to_string(),
            _ => String::new(),
        }
    );
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.ids_file)
        .with_context(|| format!("reading {}", a.ids_file.display()))?;
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of lists of token ids",
            a.ids_file.display()
        )
    })?;
    if prompts.is_empty() {
        bail!(
            "{}: no prompts; expected a JSON list of lists of token ids",
            a.ids_file.display()
        );
    }
    let path = parse_path(a.path.as_deref())?;
    let lm = a.m.load()?;
    let path = path_for(path, lm.model.num_layers())?;
    let logits = lm
        .model
        .prompt_logits(&prompts, &vec![path; prompts.len()])
        .with_context(|| format!("{}", a.ids_file.display()))?;
    let named: Vec<(String, tch::Tensor)> = logits
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("logits.{i}"), t.to_device(tch::Device::Cpu)))
        .collect();
    tch::Tensor::write_safetensors(&named, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} logits tensors to {}",
        named.len(),
        a.out.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("info");
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Eval(a) => eval::eval(*a),
        Cmd::Merge(a) => drllm_infer::merge::run(a),
        Cmd::Pool(a) => drllm_infer::pool::run(a),
    }
}
