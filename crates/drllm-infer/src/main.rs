//! `drllm-infer`: generation along a layer path or routed by a router package, logits dumps and
//! throughput benchmarks.
use std::time::Instant;

mod bench;
mod eval;
mod plot;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use drllm_cli::{LogArgs, ModelArgs};
use drllm_router::{Package, Policy};
use drllm_runtime::{GenerateOptions, LayerPath, LoadedModel, Message};

#[derive(Parser)]
#[command(
    name = "drllm-infer",
    version,
    about = "Run a frozen LLM along a layer path (skip / execute / repeat per block).",
    after_help = "Examples:
  drllm-infer generate --prompt \"What is the capital of France?\" --chat
  drllm-infer generate --prompt Hello --path 1,1,0,2,...     # one count per block
  drllm-infer bench --batch 1,8 --python none
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
    /// Prefill and decode tokens/s at several batch sizes, side by side with transformers (or,
    /// with --routers, routed against unrouted generation).
    #[command(after_help = "Examples:
  drllm-infer bench                                   # embedded model, batch 1 and 8, vs transformers
  drllm-infer bench --batch 1,4,16 --new-tokens 64 --python none
  drllm-infer bench --model path/to/Llama-3.2-3B --device cuda --dtype bf16
  drllm-infer bench --routers PKG --budget -0.5      # router overhead; routed vs baseline decode")]
    Bench(bench::BenchArgs),
    /// Validation run: routed vs all-execute baseline on the same task prompts.
    #[command(after_help = "Examples:
  drllm-infer eval --routers PKG --dataset arc_easy --split dev --limit 50
  drllm-infer eval --routers PKG --dataset arc_challenge --split dev --budget -0.3 --json s.json --out samples.parquet
  drllm-infer eval --routers PKG --dataset arc_easy,arc_challenge --budget 0,-0.2,-0.4 --plot routing.png   # budget sweep")]
    Eval(eval::EvalArgs),
}

/// Parses `--path` (before the model loads, so a typo fails fast); `None` when absent.
fn parse_path(path: Option<&str>) -> Result<Option<LayerPath>> {
    path.map(|p| p.parse::<LayerPath>().context("--path"))
        .transpose()
}

/// The parsed `--path` checked for a model of `n_layers` blocks (default: all ones).
fn path_for(path: Option<LayerPath>, n_layers: usize) -> Result<LayerPath> {
    let Some(p) = path else {
        return Ok(LayerPath::all_ones(n_layers));
    };
    p.check_len(n_layers).context("--path")?;
    Ok(p)
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

/// Reads the router package `spec` (a directory, or `embedded`: the reference routers of the
/// embedded model, compiled in), before the model loads so that a bad package fails fast.
pub(crate) fn open_package(spec: &std::path::Path) -> Result<(std::path::PathBuf, Package)> {
    let dir = drllm_router::embedded::resolve(spec)
        .with_context(|| format!("--routers {}", spec.display()))?;
    let pkg = Package::load(&dir).with_context(|| format!("--routers {}", spec.display()))?;
    Ok((dir, pkg))
}

/// The routing policy of the package `spec` for `lm` at `budget`.
pub(crate) fn load_policy(lm: &LoadedModel, spec: &std::path::Path, budget: f64) -> Result<Policy> {
    let (mut v, _) = load_policies(lm, spec, open_package(spec)?, &[budget])?;
    v.pop().context("no policy")
}

/// Routing policies of the package `spec` (read by [`open_package`]) for `lm` (same model,
/// same sizes) at each of `budgets`; also its manifest.
pub(crate) fn load_policies(
    lm: &LoadedModel,
    spec: &std::path::Path,
    (dir, pkg): (std::path::PathBuf, Package),
    budgets: &[f64],
) -> Result<(Vec<Policy>, drllm_router::PackageManifest)> {
    let dir = &dir;
    let fingerprint = lm.source.fingerprint()?;
    pkg.check_model(
        dir,
        &fingerprint,
        lm.model.num_layers(),
        lm.model.cfg.hidden_size as usize,
    )?;
    warn_held_out(spec, &pkg.manifest, budgets);
    let routers = pkg.routers.to_device(lm.model.device());
    let policies = budgets
        .iter()
        .map(|&b| Ok(Policy::new(routers.snapshot(), pkg.manifest.windows, b)?))
        .collect::<Result<_>>()?;
    Ok((policies, pkg.manifest))
}

/// Tells the user when the package's own held-out routing (drllm-train's budget sweep on
/// training prompts it never trained on) says the requested budgets lose accuracy: routers
/// that cost accuracy must not be used unknowingly.
fn warn_held_out(dir: &std::path::Path, m: &drllm_router::PackageManifest, budgets: &[f64]) {
    let Some(baseline) = m.data["routed_val_baseline_accuracy"].as_f64() else {
        return;
    };
    match m.data["recommended_budget"].as_f64() {
        Some(rec) => {
            if let Some(b) = budgets.iter().find(|&&b| b < rec) {
                tracing::warn!(
                    "{}: on its held-out training prompts these routers kept the baseline's \
                     accuracy ({baseline:.3}) only from budget {rec:+.2}; budget {b:+.2} may lose accuracy",
                    dir.display()
                );
            }
        }
        None => tracing::warn!(
            "{}: on its held-out training prompts these routers lost accuracy against the \
             baseline ({baseline:.3}) at every budget drllm-train measured (see `drllm-train \
             inspect`); budget 1 routes every block",
            dir.display()
        ),
    }
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
    let mut prompts = Vec::with_capacity(a.prompt.len());
    for text in &a.prompt {
        let ids = if a.chat {
            let mut msgs = vec![];
            if let Some(s) = &a.system {
                msgs.push(Message::system(s.clone()));
            }
            msgs.push(Message::user(text.clone()));
            let rendered = lm.tokenizer.apply_chat_template(&msgs)?;
            lm.tokenizer.encode(&rendered, false)?
        } else {
            lm.tokenizer.encode(text, true)?
        };
        prompts.push(ids);
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let t1 = Instant::now();
    let (out, paths) = match policy.filter(|_| !a.no_routing) {
        Some(p) => {
            let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
            let mut route = |l: usize, h: &tch::Tensor| p.decide(l, h, &lens);
            lm.model.generate_routed(&prompts, &mut route, &opts)?
        }
        None => {
            let paths = vec![path.clone(); prompts.len()];
            (lm.model.generate(&prompts, &paths, &opts)?, paths)
        }
    };
    let secs = t1.elapsed().as_secs_f64();
    let new_tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
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
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Eval(a) => eval::eval(a),
    }
}
