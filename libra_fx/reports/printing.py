"""A canonical, deterministic printout of the rewritten region around one stage.

Shows the stage layer's attention call, every node the passes inserted up to the end of the
next layer, and the original nodes of the next layer that were rewired to use them. Node names
are replaced by ``v0, v1, …`` in print order and other inputs by ``in0, in1, …`` (with shapes),
so the text does not depend on Dynamo's naming::

    v0 = scaled_dot_product_attention(in0, in1, in2, ...)        # [2, 4, 48, 16]
    v1 = last_row_importance(in0, in1, None, 0.25)                # [2, 48]
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from libra_fx.passes.fx_utils import INSERTED, module_path, value


def _shape(node: fx.Node) -> str:
    v = value(node)
    if isinstance(v, torch.Tensor):
        return f"{v.dtype}{list(v.shape)}".replace("torch.", "")
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(f"{x.dtype}{list(x.shape)}".replace("torch.", "") for x in v) + ")"
    return type(v).__name__ if v is not None else ""


def op_name(node: fx.Node) -> str:
    """A short name for what a node calls: ``.view`` for methods, ``sym_size`` for ``aten.sym_size.int``."""
    if node.op == "call_method":
        return f".{node.target}"
    name = getattr(node.target, "__name__", str(node.target))
    return {"getitem": "getitem", "sym_size": "sym_size"}.get(name.split(".")[0], name)


def _window(graph: fx.Graph, layer: int) -> list[fx.Node]:
    nodes = list(graph.nodes)
    first = next(i for i, n in enumerate(nodes) if n.meta.get(INSERTED) and op_name(n) == "last_row_importance"
                 and re.search(rf"layers\.{layer}(\.|$)", module_path(nodes[i - 1])))
    nxt = re.compile(rf"layers\.{layer + 1}(\.|$)")
    last = max(i for i, n in enumerate(nodes) if i > first and nxt.search(module_path(n)))
    return nodes[first - 1: last + 1]


def format_stage(gm: fx.GraphModule, layer: int) -> str:
    """The canonical printout of the stage after decoder layer ``layer`` and the layer that follows."""
    window = _window(gm.graph, layer)
    shown = [window[0]] + [
        n for n in window[1:]
        if n.meta.get(INSERTED) or any(a.meta.get(INSERTED) for a in n.all_input_nodes)
    ]
    names: dict[fx.Node, str] = {n: f"v{i}" for i, n in enumerate(shown)}
    inputs: dict[fx.Node, str] = {}

    def name(a):
        if not isinstance(a, fx.Node):
            return a
        if a not in names and a not in inputs:
            inputs[a] = f"in{len(inputs)}"
        return _Name(names.get(a) or inputs[a])

    lines = []
    for n in shown:
        args = [repr(map_aggregate(a, name)) for a in n.args]
        args += [f"{k}={map_aggregate(v, name)!r}" for k, v in n.kwargs.items()]
        lines.append(f"{names[n]} = {op_name(n)}({', '.join(args)})  # {_shape(n)}")
    header = [f"{label}: {_shape(node)}" for node, label in inputs.items()]
    return "\n".join(header + lines)


class _Name(str):
    def __repr__(self) -> str:
        return str(self)
