"""check_shapes: fake-tensor propagation of the rewritten graph; every original node after a stage
must have its old shape with T replaced by the stage's new length — and nothing else changed."""

import pytest
from passkit import make_ctx, output_values, run_alone, run_until, snapshot
from torch.fx.node import map_aggregate

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes import check_shapes, fx_utils
from libra_fx.runtime import compat

SEQ = 51


def checked(gm, **config):
    ctx, result, before = run_alone(gm, "check_shapes", **config)
    assert snapshot(ctx.gm) == before  # it proves, it does not edit
    return ctx, result


def test_correct_rewrite_passes(llava_graph):
    ctx, result = checked(llava_graph, layers=(1, 2))
    first, second = (fx_utils.value(s.new_len) for s in ctx.stages)
    assert first == SEQ - 36 + 18 + 1  # 18 targets and one compensation token per span
    assert second == first - (18 + 1) + 9 + 2  # the first compensation token is carried
    assert result.counts["stages"] == 2 and result.counts["checked"] > 100
    assert result.counts["propagated"] >= result.counts["checked"]  # the stages' regions and the inserted nodes
    for stage in ctx.stages:  # the fake values now carry the new length
        assert tuple(fx_utils.value(stage.hidden).shape) == (2, fx_utils.value(stage.new_len), 64)
    (logits,) = [n for n in output_values(ctx.gm) if ctx.original_shapes.get(n) == (2, SEQ, 128)]
    assert tuple(fx_utils.value(logits).shape) == (2, second, 128)


@pytest.mark.parametrize("graph, config", [
    ("qwen_graph", dict(layers=(1, 2))),
    ("qwen_dynamic_graph", dict(layers=(1,))),  # symbolic image size and length
    ("next_ragged_graph", dict(layers=(1, 2), serves_decode=True)),  # empty slots in front of sample 1
    ("llava_eager_graph", dict(layers=(0, 3), method="turbo")),
    ("llava_two_images", dict(layers=(1,), method="fastv")),
], ids=["qwen2_vl", "qwen2_vl_symbolic", "llava_next_ragged", "llava_eager", "llava_two_images"])
def test_other_rewrites_pass(request, graph, config):
    ctx, result = checked(request.getfixturevalue(graph), **config)
    assert result.counts["checked"] > 50


def test_vision_stage_passes(llava_graph):
    ctx, result = checked(llava_graph, method="prumerge", serves_decode=True)
    assert fx_utils.value(ctx.stages[0].new_len) == SEQ - 36 + 10  # 9 IQR slots + the extra token
    assert result.counts["stages"] == 1 and result.counts["checked"] > 100


def test_the_captured_graph_keeps_its_fake_values(llava_graph):
    ctx, _ = checked(llava_graph, layers=(1,))
    (stage,) = ctx.stages
    later = next(n for n in stage.region if not n.meta.get(fx_utils.INSERTED) and n.op != "output"
                 and hasattr(fx_utils.value(n), "shape") and SEQ in tuple(ctx.original_shapes[n]))
    original = next(n for n in llava_graph.graph.nodes if n.name == later.name)
    assert SEQ in tuple(fx_utils.value(original).shape)  # check_shapes wrote the clone's meta only


def _rewired_with_known_lengths(gm):
    lengths = [fx_utils.value(s.new_len) for s in checked(gm, layers=(1, 2))[0].stages]
    ctx = make_ctx(gm, layers=(1, 2))
    run_until(ctx, "check_shapes")
    return ctx, lengths


@pytest.mark.skipif(not compat.reshapes_sdpa_output(), reason="transformers < 5.23: no reshape(B, -1, T, d) of the "
                    "SDPA output (5.23's pack_gqa undo) whose -1 absorbs a wrong length")
def test_wrong_size_that_still_traces_names_the_node(llava_graph):
    """``attn_output.reshape(B, -1, T', d)`` with a wrong T': the -1 absorbs it, the graph still traces
    (a later reshape restores the width), so only the shape check finds it."""
    ctx, lengths = _rewired_with_known_lengths(llava_graph)
    stage, new_len = ctx.stages[-1], lengths[-1]
    node = next(n for n in ctx.gm.graph.nodes if n in stage.region and fx_utils.target_name(n) == "reshape"
                and len(n.args) == 5 and n.args[2] == -1 and n.args[3] is stage.new_len)
    node.args = map_aggregate(node.args, lambda x: 2 * new_len if x is stage.new_len else x)
    with pytest.raises(UnsupportedGraph, match=rf"after the rewrite {node.name} has shape \[2, 2, {2 * new_len}, 16\], "
                                               rf"expected \[2, 4, {new_len}, 16\]"):
        check_shapes.run(ctx)


def test_wrong_view_size_does_not_trace(llava_graph):
    """``view(B, T', -1, d)`` of the query put back to the old length T: fake propagation fails."""
    ctx, _ = _rewired_with_known_lengths(llava_graph)
    stage = ctx.stages[0]
    node = next(n for n in ctx.gm.graph.nodes if n in stage.region and fx_utils.target_name(n) == "view"
                and isinstance(n.args[1], tuple) and stage.new_len in n.args[1])
    node.args = (node.args[0], tuple(SEQ if a is stage.new_len else a for a in node.args[1]))
    with pytest.raises(UnsupportedGraph, match=r"the rewritten graph does not trace \(RuntimeError: .*invalid for input"
                                               r".*mark the sequence dimension dynamic"):
        check_shapes.run(ctx)
