"""Speed harness: prefill, decode and end-to-end latency, peak memory and compile time.

A random-weight LLaVA of realistic width (``libra_fx.testing.tiny_llava``: 576 visual tokens, vocab
32000; depth and width settable), batch 1, all rows from one run and given as ratios to the
uncompressed Inductor row:

* eager transformers,
* uncompressed Inductor (``libra_fx.compile(model, ratio=0)``),
* every decoder-side method (``libra_fx.methods.DECODER_METHODS``) through ``libra_fx.compile`` at one token budget
  (``--ratio`` after ``--layer``),
* a straightforward *eager FastV monkey-patch* at the same budget — hooks on the unmodified model
  that compute the last token's attention at layer K, cut the hidden states to the top tokens and
  slice RoPE tables and masks for the later layers, the way public FastV code patches the decoder
  (prefill only: it keeps no per-layer cache).

Prefill = one forward of the prompt (``logits_to_keep=1``); decode = per token of ``generate``; e2e =
``generate(max_new_tokens=N)``. "FLOPs-ideal" is the prefill speed-up the decoder's token-layers
promise (contract §7 formula over all tokens, text included). Compile time = first call minus a warm one.
Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (not measured on CPU)::

    python benchmarks/speed.py --layers 8 --hidden 1024 --new-tokens 16      # CPU, ~10 minutes
    python benchmarks/speed.py --device cuda --dtype bfloat16 --layers 32 --hidden 4096   # LLaVA-1.5-7B-shaped
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import libra_fx
from libra_fx.reports.flops import layer_flops
from libra_fx.methods.importance import last_row_importance
from libra_fx.methods import DECODER_METHODS, visual_token_counts
from libra_fx.testing import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fastv_patch(model, layer: int, ratio: float):
    """Eager FastV by hooks: after decoder layer ``layer`` keep the top ``round(N·(1−ratio))`` visual
    tokens by the last token's head-averaged attention there (text tokens all kept)."""
    lm = model.model.language_model
    state = {}

    def on_model(module, args, kwargs):
        state["visual"] = kwargs["input_ids"] == IMAGE_TOKEN_ID

    def on_attn(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        state["alpha"] = last_row_importance(q, k, None, module.scaling)

    def on_layer_out(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        visual, alpha = state["visual"], state["alpha"]
        n = int(visual[0].sum())
        nt = max(1, round(n * (1 - ratio)))
        score = alpha.masked_fill(~visual, float("-inf"))
        top = score.topk(nt, dim=-1).indices
        keep = (~visual).clone()
        keep.scatter_(1, top, True)
        index = keep[0].nonzero()[:, 0]  # batch 1 (or equal layouts)
        state["index"] = index
        hidden = hidden[:, index]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def on_later(module, args, kwargs):
        index = state["index"]
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos[:, index], sin[:, index])
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][:, index]
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"][..., index, :][..., index]
        return args, kwargs

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True),
               lm.layers[layer].self_attn.register_forward_pre_hook(on_attn, with_kwargs=True),
               lm.layers[layer].register_forward_hook(on_layer_out, with_kwargs=True)]
    handles += [lyr.register_forward_pre_hook(on_later, with_kwargs=True) for lyr in lm.layers[layer + 1:]]
    return handles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--layer", type=int, default=1, help="the stage: after this decoder layer")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--methods", nargs="*", default=None, help=f"default: all of {', '.join(DECODER_METHODS)}")
    args = p.parse_args(argv)
    dev, dtype = args.device, getattr(torch, args.dtype)
    methods = args.methods if args.methods is not None else list(DECODER_METHODS)

    def build():
        torch._dynamo.reset()
        model = tiny_llava(num_layers=args.layers, hidden_size=args.hidden, num_heads=max(args.hidden // 128, 1),
                           num_kv_heads=max(args.hidden // 128, 1), intermediate_size=int(args.hidden * 2.6875),
                           image_size=192, patch_size=8, vocab_size=32000, attn=args.attn).to(dev, dtype)
        model.generation_config.eos_token_id = None
        return model

    model = build()
    inputs = {k: v.to(dev) for k, v in tiny_llava_inputs(model, prefix=16, suffix=40).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    total = inputs["input_ids"].shape[1]
    n_vis = 576

    def prefill(m):
        with torch.no_grad():
            return m(**inputs, logits_to_keep=1, use_cache=False)

    def generate(m, n):
        with torch.no_grad():
            return m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def measure(m, name, with_decode=True, ideal=1.0):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        prefill(m)
        first = time.perf_counter() - start
        pre = seconds(lambda: prefill(m), args.repeats, dev)
        row = dict(name=name, prefill=pre, compile=max(first - pre, 0.0), ideal=ideal, decode=None, e2e=None)
        if with_decode:
            generate(m, args.new_tokens)
            generate(m, args.new_tokens)
            e2e = seconds(lambda: generate(m, args.new_tokens), args.repeats, dev)
            ttft = seconds(lambda: generate(m, 1), args.repeats, dev)
            row.update(e2e=e2e, decode=(e2e - ttft) / (args.new_tokens - 1))
        row["peak"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        print(f"{name}: prefill {pre * 1e3:.1f} ms" + (f", e2e {row['e2e']:.2f} s" if row["e2e"] else "")
              + f", compile {row['compile']:.0f} s", flush=True)
        return row

    d, m_ = args.hidden, int(args.hidden * 2.6875)
    full = args.layers * layer_flops(total, d, m_)

    def ideal_for(method):
        after = total - n_vis + visual_token_counts(n_vis, args.ratio, 1, method)[0]
        kept = (args.layer + 1) * layer_flops(total, d, m_) + (args.layers - args.layer - 1) * layer_flops(after, d, m_)
        return full / kept

    rows = [measure(model, "eager transformers")]
    rows.append(measure(libra_fx.compile(build(), ratio=0.0), "uncompressed Inductor"))
    for method in methods:
        rows.append(measure(libra_fx.compile(build(), ratio=args.ratio, layers=(args.layer,), method=method),
                            f"`{method}` (Inductor)", ideal=ideal_for(method)))
    patched = build()
    fastv_patch(patched, args.layer, args.ratio)
    rows.append(measure(patched, "eager FastV patch", with_decode=False, ideal=ideal_for("fastv")))

    base = rows[1]
    print(f"\nLLaVA-shaped, random weights: {args.layers} layers, hidden {args.hidden}, {n_vis} visual tokens, "
          f"prompt {total} tokens, batch 1, {dev} {args.dtype} {args.attn}, ratio {args.ratio} after layer "
          f"{args.layer}, {args.new_tokens} new tokens, median of {args.repeats}"
          + (f", {torch.get_num_threads()} threads" if dev == "cpu" else "") + "\n")
    print("| setting | prefill (ms) | prefill speed-up | FLOPs-ideal | of ideal | decode (ms/token) | e2e (s) | "
          "e2e speed-up | peak mem (GiB) | compile (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        sp = base["prefill"] / r["prefill"]
        print(f"| {r['name']} | {r['prefill'] * 1e3:.1f} | {sp:.2f}× | {r['ideal']:.2f}× | {sp / r['ideal']:.0%} | "
              + (f"{r['decode'] * 1e3:.1f} | {r['e2e']:.2f} | {base['e2e'] / r['e2e']:.2f}× | " if r["e2e"] else "— | — | — | ")
              + (f"{r['peak']:.2f}" if r["peak"] is not None else "—") + f" | {r['compile']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
