"""Append the side outputs the passes made to the graph's outputs, for the forward around the graph.

::

    return (logits, cache_k0, …)
  → return (logits, cache_k0, …, source, valid)          gm.meta["libra_fx_side_outputs"] = ("source", "valid")

The backend strips them before Dynamo sees the outputs and hands them to the model's
:class:`~libra_fx.state.ModelState` (decode layouts), or to the caller (kept-token records).
"""

from __future__ import annotations

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext

SIDE_OUTPUTS = "libra_fx_side_outputs"  # gm.meta key: the names of the trailing graph outputs that are ours


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("return_side_outputs")
    result.count("outputs", len(ctx.side_outputs))  # graph outputs appended
    if not ctx.side_outputs:
        result.skipped.append("no side outputs")
        return result
    output = next(iter(ctx.gm.graph.find_nodes(op="output")))
    returned = output.args[0]
    if not isinstance(returned, (tuple, list)):
        raise UnsupportedGraph("the graph does not return a tuple of outputs")
    names = tuple(ctx.side_outputs)
    output.args = (tuple(returned) + tuple(ctx.side_outputs[n] for n in names),) + tuple(output.args[1:])
    ctx.gm.meta[SIDE_OUTPUTS] = names
    result.matched.append(f"returned: {', '.join(names)}")
    return result
