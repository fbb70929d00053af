"""Small helpers for reading and editing Dynamo FX graphs."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from libra_fx.runtime.compat import SDPA_OPS, empty_graph_like

SDPA = SDPA_OPS  # the SDPA call, as Dynamo records it or as written
SOFTMAX = frozenset({F.softmax, torch.softmax, "softmax"})
MATMUL = frozenset({torch.matmul, operator.matmul, "matmul"})
LAYER_PATH = re.compile(r"^(?P<prefix>.*?)\.?layers\.(?P<index>\d+)(?:\.|$)")  # "<prefix>.layers.<i>…"


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module a node was traced in (``""`` outside any).

    Dynamo records it as ``L['self'].model.language_model.layers.3.self_attn``; the ``L['self']``
    root is dropped, so the result is robust to how the model was compiled.
    """
    stack = node.meta.get("nn_module_stack")
    # a module held by a module global rather than the model (with the ``kernels`` package, transformers
    # ≥ 5.25 makes ``apply_rotary_pos_emb`` one: ``G['…modeling_llama'].apply_rotary_pos_emb``) belongs to
    # the model's module that called it
    paths = [path for path, _ in (stack or {}).values() if not path.startswith("G[")]
    if not paths:
        return ""
    path = paths[-1]
    for root in ("L['self'].", "L['self']", "self.", "self"):
        if path.startswith(root):
            return path[len(root):]
    return path


def value(node: fx.Node):
    """The traced (fake) value of a node: a tensor, a SymInt, an int, … or ``None``."""
    return node.meta.get("val", node.meta.get("example_value"))


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph (node metadata is shared shallowly)."""
    graph = empty_graph_like(gm)
    out, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out).meta = dict(old_output.meta)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def _closure(first, step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(first)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def descendants(start: fx.Node) -> set[fx.Node]:
    """All nodes that (transitively) use ``start``."""
    return _closure(start.users, lambda n: n.users)


def descendants_of(first) -> set[fx.Node]:
    """The nodes ``first`` and all nodes that (transitively) use them."""
    return _closure(first, lambda n: n.users)


def ancestors(start: fx.Node) -> set[fx.Node]:
    """All nodes that ``start`` (transitively) uses."""
    return _closure(start.all_input_nodes, lambda n: n.all_input_nodes)


INSERTED = "libra_fx_inserted"


def count_inserted(graph: fx.Graph) -> int:
    """How many nodes of ``graph`` the passes inserted (a pass counts its own as the difference)."""
    return sum(1 for n in graph.nodes if n.meta.get(INSERTED))


def call(graph: fx.Graph, fn, *args, **kwargs) -> fx.Node:
    """Insert ``fn(*args, **kwargs)`` at the graph's current insertion point, marked as ours."""
    node = graph.call_function(fn, args, kwargs)
    node.meta[INSERTED] = True
    return node


def concrete(x):
    """A SymInt whose expression is a plain number, as an ``int``; anything else unchanged."""
    if isinstance(x, torch.SymInt) and x.node.expr.is_number:
        return int(x.node.expr)
    return x


def is_size_like(x, size) -> bool:
    """Whether ``x`` (an int or SymInt) is exactly the sequence length ``size``."""
    x, size = concrete(x), concrete(size)
    if isinstance(x, torch.SymInt) or isinstance(size, torch.SymInt):
        if not (isinstance(x, torch.SymInt) and isinstance(size, torch.SymInt)):
            return False
        return x.node.expr == size.node.expr
    return isinstance(x, int) and not isinstance(x, bool) and x == size


def target_name(node: fx.Node) -> str:
    """What a node calls, as a plain name: ``"masked_scatter"``, ``"cat"``, ``"add"``."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
