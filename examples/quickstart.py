"""Quickstart: compress the visual tokens of a LLaVA model inside its compiled graph.

Runs on CPU in about a minute with a small random-weight LLaVA (576 visual tokens, like
LLaVA-1.5) built from a config — no downloads. It prints

* how eager, Inductor-compiled and libra-compiled outputs agree,
* how many visual tokens each compression stage leaves,
* prefill latencies.

    python examples/quickstart.py
"""

from __future__ import annotations

import statistics
import time

import torch

import libra_fx
from libra_fx.testing import tiny_llava, tiny_llava_inputs

RATIO, LAYERS = 0.5, (1, 3, 5)


def median_ms(fn, repeats=10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    # 8 decoder layers, 576 visual tokens per image (192 px / 8 px patches), like LLaVA-1.5.
    model = tiny_llava(num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=8, intermediate_size=1024,
                       image_size=192, patch_size=8, vocab_size=1024)
    inputs = tiny_llava_inputs(model, batch=1, prefix=16, suffix=32)
    seq_len = inputs["input_ids"].shape[1]

    def run(forward):
        with torch.no_grad():
            return forward(**inputs).logits

    started = time.perf_counter()
    compiled = torch.compile(model.forward, backend="inductor", fullgraph=True)
    run(compiled)
    plain_compile_s = time.perf_counter() - started

    # The one line a user writes (here on a copy of the forward, to compare with the above).
    libra = libra_fx.backend(ratio=RATIO, layers=LAYERS, method="libra")
    started = time.perf_counter()
    compressed = torch.compile(model.forward, backend=libra, fullgraph=True)
    run(compressed)
    libra_compile_s = time.perf_counter() - started

    eager_logits, plain_logits, libra_logits = run(model.forward), run(compiled), run(compressed)
    print(f"model: LLaVA (random weights), 8 layers, sequence of {seq_len} tokens with 576 visual")
    print(f"compression: {libra}\n")

    print("agreement on the last position's logits")
    print(f"  eager vs Inductor:         max |Δ| = {(eager_logits[:, -1] - plain_logits[:, -1]).abs().max():.2e}")
    cos = torch.nn.functional.cosine_similarity(eager_logits[:, -1], libra_logits[:, -1], dim=-1).item()
    same = (eager_logits[:, -1].argmax(-1) == libra_logits[:, -1].argmax(-1)).all().item()
    print(f"  eager vs Inductor + libra: cosine = {cos:.4f}, same next token: {same}")
    print("  (compression changes the computation by design; tests/ prove it equals the SPEC oracle)\n")

    counts = libra_fx.visual_token_counts(576, RATIO, len(LAYERS), "libra")
    print("visual tokens seen by the decoder layers")
    print(f"  layers 0..{LAYERS[0]}: 576")
    for i, (layer, n) in enumerate(zip(LAYERS, counts)):
        upto = LAYERS[i + 1] if i + 1 < len(LAYERS) else 7
        print(f"  layers {layer + 1}..{upto}: {n}   ({n - i - 1} merged + {i + 1} compensation)")
    print(f"  output sequence: {libra_logits.shape[1]} positions (input {seq_len})")
    print(f"  {libra.last}\n".replace("\n", "\n  ").rstrip() + "\n")

    eager_ms, plain_ms, libra_ms = (median_ms(lambda f=f: run(f)) for f in (model.forward, compiled, compressed))
    print("prefill latency (median of 10, CPU)")
    print(f"  eager transformers:   {eager_ms:8.1f} ms")
    print(f"  Inductor:             {plain_ms:8.1f} ms   (compile {plain_compile_s:.0f} s)")
    print(f"  Inductor + libra:     {libra_ms:8.1f} ms   (compile {libra_compile_s:.0f} s)  "
          f"→ {plain_ms / libra_ms:.2f}× faster than Inductor alone")


if __name__ == "__main__":
    main()
