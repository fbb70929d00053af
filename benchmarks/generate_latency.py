"""Benchmark: time-to-first-token, decode latency and end-to-end latency of ``generate()``.

A random-weight LLaVA of realistic width (default: 24 layers, hidden 1024, vocab 32000, 576
visual tokens — a narrow LLaVA-1.5) on the CPU, compiled with ``libra_fx.compile``:

* uncompressed Inductor (``ratio=0``),
* ``libra`` R=0.5 after layers 7, 15, 23,
* ``fastv`` R=0.5 after layer 3.

All rows come from one run; ratios are against the uncompressed row::

    python benchmarks/generate_latency.py            # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import libra_fx
from libra_fx.runtime import compat
from libra_fx.testing import tiny_llava, tiny_llava_inputs

METHODS = {
    "uncompressed Inductor": dict(ratio=0.0, layers=()),
    "libra R=0.5 (7, 15, 23)": dict(method="libra", ratio=0.5, layers=(7, 15, 23)),
    "fastv R=0.5 (3)": dict(method="fastv", ratio=0.5, layers=(3,)),
}


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=list(METHODS), action="append", help="run only these rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, cfg in METHODS.items():
        if args.only and name not in args.only:
            continue
        compat.reset_dynamo()
        model = tiny_llava(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.hidden // 64,
                           num_kv_heads=args.hidden // 64, intermediate_size=int(args.hidden * 2.75),
                           image_size=192, patch_size=8, vocab_size=32000)
        inputs = tiny_llava_inputs(model, prefix=16, suffix=40)
        started = time.perf_counter()
        libra_fx.compile(model, **cfg)

        def run(n):
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        run(args.new_tokens)  # compiles prefill and both decode graphs
        run(args.new_tokens)
        compile_s = time.perf_counter() - started
        ttft = seconds(lambda: run(1), args.repeats)
        total = seconds(lambda: run(args.new_tokens), args.repeats)
        rows.append((name, ttft, (total - ttft) / (args.new_tokens - 1), total, compile_s))

    base = rows[0]
    print(f"\nLLaVA-shaped, random weights: {args.layers} layers, hidden {args.hidden}, 576 visual tokens, "
          f"prompt {inputs['input_ids'].shape[1]} tokens, {args.new_tokens} new tokens, batch 1, CPU "
          f"({torch.get_num_threads()} threads), median of {args.repeats}\n")
    print("| method | TTFT (s) | decode (ms/token) | end-to-end (s) | vs uncompressed: TTFT / decode / e2e | warm-up incl. compile (s) |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for name, ttft, decode, total, compile_s in rows:
        print(f"| {name} | {ttft:.2f} | {decode * 1e3:.1f} | {total:.2f} | "
              f"{base[1] / ttft:.2f}× / {base[2] / decode:.2f}× / {base[3] / total:.2f}× | {compile_s:.0f} |")


if __name__ == "__main__":
    main()
