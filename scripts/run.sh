#!/usr/bin/env bash
# The README's main command: ARC questions from the data directory answered by the embedded
# model along the default path and along a shorter path, side by side; then the distributed path
# search (drllm-coordinator with 2 local workers) over a few ARC-Easy train prompts, written as
# the Parquet paths dataset to $OUT (default .cache/run/paths; run again to resume).
#   scripts/run.sh [--data DIR] [--limit N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data="${DRLLM_DATA:-../shared/data}"
limit=3
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    *) echo "usage: scripts/run.sh [--data DIR] [--limit N]" >&2; exit 2 ;;
  esac
done
arc="$data/arc/ARC-Challenge-Dev.jsonl"
[ -f "$arc" ] || { echo "run.sh: $arc not found (pass --data DIR holding arc/ARC-Challenge-Dev.jsonl)" >&2; exit 1; }
bash scripts/setup.sh
cargo build --release --locked --workspace
args=()
while IFS= read -r q; do args+=(--prompt "$q"); done < <(.venv/bin/python - "$arc" "$limit" <<'PY'
import json, sys
path, limit = sys.argv[1], int(sys.argv[2])
with open(path) as f:
    for i, line in enumerate(f):
        if i >= limit: break
        row = json.loads(line)
        q = row["question"]
        choices = " ".join(f"{c['label']}. {c['text']}" for c in q["choices"])
        print(f"{q['stem']} {choices} Answer with the letter of the correct choice.")
PY
)
# Where cargo put the binaries (CARGO_TARGET_DIR when the user sets one).
release="${CARGO_TARGET_DIR:-target}/release"
bin="$release/drllm-infer"
echo "== default path (all 30 blocks once)"
"$bin" generate --model embedded --chat --max-new-tokens 24 "${args[@]}"
# Skip two late blocks and repeat an early one: cost 29 of 30.
path="1,1,1,1,2,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,0,1,1,0,1"
echo "== shorter path $path"
"$bin" generate --model embedded --chat --max-new-tokens 24 --path "$path" "${args[@]}"
out="${OUT:-.cache/run/paths}"
echo "== path search: $limit ARC-Easy train prompts, 20 simulations each, 2 workers -> $out"
"$release/drllm-coordinator" --workers 2 --data "$data" --dataset arc_easy --split train \
  --limit "$limit" --num-simulations 20 --seed 7 --out "$out"
find "$out/data" -name '*.parquet' | sort
.venv/bin/python - "$out" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/_manifest.json"))
print(f"{m['rows']} rows in {len(m['parts'])} part(s), {len(m['failed'])} failed, complete: {m['complete']}")
try:
    import polars as pl
    df = pl.scan_parquet(f"{sys.argv[1]}/data/**/*.parquet", hive_partitioning=True).collect()
    print(df.select(["sample_id", "task", "default_correct", "found", "best_cost", "evaluations"]))
except ImportError:
    pass
PY
