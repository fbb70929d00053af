"""Find the decoder layers, the visual-token mask and each stage layer's output.

Reads, does not edit. In a Dynamo graph of LLaVA::

    special_image_mask = input_ids == 100                      # [B, T]
    inputs_embeds_1 = inputs_embeds.masked_scatter(mask, feats)  # visual tokens enter here
    ...                                                        # model.language_model.layers.0 …
    hidden_states_33 = hidden_states_29 + down_proj_1          # last node of layers.L → stage L
"""

from __future__ import annotations

import torch
import torch.fx as fx

from libra_fx.fx_utils import LAYER_PATH, SDPA, SOFTMAX, call, concrete, descendants, module_path, value
from libra_fx.passes import NothingToCompress, PassResult, RewriteContext, Stage, UnsupportedGraph
from libra_fx.selectors import num_targets

SHAPE_KEEPING = {"to", "cat", "getitem", "reshape", "view", "flatten", "contiguous", "float", "type"}


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def has_causal_attention(graph: fx.Graph) -> bool:
    """Whether some attention call is causal (a decoder), not only bidirectional (a vision tower)."""
    for n in graph.nodes:
        if n.target in SDPA and (n.kwargs.get("is_causal") or n.kwargs.get("attn_mask") is not None
                                 or len(n.args) > 3 and n.args[3] is not None):
            return True
        if n.target in SOFTMAX and _target_name(n.args[0]) in ("add", "add_"):
            return True
    return False


def find_visual_insertions(graph: fx.Graph) -> list[fx.Node]:
    """The ``masked_scatter`` nodes that put visual features into the token embeddings (one per
    modality: images, videos), in program order."""
    scatters = [n for n in graph.nodes if _target_name(n) == "masked_scatter"]
    if scatters:
        return scatters
    takes_pixels = any(n.op == "placeholder" and "pixel" in n.name.lower() for n in graph.nodes)
    if takes_pixels and has_causal_attention(graph):
        raise UnsupportedGraph(
            "the graph takes pixel values and runs a causal decoder, but has no masked_scatter of visual "
            "features into the token embeddings, so the visual tokens cannot be located (unsupported architecture?)"
        )
    raise NothingToCompress("no visual tokens enter a decoder in this graph (text-only input, or a vision-only part)")


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
        if _target_name(node) == "cat" and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) == 0:
            return [(p, 0) for p in node.args[0]]
        if _target_name(node) in SHAPE_KEEPING:
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


def span_lengths(ctx: RewriteContext, scatters: list[fx.Node]) -> tuple:
    """The visual-token counts of each sample's spans, in sequence order: one row shared by all
    samples, or one row per sample. Counts are ints, or ``sym_size`` nodes for images whose
    size is symbolic. ``k`` images/videos per sample, in sample order, are assumed (and checked
    at run time by the compression node)."""
    graph, batch = ctx.gm.graph, ctx.batch
    rows = [[] for _ in range(batch)]
    for scatter in scatters:
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
    if len(scatters) > 1 and len({_key(n) for row in rows for n in row}) > 1:
        raise UnsupportedGraph("images and videos of different token counts in one prompt: their order in the "
                               "sequence is not known to the graph")
    if len({tuple(map(_key, row)) for row in rows}) == 1:
        return (tuple(rows[0]),)
    if not ctx.ragged_batches:
        raise UnsupportedGraph(
            "the samples of this batch hold different visual-token counts "
            f"{[[str(_key(n)) for n in row] for row in rows]}; their decode steps need libra_fx.compile(model, ...) "
            "(not a bare torch.compile with libra_fx.backend), or batch images of equal size"
        )
    return tuple(map(tuple, rows))


