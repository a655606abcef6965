"""Reference outputs from Hugging Face transformers for drllm's parity tests (tests/parity.rs).

Called by the Rust tests with a JSON job on stdin; writes tensors to a safetensors file and a JSON
summary to stdout. Jobs:
  gguf   -- load a GGUF with transformers (dequantized to f32): chat-template rendering (or plain
            texts with the file's special tokens), token ids,
            all-position logits and 20 greedy tokens for each prompt, optionally along layer paths.
  tokens -- token ids of many strings with the GGUF-derived tokenizer.
  cloze  -- lm-evaluation-harness's multiple-choice log-likelihoods (arc_easy's prompt) of real ARC
            rows: context/continuation token ids by lm-eval's split, and the summed log-probability
            of each choice's continuation, optionally along layer paths.
  tiny   -- create tiny random models (LLaMA + llama3 RoPE scaling, Qwen2 with biases, Qwen3 with
            q/k norm, Gemma with its 1 + w norms, scaled embeddings and GELU; Gemma 3 with four norms a block, q/k
            norms, local sliding-window blocks between global ones; one sharded) in a
            directory, and their logits along paths.
  kquant -- write a tiny LLaMA GGUF whose matrices are random Q4_K / Q5_K / Q6_K / Q5_0 / Q5_1 / Q2_K / Q3_K blocks (the
            embedded file's tokenizer), with the `gguf` package's dequantization of every tensor
            and transformers' logits of the file.

A path is run in transformers the way the paper's code does it -- `model.layers` replaced by the
list of blocks (repeats reuse the module) -- but WITHOUT a KV cache: a reused block would share
one cache slot, which corrupts repeats. Greedy decoding therefore re-runs the full sequence.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.manual_seed(0)
torch.set_grad_enabled(False)


def with_path(model, counts):
    """Temporarily runs `model` with its blocks applied per `counts` (None = all once)."""

    class Ctx:
        def __enter__(self):
            self.orig = model.model.layers
            self.n = model.config.num_hidden_layers
            self.types = getattr(model.config, "layer_types", None)
            if counts is not None:
                order = [l for l, c in enumerate(counts) for _ in range(c)]
                model.model.layers = torch.nn.ModuleList([self.orig[l] for l in order])
                model.config.num_hidden_layers = len(order)
                if self.types is not None:
                    model.config.layer_types = [self.types[l] for l in order]

        def __exit__(self, *a):
            model.model.layers = self.orig
            model.config.num_hidden_layers = self.n
            if self.types is not None:
                model.config.layer_types = self.types

    return Ctx()


def greedy_no_cache(model, ids, steps):
    """Greedy tokens and the logits of each step, re-running the whole sequence every step."""
    seq = list(ids)
    toks, step_logits = [], []
    for _ in range(steps):
        # A copy: a view would keep every position's logits of every step alive.
        out = model(torch.tensor([seq]), use_cache=False).logits[0, -1].float().clone()
        step_logits.append(out)
        t = int(out.argmax())
        toks.append(t)
        seq.append(t)
    return toks, torch.stack(step_logits)


def run_prompts(model, prompts, paths, steps, tensors, prefix, keep_last=None):
    """Logits of every position (of the last `keep_last`, for a large vocabulary's long prompts)
    and greedy continuations for each (prompt, path)."""
    res = []
    for i, ids in enumerate(prompts):
        entry = {}
        for j, counts in enumerate(paths):
            with with_path(model, counts):
                logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
                if keep_last:
                    logits = logits[-keep_last:]
                tensors[f"{prefix}{i}_path{j}_logits"] = logits.contiguous()
                if steps:
                    toks, sl = greedy_no_cache(model, ids, steps)
                    tensors[f"{prefix}{i}_path{j}_steps"] = sl.contiguous()
                    entry[f"path{j}"] = toks
                    if counts is None:
                        # transformers' own cached generate(), stopping at its EOS.
                        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
                        entry["generate"] = out[0, len(ids):].tolist()
        res.append(entry)
    return res


def job_gguf(job, tensors):
    d, f = os.path.split(job["gguf"])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    rendered, prompts = [], []
    # Plain texts (a base model without a chat template): encoded with the file's special tokens.
    for text in job.get("texts", []):
        rendered.append(text)
        prompts.append(tok(text).input_ids)
    for msgs in job.get("chats", []):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        rendered.append(text)
        # The template writes its own special tokens: encode without adding any (what
        # apply_chat_template(tokenize=True) does too).
        prompts.append(tok(text, add_special_tokens=False).input_ids)
    gens = run_prompts(model, prompts, job.get("paths", [None]), job.get("steps", 20), tensors, "p",
                       job.get("keep_last"))
    return {"rendered": rendered, "ids": prompts, "generated": gens}


def job_hidden(job, tensors):
    """The hidden state entering every block along each path: hidden_states[k] is the input of
    the k-th applied block, so block l's input is hidden_states[sum(counts[:l])]."""
    d, f = os.path.split(job["gguf"])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    for i, ids in enumerate(job["prompts"]):
        for j, counts in enumerate(job["paths"]):
            with with_path(model, counts):
                hs = model(torch.tensor([ids]), use_cache=False, output_hidden_states=True).hidden_states
            before = 0
            for l, c in enumerate(counts):
                tensors[f"p{i}_path{j}_in{l}"] = hs[before][0].float().clone()
                before += c
    return {}


def correct_smollm_pretokenizer(tok):
    """transformers builds this file's tokenizer with a plain GPT-2 ByteLevel pre-tokenizer,
    ignoring tokenizer.ggml.pre = "smollm". llama.cpp (and SmolLM2's own tokenizer.json) split
    every digit out first, then apply the GPT-2 regex; the two differ on runs of spaces before a
    digit. Correct the reference to the file's stated pre-tokenizer."""
    from tokenizers import pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def correct_pretokenizer(tok, path):
    """The correction above, where the GGUF file says its pre-tokenizer is "smollm" (other
    vocabularies, e.g. Gemma's SentencePiece, are left as transformers builds them)."""
    import gguf
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    if field is not None and bytes(field.parts[field.data[0]]).decode() == "smollm":
        correct_smollm_pretokenizer(tok)


def job_tokens(job, tensors):
    d, f = os.path.split(job["gguf"])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    raw = [tok(s, add_special_tokens=False).input_ids for s in job["strings"]]
    correct_pretokenizer(tok, job["gguf"])
    ids = [tok(s, add_special_tokens=False).input_ids for s in job["strings"]]
    return {"ids": ids, "uncorrected_differs": sum(a != b for a, b in zip(raw, ids))}


def lm_eval_encode_pair(tok, context, continuation):
    """lm-evaluation-harness's HFLM._encode_pair: trailing whitespace of the context moves to the
    continuation; the continuation's tokens are those of context + continuation after the
    context's own tokens; no special tokens (its default add_bos_token=False)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx):]


def job_cloze(job, tensors):
    """arc_easy as lm-eval defines it: doc_to_text "Question: {{question}}\nAnswer:", choices
    the choice texts after the default target delimiter " "; loglikelihood = sum of log-softmax
    of each continuation token given everything before it (one full forward pass per choice,
    no cache); acc = argmax, acc_norm = argmax of loglikelihood / len(choice text)."""
    d, f = os.path.split(job["gguf"])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    correct_pretokenizer(tok, job["gguf"])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    out = []
    for row in job["rows"]:
        context = "Question: " + row["question"] + "\nAnswer:"
        entry = {"context": context, "paths": []}
        pairs = [lm_eval_encode_pair(tok, context, " " + c) for c in row["choices"]]
        entry["context_ids"] = pairs[0][0]
        entry["continuation_ids"] = [c for _, c in pairs]
        for counts in job["paths"]:
            lls = []
            with with_path(model, counts):
                for ctx, cont in pairs:
                    inp = torch.tensor([(ctx + cont)[:-1]])
                    logp = model(inp, use_cache=False).logits[0].float().log_softmax(-1)
                    tail = logp[len(ctx) - 1:]
                    lls.append(float(tail.gather(1, torch.tensor(cont).unsqueeze(1)).sum()))
            norm = [ll / len(c) for ll, c in zip(lls, row["choices"])]
            entry["paths"].append({
                "logliks": lls,
                "acc_pick": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                "acc_norm_pick": max(range(len(norm)), key=lambda i: (norm[i], -i)),
            })
        out.append(entry)
    return out


def tiny_config(arch, vocab):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.2)
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen3":
        from transformers import Qwen3Config
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False, attention_bias=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "gemma":
        # Tied embeddings and gelu_pytorch_tanh are GemmaConfig's defaults.
        from transformers import GemmaConfig
        return GemmaConfig(**common, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "gemma3":
        # A window shorter than the prompts, so local blocks hide keys; local and global
        # blocks interleaved; the query scale off head_dim; two RoPE bases.
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention", "full_attention", "sliding_attention"],
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    raise SystemExit(f"unknown arch {arch}")


def job_tiny(job, tensors):
    d, f = os.path.split(job["gguf"])
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    out = {}
    for arch in job["archs"]:
        target = os.path.join(job["dir"], arch)
        cfg = tiny_config(arch, len(tok))
        cfg._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        # Biases are zero at init; make them matter. Norm scales near 1 (Gemma's weights w
        # scale as 1 + w, so near 0 there).
        norm_mean = 0.0 if arch.startswith("gemma") else 1.0
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.data.normal_(norm_mean if "norm" in name else 0.0, 0.1)
        shard = "40KB" if arch == job.get("sharded") else "10GB"
        model.save_pretrained(target, max_shard_size=shard)
        tok.save_pretrained(target)
        out[arch] = run_prompts(model, job["prompts"], job["paths"], job.get("steps", 8), tensors, f"{arch}_p")
    return out


def random_kquant_blocks(rng, qtype, rows, cols):
    """Random bytes for `rows` x `cols` values of a K-quant type, with finite super-block scales
    of a size that keeps the weights around +-0.05 (random bits could be NaN or inf)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    def f16(scale):
        return rng.normal(0, scale, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        blocks[:, -2:] = f16(1.2e-5)
    elif qtype == Q.Q5_0:
        blocks[:, 0:2] = f16(3e-3)
    elif qtype == Q.Q5_1:
        blocks[:, 0:2] = f16(3e-3)
        blocks[:, 2:4] = f16(4e-2)
    elif qtype == Q.Q2_K:  # scale and minimum last
        blocks[:, -4:-2] = f16(1.5e-3)
        blocks[:, -2:] = np.abs(f16(3e-3).view(np.float16)).view(np.uint8)
    elif qtype == Q.Q3_K:  # scale last
        blocks[:, -2:] = f16(4e-4)
    else:
        blocks[:, 0:2] = f16(1e-4)
        blocks[:, 2:4] = np.abs(f16(8e-4).view(np.float16)).view(np.uint8)
    return blocks.reshape(rows, -1)


def job_kquant(job, tensors):
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(0)
    src = gguf.GGUFReader(job["tokenizer_gguf"])
    w = gguf.GGUFWriter(job["path"], "llama")
    hidden, ffn, layers, heads, kv_heads = 256, 512, 2, 4, 2
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    head_dim = hidden // heads
    mats = {"token_embd.weight": (vocab, hidden, Q.Q6_K), "output.weight": (vocab, hidden, Q.Q6_K)}
    for b in range(layers):
        mats.update({
            f"blk.{b}.attn_q.weight": (hidden, hidden, Q.Q4_K),
            f"blk.{b}.attn_k.weight": (kv_heads * head_dim, hidden, Q.Q4_K),
            f"blk.{b}.attn_v.weight": (kv_heads * head_dim, hidden, Q.Q6_K),
            f"blk.{b}.attn_output.weight": (hidden, hidden, Q.Q4_K),
            f"blk.{b}.ffn_gate.weight": (ffn, hidden, Q.Q4_K),
            f"blk.{b}.ffn_up.weight": (ffn, hidden, Q.Q5_K),
            f"blk.{b}.ffn_down.weight": (hidden, ffn, Q.Q5_K),
        })
    # The 32-element five-bit types (Q5_0, Q5_1) as llama.cpp's mixes place them.
    mats["blk.1.attn_k.weight"] = (kv_heads * head_dim, hidden, Q.Q5_0)
    mats["blk.1.attn_output.weight"] = (hidden, hidden, Q.Q5_1)
    # The 2- and 3-bit K-quants of Q2_K / Q3_K_M files.
    mats["blk.0.ffn_gate.weight"] = (ffn, hidden, Q.Q2_K)
    mats["blk.1.ffn_down.weight"] = (hidden, ffn, Q.Q3_K)
    for name, (rows, cols, qtype) in mats.items():
        data = random_kquant_blocks(rng, qtype, rows, cols)
        w.add_tensor(name, data, raw_dtype=qtype)
        tensors[f"dequant.{name}"] = torch.from_numpy(
            gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(rows, cols).copy())
    norms = ["output_norm.weight"] + [f"blk.{b}.{n}.weight" for b in range(layers)
                                      for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    d, f = os.path.split(job["path"])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    for i, ids in enumerate(job["prompts"]):
        tensors[f"p{i}_logits"] = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    return {"types": {n: q.name for n, (_, _, q) in mats.items()}}


def main():
    job = json.load(sys.stdin)
    tensors = {}
    kind = job["job"]
    res = {"gguf": job_gguf, "tokens": job_tokens, "tiny": job_tiny, "hidden": job_hidden,
           "cloze": job_cloze, "kquant": job_kquant}[kind](job, tensors)
    if tensors:
        save_file(tensors, job["out"])
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
