#!/usr/bin/env bash
# The paper's own search code and drllm's, side by side in one run on the same prompts (issue 18):
# the official Dr.LLM MCTS (parameterlab/dr-llm at 14e8837, run unchanged by
# ../shared/bench/official-harness) and `drllm-worker --standalone`, each on the first N ARC-Easy
# train prompts (file order, as the harness serves them), the same simulations, the strict
# answer rule, the same torch thread count, one after the other (alternating per repetition).
# Prints evaluations/s, samples/h and peak RSS of each, the ratio, and drllm's time per
# evaluation by phase; writes everything to OUT/summary.json.
#
#   scripts/official-bench.sh [--workdir DIR] [--limit 20] [--sims 50] [--threads 2]
#                             [--repeat 1] [--out DIR] [-- EXTRA drllm-worker FLAGS]
#
# DIR is the harness's scratch folder (default .cache/official): made by the harness's setup.sh
# when absent, which needs OFFICIAL_SNAPSHOT=<git dir of a parameterlab/dr-llm checkout> (about 2
# minutes, pip installs). 20 prompts x 50 simulations take about 5 minutes for the paper's code
# and 1.5 minutes for drllm on 2 cores. Not part of the test command: it needs the paper's code.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
workdir="$root/.cache/official"
limit=20 sims=50 threads=2 repeat=1 out="$root/.cache/official-bench"
data="${DRLLM_DATA:-$root/../shared/data}"
bin="${BIN:-$root/target/release}"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --sims) sims="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "official-bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
harness="$root/../shared/bench/official-harness"
log() { echo "== [$(date -u +%H:%M:%S)] $*" >&2; }

jsonl="$data/arc/ARC-Easy-Train.jsonl"
[ -s "$jsonl" ] || { echo "official-bench.sh: $jsonl not found (--data DIR: the ARC jsonl layout)" >&2; exit 1; }
if [ ! -x "$workdir/.venv/bin/python" ] || [ ! -d "$workdir/official" ]; then
  if [ -z "${OFFICIAL_SNAPSHOT:-}" ]; then
    echo "official-bench.sh: no harness in $workdir; set OFFICIAL_SNAPSHOT to the git dir of a parameterlab/dr-llm checkout (commit 14e8837) to make one, or pass --workdir" >&2
    exit 1
  fi
  log "setting up the official harness in $workdir"
  bash "$harness/setup.sh" "$workdir" >&2
