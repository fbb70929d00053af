"""Find the decoder layers after the visual tokens, and each stage layer's output (reads, does not edit).

Nodes downstream of the visual insertion are grouped by the ``<prefix>.layers.<i>`` module they
were traced in, whatever the prefix::

    model.language_model.layers.0 … layers.3                      → ctx.decoder, ctx.num_layers = 4
    hidden_states_33 = hidden_states_29 + down_proj_1              # last node of layers.L → Stage(L)
"""

from __future__ import annotations

import torch.fx as fx

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext, Stage
from libra_fx.passes.fx_utils import LAYER_PATH, descendants, module_path, value


def decoder_layers(graph: fx.Graph, visual: fx.Node, hint: str = "") -> tuple[str, dict[int, list[fx.Node]]]:
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
            "them in it: a graph break separates them" + (f". {hint}" if hint else "")
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


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("locate_decoder")
    prefix, ctx.decoder = decoder_layers(ctx.gm.graph, ctx.scatters[-1], ctx.family.graph_break_hint)
    ctx.num_layers = max(ctx.decoder) + 1
    ctx.config.check_layers(ctx.num_layers)
    result.matched.append(f"{ctx.num_layers} decoder layers under {prefix or '<root>'!r}")
    result.count("layers", ctx.num_layers)
    for index in ctx.config.layers:
        out = layer_output(index, ctx.decoder[index])
        ctx.stages.append(Stage(index, ctx.decoder[index], out))
        result.matched.append(f"stage after layer {index}: its output is {out.name}")
    result.count("stages", len(ctx.config.layers))  # decoder-side stages (a vision-side method has none)
    for node in ctx.gm.graph.nodes:
        shape = getattr(value(node), "shape", None)
        if shape is not None:
            ctx.original_shapes[node] = tuple(shape)
    result.count("shapes", len(ctx.original_shapes))  # nodes whose shape check_shapes compares after the rewrite
    return result
