#!/usr/bin/env bash
# The reference run of a model (issue 13 for the embedded model, issue 30 for
# qwen2.5-coder-1.5b-instruct; the figures are in docs/benchmarks.md): hours on 2 CPU cores,
# every stage resumable or reused on a rerun with the same OUT.
#   0. prior: the single-skip ranking alone (drllm-search-bench static --blocks 1), so the
#      search can start before the greedy static sets are grown (both share one reward memo);
#   1. static: skip prior and greedy static paths on train prompts (drllm-search-bench static);
#   2. search: path search of ARC-Easy and ARC-Challenge train prompts (all, or SEARCH_LIMIT
#      of each; rerun with a larger limit to extend a run);
#   3. train: router training (epoch and operating budget chosen on held-out train prompts);
#   4. eval: every ARC-Easy (570) and ARC-Challenge (299) dev prompt: baseline, the two
#      train-chosen static paths, the routers at a sweep of budgets with their controls;
#   5. curve: routers trained on 250 and 500 examples, evaluated at budget 0;
#   6. oracle: the same search on the first ORACLE_LIMIT dev prompts of each task (never trained
#      on): how many have a correct path saving >= 3 blocks.
#   7. snapshot: copy the search's paths dataset (and the prior's reward memo) to
#      results/MODEL/, verified, so that hours of search survive a replaced working copy.
#   scripts/reference-run.sh [STAGE...]   (stages: prior static search train eval curve oracle
#                                          snapshot; default all but prior)
# Environment: MODEL (default embedded; e.g. qwen2.5-coder-1.5b-instruct after
# scripts/fetch-model.sh), OUT (default .cache/reference for the embedded model, else
# .cache/reference-MODEL), STATIC_LIMIT (train prompts of each task for the static stages,
# default 150), SHORTLIST (candidates per greedy step, default 8), SEARCH_LIMIT (default all),
# ORACLE_LIMIT (default 120), BUDGETS, DRLLM_DATA, BIN, PYTHON.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${DRLLM_DATA:-../shared/data}"
model="${MODEL:-embedded}"
if [ "$model" = embedded ]; then out="${OUT:-.cache/reference}"; else out="${OUT:-.cache/reference-$model}"; fi
bin="${BIN:-target/release}"
py="${PYTHON:-.venv/bin/python}"
budgets="${BUDGETS:--0.2,0,0.4,0.8,1}"
static_limit="${STATIC_LIMIT:-150}"
shortlist="${SHORTLIST:-8}"
oracle_limit="${ORACLE_LIMIT:-120}"
search_limit=()
[ -n "${SEARCH_LIMIT:-}" ] && search_limit=(--limit "$SEARCH_LIMIT")
stages="${*:-static search train eval curve oracle snapshot}"
export DRLLM_MODEL="$model"
# One search worker with both cores for a fetched model (on the 1.5B model faster than two of one
# thread each, and half the memory: docs/benchmarks.md); two for the embedded model, as its run
# was made.
workers=2
[ "$model" = embedded ] || workers=1
mkdir -p "$out"
has() { [[ " $stages " == *" $1 "* ]]; }
log() { echo "== [$(date -u +%H:%M:%S)] $*"; }
json() { "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

static_bench() {  # static_bench BLOCKS SHORTLIST JSON
  "$bin/drllm-search-bench" static --data "$data" --dataset arc_easy,arc_challenge \
    --limit "$static_limit" --blocks "$1" --shortlist "$2" --memo "$out/memo-train.jsonl" --json "$3"
}
if has prior; then
  log "single-skip ranking (the skip prior) on $static_limit train prompts of each task"
  static_bench 1 1 "$out/static-rank.json"
fi
if has static; then
  log "skip prior and greedy static paths on $static_limit train prompts of each task"
  static_bench 6 "$shortlist" "$out/static-train.json"
fi
# The prior from the full static stage when it ran, else from the ranking alone.
ranked="$out/static-train.json"
[ -f "$ranked" ] || ranked="$out/static-rank.json"
prior=""
if has search || has oracle; then prior="$(json "$ranked" "','.join(map(str, d['skip_prior']))")"; fi

if has search; then
  log "path search: ARC train prompts (${SEARCH_LIMIT:-all} of each task)"
  "$bin/drllm-coordinator" --workers "$workers" --data "$data" --dataset arc_easy,arc_challenge \
    --split train "${search_limit[@]}" --num-simulations 50 --skip-prior "$prior" --seed 7 \
    --out "$out/paths"
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
statics() {  # the train-chosen static paths of 3 and 6 blocks, as --path flags
  local s3 s6
  s3="$(json "$out/static-train.json" "d['greedy'][2]['path']")"
  s6="$(json "$out/static-train.json" "d['greedy'][5]['path']")"
  echo "--path $s3 --path $s6"
}
if has eval; then
  log "validation on every ARC dev prompt"
  # shellcheck disable=SC2046
  evaluate "$out/routers" eval-dev "$budgets" $(statics) --control permuted,random \
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
  "$bin/drllm-coordinator" --workers "$workers" --data "$data" --dataset arc_easy,arc_challenge --split dev --limit "$oracle_limit" \
    --num-simulations 50 --skip-prior "$prior" --seed 7 --out "$out/oracle-dev"
fi
if has snapshot; then
  dest="results/$model"
  log "snapshot of $out/paths into $dest"
  mkdir -p "$dest/paths"
  # The manifest first: parts committed while copying are not in it, and are left out.
  cp "$out/paths/_manifest.json" "$dest/paths/_manifest.json.new"
  rm -rf "$dest/paths/data"
  cp -r "$out/paths/data" "$out/paths/README.md" "$dest/paths/"
  mv "$dest/paths/_manifest.json.new" "$dest/paths/_manifest.json"
  "$py" - "$dest/paths" <<'PY'
import json, os, sys
root = sys.argv[1]
listed = {p["path"] for p in json.load(open(os.path.join(root, "_manifest.json")))["parts"]}
for d, _, files in os.walk(os.path.join(root, "data")):
    for f in files:
        rel = os.path.relpath(os.path.join(d, f), root)
        if rel not in listed:
            os.remove(os.path.join(d, f))
PY
  [ -f "$out/memo-train.jsonl" ] && cp "$out/memo-train.jsonl" "$dest/single-skip-rewards.jsonl"
  [ -f "$ranked" ] && cp "$ranked" "$dest/skip-prior.json"
  "$bin/drllm-data" verify "$dest/paths"
fi
log "done: $out"
