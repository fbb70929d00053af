"""Name the visual spans' sizes in the graph: the visual-token mask, and each stage's span lengths.

A span is one image or one video (contract §1). Its token count is read off how the features
were built: a ``cat`` of per-image ``[N_i, D]`` pieces, or one ``[n, N, D]`` tensor. Symbolic
counts get a ``sym_size`` node; each stage's target counts a ``num_targets`` node::

    image_features = torch.cat([f0, f1])                   # f0: [s3, 64], f1: [36, 64]
  + sym_size = sym_size(f0, 0)                             # span lengths ((sym_size, 36),)
  + num_targets = num_targets(sym_size, 0.5)               # the next stage's span length
  + visual = logical_or(image_mask, video_mask)            # only with two modalities
"""

from __future__ import annotations

import torch
import torch.fx as fx

from libra_fx.errors import UnsupportedGraph
from libra_fx.methods.selectors import num_targets
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.fx_utils import call, concrete, count_inserted, target_name, value

SHAPE_KEEPING = frozenset({"to", "cat", "getitem", "reshape", "view", "flatten", "contiguous", "float", "type"})


def feature_pieces(features: fx.Node) -> list[tuple[fx.Node, int]]:
    """``(node, dim)`` per image/video: its token count is ``node.shape[dim]``. Read off how the
    flattened features ``[Σ N_i, D]`` were built: a ``cat`` of per-image ``[N_i, D]`` pieces, or a
    ``[n_images, N, D]`` tensor (one entry standing for all its images)."""
    todo, seen = [features], set()
    while todo:
        node = todo.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        shape = getattr(value(node), "shape", None)
        if shape is not None and len(shape) == 3:
            return [(node, 1)] * concrete(shape[0]) if isinstance(concrete(shape[0]), int) else []
        if target_name(node) == "cat" and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) == 0:
            return [(p, 0) for p in node.args[0]]
        if target_name(node) in SHAPE_KEEPING:
            todo.extend(a for a in node.all_input_nodes)
    return []


def size_of(graph: fx.Graph, node: fx.Node, dim: int):
    """``node.shape[dim]`` as an int, or as a new ``sym_size`` node when it is symbolic."""
    size = concrete(value(node).shape[dim])
    if isinstance(size, int):
        return size
    anchor = node if node.op != "placeholder" else next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_after(anchor) if node.op != "placeholder" else graph.inserting_before(anchor):
        sym = call(graph, torch.ops.aten.sym_size.int, node, dim)
    sym.meta["val"] = size
    return sym


def _key(x):
    return x if isinstance(x, int) else str(value(x).node.expr)


def span_lengths(ctx: RewriteContext) -> tuple:
    """The visual-token counts of each sample's spans, in sequence order: one row shared by all
    samples, or one row per sample. ``k`` images/videos per sample, in sample order, are assumed
    (and checked at run time by the compression node)."""
    graph, batch = ctx.gm.graph, ctx.batch
    rows = [[] for _ in range(batch)]
    for scatter in ctx.scatters:
        features = scatter.args[2]
        pieces = feature_pieces(features)
        sizes = {p: size_of(graph, *p) for p in dict.fromkeys(pieces)}  # one sym_size node per distinct piece
        lengths = [sizes[p] for p in pieces]
        if not lengths:  # one flat tensor: as many equal images as samples
            total = concrete(value(features).shape[0])
            if not isinstance(total, int) or total % batch:
                raise UnsupportedGraph(f"cannot tell how the {total} visual features of {scatter.name} split into images")
            lengths = [total // batch] * batch
        if len(lengths) % batch:
            raise UnsupportedGraph(f"{len(lengths)} images/videos do not split evenly over {batch} samples")
        k = len(lengths) // batch
        for i in range(batch):
            rows[i] += lengths[i * k:(i + 1) * k]
    if len(ctx.scatters) > 1 and len({_key(n) for row in rows for n in row}) > 1:
        raise UnsupportedGraph("images and videos of different token counts in one prompt: their order in the "
                               "sequence is not known to the graph")
    if len({tuple(map(_key, row)) for row in rows}) == 1:
        return (tuple(rows[0]),)
    if not ctx.serves_decode:
        raise UnsupportedGraph(
            "the samples of this batch hold different visual-token counts "
            f"{[[str(_key(n)) for n in row] for row in rows]}; their decode steps need libra_fx.compile(model, ...) "
            "(not a bare torch.compile with libra_fx.backend), or batch images of equal size"
        )
    return tuple(map(tuple, rows))


def _or_masks(graph: fx.Graph, scatters: list[fx.Node]) -> fx.Node:
    mask = scatters[0].args[1]
    for other in scatters[1:]:
        with graph.inserting_before(other.next):
            mask = call(graph, torch.logical_or, mask, other.args[1])
    return mask


def _num_targets(graph: fx.Graph, n, ratio: float, memo: dict):
    if isinstance(n, int):
        return num_targets(n, ratio)
    if n not in memo:
        with graph.inserting_after(n):
            memo[n] = call(graph, num_targets, n, ratio)
        memo[n].meta["val"] = num_targets(value(n), ratio)
    return memo[n]


def show(rows) -> str:
    shown = [", ".join(str(value(n) if isinstance(n, fx.Node) else n) for n in row) for row in rows]
    return shown[0] if len(shown) == 1 else " | ".join(shown)


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("insert_span_sizes")
    graph = ctx.gm.graph
    already = count_inserted(graph)
    ctx.span_lens = span_lens = span_lengths(ctx)
    ctx.visual_mask = _or_masks(graph, ctx.scatters)
    result.matched.append(f"visual tokens: span(s) of {show(span_lens)} per sample, mask {ctx.visual_mask.name}")
    memo: dict = {}
    for i, stage in enumerate(ctx.stages):
        if i:  # the spans entering this stage: the previous stage's targets
            ratio = ctx.config.stage_ratio(i - 1)
            span_lens = tuple(tuple(_num_targets(graph, n, ratio, memo) for n in row) for row in span_lens)
        stage.span_lens = span_lens
        result.matched.append(f"stage after layer {stage.layer}: span(s) of {show(span_lens)} tokens")
    result.count("spans", len(ctx.span_lens[0]))  # images and videos per sample
    result.count("samples", ctx.batch)
    result.count("ragged", int(len(ctx.span_lens) > 1))  # 1: the samples' counts differ (a row of lengths each)
    result.count("stages", len(ctx.stages))
    result.count("inserted", count_inserted(graph) - already)  # sym_size / num_targets nodes, the or of two masks
    return result
