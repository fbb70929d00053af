"""Where a compressed prefill's time goes: the inserted nodes and the decoder layers around the stage.

``python benchmarks/speed.py --profile [--methods libra fastv turbo] [--profile-compiler eager]``

Each method's rewritten graph (the one ``libra_fx.compile`` hands its compiler) is cut into runs of
consecutive nodes that belong to one part, and every run is compiled on its own — by Inductor, or
run as FX code with ``--profile-compiler eager`` — and timed around its call. A stage node
(``compress_visual_tokens``) is traced into ATen ops first, with its selector, compressor and splice
annotated (``torch.fx.traceback.annotate``), and cut the same way::

    other              vision tower, projector, embeddings, RoPE and mask tables, final norm, head
    layers ≤ L         the decoder layers up to and including the stage layer
    importance row     last_row_importance (contract §2)
    selection          the method's selector (PTI, top-k, Turbo's informativity)
    compressor         the method's compressor (IGM, average, prune)
    splice + gathers   the rest of the stage (span positions, token gathers, checks, the splice) and the
                       re-indexing of RoPE tables and masks for the later layers
    layers > L         the decoder layers after the stage

Why this way: Inductor fuses across these boundaries (the stage's first kernel also finishes layer L's
residual add), so kernels of one uncut graph cannot be attributed to parts; timing each part's own
compiled code can. The cuts cost a little fusion: the table also gives each method's uncut prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import statistics
import time
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.split_module import split_module

import libra_fx
from libra_fx.runtime import compat
import libra_fx.sequence.splice as splice_module
from libra_fx.methods import DECODER_METHODS
from libra_fx.methods.importance import last_row_importance
from libra_fx.passes.fx_utils import INSERTED, LAYER_PATH, clone, module_path
from libra_fx.sequence.splice import compress_visual_tokens

PARTS = ("other", "layers ≤ L", "importance row", "selection", "compressor", "splice + gathers", "layers > L")
STAGE_PARTS = ("selection", "compressor", "splice")  # annotated inside compress_visual_tokens
ANNOTATION = "libra_part"


class Timings:
    """Seconds per part of the current call, and the totals of every call."""

    def __init__(self, device: str):
        self.device, self.current, self.calls = device, {}, []

    def add(self, part: str, seconds: float) -> None:
        self.current[part] = self.current.get(part, 0.0) + seconds

    def finish_call(self) -> None:
        self.calls.append(self.current)
        self.current = {}

    def median(self, part: str) -> float:
        return statistics.median(c.get(part, 0.0) for c in self.calls)


class TimedPart(torch.nn.Module):
    """One run of a cut graph: compiled on its first call (with the real inputs), timed on every call."""

    def __init__(self, gm: fx.GraphModule, part: str, compiler: str, timings: Timings):
        super().__init__()
        self.gm, self.part, self.compiler, self.timings, self.fn = gm, part, compiler, timings, None

    def forward(self, *args):
        if self.fn is None:
            self.fn = self._compile(args)
        if self.part == "stage":  # its own runs are timed
            return self.fn(*args)
        sync(self.timings.device)
        start = time.perf_counter()
        out = self.fn(*args)
        sync(self.timings.device)
        self.timings.add(self.part, time.perf_counter() - start)
        return out

    def _compile(self, args):
        if self.compiler == "eager" or self.part == "stage":  # a stage run only calls its own cut graph
            return self.gm
        fake = compat.fake_mode_with_shape_env()  # a shape env: transformers' count checks call .item()
        for node in self.gm.graph.nodes:  # values traced in Dynamo's shape env, not this one
            for key in ("val", "example_value", "unbacked_bindings"):
                node.meta.pop(key, None)
        example = [fake.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
        with compat.tracing(compat.tracing_context(fake)):
            return compat.inductor(self.gm, example)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cut(gm: fx.GraphModule, part_of, compiler: str, timings: Timings) -> fx.GraphModule:
    """``gm`` split into runs of consecutive nodes of one part (runs in node order never form a
    cycle), each run a :class:`TimedPart`."""
    runs, parts, previous = {}, [], None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):  # split_module places get_attr with its users
            continue
        part = part_of(node)
        if part != previous:
            parts.append(part)
            previous = part
        runs[node] = len(parts) - 1
    split = split_module(gm, None, lambda node: runs[node], keep_original_order=True)
    for name, sub in list(split.named_children()):
        setattr(split, name, TimedPart(sub, parts[int(name.removeprefix("submod_"))], compiler, timings))
    return split


def graph_part(layer: int):
    """The part of a node of the rewritten graph (a stage node is its own part, ``"stage"``)."""

    def part_of(node: fx.Node) -> str:
        if node.target is last_row_importance:
            return "importance row"
        if node.target in (compress_visual_tokens, operator.getitem, torch.ops.aten.sym_size.int) and node.meta.get(INSERTED):
            return "stage"  # with its outputs' getitems and the new length, not compiled: its runs are
        if node.meta.get(INSERTED):
            return "splice + gathers"
        match = LAYER_PATH.match(module_path(node))
        if match is None:
            return "other"
        return "layers ≤ L" if int(match["index"]) <= layer else "layers > L"

    return part_of


@contextmanager
def annotated_stage():
    """Mark the selector, the compressor and the splice inside ``compress_visual_tokens`` while it is traced."""

    def mark(fn, part):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with fx_traceback.annotate({ANNOTATION: part}):
                return fn(*args, **kwargs)

        return inner

    get_method, splice = splice_module.get_method, splice_module.splice

    def marked_method(name):
        m = get_method(name)
        return dataclasses.replace(m, selector=mark(m.selector, "selection"), compressor=mark(m.compressor, "compressor"))

    splice_module.get_method, splice_module.splice = marked_method, mark(splice, "splice")
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        splice_module.get_method, splice_module.splice = get_method, splice


def stage_part(node: fx.Node) -> str:
    part = node.meta.get("custom", {}).get(ANNOTATION)
    return "splice + gathers" if part in (None, "splice") else part


def profiled_stage(compiler: str, timings: Timings):
    """A stand-in for ``compress_visual_tokens`` that traces it on its first call and runs it cut by part."""
    cache = {}

    def compress_visual_tokens_profiled(*args, **kwargs):
        if "fn" not in cache:
            with annotated_stage():
                traced = make_fx(functools.partial(compress_visual_tokens, **kwargs))(*args)
            cache["fn"] = cut(traced, stage_part, compiler, timings)
        return cache["fn"](*args)

    return compress_visual_tokens_profiled


def profiled_compiler(layer: int, compiler: str, timings: Timings):
    """A replacement for the backend's compile step: the graph cut by part, each run compiled and timed."""

    def compile_cut(gm: fx.GraphModule, example_inputs):
        gm = clone(gm)
        part_of = graph_part(layer)
        parts = {node: part_of(node) for node in gm.graph.nodes if node.op not in ("placeholder", "output")}
        for node in gm.graph.nodes:
            if node.target is compress_visual_tokens:
                node.target = profiled_stage(compiler, timings)
        gm.recompile()
        split = cut(gm, lambda node: parts[node], compiler, timings)

        def run(*args):
            out = split(*args)
            timings.finish_call()
            return out

        return run

    return compile_cut


