#!/usr/bin/env bash
# Search quality at equal evaluation budgets: UCT vs the paper code's chain descent on the same
# prompts, seeds and simulation budget. Prints found-rate, mean best cost and mean blocks saved.
#   scripts/search-quality.sh [LIMIT] [SIMULATIONS] [REWARD]     (defaults: 50 50 lenient)
# EXTRA_FLAGS passes further drllm-worker flags to both runs (e.g. "--stop-on-saving 0").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit="${1:-50}"; sims="${2:-50}"; reward="${3:-lenient}"
out="${OUT:-/tmp/drllm-search-quality}"
mkdir -p "$out"
cargo build --release --locked -p drllm-worker >&2
for sel in uct chain; do
  target/release/drllm-worker --standalone --dataset arc_easy --split train --limit "$limit" \
    --num-simulations "$sims" --seed 7 --reward "$reward" --selection "$sel" ${EXTRA_FLAGS:-} --out "$out/$sel.jsonl" >&2
done
.venv/bin/python - "$out" "$sims" "$reward" <<'PY'
import json, sys
out, sims, reward = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"ARC-Easy train, {sims} simulations, reward {reward}; mean best cost and saved over found samples")
print(f"{'selection':>9} | {'samples':>7} | {'found':>5} | {'found-rate':>10} | {'mean best cost':>14} | {'mean saved':>10} | {'evaluations':>11}")
for sel in ("uct", "chain"):
    rows = [json.loads(l) for l in open(f"{out}/{sel}.jsonl")]
    ok = [r for r in rows if "error" not in r]
    found = [r for r in ok if r["found"]]
    costs = [r["best_cost"] for r in found]
    saved = [len(r["best_path"]) - r["best_cost"] for r in found]
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    print(f"{sel:>9} | {len(ok):>7} | {len(found):>5} | {len(found)/max(1,len(ok)):>10.2f} | {mean(costs):>14.2f} | {mean(saved):>10.2f} | {sum(r['evaluations'] for r in ok):>11}")
PY
