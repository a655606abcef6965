"""lm-evaluation-harness 0.4.13's own multiple-choice tasks (piqa, openbookqa, sciq, boolq,
arc_easy, arc_challenge), run with its `hf` backend on the embedded GGUF, over documents read
here from the upstream files in the data directory (tests/cloze.rs compares drllm with them).

The task configurations are lm-eval's registered YAML files, unchanged except for where the
documents come from (a local JSON file instead of the hub): doc_to_text, doc_to_choice,
doc_to_target and the metrics are lm-eval's. The documents are built here independently of
drllm's readers, with drllm's documented split rule (PIQA, SciQ and BoolQ dev = rows 1, 5, 9, ...
of upstream validation).

A JSON job on stdin: {"gguf": PATH, "data": DIR, "tasks": {"piqa": N, ...}, "batch_size": B}
Prints {"task": [{"id": ID, "lls": [...], "acc": 0/1, "acc_norm": 0/1 or null}, ...], ...}.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

CARVE_EVERY = 4


def carved_dev(rows):
    """drllm's dev split of PIQA, SciQ and BoolQ: rows 1, 5, 9, ... (from 1) of validation."""
    return [(i + 1, r) for i, r in enumerate(rows) if i % CARVE_EVERY == 0]


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def docs_for(task, data, n):
    """(drllm sample id, document in the Hugging Face dataset's fields), first n of dev."""
    if task == "piqa":
        rows = jsonl(os.path.join(data, "piqa/valid.jsonl"))
        with open(os.path.join(data, "piqa/valid-labels.lst")) as f:
            labels = [int(x) for x in f.read().split()]
        out = [(f"valid:{i}", {**r, "label": labels[i - 1]}) for i, r in carved_dev(rows)]
    elif task == "openbookqa":
        out = [(r["id"], {"id": r["id"], "question_stem": r["question"]["stem"],
                          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                      "label": [c["label"] for c in r["question"]["choices"]]},
                          "answerKey": r["answerKey"]})
               for r in jsonl(os.path.join(data, "openbookqa/dev.jsonl"))]
    elif task == "sciq":
        with open(os.path.join(data, "sciq/valid.json"), encoding="utf-8") as f:
            rows = json.load(f)
        out = [(f"valid:{i}", r) for i, r in carved_dev(rows)]
    elif task == "boolq":
        rows = jsonl(os.path.join(data, "boolq/val.jsonl"))
        out = [(str(r["idx"]), {**r, "label": int(bool(r["label"]))}) for _, r in carved_dev(rows)]
    elif task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
        out = [(r["id"], {"id": r["id"], "question": r["question"]["stem"],
                          "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                      "label": [c["label"] for c in r["question"]["choices"]]},
                          "answerKey": r["answerKey"]})
               for r in jsonl(os.path.join(data, f"arc/{name}-Dev.jsonl"))]
    else:
        raise SystemExit(f"unknown task {task}")
    return out[:n]


def load_yaml(path):
    """A task YAML with its `include` (a file beside it) merged underneath, as lm-eval reads it."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    inc = cfg.pop("include", None)
    if inc:
        base = load_yaml(os.path.join(os.path.dirname(path), inc))
        base.update(cfg)
        cfg = base
    return cfg


def main():
    job = json.load(sys.stdin)
    tm = TaskManager()
    tmp = tempfile.mkdtemp()
    configs, ids = [], {}
    for task, n in job["tasks"].items():
        docs = docs_for(task, job["data"], n)
        ids[task] = [i for i, _ in docs]
        path = os.path.join(tmp, f"{task}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for _, d in docs:
                f.write(json.dumps(d) + "\n")
        cfg = load_yaml(tm.task_index[task].yaml_path)
        # Only where the documents come from changes; the task keeps its name.
        cfg.update(dataset_path="json", dataset_name=None,
                   dataset_kwargs={"data_files": {"validation": path}},
                   training_split=None, validation_split="validation", test_split=None,
                   fewshot_split=None)
        cfg.pop("tag", None)
        configs.append(cfg)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lm_eval.models.huggingface import HFLM
    sys.path.insert(0, os.path.dirname(__file__))
    from hf_reference import correct_pretokenizer
    d, f = os.path.split(job["gguf"])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    correct_pretokenizer(tok, job["gguf"])
    torch.set_num_threads(int(job.get("threads", 2)))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=job.get("batch_size", 8), max_length=2048)
    res = lm_eval.simple_evaluate(model=hf, tasks=configs, task_manager=tm, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    out = {}
    for task in job["tasks"]:
        rows = []
        for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
            rows.append({"id": ids[task][s["doc_id"]],
                         "lls": [float(r[0]) for r in s["filtered_resps"]],
                         "target": s["target"],
                         "acc": s.get("acc"), "acc_norm": s.get("acc_norm")})
        out[task] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
