//! `drllm-infer`: generation along a layer path (and, later, routed validation runs).
use std::time::Instant;

mod bench;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drllm_runtime::{
    parse_dtype, DeviceSpec, GenerateOptions, LayerPath, LoadedModel, Message, ModelSource,
};

#[derive(Parser)]
#[command(
    name = "drllm-infer",
    version,
    about = "Run a frozen LLM along a layer path (skip / execute / repeat per block)."
)]
struct Cli {
    /// Log as JSON lines (for SLURM log scraping).
    #[arg(long, global = true, env = "DRLLM_LOG_JSON")]
    log_json: bool,
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
  drllm-infer generate --prompt A --prompt B --max-new-tokens 32 --json")]
    Generate(GenerateArgs),
    /// Prefill and decode tokens/s at several batch sizes, side by side with transformers.
    #[command(after_help = "Examples:
  drllm-infer bench                                   # embedded model, batch 1 and 8, vs transformers
  drllm-infer bench --batch 1,4,16 --new-tokens 64 --python none
  drllm-infer bench --model path/to/Llama-3.2-3B --device cuda --dtype bf16")]
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model: a Hugging Face model directory, a .gguf file, `embedded` (SmolLM2-135M-Instruct,
    /// installed by scripts/setup.sh), or a repo id present in the local Hugging Face cache.
    #[arg(long, env = "DRLLM_MODEL", default_value = "embedded")]
    model: String,
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
    #[arg(long)]
    path: Option<String>,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// cpu, cuda or cuda:N; `auto` picks the first GPU when one is visible.
    #[arg(long, env = "DRLLM_DEVICE", default_value = "auto")]
    device: String,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, bf16, f16.
    #[arg(long, env = "DRLLM_DTYPE", default_value = "auto")]
    dtype: String,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long, env = "DRLLM_THREADS")]
    threads: Option<i32>,
    /// Print one JSON object per prompt instead of text.
    #[arg(long)]
    json: bool,
}

fn init_logging(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DRLLM_LOG").unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// `auto` = first GPU when libtorch sees one, else CPU; otherwise cpu, cuda or cuda:N.
pub(crate) fn pick_device(spec: &str) -> Result<tch::Device> {
    Ok(if spec == "auto" {
        tch::Device::cuda_if_available()
    } else {
        spec.parse::<DeviceSpec>()?.0
    })
}

fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    let device = pick_device(&a.device)?;
    let kind = parse_dtype(&a.dtype, device)?;
    let source = ModelSource::resolve(&a.model)?;
    let t0 = Instant::now();
    let lm = LoadedModel::load(source, device, kind)
        .with_context(|| format!("loading model {}", a.model))?;
    let n_layers = lm.model.num_layers();
    tracing::info!(model = %a.model, layers = n_layers, ?device, ?kind, secs = t0.elapsed().as_secs_f64(), "model loaded");
    let path = match &a.path {
        Some(p) => {
            let p: LayerPath = p.parse().context("--path")?;
            p.check_len(n_layers).context("--path")?;
            p
        }
        None => LayerPath::all_ones(n_layers),
    };
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
    let paths = vec![path.clone(); prompts.len()];
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_ids: lm.stop_ids(),
    };
    let t1 = Instant::now();
    let out = lm.model.generate(&prompts, &paths, &opts)?;
    let secs = t1.elapsed().as_secs_f64();
    let new_tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
    for (i, g) in out.iter().enumerate() {
        let text = lm.tokenizer.decode(&g.tokens)?;
        if a.json {
            let v = serde_json::json!({
                "prompt": a.prompt[i], "text": text, "tokens": g.tokens, "stopped": g.stopped,
                "path": path.to_string(), "cost": path.cost(), "layers": n_layers,
            });
            println!("{v}");
        } else {
            if out.len() > 1 {
                println!("--- [{i}] {}", a.prompt[i]);
            }
            println!("{text}");
        }
    }
    eprintln!(
        "{new_tokens} new tokens in {secs:.2}s ({:.1} tokens/s, batch {}); path cost {}/{n_layers} blocks",
        new_tokens as f64 / secs.max(1e-9),
        prompts.len(),
        path.cost()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Bench(a) => bench::bench(a),
    }
}
