"""identify_family: the adapter of the graph's model family, found from the module classes (or,
after a graph break, the transformers modeling file); reads, does not edit."""


import pytest
from passkit import make_ctx, run_until, snapshot, toy_graph

from libra_fx.errors import UnsupportedGraph
from libra_fx.families import LLAVA, LLAVA_NEXT, QWEN2_VL
from libra_fx.passes import identify_family


@pytest.mark.parametrize("graph, family", [
    ("llava_graph", LLAVA),
    ("next_ragged_graph", LLAVA_NEXT),  # after a graph break: only the language model's classes
    ("qwen_graph", QWEN2_VL),
], ids=["llava", "llava_next", "qwen2_vl"])
def test_recognised_from_the_graph(request, graph, family):
    ctx = make_ctx(request.getfixturevalue(graph))
    run_until(ctx, "identify_family")
    before = snapshot(ctx.gm)
    result = identify_family.run(ctx)
    assert ctx.family is family
    assert not result.skipped
    assert result.counts["found"] == 1 and result.counts["classes"] >= 1 and "given" not in result.counts
    # the record names the classes (or modeling files) it was recognised by, and only the family's
    named = result.matched[0][len(family.name) + len(" (from "):-1].split(", ")
    assert len(named) == result.counts["classes"] and all(n in family.classes + family.modeling for n in named)
    assert snapshot(ctx.gm) == before


def test_llava_named_by_its_model_class(llava_graph):
    ctx = make_ctx(llava_graph)
    run_until(ctx, "identify_family")
    assert "LlavaModel" in identify_family.run(ctx).matched[0]


def test_family_given_by_the_caller_is_kept(llava_graph):
    """libra_fx.compile knows the family from the model object: no lookup (even a wrong one is kept)."""
    ctx = make_ctx(llava_graph, family=LLAVA_NEXT)
    run_until(ctx, "identify_family")
    result = identify_family.run(ctx)
    assert ctx.family is LLAVA_NEXT
    assert result.counts == {"given": 1}
    assert LLAVA_NEXT.name in str(result)  # the record names it


def test_model_of_no_family_is_refused_by_name():
    ctx = make_ctx(toy_graph())
    run_until(ctx, "identify_family")
    with pytest.raises(UnsupportedGraph, match="belongs to no family") as err:
        identify_family.run(ctx)
    # the module classes it saw are named (the root module is not in nn_module_stack), and the supported ones
    assert any(c in str(err.value) for c in ("Embedding", "Linear", "ToyBlock"))
    assert "LlavaForConditionalGeneration" in str(err.value)
    assert ctx.family is None

