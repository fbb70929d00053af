"""Quickstart: compress the visual tokens of a LLaVA model inside its compiled graph.

Runs on CPU in about a minute and a half with a small random-weight LLaVA (576 visual tokens
per image, like LLaVA-1.5) built from a config — no downloads. It generates with

* eager transformers,
* Inductor alone (``libra_fx.compile`` with ``ratio=0``: the graph is left untouched),
* Inductor + libra (``ratio=0.5`` after layers 1, 3 and 5),

and prints how they agree, how many visual tokens each stage leaves, and the latencies.

    python examples/quickstart.py
"""

from __future__ import annotations

import copy
import time

import torch

import libra_fx
from libra_fx.testing import tiny_llava, tiny_llava_inputs

RATIO, LAYERS, NEW_TOKENS = 0.5, (1, 3, 5), 16


def timed_generate(model, inputs, repeats=3):
    """(tokens, first-step logits, median seconds) of a greedy generate; the first call warms up."""

    def run():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)

    out = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return out.sequences[:, -NEW_TOKENS:], out.logits[0], sorted(times)[len(times) // 2]


def main() -> None:
    # 8 decoder layers, 576 visual tokens per image (192 px / 8 px patches), random weights.
    base = tiny_llava(num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=8, intermediate_size=1024,
                      image_size=192, patch_size=8, vocab_size=1024)
    base.generation_config.eos_token_id = None  # random weights: always generate NEW_TOKENS
    inputs = tiny_llava_inputs(base, batch=1, prefix=16, suffix=32)
    print(f"LLaVA (random weights), 8 layers, prompt of {inputs['input_ids'].shape[1]} tokens "
          f"with 576 visual, {NEW_TOKENS} new tokens\n")

    eager = timed_generate(base, inputs)

    started = time.perf_counter()
    plain = libra_fx.compile(copy.deepcopy(base), ratio=0.0)  # Inductor, graph untouched
    plain_run = timed_generate(plain, inputs)
    plain_compile = time.perf_counter() - started

    started = time.perf_counter()
    # The one call a user writes: prefill and decode of generate() now go through the backend.
    model = libra_fx.compile(copy.deepcopy(base), ratio=RATIO, layers=LAYERS, method="libra")
    libra_run = timed_generate(model, inputs)
    libra_compile = time.perf_counter() - started

    print("agreement with eager transformers")
    print(f"  Inductor:          same tokens: {torch.equal(eager[0], plain_run[0])}, "
          f"first-step logits max |Δ| = {(eager[1] - plain_run[1]).abs().max():.1e}")
    cos = torch.nn.functional.cosine_similarity(eager[1], libra_run[1], dim=-1).item()
    same = (eager[0] == libra_run[0]).float().mean().item()
    print(f"  Inductor + libra:  first-step logits cosine = {cos:.4f}, same tokens: {same:.0%}")
    print("  (compression changes the computation by design; tests/ prove it equals the SPEC oracle)\n")

    counts = libra_fx.visual_token_counts(576, RATIO, len(LAYERS), "libra")
    print("visual tokens seen by the decoder layers (and held in their KV cache)")
    print(f"  layers 0..{LAYERS[0]}: 576")
    for i, (layer, n) in enumerate(zip(LAYERS, counts)):
        upto = LAYERS[i + 1] if i + 1 < len(LAYERS) else 7
        print(f"  layers {layer + 1}..{upto}: {n}   ({n - i - 1} merged + {i + 1} compensation)")
    prefill = next(r for r in model.libra_backend.records if r.compressed)
    print("\n  " + str(prefill).replace("\n", "\n  ") + "\n")

    print(f"generate() latency, {NEW_TOKENS} new tokens (median of 3, CPU)")
    print(f"  eager transformers: {eager[2] * 1e3:8.1f} ms")
    print(f"  Inductor:           {plain_run[2] * 1e3:8.1f} ms   (warm-up with compile {plain_compile:.0f} s)")
    print(f"  Inductor + libra:   {libra_run[2] * 1e3:8.1f} ms   (warm-up with compile {libra_compile:.0f} s)"
          f"  → {plain_run[2] / libra_run[2]:.2f}× faster than Inductor alone")


if __name__ == "__main__":
    main()
