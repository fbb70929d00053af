"""Helpers of the per-pass tests: capture a Dynamo graph without compiling it, build a fresh
:class:`RewriteContext` on a clone of it, run the pipeline up to one pass, count what the passes
inserted (by target, never by node name).

Each test file calls one pass alone, after :func:`run_until` has run the passes before it, in the
style of vLLM's ``tests/compile`` pass tests.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from libra_fx import testing
from libra_fx.config import CompressionConfig
from libra_fx.families import QWEN2_VL
from libra_fx.passes import PIPELINE, fx_utils, run_pipeline
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.runtime import compat

PASS_NAMES = tuple(p.name for p in PIPELINE)
SIDE_OUTPUTS = "libra_fx_side_outputs"


# ----------------------------------------------------------------------------------- capturing


def capture_graphs(model, *inputs: dict, fullgraph: bool = True, dynamic=None) -> list[fx.GraphModule]:
    """Every FX graph Dynamo hands its backend for ``model.forward(**x)``, for each ``x`` of
    ``inputs`` in turn through one compiled forward (a new shape recompiles, as in real use);
    nothing is compiled: the backend returns ``gm.forward``."""
    graphs: list[fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # every tiny model shares forward's code object: start from a clean cache
    forward = torch.compile(model.forward, backend=capture, fullgraph=fullgraph, dynamic=dynamic)
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        for x in inputs:
            forward(**x)
    torch._dynamo.reset()
    return graphs


def visual_graphs(model, *inputs: dict, fullgraph: bool = True, dynamic=None) -> list[fx.GraphModule]:
    """The captured graphs that hold a ``masked_scatter`` (with graph breaks, the one graph per call
    where the visual features enter the embeddings), in capture order."""
    return [g for g in capture_graphs(model, *inputs, fullgraph=fullgraph, dynamic=dynamic) if has_scatter(g)]


def qwen_inputs(model, **kw):
    """A Qwen2-VL prefill as ``generate()`` runs it: the 3-D (M-RoPE) position ids computed before
    forward and, where forward takes them (transformers ≥ 5.18), the vision tower's features too
    (``mm_encoder_outputs``), so that the forward is one graph. transformers 5.17 runs the tower inside
    forward, whose pixel path breaks the graph around it: capture with ``fullgraph=False`` (the graph
    that holds the ``masked_scatter`` is then the decoder's, as in 5.17's ``generate``)."""
    inputs = QWEN2_VL.prepare_forward(model, testing.tiny_qwen2_vl_inputs(model, **kw))
    if not compat.takes_encoder_outputs(model):
        return inputs
    with torch.no_grad():
        features = model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                  return_dict=True)
    return dict(inputs, mm_encoder_outputs={"image": features})


def has_scatter(gm: fx.GraphModule) -> bool:
    return any(fx_utils.target_name(n) == "masked_scatter" for n in gm.graph.nodes)


def capture_graph(model, inputs: dict, *, fullgraph: bool = True, dynamic=None) -> fx.GraphModule:
    """The one captured graph where the visual features enter the embeddings (with graph breaks, the
    graph that holds the ``masked_scatter``); the only graph when there is none (text-only input)."""
    graphs = capture_graphs(model, inputs, fullgraph=fullgraph, dynamic=dynamic)
    with_scatter = [g for g in graphs if has_scatter(g)]
    if with_scatter:
        assert len(with_scatter) == 1, f"{len(with_scatter)} graphs hold a masked_scatter"
        return with_scatter[0]
    assert len(graphs) == 1, f"{len(graphs)} graphs, none with a masked_scatter"
    return graphs[0]


# ------------------------------------------------------------------------------- contexts, passes


def make_ctx(gm: fx.GraphModule, *, ratio=0.5, layers=(1, 2), method="libra", family=None,
             serves_decode=False, record=False) -> RewriteContext:
    """A fresh context on a clone of ``gm`` (as ``LibraBackend.rewrite`` builds it): ``gm`` stays as captured."""
    config = CompressionConfig.build(ratio=ratio, layers=layers, method=method)
    return RewriteContext(fx_utils.clone(gm), config, family=family, serves_decode=serves_decode, record=record)


def pass_named(name: str):
    for p in PIPELINE:
        if p.name == name:
            return p
    raise KeyError(f"no pass {name!r} in the pipeline {PASS_NAMES}")


def run_until(ctx: RewriteContext, name: str) -> list[PassResult]:
    """Run the pipeline's passes before the one called ``name`` (with ``run_pipeline``, so each only
    where its ``applies`` holds), so that a test can then call that pass alone."""
    return run_pipeline(ctx, PIPELINE[:PIPELINE.index(pass_named(name))])


def run_after(ctx: RewriteContext, name: str) -> list[PassResult]:
    """Run the pipeline's passes after the one called ``name``."""
    return run_pipeline(ctx, PIPELINE[PIPELINE.index(pass_named(name)) + 1:])


