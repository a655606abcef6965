//! `drllm-infer-bench`: prefill and decode throughput of the runtime, side by side with
//! transformers, or routed against unrouted generation (the work is in `drllm_infer::bench`).
use anyhow::Result;
use clap::Parser;
use drllm_cli::LogArgs;
use drllm_infer::bench;

#[derive(Parser)]
#[command(
    name = "drllm-infer-bench",
    version,
    about = "Prefill and decode tokens/s at several batch sizes, side by side with transformers \
             (or, with --routers, routed against unrouted generation).",
    after_help = "Examples:
  drllm-infer-bench                                   # embedded model, batch 1 and 8, vs transformers
  drllm-infer-bench --batch 1,4,16 --new-tokens 64 --python none
  drllm-infer-bench --model path/to/Llama-3.2-3B --device cuda --dtype bf16
  drllm-infer-bench --routers PKG --budget -0.5      # router overhead; routed vs baseline decode"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    bench: bench::BenchArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init("info");
    bench::bench(cli.bench)
}
