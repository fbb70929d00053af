"""Recognise the model family from the graph, and refuse one that has no adapter (reads, does not edit).

Dynamo records the module classes each node was traced in (``nn_module_stack``)::

    "L['self'].model"  → <Family>Model       → that family's adapter (libra_fx.families)
    "L['self'].model"  → <Other>Model        → no adapter: UnsupportedGraph, naming the classes

(after a graph break, the transformers modeling file of the nodes' outermost frame names it).
``libra_fx.compile`` already knows the family from the model object and passes it in; a family whose
inputs it must check before each call (``FamilyAdapter.bare_backend``) is refused without it. A family's
masks need nothing of it: the later layers take the original mask's rows and columns at the kept
tokens, whatever the mask (contract §5).
"""

from __future__ import annotations

from libra_fx import families
from libra_fx.errors import UnsupportedGraph
from libra_fx.passes.context import PassResult, RewriteContext


def run(ctx: RewriteContext) -> PassResult:
    result = PassResult("identify_family")
    if ctx.family is None:
        ctx.family, seen = families.for_graph(ctx.gm)
        _check_known(ctx.family, seen)
        if ctx.family.bare_backend:
            raise UnsupportedGraph(f"{ctx.family.name}: {ctx.family.bare_backend}")
        naming = [s for s in seen if _names(ctx.family, s)]
        result.matched.append(f"{ctx.family.name} (from {', '.join(naming)})")
        result.count("found")  # found in the graph
        result.count("classes", len(naming))  # the module classes (or modeling files) that named it
    else:
        result.matched.append(f"{ctx.family.name} (given by the caller)")
        result.count("given")
    return result


def _names(family, seen: str) -> bool:
    return seen in family.classes or seen in family.modeling


def _check_known(family, classes: list[str]) -> None:
    if family is None:
        shown = ", ".join(classes[:3]) or "no module classes recorded"
        raise UnsupportedGraph(
            f"the model ({shown}) belongs to no family libra-fx has an adapter for "
            f"(supported: {', '.join(families.supported_classes())}); its attention masks, positions or spans "
            "may differ from what the passes assume"
        )
