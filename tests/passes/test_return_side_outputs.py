"""return_side_outputs: the passes' side outputs appended to the graph's outputs, their names in
``gm.meta["libra_fx_side_outputs"]``."""

import pytest
from passkit import SIDE_OUTPUTS, make_ctx, output_values, run_alone, run_until, snapshot

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes import return_side_outputs


def returned(gm, **config):
    return run_alone(gm, "return_side_outputs", output_values, **config)


def test_vision_stage_returns_source_valid_and_positions(llava_graph):
    ctx, result, old = returned(llava_graph, method="prumerge", serves_decode=True)
    new = output_values(ctx.gm)
    assert new[:len(old)] == old
    assert new[len(old):] == tuple(ctx.side_outputs[n] for n in ("source", "valid", "positions"))
    assert ctx.gm.meta[SIDE_OUTPUTS] == ("source", "valid", "positions")
    assert result.counts == {"outputs": 3} and not result.skipped
    ctx.gm.graph.lint()


def test_ragged_batch_returns_empty_slots(next_ragged_graph):
    ctx, result, old = returned(next_ragged_graph, serves_decode=True)
    assert output_values(ctx.gm) == old + (ctx.side_outputs["empty_slots"],)
    assert ctx.gm.meta[SIDE_OUTPUTS] == ("empty_slots",)
    assert result.counts == {"outputs": 1}


def test_records_in_stage_order(llava_graph):
    ctx, result, old = returned(llava_graph, record=True)
    assert ctx.gm.meta[SIDE_OUTPUTS] == ("records0", "records1")
    assert output_values(ctx.gm)[len(old):] == (ctx.side_outputs["records0"], ctx.side_outputs["records1"])
    assert result.counts == {"outputs": 2}


def test_skipped_without_side_outputs(llava_graph):
    ctx = make_ctx(llava_graph)
    run_until(ctx, "return_side_outputs")
    before = snapshot(ctx.gm)
    result = return_side_outputs.run(ctx)
    assert result.counts == {"outputs": 0} and result.skipped and not result.matched
    assert snapshot(ctx.gm) == before
    assert SIDE_OUTPUTS not in ctx.gm.meta
    assert SIDE_OUTPUTS not in llava_graph.meta  # and the captured graph's meta was never touched


def test_graph_returning_a_single_value_is_refused(llava_graph):
    ctx = make_ctx(llava_graph, method="prumerge", serves_decode=True)
    run_until(ctx, "return_side_outputs")
    output = next(iter(ctx.gm.graph.find_nodes(op="output")))
    output.args = (output.args[0][0],)
    with pytest.raises(UnsupportedGraph, match="does not return a tuple"):
        return_side_outputs.run(ctx)
