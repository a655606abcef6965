#!/usr/bin/env bash
# The README's main command: the whole drllm pipeline on the embedded model (SmolLM2-135M) and
# the data in ../shared/data, in about 7 minutes on 2 CPU cores (after the first build).
#   1. path search: drllm-coordinator with 2 local workers over ARC-Easy and DART level-1 train
#      prompts (Parquet paths datasets);
#   2. router training: drllm-train on both datasets (router package);
#   3. validation: drllm-infer eval on held-out ARC-Easy dev prompts, baseline vs routed at a few
#      budgets (accuracy with 95% intervals, cost), JSON summary, per-sample Parquet and a plot;
#   4. a summary table.
# Reward: lenient (the answer letter or the choice's text); the paper's strict letter-only rule
# scores the 135M model 0 everywhere, so nothing would be learned from it.
# Every stage resumes or is reused on a rerun with the same flags (outputs are keyed by them).
#
#   scripts/quickstart.sh [--data DIR] [--out DIR] [--arc N] [--dart N] [--dev N] [--sims N]
#                         [--budgets LIST] [--workers N]
# Larger runs: see "End-to-end quickstart" in README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${DRLLM_DATA:-../shared/data}"
out="${OUT:-.cache/quickstart}"
arc=96 dart=4 dev=60 sims=50 budgets="0,-0.3,-0.6" workers=2
usage="usage: scripts/quickstart.sh [--data DIR] [--out DIR] [--arc N] [--dart N] [--dev N] [--sims N] [--budgets LIST] [--workers N]"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
  case "$1" in
    --data) data="$2" ;;
    --out) out="$2" ;;
    --arc) arc="$2" ;;
    --dart) dart="$2" ;;
    --dev) dev="$2" ;;
    --sims) sims="$2" ;;
    --budgets) budgets="$2" ;;
    --workers) workers="$2" ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift 2
done
for f in arc/ARC-Easy-Train.jsonl arc/ARC-Easy-Dev.jsonl math/train.jsonl; do
  [ -f "$data/$f" ] || { echo "quickstart: $data/$f not found (pass --data DIR holding arc/ and math/)" >&2; exit 1; }
done
start=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

# The test suite runs this script after building everything itself.
if [ -z "${DRLLM_QUICKSTART_NO_BUILD:-}" ]; then
  stage "set-up and release build (first run only: minutes)"
  bash scripts/setup.sh
  cargo build --release --locked --workspace
fi
bin=target/release
mkdir -p "$out"
arc_out="$out/paths-arc_easy-n$arc-s$sims"
dart_out="$out/paths-dart-1-n$dart"
pkg="$out/routers-n$arc-d$dart-s$sims"

stage "path search: $arc ARC-Easy train prompts, $sims simulations each, $workers workers -> $arc_out"
"$bin/drllm-coordinator" --workers "$workers" --data "$data" --dataset arc_easy --split train \
  --limit "$arc" --num-simulations "$sims" --reward lenient --seed 7 --out "$arc_out"
dart_sims=$(( sims < 20 ? sims : 20 ))
stage "path search: $dart DART level-1 train prompts, $dart_sims simulations, 48 new tokens -> $dart_out"
"$bin/drllm-coordinator" --workers "$workers" --data "$data" --dataset dart-1 --split train \
  --limit "$dart" --num-simulations "$dart_sims" --max-new-tokens 48 --seed 7 --out "$dart_out"

stage "router training -> $pkg"
"$bin/drllm-train" --data "$arc_out" --data "$dart_out" --out "$pkg" --seed 0

stage "validation: $dev held-out ARC-Easy dev prompts, baseline vs routed at budgets $budgets"
"$bin/drllm-infer" eval --routers "$pkg" --data "$data" --dataset arc_easy --split dev \
  --limit "$dev" --budget="$budgets" --reward lenient \
  --json "$out/eval.json" --out "$out/eval.parquet" --plot "$out/routing.png"

stage "summary"
"${PYTHON:-.venv/bin/python}" - "$arc_out" "$dart_out" "$pkg" "$out/eval.json" "$out/routing.png" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
arc_out, dart_out, pkg, ev, plot, secs = sys.argv[1:]
m = json.load(open(f"{pkg}/manifest.json"))
print("reward: lenient (an answer counts when it gives the right letter or the choice's text)")
print("\npath search (paths datasets)")
for s in m["data"]["sources"]:
    print(f"  {s['path']}: {s['rows']} prompts searched, {s['found']} with a path the model answers correctly along")
d = m["data"]
best = m["epochs"][m["best_epoch"] - 1]
print(f"\nrouter training: {d['examples']} examples ({d['train']} train / {d['val']} validation)")
print(f"  validation macro-F1 {best['val_macro_f1']:.3f} (best epoch {m['best_epoch']}) vs {d['majority_baseline_macro_f1']:.3f} for always-{d['majority_class']}")
e = json.load(open(ev))
L = e["num_layers"]
print(f"\nvalidation on held-out {e['tasks'][0]['task']} {e['split']} prompts (cost = blocks applied per token, baseline {L})")
print(f"  {'mode':<14} {'accuracy [95% CI]':<24} {'cost':>6} {'saved':>7}")
for t in e["tasks"]:
    rows = [("baseline", t["baseline"])] + [(f"routed {r['budget']:+.1f}", r) for r in t["routed"]]
    for name, r in rows:
        lo, hi = r["ci95"]
        print(f"  {name:<14} {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]   {r['cost']:>6.2f} {100 * r['blocks_saved'] / L:>6.1f}%")
print(f"\nplot: {plot}")
print(f"per-sample answers: {ev[:-5]}.parquet; summary: {ev}; routers: {pkg}")
print(f"total {int(secs)}s")
PY