def decoder_layers(graph: fx.Graph, visual: fx.Node) -> tuple[str, dict[int, list[fx.Node]]]:
    """Group the nodes downstream of the visual insertion by ``<prefix>.layers.<i>``."""
    downstream = descendants(visual)
    groups: dict[str, dict[int, list[fx.Node]]] = {}
    for node in graph.nodes:
        match = LAYER_PATH.match(module_path(node))
        if match and node in downstream:
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(node)
    if not groups:
        raise UnsupportedGraph(
            "the visual tokens enter the embeddings in this graph, but no decoder layer (…layers.<i>) follows "
            "them in it: a graph break separates them. Qwen2-VL's forward computes its 3-D positions with "
            "graph breaks: use libra_fx.compile(model, ...) (it computes them before the graph) or generate()"
        )
    prefix = max(groups, key=lambda p: sum(len(v) for v in groups[p].values()))
    return prefix, groups[prefix]


def layer_output(index: int, nodes: list[fx.Node]) -> fx.Node:
    inside = set(nodes)
    leaving = [n for n in nodes if any(u not in inside for u in n.users) and _is_hidden(n)]
    if len(leaving) != 1:
        raise UnsupportedGraph(
            f"decoder layer {index}: expected one hidden-state output, found {[n.name for n in leaving]}"
        )
    return leaving[0]


def _is_hidden(node: fx.Node) -> bool:
    shape = getattr(value(node), "shape", None)
    return shape is not None and len(shape) == 3


def _is_mrope_positions(node: fx.Node, batch) -> bool:
    """Qwen2-VL's ``[3 | 4, B, T]`` position ids (text row + three M-RoPE rows)."""
    v = value(node)
    return ("position_ids" in node.name and isinstance(v, torch.Tensor) and v.dim() == 3
            and concrete(v.shape[0]) in (3, 4) and concrete(v.shape[1]) == batch)


def _or_masks(graph: fx.Graph, scatters: list[fx.Node]) -> fx.Node:
    mask = scatters[0].args[1]
    for other in scatters[1:]:
        with graph.inserting_before(other.next):
            mask = call(graph, torch.logical_or, mask, other.args[1])
    return mask


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("locate_decoder")
    graph = ctx.gm.graph
    scatters = find_visual_insertions(graph)
    prefix, layers = decoder_layers(graph, scatters[-1])
    ctx.num_layers = max(layers) + 1
    ctx.config.check_layers(ctx.num_layers)
    result.matched.append(f"{ctx.num_layers} decoder layers under {prefix or '<root>'!r}")

    embeds = value(scatters[-1])
    ctx.batch, ctx.seq_len = concrete(embeds.shape[0]), concrete(embeds.shape[1])
    span_lens = span_lengths(ctx, scatters)
    ctx.mrope = any(_is_mrope_positions(n, ctx.batch) for n in graph.nodes if n.op == "placeholder")
    ctx.visual_mask = _or_masks(graph, scatters)
    result.matched.append(f"visual tokens: span(s) of {_show(span_lens)} per sample, mask {ctx.visual_mask.name}")

    memo: dict = {}
    for i, index in enumerate(ctx.config.layers):
        out = layer_output(index, layers[index])
        ctx.stages.append(Stage(index, layers[index], out, span_lens))
        result.matched.append(f"stage {i}: after layer {index} ({out.name}), span(s) of {_show(span_lens)} tokens")
        span_lens = tuple(tuple(_num_targets(graph, n, ctx.config.ratio, memo) for n in row) for row in span_lens)
    for node in graph.nodes:
        shape = getattr(value(node), "shape", None)
        if shape is not None:
            ctx.original_shapes[node] = tuple(shape)
    return result


def _show(rows) -> str:
    shown = [", ".join(str(value(n) if isinstance(n, fx.Node) else n) for n in row) for row in rows]
    return shown[0] if len(shown) == 1 else " | ".join(shown)


def _num_targets(graph: fx.Graph, n, ratio: float, memo: dict):
    if isinstance(n, int):
        return num_targets(n, ratio)
    if n not in memo:
        with graph.inserting_after(n):
            memo[n] = call(graph, num_targets, n, ratio)
        memo[n].meta["val"] = num_targets(value(n), ratio)
    return memo[n]
