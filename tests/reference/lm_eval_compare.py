"""lm-evaluation-harness against drllm-serve and against its own transformers backend on the
same weights (tests/serve.rs and docs/benchmarks.md). A JSON job on stdin:

  {"gguf": PATH, "tasks_dir": DIR, "task": NAME, "limit": N, "batch_size": B,
   "servers": {"label": {"base": "http://127.0.0.1:PORT", "model": NAME}, ...}, "hf": true,
   "max_gen_toks": 256}

For each server, `local-completions` with lm-eval's remote tokenizer (nothing but the server);
with "hf", lm-eval's `HFLM` on the GGUF dequantized by transformers (its tokenizer's
pre-tokenizer corrected as in hf_reference.py). Prints per backend: metrics, wall seconds, and
per sample the log-likelihood of every choice (multiple choice) or the filtered answer
(generation).
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402


def per_sample(res, task):
    out = {}
    for s in res["samples"][task]:
        key = str(s["doc_id"])
        resps = s["filtered_resps"]
        if resps and isinstance(resps[0], (list, tuple)):
            out[key] = {"lls": [float(r[0]) for r in resps], "target": s["target"]}
        else:
            raw = s["resps"][0][0] if s["resps"] and s["resps"][0] else None
            out[key] = {"answer": resps[0] if resps else None, "text": raw,
                        "target": s["target"]}
    return out


def run(model, job, tm):
    t = time.time()
    res = lm_eval.simple_evaluate(model=model, tasks=[job["task"]], task_manager=tm,
                                  limit=job["limit"], batch_size=job["batch_size"],
                                  log_samples=True, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    wall = time.time() - t
    metrics = {k: v for k, v in res["results"][job["task"]].items()
               if isinstance(v, (int, float)) and "stderr" not in k}
    return {"metrics": metrics, "wall_s": wall, "samples": per_sample(res, job["task"])}


def main():
    job = json.load(sys.stdin)
    tm = TaskManager(include_path=job["tasks_dir"])
    out = {}
    for label, srv in job.get("servers", {}).items():
        args = (f"model={srv['model']},base_url={srv['base']}/v1/completions,"
                f"tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,"
                f"max_length=2048,max_gen_toks={job.get('max_gen_toks', 256)}")
        out[label] = run(lm_eval.api.registry.get_model("local-completions")
                         .create_from_arg_string(args, {"batch_size": job["batch_size"]}), job, tm)
    if job.get("hf"):
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
        hf = HFLM(pretrained=model, tokenizer=tok, batch_size=job["batch_size"],
                  max_length=2048, max_gen_toks=job.get("max_gen_toks", 256))
        out["hf"] = run(hf, job, tm)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
