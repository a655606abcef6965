#!/usr/bin/env bash
# The reference run of the embedded model (issue 13; the figures are in docs/benchmarks.md):
# hours on 2 CPU cores, every stage resumable or reused on a rerun with the same OUT.
#   1. skip prior and static paths: drllm-search-bench static on 300 ARC train prompts;
#   2. path search of every ARC-Easy and ARC-Challenge train prompt (3,370);
#   3. router training (epoch and operating budget chosen on held-out train prompts);
#   4. validation on every ARC-Easy (570) and ARC-Challenge (299) dev prompt: baseline, the two
#      train-chosen static paths, the routers at a sweep of budgets;
#   5. learning curve: routers trained on 500 and 1,000 examples, evaluated the same way;
#   6. the oracle: the same search on the dev prompts (never trained on): how many have a
#      correct path saving >= 3 blocks.
#   scripts/reference-run.sh [STAGE...]     (stages: static search train eval curve oracle; default all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${DRLLM_DATA:-../shared/data}"
out="${OUT:-.cache/reference}"
bin="${BIN:-target/release}"
py="${PYTHON:-.venv/bin/python}"
budgets="${BUDGETS:--0.2,0,0.2,0.4,0.6,0.8,0.9}"
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
evaluate() {  # evaluate PKG NAME BUDGETS
  "$bin/drllm-infer" eval --routers "$1" --data "$data" --dataset arc_easy,arc_challenge --split dev \
    --budget="$3" --path "$static3" --path "$static6" --batch 16 \
    --json "$out/$2.json" --out "$out/$2.parquet" --plot "$out/$2.png"
}

if has train; then
  log "router training on every example"
  train "$out/routers" --weights-dtype bf16 | tee "$out/train.log"
fi
if has eval; then
  log "validation on every ARC dev prompt"
  evaluate "$out/routers" eval-dev "$budgets" | tee "$out/eval-dev.txt"
fi
if has curve; then
  for n in 500 1000; do
    log "learning curve: $n training examples"
    train "$out/routers-$n" --max-examples "$n" --routed-every 5 | tee "$out/train-$n.log"
    evaluate "$out/routers-$n" "eval-dev-$n" "0,0.4,0.8" | tee "$out/eval-dev-$n.txt"
  done
fi
if has oracle; then
  log "oracle: the same search on the dev prompts"
  "$bin/drllm-coordinator" --workers 2 --data "$data" --dataset arc_easy,arc_challenge --split dev \
    --num-simulations 50 --skip-prior "$prior" --seed 7 --out "$out/oracle-dev"
fi
log "done: $out"