fi
[ -x "$bin/drllm-worker" ] || { echo "official-bench.sh: $bin/drllm-worker missing (cargo build --release -p drllm-worker)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "official-bench.sh: needs GNU time (/usr/bin/time; apt-get install time) for peak RSS" >&2; exit 1; }
mkdir -p "$out"

for r in $(seq 1 "$repeat"); do
  official() {
    log "repetition $r: the paper's code, $limit prompts x $sims simulations"
    (cd "$workdir" && OFFICIAL_DIR=official ARC_JSONL="$jsonl" GGUF_DIR=model OMP_NUM_THREADS="$threads" \
      /usr/bin/time -f "%M" -o "$out/official-$r.rss" \
      .venv/bin/python run_mcts.py "$limit" "$sims" "$out/official-$r.json" > "$out/official-$r.log" 2>&1)
  }
  drllm() {
    log "repetition $r: drllm-worker --standalone, $limit prompts x $sims simulations"
    /usr/bin/time -f "%M" -o "$out/drllm-$r.rss" \
      "$bin/drllm-worker" --standalone --model embedded --data "$data" --dataset arc_easy --split train \
      --limit "$limit" --num-simulations "$sims" --reward strict --seed 7 --threads "$threads" \
      --out "$out/drllm-$r.jsonl" --stats "$out/drllm-$r.stats.json" ${extra[@]+"${extra[@]}"} \
      > "$out/drllm-$r.log" 2>&1
  }
  # Alternate the order so a slow phase of the shared machine does not always hit the same side.
  if [ $((r % 2)) = 1 ]; then official; drllm; else drllm; official; fi
done

"$root/.venv/bin/python" - "$out" "$repeat" "$limit" "$sims" "$threads" <<'PY'
import json, statistics as st, sys
out, repeat, limit, sims, threads = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rows = []
for r in range(1, repeat + 1):
    o = json.load(open(f"{out}/official-{r}.json"))
    S = o["samples"]
    o_wall = sum(s["wall_s"] for s in S)
    o_evals = sum(s["generate_calls"] for s in S)
    d = json.load(open(f"{out}/drllm-{r}.stats.json"))
    rss = lambda side: int(open(f"{out}/{side}-{r}.rss").read().split()[-1]) / 1024
    rows.append({
        "official": {"samples": len(S), "evaluations": o_evals, "wall_s": o_wall,
                     "evals_per_s": o_evals / o_wall, "samples_per_h": 3600 * len(S) / o_wall,
                     "found": sum(s["mcts_found"] for s in S), "peak_rss_mib": rss("official")},
        "drllm": {"samples": d["samples"], "evaluations": d["evaluations"], "wall_s": d["wall_s"],
                  "evals_per_s": d["evaluations"] / d["wall_s"],
                  "samples_per_h": 3600 * d["samples"] / d["wall_s"], "found": d["found"],
                  "peak_rss_mib": rss("drllm"), "phases_s": d["phases_s"],
                  "tokens_per_eval": d["tokens_decoded"] / max(d.get("evaluations_scored", d["evaluations"]), 1),
                  "ahead_unused": d.get("evaluated_ahead_unused", 0), "lookahead": d.get("lookahead", 0),
                  "decode_steps": d["decode_steps"], "batches": d["batches"]},
    })
med = lambda side, k: st.median(x[side][k] for x in rows)
ratio = st.median(x["drllm"]["evals_per_s"] / x["official"]["evals_per_s"] for x in rows)
ratio_h = st.median(x["drllm"]["samples_per_h"] / x["official"]["samples_per_h"] for x in rows)
print(f"{limit} ARC-Easy train prompts x {sims} simulations, strict reward, {threads} threads, "
      f"{repeat} repetition(s), medians:")
print("| engine | evaluations | wall s | evals/s | samples/h | peak RSS MiB | found |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for side, name in [("official", "paper's code (data_generation.py MCTS)"), ("drllm", "drllm-worker --standalone")]:
    print(f"| {name} | {med(side, 'evaluations'):.0f} | {med(side, 'wall_s'):.1f} | "
          f"{med(side, 'evals_per_s'):.2f} | {med(side, 'samples_per_h'):.0f} | "
          f"{med(side, 'peak_rss_mib'):.0f} | {med(side, 'found'):.0f} |")
print(f"drllm / paper's code: {ratio:.2f}x evaluations/s, {ratio_h:.2f}x samples/h"
      + ("" if repeat == 1 else " (per repetition: " + ", ".join(
          "%.2f" % (x["drllm"]["evals_per_s"] / x["official"]["evals_per_s"]) for x in rows) + ")"))
# drllm's time per evaluation by phase (median repetition by evals/s).
mid = sorted(rows, key=lambda x: x["drllm"]["evals_per_s"])[len(rows) // 2]["drllm"]
n, wall = mid["evaluations"], mid["wall_s"]
print(f"drllm time per evaluation: {1e3 * wall / n:.1f} ms ({mid['tokens_per_eval']:.2f} tokens decoded per evaluation, "
      f"{mid['decode_steps']} decode steps in {mid['batches']} batches)")
for k, s in list(mid["phases_s"].items()) + [("other (feed, scheduling, idle)", wall - sum(mid["phases_s"].values()))]:
    print(f"  {k:32s} {1e3 * s / n:7.2f} ms  {100 * s / wall:5.1f}%")
json.dump({"limit": int(limit), "simulations": int(sims), "threads": int(threads), "runs": rows,
           "ratio_evals_per_s": ratio, "ratio_samples_per_h": ratio_h},
          open(f"{out}/summary.json", "w"), indent=1)
print(f"summary: {out}/summary.json")
PY
