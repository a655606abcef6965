#!/usr/bin/env bash
# One-call GPU check for a lent GPU machine (torch 2.11.0 + transformers at its python3, no
# network). Build here first, then carry the binaries and the ARC-Easy train prompts:
#   cargo build --release -p drllm-infer -p drllm-worker && mkdir -p .gpu/data/arc &&
#     for b in drllm-infer drllm-infer-bench drllm-worker-bench; do strip -o .gpu/$b target/release/$b; done &&
#     cp ../shared/data/arc/ARC-Easy-Train.jsonl .gpu/data/arc/
#   (device run, carry [".gpu"]):  bash scripts/gpu-check.sh .gpu/drllm-infer
# Runs: CUDA visibility through our libtorch link, bf16 logits parity on a random
# LLaMA-3.2-3B-shaped model vs transformers, the throughput benchmark on it, the path search
# (batched evaluator, 64 concurrent searches, with its time per evaluation by phase) and routed
# decoding (randomly initialised routers of the model's shape) on it.
# Results go to $OUT (the device tool's folder) or /tmp/gpu-check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${1:-target/release/drllm-infer}"
bench_bin="$(dirname "$bin")/drllm-infer-bench"
search_bin="$(dirname "$bin")/drllm-worker-bench"
data="${GPU_CHECK_DATA:-$(dirname "$bin")/data}"
shape="${GPU_CHECK_SHAPE:-3b}"
device="${GPU_CHECK_DEVICE:-cuda}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
# Our binaries carry an rpath to the build machine's libtorch; point them at this one.
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
  echo "== parity ($shape, $device, bf16)"
  "$py" scripts/gpu_check.py --bin "$bin" --out "$out/work" --shape "$shape" --device "$device"
  echo "== generate on $device"
  "$bin" generate --model "$out/work/llama32-$shape-random" --device "$device" --prompt "hello" --max-new-tokens 16 --json
  echo "== benchmark"
  "$bench_bin" --model "$out/work/llama32-$shape-random" --device "$device" --dtype bf16 --batch 1,8 --prompt-tokens 128 --new-tokens 32 --repeats 5 --python "$py"
  echo "== path search (64 concurrent searches, strict reward, bf16)"
  "$search_bin" --model "$out/work/llama32-$shape-random" --device "$device" --dtype bf16 --data "$data" \
    --limit 64 --concurrency 64 --num-simulations 20 --reward strict --style base --skip-alone
  echo "== routed decoding (random routers, budget 0 and -0.5)"
  for b in 0 -0.5; do
    "$bench_bin" --model "$out/work/llama32-$shape-random" --device "$device" --dtype bf16 --routers random \
      --budget "$b" --batch 1,8,32 --prompt-tokens 128 --new-tokens 32 --repeats 5
  done
} 2>&1 | tee "$out/gpu-check.log"
# Only the log comes back; the model files are large.
rm -rf "$out/work"