def prepared(base, inputs, args, method: str) -> tuple[object, object, Timings]:
    """Two copies of the model compiled for ``method`` at the equal budget: one cut (with its timings),
    one as ``libra_fx.compile`` makes it; both warmed up, their logits checked against each other."""
    from speed import equal_budget_ratio, replica

    def compiled(timings: Timings | None):
        model = replica(base)
        libra_fx.compile(model, method=method, ratio=equal_budget_ratio(method, args.ratio), layers=(args.layer,))
        if timings is not None:
            model.libra_backend._compile = profiled_compiler(args.layer, args.profile_compiler, timings)
        return model

    timings = Timings(args.device)
    cut_model, plain = compiled(timings), compiled(None)
    got, want = prefill(cut_model, inputs), prefill(plain, inputs)
    if not torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3):
        raise AssertionError(f"{method}: the cut graph's logits differ from the uncut one's")
    prefill(plain, inputs)
    timings.calls.clear()
    return cut_model, plain, timings


def prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1, use_cache=False).logits


def main(base, inputs, args):
    methods = args.methods if args.methods is not None else ["libra", "fastv", "turbo"]
    unknown = sorted(set(methods) - set(DECODER_METHODS))
    if unknown:
        raise ValueError(f"--profile takes decoder methods, got {', '.join(unknown)}")
    models = {name: prepared(base, inputs, args, name) for name in methods}
    walls = {name: ([], []) for name in methods}  # cut, uncut
    for _ in range(args.repeats):  # alternating rounds: every method's cut and uncut prefill
        for name, (cut_model, plain, _) in models.items():
            for model, times in zip((cut_model, plain), walls[name]):
                sync(args.device)
                start = time.perf_counter()
                prefill(model, inputs)
                sync(args.device)
                times.append(time.perf_counter() - start)
    timings = [t for _, _, t in models.values()]
    print(f"\nPrefill time by part (ms, median of {args.repeats} alternating rounds), {args.layers} layers, hidden "
          f"{args.hidden}, stage after layer {args.layer} (L), equal token budget (libra R={args.ratio}), each part "
          f"compiled on its own by {args.profile_compiler}"
          + (f", {torch.get_num_threads()} threads" if args.device == "cpu" else "") + "\n")
    print("| part | " + " | ".join(f"`{m}`" for m in methods) + " |")
    print("| --- |" + " ---: |" * len(methods))
    for part in PARTS:
        print(f"| {part} | " + " | ".join(f"{t.median(part) * 1e3:.1f}" for t in timings) + " |")
    totals = [statistics.median(sum(c.values()) for c in t.calls) * 1e3 for t in timings]
    print("| **sum of the parts** | " + " | ".join(f"**{x:.1f}**" for x in totals) + " |")
    for label, i in (("prefill, cut (wall)", 0), ("prefill, uncut Inductor (wall)", 1)):
        print(f"| {label} | " + " | ".join(f"{statistics.median(walls[m][i]) * 1e3:.1f}" for m in methods) + " |")
    return timings
