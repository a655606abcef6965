"""GPU parity check (run by scripts/gpu-check.sh on a machine with a CUDA GPU, torch and
transformers, no network).

Creates a random LLaMA-3.2-3B-shaped model with transformers (llama3 RoPE scaling, GQA, tied
embeddings), saves it, and compares `drllm-infer logits` (bf16 on CUDA) with transformers on the
same weights, along the default path and a path with skips and repeats. The reference is
transformers in f32 on the same bf16 weights; our bf16 error must stay within twice transformers'
own bf16 error (plus a small floor), and the greedy next token must agree where the reference's
top-2 margin exceeds both errors. `--shape tiny --device cpu` runs the same plumbing anywhere.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from hf_reference import with_path  # noqa: E402

torch.set_grad_enabled(False)

SHAPES = {
    # LLaMA-3.2-3B: 28 blocks, hidden 3072, 24 heads / 8 kv heads, MLP 8192, vocab 128256.
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}


def make_model(shape, target, device):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      initializer_range=0.02, rope_parameters={
                          "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.normal_(1.0, 0.1)
    model.save_pretrained(target)
    # A byte-level tokenizer (no network here to fetch LLaMA's): enough for loading.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(target)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="3b", choices=SHAPES)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    target = os.path.join(a.out, f"llama32-{a.shape}-random")
    t0 = time.time()
    model = make_model(a.shape, target, a.device)
    print(f"created {target} in {time.time() - t0:.1f}s", flush=True)
    n = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (ln,), generator=g).tolist() for ln in (37, 64, 9)]
    edited = [1] * n
    for l in (3, n - 4):
        edited[l] = 0
    edited[5] = 2
    ids_file = os.path.join(a.out, "prompts.json")
    with open(ids_file, "w") as f:
        json.dump(prompts, f)
    failures = []
    for counts in (None, edited):
        label = "default" if counts is None else "edited"
        out = os.path.join(a.out, f"ours-{label}.safetensors")
        cmd = [a.bin, "logits", "--model", target, "--device", a.device, "--dtype", "bf16",
               "--ids-file", ids_file, "--out", out]
        if counts is not None:
            cmd += ["--path", ",".join(map(str, counts))]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"[{label}] drllm-infer logits in {time.time() - t0:.1f}s", flush=True)
        ours = load_file(out)
        with with_path(model, counts):
            for i, p in enumerate(prompts):
                ids = torch.tensor([p], device=a.device)
                ref32 = model.float()(ids, use_cache=False).logits[0].float().cpu()
                ref16 = model.to(torch.bfloat16)(ids, use_cache=False).logits[0].float().cpu()
                got = ours[f"logits.{i}"]
                e_ours = (got - ref32).abs().max().item()
                e_hf = (ref16 - ref32).abs().max().item()
                top2 = ref32.topk(2, -1).values
                margin = top2[:, 0] - top2[:, 1]
                clear = margin > 2 * max(e_ours, e_hf)
                agree = (got.argmax(-1) == ref32.argmax(-1))[clear].float().mean().item() if clear.any() else 1.0
                ok = e_ours <= 2 * e_hf + 1e-2 and agree == 1.0
                print(f"[{label}] prompt {i}: max|ours-f32ref| {e_ours:.4f}, max|hf_bf16-f32ref| {e_hf:.4f}, "
                      f"argmax agreement on clear positions {agree:.3f} -> {'ok' if ok else 'FAIL'}", flush=True)
                if not ok:
                    failures.append((label, i))
    print("GPU PARITY:", "PASS" if not failures else f"FAIL {failures}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
