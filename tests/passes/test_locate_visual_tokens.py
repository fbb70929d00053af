"""locate_visual_tokens: finds the masked_scatter where the visual features enter the embeddings,
and the batch and sequence length; reads, does not edit."""

import pytest
import torch
from passkit import calls, make_ctx, run_pass, snapshot, toy_graph

from libra_fx.errors import NothingToCompress, UnsupportedGraph
from libra_fx.passes import locate_visual_tokens

SEQ = 3 + 5 + 36 + 7  # the padding of sample 1, prefix, image, suffix


def test_llava_one_scatter_batch_and_length(llava_graph):
    ctx = make_ctx(llava_graph)
    before = snapshot(ctx.gm)
    result = locate_visual_tokens.run(ctx)
    assert ctx.scatters == calls(ctx.gm, "masked_scatter")
    assert len(ctx.scatters) == 1
    scatter = ctx.scatters[0]
    assert tuple(scatter.meta["example_value"].shape) == (2, SEQ, 64)
    assert (ctx.batch, ctx.seq_len) == (2, SEQ)
    assert isinstance(ctx.seq_len, int) and isinstance(ctx.batch, int)
    assert result.name == "locate_visual_tokens" and not result.skipped
    assert result.counts == {"scatters": 1}
    assert snapshot(ctx.gm) == before  # reads only


def test_llava_two_images_still_one_scatter(llava_two_images):
    ctx = make_ctx(llava_two_images)
    locate_visual_tokens.run(ctx)
    assert len(ctx.scatters) == 1
    assert (ctx.batch, ctx.seq_len) == (2, 5 + 36 + 3 + 36 + 7)


def test_qwen_dynamic_length_is_symbolic(qwen_dynamic_graph):
    ctx = make_ctx(qwen_dynamic_graph)
    n = len(ctx.gm.graph.nodes)
    result = locate_visual_tokens.run(ctx)
    assert len(ctx.scatters) == 1
    assert ctx.batch == 1  # 0/1 specialisation
    assert isinstance(ctx.seq_len, torch.SymInt)
    assert result.counts == {"scatters": 1}
    assert len(ctx.gm.graph.nodes) == n


def test_text_only_graph_has_nothing_to_compress(llava_text_graph):
    ctx = make_ctx(llava_text_graph)
    with pytest.raises(NothingToCompress, match="no visual tokens enter a decoder"):
        locate_visual_tokens.run(ctx)
    assert ctx.scatters == []


def test_pixels_and_causal_decoder_without_masked_scatter_is_unsupported():
    ctx = make_ctx(toy_graph(scatter=False))
    assert any("pixel" in n.name for n in ctx.gm.graph.find_nodes(op="placeholder"))
    with pytest.raises(UnsupportedGraph, match="no masked_scatter of visual features"):
        locate_visual_tokens.run(ctx)


def test_pixels_without_a_causal_decoder_has_nothing_to_compress():
    """A vision-only part (bidirectional attention only) with no masked_scatter: left as it is."""
    ctx = make_ctx(toy_graph(scatter=False, causal=False))
    with pytest.raises(NothingToCompress):
        locate_visual_tokens.run(ctx)


def test_run_through_the_pipeline_table(llava_graph):
    ctx = make_ctx(llava_graph)
    result = run_pass(ctx, "locate_visual_tokens")
    assert ctx.scatters and result.counts == {"scatters": 1}
