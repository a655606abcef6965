#!/usr/bin/env python3
"""drllm-serve throughput and latency, measured side by side in one run (docs/benchmarks.md).

Starts target/release/drllm-serve on the embedded model (or --model), sends the same greedy
completion requests (real ARC-Easy dev questions) one at a time and then from 8 and 64
concurrent clients, and prints per setting: requests, errors, answers equal to the one-at-a-time
answer, p50 / p99 latency, generated tokens/s and the speed-up over one at a time. With
--lm-eval it also times lm-evaluation-harness on ARC-Easy dev (local task) against the server
(`local-completions`) and against its own transformers backend on the same weights.

  .venv/bin/python scripts/serve_bench.py [--requests 64] [--max-tokens 32] [--threads 2] [--lm-eval]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(args, extra):
    cmd = [os.path.join(ROOT, "target/release/drllm-serve"), "--port", "0",
           "--threads", str(args.threads), "--model", args.model] + extra
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"on (http://[0-9.:]+)/v1", line)
        if m:
            # Keep reading its log so that the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, m.group(1)
    sys.exit("drllm-serve exited before serving")


def post(base, body):
    r = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(r, timeout=3600) as resp:
            out = json.loads(resp.read())
        return time.time() - t, out["choices"][0]["text"], out["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - every failure counts as an error
        return time.time() - t, None, repr(e)


def questions(n):
    path = os.path.join(ROOT, "..", "shared", "data", "arc", "ARC-Easy-Dev.jsonl")
    out = []
    with open(os.environ.get("DRLLM_ARC_DEV", path)) as f:
        for line in f:
            out.append("Question: " + json.loads(line)["question"]["stem"] + "\nAnswer:")
            if len(out) == n:
                break
    return out


def run(base, prompts, max_tokens, clients):
    bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0} for p in prompts]
    t = time.time()
    with ThreadPoolExecutor(max_workers=clients) as ex:
        res = list(ex.map(lambda b: post(base, b), bodies))
    return time.time() - t, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--lm-eval", action="store_true")
    ap.add_argument("--lm-eval-limit", type=int, default=40)
    args = ap.parse_args()
    proc, base = start(args, ["--max-batch", str(args.max_batch), "--served-model-name", "m"])
    try:
        prompts = questions(args.requests)
        post(base, {"prompt": prompts[0], "max_tokens": 2, "temperature": 0})  # warm-up
        rows, solo = [], None
        for clients in (1, 8, 64):
            wall, res = run(base, prompts, args.max_tokens, clients)
            ok = [r for r in res if r[1] is not None]
            if solo is None:
                solo = [r[1] for r in res]
            same = sum(r[1] == s for r, s in zip(res, solo))
            lat = sorted(r[0] for r in ok) or [float("nan")]
            toks = sum(r[2] for r in ok)
            rows.append((clients, len(res), len(res) - len(ok), same, statistics.median(lat),
                         lat[min(len(lat) - 1, int(0.99 * len(lat)))], toks / wall, wall))
        print(f"drllm-serve, {args.requests} ARC-Easy dev questions, greedy, max_tokens "
              f"{args.max_tokens}, --threads {args.threads}, --max-batch {args.max_batch}")
        print("| clients | requests | errors | equal to one-at-a-time | p50 latency s | "
              "p99 latency s | tokens/s | speed-up |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c, n, err, same, p50, p99, tps, _ in rows:
            print(f"| {c} | {n} | {err} | {same}/{n} | {p50:.2f} | {p99:.2f} | {tps:.1f} | "
                  f"{tps / rows[0][6]:.2f}x |")
        if args.lm_eval:
            with tempfile.TemporaryDirectory() as tmp:
                data = os.path.realpath(os.path.join(ROOT, "..", "shared", "data"))
                src = os.path.join(ROOT, "tests/reference/lm_eval/arc_easy_drllm.yaml")
                with open(src) as f, open(os.path.join(tmp, "arc_easy_drllm.yaml"), "w") as o:
                    o.write(f.read().replace("${DATA}", data))
                job = {"gguf": os.path.join(ROOT, ".cache/drllm/SmolLM2-135M-Instruct.Q4_1.gguf"),
                       "tasks_dir": tmp, "task": "arc_easy_drllm", "limit": args.lm_eval_limit,
                       "batch_size": 8, "hf": True, "threads": args.threads,
                       "servers": {"server": {"base": base, "model": "m"}}}
                out = subprocess.run([sys.executable,
                                      os.path.join(ROOT, "tests/reference/lm_eval_compare.py")],
                                     input=json.dumps(job), capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(out.stderr[-2000:])
                r = json.loads(out.stdout)
                s, h = r["server"], r["hf"]
                print(f"\nlm-eval arc_easy_drllm, {args.lm_eval_limit} docs, batch 8: "
                      f"local-completions against drllm-serve {s['wall_s']:.1f}s "
                      f"(acc {s['metrics']['acc,none']}), --model hf {h['wall_s']:.1f}s "
                      f"(acc {h['metrics']['acc,none']}): hf / server = "
                      f"{h['wall_s'] / s['wall_s']:.2f}x")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
