#!/usr/bin/env bash
# The README's main command: the whole drllm pipeline on the embedded model (SmolLM2-135M) and
# the data in ../shared/data, in a few minutes on 2 CPU cores (after the first build).
#   1. path search: drllm-coordinator with 2 local workers over ARC-Easy train prompts (Parquet
#      paths dataset), cloze reward (the gold choice's text is the most likely continuation of
#      the question, lm-evaluation-harness's ARC metric), skips tried in the embedded model's
#      skip prior first;
#   2. router training: drllm-train (examples = every prompt with a correct path, labelled with
#      its cheapest one; the epoch kept is the one routing held-out prompts best);
#   3. validation: drllm-infer eval on held-out ARC-Easy dev prompts: the baseline, the best
#      static path of the same order of cost (chosen on train prompts), the quickstart's routers
#      at a few budgets and the reference routers shipped for the embedded model;
#   4. a summary table.
# Every stage resumes or is reused on a rerun with the same flags (outputs are keyed by them).
#
#   scripts/quickstart.sh [--data DIR] [--out DIR] [--arc N] [--dev N] [--sims N]
#                         [--budgets LIST] [--workers N]
# Larger runs: see "End-to-end quickstart" in README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${DRLLM_DATA:-../shared/data}"
out="${OUT:-.cache/quickstart}"
arc=200 dev=100 sims=50 budgets="-0.3,0,0.5" workers=2
usage="usage: scripts/quickstart.sh [--data DIR] [--out DIR] [--arc N] [--dev N] [--sims N] [--budgets LIST] [--workers N]"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
  case "$1" in
    --data) data="$2" ;;
    --out) out="$2" ;;
    --arc) arc="$2" ;;
    --dev) dev="$2" ;;
    --sims) sims="$2" ;;
    --budgets) budgets="$2" ;;
    --workers) workers="$2" ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift 2
done
for f in arc/ARC-Easy-Train.jsonl arc/ARC-Easy-Dev.jsonl; do
  [ -f "$data/$f" ] || { echo "quickstart: $data/$f not found (pass --data DIR holding arc/)" >&2; exit 1; }
done
start=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

# The test suite runs this script after building everything itself.
if [ -z "${DRLLM_QUICKSTART_NO_BUILD:-}" ]; then
  stage "set-up and release build (first run only: minutes)"
  bash scripts/setup.sh
  cargo build --release --locked --workspace
fi
# Where cargo put the binaries (CARGO_TARGET_DIR when the user sets one).
bin="${CARGO_TARGET_DIR:-target}/release"
ref=routers/smollm2-135m-instruct
# The embedded model's skip prior and best static paths, measured on 300 ARC train prompts by
# `drllm-search-bench static` (docs/benchmarks.md); the reference routers' search used them too.
prior="$(cat "$ref/skip-prior.txt")"
static3="$(sed -n 1p "$ref/static-paths.txt")"
static6="$(sed -n 2p "$ref/static-paths.txt")"
mkdir -p "$out"
arc_out="$out/paths-arc_easy-n$arc-s$sims"
pkg="$out/routers-n$arc-s$sims"

stage "path search: $arc ARC-Easy train prompts, $sims simulations each, $workers workers -> $arc_out"
"$bin/drllm-coordinator" --workers "$workers" --data "$data" --dataset arc_easy --split train \
  --limit "$arc" --num-simulations "$sims" --skip-prior "$prior" --seed 7 --out "$arc_out"

stage "router training -> $pkg"
"$bin/drllm-train" --data "$arc_out" --task-data "$data" --out "$pkg" --seed 0

stage "validation: $dev held-out ARC-Easy dev prompts: baseline, static paths, routers at budgets $budgets, reference routers"
"$bin/drllm-infer" eval --routers "$pkg" --data "$data" --dataset arc_easy --split dev \
  --limit "$dev" --budget="$budgets" --path "$static3" --path "$static6" \
  --json "$out/eval.json" --out "$out/eval.parquet" --plot "$out/routing.png"
"$bin/drllm-infer" eval --routers embedded --data "$data" --dataset arc_easy --split dev \
  --limit "$dev" --budget=0 --json "$out/eval-reference.json"

stage "summary"
"${PYTHON:-.venv/bin/python}" - "$arc_out" "$pkg" "$out/eval.json" "$out/eval-reference.json" "$ref/reference.json" "$out/routing.png" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
arc_out, pkg, ev, ev_ref, reference, plot, secs = sys.argv[1:]
m = json.load(open(f"{pkg}/manifest.json"))
print("reward: cloze (a path is right when the gold choice's text is the most likely continuation)")
d = m["data"]
print("\npath search (paths dataset)")
for s in d["sources"]:
    print(f"  {s['path']}: {s['rows']} prompts searched, {s['examples']} training examples")
print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in d["rows_by_outcome"].items()))
lc = m["label_counts"]
n = max(sum(lc), 1)
print(f"  labels: skip {100 * lc[0] / n:.1f}%, execute {100 * lc[1] / n:.1f}%, repeat {100 * lc[2] / n:.1f}%")
best = m["epochs"][m["best_epoch"] - 1]
print(f"\nrouter training: {d['examples']} examples ({d['train']} train / {d['val']} validation)")
if best.get("val_routed_accuracy") is not None:
    print(f"  epoch {m['best_epoch']} kept: routed accuracy {best['val_routed_accuracy']:.3f} at cost "
          f"{best['val_routed_cost']:.2f} on {d['routed_val_prompts']} held-out prompts "
          f"(baseline {d['routed_val_baseline_accuracy']:.3f})")

def table(path, title):
    e = json.load(open(path))
    L = e["num_layers"]
    print(f"\n{title} (cost = blocks applied per token, baseline {L})")
    print(f"  {'mode':<16} {'accuracy [95% CI]':<24} {'- baseline [paired 95%]':<26} {'cost':>6} {'saved':>7}")
    for t in e["tasks"]:
        rows = [("baseline", t["baseline"])]
        rows += [(f"static -{round(L - r['cost'])}", r) for r in t.get("static", [])]
        rows += [(f"routed {r['budget']:+.1f}", r) for r in t["routed"]]
        for name, r in rows:
            lo, hi = r["ci95"]
            diff = ""
            if "minus_baseline" in r:
                dl, dh = r["minus_baseline"]["paired_ci95"]
                diff = f"{r['minus_baseline']['accuracy']:+.3f} [{dl:+.3f}, {dh:+.3f}]"
            print(f"  {name:<16} {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]   {diff:<26} {r['cost']:>6.2f} {100 * r['blocks_saved'] / L:>6.1f}%")
    return e

e = table(ev, f"validation on held-out arc_easy dev prompts, this run's routers")
table(ev_ref, "the reference routers (routers/smollm2-135m-instruct) on the same prompts")
r = json.load(open(reference))
print(f"\nreference run (docs/benchmarks.md): {r['summary']}")
print(f"\nplot: {plot}")
print(f"per-sample answers: {ev[:-5]}.parquet; summary: {ev}; routers: {pkg}")
print(f"total {int(secs)}s")
PY
