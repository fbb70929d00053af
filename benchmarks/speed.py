"""Speed harness: prefill, decode and end-to-end latency, peak memory, compile time and Dynamo counters.

A random-weight LLaVA of realistic width (``libra_fx.testing.tiny_llava``: 576 visual tokens, vocab
32000; depth and width settable), batch 1. Every row is a copy of one model (shared weights), all in
one process, and given as ratios to the uncompressed Inductor row:

* ``eager``: eager transformers;
* ``uncompressed``: uncompressed Inductor (``libra_fx.compile(model, ratio=0)``);
* every decoder-side method (``libra_fx.methods.DECODER_METHODS``) through ``libra_fx.compile``;
* ``fastv-hooks``: an eager FastV monkey-patch — hooks on the unmodified SDPA model compute the last
  token's attention row at layer L, cut the hidden states to the top tokens and slice RoPE tables and
  masks for the later layers (prefill only: it keeps no per-layer cache);
* ``fastv-public``: FastV the way its public code runs (github.com/pkunlp-icler/FastV): eager
  attention in the whole model, the scores read from layer L's attention probabilities
  (``output_attentions`` of layer K−1, K = L+1), then the same cut (prefill only).

**Equal token budget:** every compressed row leaves as many tokens to the layers after the stage as
``libra`` at ``--ratio`` (576 → 288 targets + 1 compensation token = 289 at 0.5); the other methods'
ratios are chosen for that (``equal_budget_ratio``). The "tokens after" column is measured (KV cache
length of layer L+1, or the patch's own cut).

Prefill = one forward of the prompt (``logits_to_keep=1``, no cache), timed in alternating rounds
(round r times every row once, so drift hits all rows alike); decode = median time of one
``generate`` step (each forward timed); e2e = ``generate(max_new_tokens=N)``. "FLOPs-ideal" is the
prefill speed-up the decoder's token-layers promise (contract §7 formula over all tokens, text
included). Compile time = first call minus a warm one. Peak memory is ``torch.cuda.max_memory_allocated``
on a GPU (not measured on CPU). Dynamo counters per row: unique graphs, frame compiles (recompiles
included), graph breaks, then what happened in the timed calls: compiles (must be 0) and forwards
that ran no compiled graph (Dynamo fell back to eager: must be 0)::

    python benchmarks/speed.py --layers 8 --hidden 1024 --new-tokens 16          # CPU table
    python benchmarks/speed.py --compare libra fastv --repeats 7                  # prefill only, libra vs fastv
    python benchmarks/speed.py --profile                                          # where prefill time goes
    python benchmarks/speed.py --device cuda --dtype bfloat16 --layers 32 --hidden 4096 --layer 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import statistics
import time
from dataclasses import dataclass, field

import torch

import libra_fx
from libra_fx.runtime import compat
from libra_fx.runtime.compat import prompt_tokens, returned_cache
from libra_fx.methods import DECODER_METHODS, get_method, visual_token_counts
from libra_fx.methods.importance import last_row_importance
from libra_fx.methods.selectors import num_targets
from libra_fx.reports.flops import layer_flops
from libra_fx.testing import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

N_VISUAL = 576
PATCHES = ("fastv-hooks", "fastv-public")
ROWS = ("eager", "uncompressed", *DECODER_METHODS, *PATCHES)


def build_model(layers: int, hidden: int, attn: str = "sdpa", device="cpu", dtype=torch.float32):
    """The benchmark's LLaVA: ``layers`` Llama layers of width ``hidden`` (heads of 128), 576 visual tokens."""
    heads = max(hidden // 128, 1)
    model = tiny_llava(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
                       intermediate_size=int(hidden * 2.6875), image_size=192, patch_size=8, vocab_size=32000,
                       attn=attn).to(device, dtype)
    model.generation_config.eos_token_id = None
    return model


def prompt(model, device="cpu", dtype=torch.float32) -> dict:
    """16 text tokens, the image's 576, 40 text tokens."""
    inputs = {k: v.to(device) for k, v in tiny_llava_inputs(model, prefix=16, suffix=40).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def replica(model):
    """A copy of ``model`` that shares its parameters and buffers (one set of weights for every row)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def equal_budget_ratio(method: str, ratio: float, reference: str = "libra", n: int = N_VISUAL) -> float:
    """The shortest decimal ratio at which ``method`` leaves as many visual tokens after one stage as
    ``reference`` does at ``ratio`` (compensation tokens counted)."""
    want = visual_token_counts(n, ratio, 1, reference)[0] - int(get_method(method).compensation)
    for digits in range(1, 9):
        candidate = round(1 - want / n, digits)
        if num_targets(n, candidate) == want:
            return candidate
    raise ValueError(f"no ratio gives {method} {want} targets of {n}")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def fastv_patch(model, layer: int, kept: int, scores: str = "row"):
    """Eager FastV by hooks: after decoder layer ``layer`` keep the ``kept`` visual tokens (text tokens
    all kept) that the last token attends to most, head-averaged, at that layer.

    ``scores="row"``: the row is computed from the layer's query and key beside its own kernel (SDPA
    stays); ``"attention"``: read from the layer's attention probabilities, as FastV's public code reads
    ``output_attentions`` of layer K−1 (needs ``attn_implementation="eager"``). Returns the hook
    state: ``state["tokens"]`` is the sequence length the later layers saw."""
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

    def on_attn_out(module, args, kwargs, output):
        probabilities = output[1]  # [B, H, T, T]: eager attention returns them
        state["alpha"] = probabilities.mean(1)[:, -1]

    def on_layer_out(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        visual, alpha = state["visual"], state["alpha"]
        score = alpha.masked_fill(~visual, float("-inf"))
        top = score.topk(kept, dim=-1).indices
        keep = (~visual).clone()
        keep.scatter_(1, top, True)
        index = keep[0].nonzero()[:, 0]  # batch 1 (or equal layouts)
        state["index"], state["tokens"] = index, len(index)
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

    attn = lm.layers[layer].self_attn
    model.register_forward_pre_hook(on_model, with_kwargs=True)
    if scores == "row":
        attn.register_forward_pre_hook(on_attn, with_kwargs=True)
    else:
        attn.register_forward_hook(on_attn_out, with_kwargs=True)
    lm.layers[layer].register_forward_hook(on_layer_out, with_kwargs=True)
    for later in lm.layers[layer + 1:]:
        later.register_forward_pre_hook(on_later, with_kwargs=True)
    return state


def dynamo_counts() -> dict:
    c = compat.dynamo_counters()
    return dict(graphs=c["stats"]["unique_graphs"], compiles=c["frames"]["total"],
                breaks=sum(c["graph_break"].values()))


def since(before: dict) -> dict:
    now = dynamo_counts()
    return {k: now[k] - before[k] for k in now}


@dataclass
class Row:
    key: str
    name: str
    model: object
    ideal: float
    decode: bool = True
    patch: dict | None = None  # a FastV patch's hook state
    calls: list = field(default_factory=list)  # (seconds, query tokens, ran a compiled graph?) per forward
    prefill: list = field(default_factory=list)
    e2e: list = field(default_factory=list)
    first: float = 0.0
    tokens_after: int = 0  # measured: the KV cache of layer L+1, or the patch's own cut
    built: dict = field(default_factory=dict)  # Dynamo counters of its compiles
    peak: float | None = None

    def __post_init__(self):
        """Time every forward (prefill and each decode step of ``generate``) and note whether it ran a
        compiled graph."""
        forward, be = self.model.forward, getattr(self.model, "libra_backend", None)

        @functools.wraps(forward)
        def timed(*args, **kwargs):
            start, graphs = time.perf_counter(), be and be.graphs_run
            out = forward(*args, **kwargs)
            sync(out.logits.device.type)
            ran = None if be is None else be.graphs_run > graphs
            self.calls.append((time.perf_counter() - start, prompt_tokens(args, kwargs).shape[1], ran))
            return out

        self.model.forward = timed

    @property
    def eager_calls(self) -> int | None:
        """Timed forwards that ran no compiled graph (``None``: a row without the libra backend)."""
        return sum(not ran for _, _, ran in self.calls) if hasattr(self.model, "libra_backend") else None


def make_rows(keys, base, args, total: int) -> list[Row]:
    d, m = args.hidden, int(args.hidden * 2.6875)
    full = args.layers * layer_flops(total, d, m)
    kept = visual_token_counts(N_VISUAL, args.ratio, 1, "libra")[0]
    after = total - N_VISUAL + kept
    ideal = full / ((args.layer + 1) * layer_flops(total, d, m) + (args.layers - args.layer - 1) * layer_flops(after, d, m))
    rows = []
    for key in keys:
        model = replica(base)
        if key == "eager":
            row = Row(key, "eager transformers", model, 1.0)
        elif key == "uncompressed":
            row = Row(key, "uncompressed Inductor", libra_fx.compile(model, ratio=0.0), 1.0)
        elif key in DECODER_METHODS:
            ratio = equal_budget_ratio(key, args.ratio)
            libra_fx.compile(model, ratio=ratio, layers=(args.layer,), method=key)
            row = Row(key, f"`{key}` R={ratio:g} (Inductor)", model, ideal)
        elif key in PATCHES:
            scores = "row" if key == "fastv-hooks" else "attention"
            if scores == "attention":
                model.set_attn_implementation("eager")
            name = "eager FastV patch (hooks, SDPA)" if scores == "row" else "FastV public way (eager attention)"
            row = Row(key, name, model, ideal, decode=False, patch=fastv_patch(model, args.layer, kept, scores))
        else:
            raise ValueError(f"unknown row {key!r}; rows: {', '.join(ROWS)}")
        rows.append(row)
    return rows


def run_rows(rows: list[Row], inputs: dict, args, with_decode: bool) -> dict:
    """Warm every row up (compiles), then time prefill — and generate — in alternating rounds; returns
    the Dynamo counters of the timed phase."""
    dev = args.device

    def prefill(row):
        with torch.no_grad():
            row.model(**inputs, logits_to_keep=1, use_cache=False)

    def generate(row, n, **kw):
        with torch.no_grad():
            return row.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

    for row in rows:
        before = dynamo_counts()
        start = time.perf_counter()
        prefill(row)
        row.first = time.perf_counter() - start
        prefill(row)
        if row.patch is not None:
            row.tokens_after = row.patch["tokens"]
        else:  # the prefill with a cache (and, with decode, both decode graphs) compiles here too
            n = args.new_tokens if with_decode else 1
            out = generate(row, n, return_dict_in_generate=True)
            row.tokens_after = returned_cache(out).get_seq_length(args.layer + 1) - (n - 1)
            if with_decode:
                generate(row, n)
        row.built = since(before)
        print(f"{row.name}: warm ({row.first:.0f} s first call), {row.tokens_after} tokens after layer {args.layer}",
              flush=True)

    for row in rows:
        row.calls.clear()
    before = dynamo_counts()
    for _ in range(args.repeats):
        for row in rows:
            sync(dev)
            start = time.perf_counter()
            prefill(row)
            sync(dev)
            row.prefill.append(time.perf_counter() - start)
    if with_decode:
        for _ in range(args.repeats):
            for row in (r for r in rows if r.decode):
                sync(dev)
                start = time.perf_counter()
                generate(row, args.new_tokens)
                sync(dev)
                row.e2e.append(time.perf_counter() - start)
    timed = since(before)  # Dynamo's counters are per process: the timed phase is checked as a whole
    if dev == "cuda":
        for row in rows:
            torch.cuda.reset_peak_memory_stats()
            prefill(row)
            row.peak = torch.cuda.max_memory_allocated() / 2**30
    return timed


def median_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def decode_ms(row: Row) -> float | None:
    steps = [s for s, q, _ in row.calls if q == 1]
    return median_ms(steps) if steps else None


def print_table(rows: list[Row], args, total: int, timed: dict) -> None:
    base = next((r for r in rows if r.key == "uncompressed"), rows[0])
    print(f"\nLLaVA-shaped, random weights: {args.layers} layers, hidden {args.hidden}, {N_VISUAL} visual tokens, "
          f"prompt {total} tokens, batch 1, {args.device} {args.dtype} {args.attn}, budget: libra R={args.ratio} "
          f"after layer {args.layer}, {args.new_tokens} new tokens, median of {args.repeats} alternating rounds"
          + (f", {torch.get_num_threads()} threads" if args.device == "cpu" else "") + "\n")
    print("| setting | tokens after | prefill (ms) | prefill speed-up | FLOPs-ideal | of ideal | decode (ms/token) | "
          "e2e (s) | e2e speed-up | peak mem (GiB) | compile (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    pre = {r.key: median_ms(r.prefill) for r in rows}
    for r in rows:
        sp = pre[base.key] / pre[r.key]
        e2e = statistics.median(r.e2e) if r.e2e else None
        print(f"| {r.name} | {r.tokens_after} | {pre[r.key]:.1f} | {sp:.2f}× | {r.ideal:.2f}× | {sp / r.ideal:.0%} | "
              + (f"{decode_ms(r):.1f} | {e2e:.2f} | {statistics.median(base.e2e) / e2e:.2f}× | " if e2e else "— | — | — | ")
              + (f"{r.peak:.2f}" if r.peak is not None else "—") + f" | {max(r.first - pre[r.key] / 1e3, 0):.0f} |")
    print(f"\nDynamo counters. Timed phase (all rows): {timed['compiles']} frame compiles, {timed['breaks']} graph "
          "breaks.\n")
    print("| setting | unique graphs | frame compiles | graph breaks | timed forwards | of them without a compiled graph |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        eager = r.eager_calls
        print(f"| {r.name} | {r.built['graphs']} | {r.built['compiles']} | {r.built['breaks']} | {len(r.calls)} | "
              + ("—" if eager is None else str(eager)) + " |")


def print_comparison(rows: list[Row], args, timed: dict) -> None:
    """Medians and the paired (same-round) ratio of every row to the last one."""
    ref = rows[-1]
    print(f"\nprefill, median of {args.repeats} alternating rounds"
          + (f", {torch.get_num_threads()} threads" if args.device == "cpu" else "") + ":")
    for r in rows:
        paired = statistics.median(a / b for a, b in zip(r.prefill, ref.prefill))
        eager = r.eager_calls
        print(f"  {r.name}: {median_ms(r.prefill):.1f} ms, {r.tokens_after} tokens after layer {args.layer}, "
              f"rounds {[round(x * 1e3) for x in r.prefill]}, vs {ref.key}: {paired - 1:+.1%} (paired), "
              f"{median_ms(r.prefill) / median_ms(ref.prefill) - 1:+.1%} (medians)"
              + ("" if eager is None else f", forwards without a compiled graph: {eager}"))
    print(f"  timed phase: {timed['compiles']} frame compiles, {timed['breaks']} graph breaks")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.5, help="libra's ratio; the other rows match its token count")
    p.add_argument("--layer", type=int, default=1, help="the stage: after this decoder layer")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--methods", nargs="*", default=None, help=f"default: all of {', '.join(DECODER_METHODS)}")
    p.add_argument("--compare", nargs="+", metavar="ROW", help=f"prefill only, these rows ({', '.join(ROWS)}); "
                   "ratios against the last one")
    p.add_argument("--profile", action="store_true", help="where prefill time goes (benchmarks/stage_profile.py)")
    p.add_argument("--profile-compiler", default="inductor", choices=("inductor", "eager"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    compat.reset_dynamo()
    base = build_model(args.layers, args.hidden, args.attn, args.device, dtype)
    inputs = prompt(base, args.device, dtype)
    total = inputs["input_ids"].shape[1]
    if args.profile:
        import stage_profile

        return stage_profile.main(base, inputs, args)
    if args.compare:
        rows = make_rows(args.compare, base, args, total)
        print_comparison(rows, args, run_rows(rows, inputs, args, with_decode=False))
        return rows
    methods = args.methods if args.methods is not None else list(DECODER_METHODS)
    rows = make_rows(["eager", "uncompressed", *methods, *PATCHES], base, args, total)
    print_table(rows, args, total, run_rows(rows, inputs, args, with_decode=True))
    return rows


if __name__ == "__main__":
    main()
