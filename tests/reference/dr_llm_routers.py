"""Router logits as the paper's code (parameterlab/dr-llm) computes them, from a file written by
`drllm-train export --format dr-llm`: per block a Linear(hidden, 128) -> tanh-GELU -> Linear(128, 3)
applied to each of min(8, T) window means (T // windows tokens each, the remainder dropped) and
averaged. Reads {"routers": FILE, "inputs": FILE} (hidden states "h{T}" [T, H]) and prints the
logits per input as nested lists [L][3]. Written for drllm's tests from the paper's description of
its RouterBlock, not copied from it."""
import json
import sys

import torch
from safetensors.torch import load_file

job = json.load(sys.stdin)
state = load_file(job["routers"])
layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("model.routers.")})
blocks = []
for i in layers:
    w1, b1 = state[f"model.routers.{i}.linear1.weight"], state[f"model.routers.{i}.linear1.bias"]
    w2, b2 = state[f"model.routers.{i}.linear2.weight"], state[f"model.routers.{i}.linear2.bias"]
    lin1 = torch.nn.Linear(w1.shape[1], w1.shape[0])
    lin2 = torch.nn.Linear(w2.shape[1], w2.shape[0])
    lin1.load_state_dict({"weight": w1, "bias": b1})
    lin2.load_state_dict({"weight": w2, "bias": b2})
    blocks.append(torch.nn.Sequential(lin1, torch.nn.GELU(approximate="tanh"), lin2))

out = {"names": sorted(state), "logits": {}}
with torch.no_grad():
    for name, h in load_file(job["inputs"]).items():
        t = h.shape[0]
        w = min(8, t)
        size = t // w
        means = h[: w * size].reshape(w, size, -1).mean(dim=1)
        out["logits"][name] = [blk(means).mean(dim=0).tolist() for blk in blocks]
json.dump(out, sys.stdout)
