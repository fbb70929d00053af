"""The GPU check: prefill latency and peak memory of a LLaVA-1.5-7B-shaped model, and the real
flash-attn test, in one run of under 8 minutes; writes ``<out>/gpu_check.md``.

Run it as ``bash benchmarks/gpu_check.sh`` (``OUT`` names the output folder): it puts this checkout on
``PYTHONPATH`` and installs nothing, so the machine's own torch, transformers and flash-attn are used.

* A random-weight LLaVA-1.5-7B-shaped model: 32 Llama layers, hidden 4096, 32 heads, FFN 11008,
  vocab 32000, bf16, built on the GPU; a tiny CLIP tower gives the 576 visual tokens (the tower is not
  what is measured). One 632-token prompt, batch 1, prefill through ``libra_fx.compile`` (Inductor):
  uncompressed, ``libra`` R=0.5 after layers (7, 15, 23), ``fastv`` K=3 (R=0.5 after layer 2), in
  alternating rounds (median), with peak memory per row; SDPA, then ``flash_attention_2`` when
  ``flash_attn`` imports (it is never built here).
* ``tests/test_flash.py``'s real-kernel test (flash_attention_2 against the oracle), with pytest.
* Rows that would overrun ``--budget`` seconds are skipped and listed as skipped.

``--dry``: the same steps on the CPU with tiny shapes and ``compiler="eager"`` (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import transformers
from transformers import LlavaForConditionalGeneration

import libra_fx
from libra_fx.conformance import tiny
from libra_fx.methods import visual_token_counts
from libra_fx.testing import num_visual_tokens, tiny_llava_config
from speed import prompt, replica, sync

FULL = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008,
            image_size=192, patch_size=8, vocab_size=32000)
DRY = dict(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=128,
           image_size=48, patch_size=8, vocab_size=128)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings(num_layers: int) -> dict:
    """uncompressed; libra R=0.5 after the last layer of each quarter but the last; fastv K=3."""
    libra = tuple(num_layers // 4 * i - 1 for i in (1, 2, 3))  # (7, 15, 23) of 32
    return {"uncompressed": dict(method="libra", ratio=0.0, layers=()),
            f"libra R=0.5 {libra}": dict(method="libra", ratio=0.5, layers=libra),
            "fastv K=3 (R=0.5 after layer 2)": dict(method="fastv", ratio=0.5, layers=(2,))}


def build(dims: dict, device: str, dtype: torch.dtype):
    """Random weights drawn on ``device`` in ``dtype`` (the tiny-model factory, ``libra_fx.conformance.tiny.build``),
    run once eagerly (as ``libra_fx.testing.tiny_llava`` is)."""
    model = tiny.build(LlavaForConditionalGeneration, tiny_llava_config(**dims), 0, dtype=dtype, device=device)
    model.generation_config.eos_token_id = None
    inputs = prompt(model, device, dtype)
    with torch.no_grad():
        model(**inputs, logits_to_keep=1, use_cache=False)
    return model, inputs


def prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1, use_cache=False).logits


def measure(base, inputs, attn: str, args, deadline: float, compile_s: float) -> tuple[list[dict], float]:
    """Every setting on ``attn``; a row is skipped when the last compile (``compile_s``) says it would
    pass the deadline. Returns the rows and the last compile time."""
    rows, models = [], {}
    for name, cfg in settings(base.config.text_config.num_hidden_layers).items():
        if time.perf_counter() + compile_s > deadline:
            rows.append(dict(attn=attn, name=name, skipped="time budget"))
            continue
        model = replica(base)
        model.set_attn_implementation({"text_config": attn})
        libra_fx.compile(model, compiler=args.compiler, **cfg)
        start = time.perf_counter()
        logits = prefill(model, inputs)
        sync(args.device)
        compile_s = time.perf_counter() - start
        models[name] = model
        stages = visual_token_counts(num_visual_tokens(base), cfg["ratio"], len(cfg["layers"]), cfg["method"]) \
            if cfg["ratio"] else []
        row = dict(attn=attn, name=name, compile=compile_s, finite=bool(torch.isfinite(logits).all()), stages=stages,
                   compressed=any(r.compressed for r in model.libra_backend.records), times=[])
        rows.append(row)
    timed = [r for r in rows if "skipped" not in r]
    for _ in range(args.repeats):  # alternating rounds
        for row in timed:
            sync(args.device)
            start = time.perf_counter()
            prefill(models[row["name"]], inputs)
            sync(args.device)
            row["times"].append(time.perf_counter() - start)
    for row in timed:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prefill(models[row["name"]], inputs)
        row["peak"] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        row["ms"] = statistics.median(row["times"]) * 1e3
    models.clear()
    return rows, compile_s


def flash_test(has_flash: bool) -> str:
    """tests/test_flash.py's real-kernel test, through pytest."""
    if importlib.util.find_spec("pytest") is None:
        return "not run: pytest is not installed"
    test = "tests/test_flash.py::test_real_flash_attention_2_prefill_matches_oracle"
    done = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rs", test],
                          cwd=ROOT, capture_output=True, text=True)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    return f"exit {done.returncode}: {tail[0]}" + ("" if has_flash else " (flash_attn not importable)")


