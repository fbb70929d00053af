"""Find the decoder layers, the visual-token mask and each stage layer's output.

Reads, does not edit. In a Dynamo graph of LLaVA::

    special_image_mask = input_ids == 100                      # [B, T]
    inputs_embeds_1 = inputs_embeds.masked_scatter(mask, feats)  # visual tokens enter here
    ...                                                        # model.language_model.layers.0 …
    hidden_states_33 = hidden_states_29 + down_proj_1          # last node of layers.L → stage L
"""

from __future__ import annotations

import torch.fx as fx

from libra_fx.fx_utils import LAYER_PATH, SDPA, SOFTMAX, concrete, descendants, module_path, value
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


def find_visual_insertion(graph: fx.Graph) -> fx.Node:
    scatters = [n for n in graph.nodes if _target_name(n) == "masked_scatter"]
    if len(scatters) > 1:
        raise UnsupportedGraph(f"found {len(scatters)} visual-feature insertions (masked_scatter); expected one")
    if scatters:
        return scatters[0]
    takes_pixels = any(n.op == "placeholder" and "pixel" in n.name.lower() for n in graph.nodes)
    if takes_pixels and has_causal_attention(graph):
        raise UnsupportedGraph(
            "the graph takes pixel values and runs a causal decoder, but has no masked_scatter of visual "
            "features into the token embeddings, so the visual tokens cannot be located (unsupported architecture?)"
        )
    raise NothingToCompress("no visual tokens enter a decoder in this graph (text-only input, or a vision-only part)")


def tokens_per_image(features: fx.Node) -> int | None:
    """Visual tokens per image, read off how the flattened features ``[n_images·N, D]`` were built:
    a ``cat`` of per-image ``[N, D]`` pieces, or a ``[n_images, N, D]`` tensor."""
    todo, seen = [features], set()
    while todo:
        node = todo.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        shape = getattr(value(node), "shape", None)
        if shape is not None and len(shape) == 3:
            return shape[1]
        if _target_name(node) == "cat" and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) == 0:
            sizes = {getattr(value(p), "shape", (None,))[0] for p in node.args[0]}
            if len(sizes) != 1:
                raise UnsupportedGraph(f"images of different token counts {sorted(map(str, sizes))} are not supported yet")
            return sizes.pop()
        if _target_name(node) in SHAPE_KEEPING:
            todo.extend(a for a in node.all_input_nodes)
    return None


def decoder_layers(graph: fx.Graph, visual: fx.Node) -> tuple[str, dict[int, list[fx.Node]]]:
    """Group the nodes downstream of the visual insertion by ``<prefix>.layers.<i>``."""
    downstream = descendants(visual)
    groups: dict[str, dict[int, list[fx.Node]]] = {}
    for node in graph.nodes:
        match = LAYER_PATH.match(module_path(node))
        if match and node in downstream:
            groups.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append(node)
    if not groups:
        raise UnsupportedGraph("no decoder layers (…layers.<i> modules) found after the visual tokens")
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


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("locate_decoder")
    graph = ctx.gm.graph
    visual = find_visual_insertion(graph)
    prefix, layers = decoder_layers(graph, visual)
    ctx.num_layers = max(layers) + 1
    ctx.config.check_layers(ctx.num_layers)
    result.matched.append(f"{ctx.num_layers} decoder layers under {prefix or '<root>'!r}")

    embeds = value(visual)
    ctx.batch, ctx.seq_len = concrete(embeds.shape[0]), concrete(embeds.shape[1])
    ctx.visual_mask = visual.args[1]
    features = visual.args[2]
    rows = value(features).shape[0]
    per_image = tokens_per_image(features) or rows // ctx.batch
    if rows % (ctx.batch * per_image):
        raise UnsupportedGraph(
            f"{rows} visual tokens do not split into {ctx.batch} samples of whole images of {per_image} tokens"
        )
    ctx.spans_per_sample = rows // (ctx.batch * per_image)
    result.matched.append(
        f"visual tokens: {ctx.spans_per_sample} span(s) of {per_image} per sample, mask {ctx.visual_mask.name}"
    )

    span_len = per_image
    for i, index in enumerate(ctx.config.layers):
        out = layer_output(index, layers[index])
        ctx.stages.append(Stage(index, layers[index], out, span_len))
        result.matched.append(f"stage {i}: after layer {index} ({out.name}), {span_len} tokens per span")
        span_len = num_targets(span_len, ctx.config.ratio)
    for node in graph.nodes:
        shape = getattr(value(node), "shape", None)
        if shape is not None:
            ctx.original_shapes[node] = tuple(shape)
    return result
