#!/usr/bin/env bash
# The reference run of the embedded model (issue 13; the figures are in docs/benchmarks.md):
# hours on 2 CPU cores, every stage resumable or reused on a rerun with the same OUT.
#   1. skip prior and static paths: drllm-search-bench static on 300 ARC train prompts;
#   2. path search of every ARC-Easy and ARC-Challenge train prompt (3,370);
#   3. router training (epoch and operating budget chosen on held-out train prompts);
#   4. validation on every ARC-Easy (570) and ARC-Challenge (299) dev prompt: baseline, the two
#      train-chosen static paths, the routers at a sweep of budgets;
#   5. learning curve: routers trained on 250 and 500 examples, evaluated at budget 0;
#   6. the oracle: the same search on the first 120 dev prompts of each task (never trained
#      on): how many have a correct path saving >= 3 blocks.
#   scripts/reference-run.sh [STAGE...]     (stages: static search train eval curve oracle; default all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${DRLLM_DATA:-../shared/data}"
out="${OUT:-.cache/reference}"
bin="${BIN:-target/release}"
py="${PYTHON:-.venv/bin/python}"
budgets="${BUDGETS:--0.2,0,0.4,0.8,1}"
stages="${*:-static search train eval curve oracle}"
mkdir -p "$out"
has() { [[ " $stages " == *" $1 "* ]]; }
log() { echo "== [$(date -u +%H:%M:%S)] $*"; }
json() { "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

if has static; then
  log "skip prior and greedy static paths on 300 train prompts"
  "$bin/drllm-search-bench" static --data "$data" --dataset arc_easy,arc_challenge --limit 150 \
    --blocks 6 --shortlist 8 --memo "$out/memo-train.jsonl" --json "$out/static-train.json"
fi
prior="$(json "$out/static-train.json" "','.join(map(str, d['skip_prior']))")"
static3="$(json "$out/static-train.json" "d['greedy'][2]['path']")"
static6="$(json "$out/static-train.json" "d['greedy'][5]['path']")"

if has search; then
  log "path search: every ARC train prompt"
  "$bin/drllm-coordinator" --workers 2 --data "$data" --dataset arc_easy,arc_challenge --split train \
    --num-simulations 50 --skip-prior "$prior" --seed 7 --out "$out/paths"
fi

train() {  # train OUTDIR [flags...]
  local pkg="$1"; shift
  "$bin/drllm-train" --data "$out/paths" --task-data "$data" --out "$pkg" --seed 0 "$@"
}
evaluate() {  # evaluate PKG NAME BUDGETS [flags...]
  local pkg="$1" name="$2" b="$3"; shift 3
  "$bin/drllm-infer" eval --routers "$pkg" --data "$data" --dataset arc_easy,arc_challenge --split dev \
    --budget="$b" --batch 16 --json "$out/$name.json" --out "$out/$name.parquet" "$@"
}

if has train; then
  log "router training on every example"
  train "$out/routers" --routed-every 5 --weights-dtype bf16 | tee "$out/train.log"
fi
if has eval; then
  log "validation on every ARC dev prompt"
  evaluate "$out/routers" eval-dev "$budgets" --path "$static3" --path "$static6" \
    --plot "$out/eval-dev.png" | tee "$out/eval-dev.txt"
fi
if has curve; then
  for n in 250 500; do
    log "learning curve: $n training examples"
    train "$out/routers-$n" --max-examples "$n" --routed-every 5 --val-budgets 0 | tee "$out/train-$n.log"
    evaluate "$out/routers-$n" "eval-dev-$n" 0 | tee "$out/eval-dev-$n.txt"
  done
fi
if has oracle; then
  log "oracle: the same search on the dev prompts"
  "$bin/drllm-coordinator" --workers 2 --data "$data" --dataset arc_easy,arc_challenge --split dev --limit 120 \
    --num-simulations 50 --skip-prior "$prior" --seed 7 --out "$out/oracle-dev"
fi
log "done: $out"
