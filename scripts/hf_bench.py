"""transformers side of `drllm-infer-bench`: same model, same dtype, same prompts, same greedy
KV-cached decoding loop, timed the same way. Reads one JSON request per line on stdin
({"ids": [[...], ...], "new_tokens": N}) and answers one JSON line per request."""
import json
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

torch.set_grad_enabled(False)


def main():
    path, threads, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(threads)
    kind = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    d, f = os.path.split(path)
    if f.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=kind)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=kind)
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids = torch.tensor(req["ids"], device=device)
        n = req["new_tokens"]
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(n):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.cpu()
        sync()
        t2 = time.perf_counter()
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"prefill_s": t1 - t0, "decode_s": t2 - t1, "peak_rss_mib": rss_mib}), flush=True)


if __name__ == "__main__":
    main()