def table(rows: list[dict], header: list[str], flash: str) -> str:
    lines = [*header, "", "| attention | setting | visual tokens after each stage | prefill (ms) | vs uncompressed | "
             "peak mem (GiB) | first call (s) | compressed | logits finite |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    base = {r["attn"]: r["ms"] for r in rows if r["name"] == "uncompressed" and "ms" in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['attn']} | {r['name']} | skipped: {r['skipped']} | | | | | | |")
            continue
        speed = f"{base[r['attn']] / r['ms']:.2f}×" if r["attn"] in base else "—"
        peak = f"{r['peak']:.2f}" if r["peak"] is not None else "—"
        lines.append(f"| {r['attn']} | {r['name']} | {', '.join(map(str, r['stages'])) or '—'} | {r['ms']:.1f} | "
                     f"{speed} | {peak} | {r['compile']:.0f} | "
                     f"{'yes' if r['compressed'] else 'no'} | {'yes' if r['finite'] else 'NO'} |")
    return "\n".join([*lines, "", f"Real flash-attn test (`tests/test_flash.py`): {flash}", ""])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, compiler='eager'")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the model rows")
    args = p.parse_args(argv)
    started = time.perf_counter()
    args.device = "cpu" if args.dry else "cuda"
    args.compiler = "eager" if args.dry else "inductor"
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry for the CPU dry run)")
    dtype = torch.float32 if args.dry else torch.bfloat16
    dims = DRY if args.dry else FULL
    has_flash = importlib.util.find_spec("flash_attn") is not None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"
    header = [f"# GPU check{' (dry run: CPU, tiny shapes, compiler=eager)' if args.dry else ''}", "",
              f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"flash_attn {'importable' if has_flash else 'not importable'}; Python {platform.python_version()}.",
              f"LLaVA-shaped random weights: {dims['num_layers']} layers, hidden {dims['hidden_size']}, "
              f"{dims['num_heads']} heads, FFN {dims['intermediate_size']}, vocab {dims['vocab_size']}, "
              f"{str(dtype).removeprefix('torch.')}; batch 1; prefill, median of {args.repeats} alternating rounds."]
    base, inputs = build(dims, args.device, dtype)
    header[-1] += f" Prompt {inputs['input_ids'].shape[1]} tokens ({num_visual_tokens(base)} visual)."
    deadline = started + args.budget
    rows, compile_s = measure(base, inputs, "sdpa", args, deadline, 0.0)
    flash = flash_test(has_flash)
    if has_flash:
        rows += measure(base, inputs, "flash_attention_2", args, deadline, compile_s)[0]
    else:
        rows.append(dict(attn="flash_attention_2", name="all settings", skipped="flash_attn not importable"))
    text = table(rows, header, flash) + f"\nTotal {time.perf_counter() - started:.0f} s.\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
