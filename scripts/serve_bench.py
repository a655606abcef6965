#!/usr/bin/env python3
"""drllm-serve throughput and latency, measured side by side in one run (docs/benchmarks.md).

Starts target/release/drllm-serve on the embedded model (or --model), sends the same greedy
completion requests (real ARC-Easy dev questions) one at a time and then from more concurrent
clients (--clients, default 1,8,32: equal total work), and prints per setting: requests, errors, answers equal to the one-at-a-time
answer, p50 / p99 latency, generated tokens/s and the speed-up over one at a time. With
--lm-eval it also times lm-evaluation-harness on ARC-Easy dev (local task) against the server
(`local-completions`) and against its own transformers backend on the same weights, --repeats
times alternating, and prints the medians and the median of the per-repeat ratios.

  .venv/bin/python scripts/serve_bench.py [--requests 64] [--max-tokens 32] [--threads 2] [--clients 1,8,32]
      [--lm-eval [--repeats 3]] [--no-load]
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
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-load", action="store_true", help="skip the concurrency table")
    args = ap.parse_args()
    proc, base = start(args, ["--max-batch", str(args.max_batch), "--served-model-name", "m"])
    try:
        prompts = questions(args.requests)
        post(base, {"prompt": prompts[0], "max_tokens": 2, "temperature": 0})  # warm-up
        rows, solo = [], None
        for clients in ([] if args.no_load else [int(c) for c in args.clients.split(",")]):
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
              "p99 latency s | tokens/s | wall s | speed-up |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c, n, err, same, p50, p99, tps, wall in rows:
            print(f"| {c} | {n} | {err} | {same}/{n} | {p50:.2f} | {p99:.2f} | {tps:.1f} | "
                  f"{wall:.1f} | {tps / rows[0][6]:.2f}x |")
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
                walls_s, walls_h = [], []
                for _ in range(args.repeats):
                    out = subprocess.run([sys.executable,
                                          os.path.join(ROOT, "tests/reference/lm_eval_compare.py")],
                                         input=json.dumps(job), capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.exit(out.stderr[-2000:])
                    r = json.loads(out.stdout)
                    s, h = r["server"], r["hf"]
                    walls_s.append(s["wall_s"])
                    walls_h.append(h["wall_s"])
                    print(f"lm-eval run: server {s['wall_s']:.1f}s (acc {s['metrics']['acc,none']}, "
                          f"acc_norm {s['metrics']['acc_norm,none']}), hf {h['wall_s']:.1f}s "
                          f"(acc {h['metrics']['acc,none']}, acc_norm {h['metrics']['acc_norm,none']})",
                          flush=True)
                ratios = [h / s for h, s in zip(walls_h, walls_s)]
                print(f"\nlm-eval arc_easy_drllm, {args.lm_eval_limit} docs, batch 8, {args.repeats} "
                      f"runs: local-completions against drllm-serve median "
                      f"{statistics.median(walls_s):.1f}s, --model hf median "
                      f"{statistics.median(walls_h):.1f}s: hf / server = median "
                      f"{statistics.median(ratios):.2f}x (runs: "
                      f"{', '.join(f'{x:.2f}' for x in ratios)})")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
