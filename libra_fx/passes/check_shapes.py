"""Prove the rewrite is consistent by fake-tensor propagation of the rewritten graph.

Every original node in a stage's region must have its old shape with the sequence length
``T`` replaced by the stage's new length ``T'`` — and nothing else changed::

    view_9   [2, s27, 4, 16]  →  [2, s27 - 17, 4, 16]   ✓
    view_9   [1, 64, 2, 64]   →  [1, 40, 4, 40]          ✗ (a literal 64 was not a length)
    arange_6 [4*s22]          →  [4*s22 - 68]            ✓ (a size derived from T: 4·T')
    query_15 [2, 4, s22 + Mod(64 - Mod(s22, 64), 64), 16]  →  the same  ✓ (a kept chunk padding)

A failure (an exception, or any other shape) makes the graph unsupported, so a rewrite that would
silently compute something else is never compiled.
"""

from __future__ import annotations

import sympy
import torch

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.fx_utils import INSERTED, is_size_like, value
from libra_fx.passes.rewire_sequence import PADDED
from libra_fx.runtime.compat import fake_propagation, fake_tensor_type


def _hint(ctx: RewriteContext) -> str:
    if not isinstance(ctx.seq_len, int):
        return ""
    return (
        f"; with static shapes the sequence length {ctx.seq_len} is found as a literal and may equal another "
        "dimension: mark the sequence dimension dynamic (torch._dynamo.mark_dynamic(input_ids, 1))"
    )


class _PropagateRewritten(torch.fx.Interpreter):
    """Fake-run only what the passes changed (inserted nodes and the stages' regions); every other
    node keeps the fake value Dynamo traced for it."""

    def __init__(self, gm, mode, changed):
        super().__init__(gm)
        self.mode, self.changed = mode, changed
        self.propagated = 0  # nodes fake-run

    def run_node(self, n):
        if n.op == "placeholder" or not (n in self.changed or n.meta.get(INSERTED) or n.op == "output"):
            return value(n)
        # as Dynamo traced it (symbolic pads, …); without the fake-tensor cache, whose entries for symbolic
        # shapes cost more to build than the one run of each node they would serve (about a third of the pass)
        with fake_propagation(self.mode):
            result = super().run_node(n)
        self.propagated += n.op != "output"
        n.meta["val"] = result
        return result


def _expected(old: tuple, seq_len, new_len, kept=frozenset()) -> tuple:
    """``old`` with ``T`` replaced by ``T'``, also inside sizes derived from it (``4·T`` → ``4·T'``),
    except inside the ``kept`` padded lengths (``T + Mod(-T, 64)``, rewire_sequence's chunk padding)."""
    if not isinstance(seq_len, torch.SymInt) or not seq_len.node.expr.is_Symbol:
        return tuple(new_len if is_size_like(s, seq_len) else s for s in old)
    marks = {expr: sympy.Dummy() for expr in kept}
    swap = {seq_len.node.expr: new_len.node.expr if isinstance(new_len, torch.SymInt) else new_len}
    unmark = {mark: expr for expr, mark in marks.items()}
    return tuple(s.node.expr.xreplace(marks).xreplace(swap).xreplace(unmark) if isinstance(s, torch.SymInt) else s
                 for s in old)


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    expr = lambda x: x.node.expr if isinstance(x, torch.SymInt) else sympy.sympify(x)  # noqa: E731
    return expr(a) == expr(b) or bool((expr(a) - expr(b)).simplify() == 0)


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("check_shapes")
    placeholders = [value(n) for n in ctx.gm.graph.find_nodes(op="placeholder")]
    fake = fake_tensor_type()
    mode = next(x.fake_mode for x in placeholders if isinstance(x, fake))
    changed = set().union(*(stage.region for stage in ctx.stages))
    propagation = _PropagateRewritten(ctx.gm, mode, changed)
    try:
        propagation.run(*placeholders)
    except Exception as e:  # noqa: BLE001  (any failure means the rewrite is not understood)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnsupportedGraph(
            f"the rewritten graph does not trace ({type(e).__name__}: {first_line}){_hint(ctx)}"
        ) from e

    owner = {}
    for stage in ctx.stages:  # later stages' regions are inside earlier ones: the last one wins
        owner.update(dict.fromkeys(stage.region, stage))
    kept = {value(n.meta[PADDED]).node.expr for n in ctx.gm.graph.nodes if PADDED in n.meta}
    checked = 0
    for node, old in ctx.original_shapes.items():
        stage = owner.get(node)
        new = getattr(value(node), "shape", None)
        if stage is None or new is None:
            continue
        want = _expected(old, ctx.seq_len, value(stage.new_len), kept)
        if len(want) != len(new) or not all(_same(a, b) for a, b in zip(want, new)):
            raise UnsupportedGraph(
                f"after the rewrite {node.name} has shape {list(new)}, expected {list(want)}{_hint(ctx)}"
            )
        checked += 1
    lengths = ", ".join(f"layer {s.layer}: {value(s.new_len)}" for s in ctx.stages)
    result.matched.append(f"{checked} later shapes consistent; lengths after stages: {lengths}")
    result.count("stages", len(ctx.stages))
    result.count("propagated", propagation.propagated)  # nodes fake-run: inserted ones and the stages' regions
    result.count("checked", checked)  # original nodes whose new shape was compared with the expected one
    return result
