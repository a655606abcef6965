"""Writes real rows from the shared data in Hugging Face parquet layouts, for tests/data.rs.

usage: write_hf_parquet.py DATA_DIR OUT_DIR
  OUT/ARC-Easy/validation-00000-of-00001.parquet   (allenai/ai2_arc: question str, choices {text, label})
  OUT/gsm8k/main/train-00000-of-00001.parquet      (openai/gsm8k: question, answer)
  OUT/math/train-0000{0,1}-of-00002.parquet        (MATH raw columns, two shards)
  OUT/piqa/validation-00000-of-00001.parquet       (PIQA: goal, sol1, sol2, label)
  OUT/openbookqa/main/validation-00000-of-00001.parquet (allenai/openbookqa: question_stem, choices)
  OUT/sciq/validation-00000-of-00001.parquet       (allenai/sciq columns)
  OUT/boolq/validation-00000-of-00001.parquet      (super_glue boolq: question, passage, idx, label 0/1)
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

data, out = sys.argv[1], sys.argv[2]


def rows(path, n):
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


arc = rows(os.path.join(data, "arc/ARC-Easy-Dev.jsonl"), 10_000)
table = pa.table({
    "id": [r["id"] for r in arc],
    "question": [r["question"]["stem"] for r in arc],
    "choices": [{"text": [c["text"] for c in r["question"]["choices"]],
                 "label": [c["label"] for c in r["question"]["choices"]]} for r in arc],
    "answerKey": [r["answerKey"] for r in arc],
})
os.makedirs(os.path.join(out, "ARC-Easy"), exist_ok=True)
pq.write_table(table, os.path.join(out, "ARC-Easy/validation-00000-of-00001.parquet"))

gsm = rows(os.path.join(data, "gsm8k/train.jsonl"), 300)
os.makedirs(os.path.join(out, "gsm8k/main"), exist_ok=True)
pq.write_table(pa.Table.from_pylist(gsm), os.path.join(out, "gsm8k/main/train-00000-of-00001.parquet"), compression="zstd")

math = rows(os.path.join(data, "math/train.jsonl"), 400)
os.makedirs(os.path.join(out, "math"), exist_ok=True)
for k, part in enumerate((math[:200], math[200:])):
    pq.write_table(pa.Table.from_pylist(part), os.path.join(out, f"math/train-0000{k}-of-00002.parquet"), compression="snappy")

def put(rel, table):
    os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
    pq.write_table(table, os.path.join(out, rel))


piqa = rows(os.path.join(data, "piqa/valid.jsonl"), 10_000)
with open(os.path.join(data, "piqa/valid-labels.lst")) as f:
    labels = [int(x) for x in f.read().split()]
put("piqa/validation-00000-of-00001.parquet", pa.Table.from_pylist(
    [{**r, "label": lab} for r, lab in zip(piqa, labels)]))
obqa = rows(os.path.join(data, "openbookqa/dev.jsonl"), 10_000)
put("openbookqa/main/validation-00000-of-00001.parquet", pa.table({
    "id": [r["id"] for r in obqa],
    "question_stem": [r["question"]["stem"] for r in obqa],
    "choices": [{"text": [c["text"] for c in r["question"]["choices"]],
                 "label": [c["label"] for c in r["question"]["choices"]]} for r in obqa],
    "answerKey": [r["answerKey"] for r in obqa],
}))
with open(os.path.join(data, "sciq/valid.json")) as f:
    sciq = json.load(f)
put("sciq/validation-00000-of-00001.parquet", pa.Table.from_pylist(sciq))
boolq = rows(os.path.join(data, "boolq/val.jsonl"), 10_000)
put("boolq/validation-00000-of-00001.parquet", pa.Table.from_pylist(
    [{**r, "label": int(r["label"])} for r in boolq]))
print(json.dumps({"arc": len(arc), "gsm8k": len(gsm), "math": len(math), "piqa": len(piqa),
                  "openbookqa": len(obqa), "sciq": len(sciq), "boolq": len(boolq)}))
