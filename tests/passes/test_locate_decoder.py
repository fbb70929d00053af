"""locate_decoder: the decoder layers after the visual tokens (grouped by ``<prefix>.layers.<i>``)
and each stage layer's hidden-state output; reads, does not edit."""

import pytest
from passkit import make_ctx, run_alone, run_until, snapshot, toy_graph

from libra_fx.errors import UnsupportedGraph
from libra_fx.families import LLAVA
from libra_fx.passes import fx_utils, locate_decoder
from libra_fx.runtime import compat


def located(gm, **config):
    ctx, result, before = run_alone(gm, "locate_decoder", **config)
    assert snapshot(ctx.gm) == before  # reads only
    return ctx, result


def test_llava_layers_and_stage_outputs(llava_graph):
    ctx, result = located(llava_graph, layers=(1, 2))
    assert ctx.num_layers == 4
    assert sorted(ctx.decoder) == [0, 1, 2, 3]
    for i, nodes in ctx.decoder.items():
        assert nodes and all(fx_utils.module_path(n).startswith(f"model.language_model.layers.{i}") for n in nodes)
    # the vision tower's encoder layers (…vision_tower.encoder.layers.<i>) are not the decoder
    assert not any("vision_tower" in fx_utils.module_path(n) for nodes in ctx.decoder.values() for n in nodes)
    assert [s.layer for s in ctx.stages] == [1, 2]
    for stage in ctx.stages:
        assert stage.layer_nodes is ctx.decoder[stage.layer]
        out = stage.layer_output
        assert out in ctx.decoder[stage.layer]
        assert tuple(fx_utils.value(out).shape) == (2, 51, 64)
        outside = [u for u in out.users if u not in set(stage.layer_nodes)]
        assert outside and all(f"layers.{stage.layer + 1}" in fx_utils.module_path(u) for u in outside)
        assert stage.importance is None and stage.hidden is None  # filled in by later passes
    assert ctx.stages[0].layer_output is not ctx.stages[1].layer_output
    assert result.counts == {"layers": 4, "stages": 2, "shapes": len(ctx.original_shapes)}


def test_original_shapes_recorded(llava_graph):
    ctx, result = located(llava_graph)
    assert ctx.original_shapes[ctx.stages[0].layer_output] == (2, 51, 64)
    assert ctx.original_shapes[ctx.scatters[0]] == (2, 51, 64)
    with_shapes = [n for n in ctx.gm.graph.nodes if hasattr(fx_utils.value(n), "shape")]
    assert set(ctx.original_shapes) == set(with_shapes)
    assert result.counts["shapes"] == len(with_shapes)


def test_qwen_prefix(qwen_graph, qwen_model):
    ctx, result = located(qwen_graph, layers=(2,))
    assert ctx.num_layers == 4 and [s.layer for s in ctx.stages] == [2]
    assert result.counts["layers"] == 4 and result.counts["stages"] == 1
    # transformers 5.17: the decoder's graph resumes inside Qwen2VLModel.forward, after the tower's graph break
    prefix = "model." if compat.takes_encoder_outputs(qwen_model) else ""
    assert all(fx_utils.module_path(n).startswith(f"{prefix}language_model.layers.{i}")
               for i, nodes in ctx.decoder.items() for n in nodes)


def test_vision_side_method_has_no_decoder_stage(llava_graph):
    ctx, result = located(llava_graph, method="prumerge", layers=(1, 2))
    assert ctx.config.layers == () and ctx.stages == []
    assert ctx.num_layers == 4 and result.counts["layers"] == 4 and result.counts["stages"] == 0


def test_no_decoder_layer_after_the_visual_tokens():
    """Visual tokens enter, but the blocks are not ``layers.<i>`` modules (as after a graph break)."""
    ctx = make_ctx(toy_graph(), family=LLAVA)
    run_until(ctx, "locate_decoder")
    with pytest.raises(UnsupportedGraph, match=r"no decoder layer \(…layers.<i>\) follows them"):
        locate_decoder.run(ctx)


def test_layer_index_beyond_the_model(llava_graph):
    ctx = make_ctx(llava_graph, layers=(1, 5))
    run_until(ctx, "locate_decoder")
    with pytest.raises(ValueError, match=r"layer index 5 is out of range: the model has 4 decoder layers"):
        locate_decoder.run(ctx)
    assert ctx.stages == []