def run_alone(gm: fx.GraphModule, name: str, observe=None, **config) -> tuple[RewriteContext, PassResult, object]:
    """A fresh context on ``gm`` (``make_ctx(gm, **config)``), the passes before ``name`` run, then
    ``name`` alone: ``(ctx, its result, observe(ctx.gm) just before it)`` (``observe`` defaults to
    :func:`snapshot`)."""
    ctx = make_ctx(gm, **config)
    run_until(ctx, name)
    before = (observe or snapshot)(ctx.gm)
    return ctx, pass_named(name).run(ctx), before


def run_pass(ctx: RewriteContext, name: str) -> PassResult:
    """``name``'s ``run`` alone (its ``applies`` is the caller's business)."""
    return pass_named(name).run(ctx)


# ------------------------------------------------------------------------------ reading graphs


def inserted(gm: fx.GraphModule, target=None) -> list[fx.Node]:
    """The nodes the passes inserted (``node.meta["libra_fx_inserted"]``), in program order; only
    those calling ``target`` when given."""
    return [n for n in gm.graph.nodes if n.meta.get(fx_utils.INSERTED) and (target is None or n.target is target)]


def inserted_counts(gm: fx.GraphModule) -> collections.Counter:
    """``{target: how many inserted nodes call it}``."""
    return collections.Counter(n.target for n in inserted(gm))


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    """Every node calling ``target``: a callable (compared by identity), a set of them, or a method name."""
    if isinstance(target, (set, frozenset, tuple)):
        return [n for n in gm.graph.nodes if n.op != "placeholder" and n.target in target]
    if isinstance(target, str):
        return [n for n in gm.graph.nodes
                if n.op in ("call_method", "call_function") and fx_utils.target_name(n) == target]
    return [n for n in gm.graph.nodes if n.target is target]


def snapshot(gm: fx.GraphModule) -> list[str]:
    """The graph as text, node by node (what each node calls, on what): equal before and after a
    pass that does not edit it."""
    return [f"{n.name} = {n.op}[{fx_utils.target_name(n) or n.target}]{n.args}{n.kwargs}" for n in gm.graph.nodes]


def position(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def output_values(gm: fx.GraphModule) -> tuple:
    return tuple(next(iter(gm.graph.find_nodes(op="output"))).args[0])


def in_module(node: fx.Node, fragment: str) -> bool:
    return fragment in fx_utils.module_path(node)


def layer_of(node: fx.Node):
    """The ``i`` of the ``…layers.<i>`` module a node was traced in (``None`` outside any)."""
    match = fx_utils.LAYER_PATH.match(fx_utils.module_path(node))
    return int(match["index"]) if match else None


def flat_args(node: fx.Node) -> list:
    out = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda x: out.append(x) or x)
    return out


# ------------------------------------------------------------------------- hand-written models


class ToyBlock(nn.Module):
    """Attention + residual; causal SDPA (a decoder block) or bidirectional (an encoder block)."""

    def __init__(self, d: int = 16, causal: bool = True):
        super().__init__()
        self.qkv, self.causal = nn.Linear(d, 3 * d), causal

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + out.transpose(1, 2).reshape(b, t, d)


class ToyVLM(nn.Module):
    """A vision-language model of no known family: patch features go through a linear "tower" and
    enter the token embeddings at the image tokens (id 100), then two causal blocks under
    ``blocks`` (not ``layers.<i>``). ``scatter=False`` prepends the features with ``cat`` instead of
    ``masked_scatter``; ``causal=False`` makes the blocks bidirectional."""

    IMAGE = 100

    def __init__(self, scatter: bool = True, causal: bool = True):
        super().__init__()
        self.scatter = scatter
        self.embed = nn.Embedding(128, 16)
        self.vision = nn.Linear(12, 16)
        self.blocks = nn.ModuleList([ToyBlock(causal=causal) for _ in range(2)])
        self.head = nn.Linear(16, 128)

    def forward(self, input_ids, pixel_values):
        x = self.embed(input_ids)
        feats = self.vision(pixel_values)  # [B, N, 16]
        if self.scatter:
            mask = (input_ids == self.IMAGE)[..., None].expand_as(x)
            x = x.masked_scatter(mask, feats.flatten(0, 1))
        else:
            x = torch.cat([feats, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return (self.head(x),)


def toy_inputs(batch: int = 1, images: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (batch, 10), generator=gen)
    ids[:, 3:3 + images] = ToyVLM.IMAGE
    return dict(input_ids=ids, pixel_values=torch.randn(batch, images, 12, generator=gen))


def toy_graph(**kwargs) -> fx.GraphModule:
    torch.manual_seed(0)
    return capture_graph(ToyVLM(**kwargs).eval(), toy_inputs())
