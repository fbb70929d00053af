"""insert_importance: one ``last_row_importance(q, k, mask, scale)`` node beside each stage
layer's attention, whatever its kernel (SDPA or eager softmax(q·kᵀ)); the kernel itself is kept."""

import pytest
from passkit import calls, inserted, inserted_counts, make_ctx, position, run_alone, run_until, snapshot

from libra_fx.errors import UnsupportedGraph
from libra_fx.methods.importance import last_row_importance
from libra_fx.passes import fx_utils, insert_importance
from libra_fx.passes.matchers import AttentionKind
from libra_fx.runtime import compat


def importance(gm, **config):
    return run_alone(gm, "insert_importance", **config)


def check_inserted(ctx):
    rows = inserted(ctx.gm, last_row_importance)
    assert rows == [s.importance for s in ctx.stages]
    assert inserted_counts(ctx.gm) == {last_row_importance: len(ctx.stages)}
    at = position(ctx.gm)
    for stage in ctx.stages:
        site = stage.attention
        assert stage.importance.args == (site.query, site.key, site.mask, site.scale)
        assert at[site.node] < at[stage.importance] < at[stage.layer_output]  # inside the layer, after its kernel
        assert not stage.importance.users  # insert_compression uses it
        assert {site.node, site.query, site.key} <= set(stage.layer_nodes)


def test_sdpa_matched_and_kernel_kept(llava_graph):
    ctx, result, before = importance(llava_graph, layers=(1, 2))
    check_inserted(ctx)
    for stage in ctx.stages:
        site = stage.attention
        assert site.kind is AttentionKind.SDPA
        assert site.node.target in fx_utils.SDPA
        assert site.mask is not None and tuple(fx_utils.value(site.mask).shape) == (2, 1, 51, 51)
        assert fx_utils.value(site.query).shape[2] == 51 and fx_utils.value(site.key).shape[2] == 51
    # the kernels are untouched: the graph is the old one plus the importance rows
    assert [line for line in snapshot(ctx.gm) if "last_row_importance" not in line] == before
    assert result.counts == {"stages": 2, "attention_rows": 2, "sdpa_attention": 2, "inserted": 2}


@pytest.mark.skipif(not compat.skips_causal_mask_when_compiled(), reason="transformers < 5.18 builds the causal "
                    "mask whenever Dynamo traces: no mask-less is_causal SDPA in a captured graph")
def test_sdpa_without_mask_is_causal(llava_two_images):
    ctx, result, _ = importance(llava_two_images, layers=(1,))
    site = ctx.stages[0].attention
    assert site.kind is AttentionKind.SDPA and site.mask is None
    assert site.node.kwargs.get("is_causal") is True
    assert ctx.stages[0].importance.args[2] is None
    assert result.counts["causal"] == 1


def test_eager_attention_matched(llava_eager_graph):
    ctx, result, _ = importance(llava_eager_graph, layers=(0, 3))
    check_inserted(ctx)
    for stage in ctx.stages:
        site = stage.attention
        assert site.kind is AttentionKind.EAGER
        assert site.node.target in fx_utils.SOFTMAX  # the softmax of softmax(q @ kᵀ * s + m)
        assert isinstance(site.scale, float) and site.scale == pytest.approx(16 ** -0.5)
        assert site.mask is not None
        assert not calls(ctx.gm, fx_utils.SDPA)
    assert result.counts == {"stages": 2, "attention_rows": 2, "eager_attention": 2, "inserted": 2}


def test_layer_without_attention_is_unsupported(llava_graph):
    ctx = make_ctx(llava_graph, layers=(1,))
    run_until(ctx, "insert_importance")
    stage = ctx.stages[0]
    stage.layer_nodes = [n for n in stage.layer_nodes if n.target not in fx_utils.SDPA]
    with pytest.raises(UnsupportedGraph, match=r"decoder layer 1: expected one attention call .* found 0"):
        insert_importance.run(ctx)
