"""insert_span_sizes: the visual-token mask and each stage's span lengths (one row shared by all
samples, or one per sample); ``sym_size`` / ``num_targets`` nodes only for symbolic sizes."""

import pytest
import torch
from passkit import inserted, inserted_counts, make_ctx, run_after, run_alone, run_until, snapshot

from libra_fx.errors import UnsupportedGraph
from libra_fx.methods.selectors import num_targets
from libra_fx.passes import fx_utils, insert_span_sizes

SYM_SIZE = torch.ops.aten.sym_size.int


def spans(gm, **config):
    return run_alone(gm, "insert_span_sizes", **config)


def test_static_spans_of_36(llava_graph):
    ctx, result, before = spans(llava_graph, layers=(1, 2))
    assert ctx.span_lens == ((36,),)  # one row shared by both samples
    assert [s.span_lens for s in ctx.stages] == [((36,),), ((18,),)]
    assert ctx.visual_mask is ctx.scatters[0].args[1]  # one modality: the scatter's own mask
    assert snapshot(ctx.gm) == before  # static sizes: nothing inserted
    assert result.counts == {"spans": 1, "samples": 2, "ragged": 0, "stages": 2, "inserted": 0}


def test_three_stages_follow_num_targets(llava_graph):
    ctx, _, _ = spans(llava_graph, layers=(0, 1, 3), ratio=0.3)
    rows = [s.span_lens[0][0] for s in ctx.stages]
    assert rows == [36, num_targets(36, 0.3), num_targets(num_targets(36, 0.3), 0.3)] == [36, 25, 18]


def test_two_images_per_prompt_two_spans(llava_two_images):
    ctx, result, before = spans(llava_two_images, layers=(1, 2))
    assert ctx.span_lens == ((36, 36),)
    assert [s.span_lens for s in ctx.stages] == [((36, 36),), ((18, 18),)]
    assert result.counts == {"spans": 2, "samples": 2, "ragged": 0, "stages": 2, "inserted": 0}
    assert snapshot(ctx.gm) == before


def test_symbolic_image_size(qwen_dynamic_graph):
    """Qwen2-VL under ``dynamic=True``: the image's token count is a SymInt, named by one inserted
    ``sym_size`` of the feature piece, and each later stage's count by a ``num_targets`` node."""
    ctx, result, _ = spans(qwen_dynamic_graph, layers=(1, 2))
    (row,) = ctx.span_lens
    (size,) = row
    assert isinstance(size, torch.fx.Node)
    assert size.target is SYM_SIZE and size.meta[fx_utils.INSERTED]
    assert isinstance(size.meta["val"], torch.SymInt)
    piece, dim = size.args
    assert str(fx_utils.value(piece).shape[dim]) == str(size.meta["val"])
    counts = inserted_counts(ctx.gm)
    assert counts[SYM_SIZE] == 1  # one per distinct feature piece
    assert ctx.stages[0].span_lens == ((size,),)
    (target,), = ctx.stages[1].span_lens
    assert target.target is num_targets and target.args == (size, 0.5) and target.meta[fx_utils.INSERTED]
    assert str(target.meta["val"]) == str(num_targets(size.meta["val"], 0.5))
    assert set(counts) <= {SYM_SIZE, num_targets}
    assert result.counts == {"spans": 1, "samples": 1, "ragged": 0, "stages": 2, "inserted": 2}  # sym_size, num_targets
    positions = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
    assert positions[piece] < positions[size] < positions[target]  # defined after what they read


def test_ragged_batch_one_row_per_sample(next_ragged_graph):
    ctx, result, before = spans(next_ragged_graph, layers=(1, 2), serves_decode=True)
    assert ctx.span_lens == ((72,), (36,))
    assert [s.span_lens for s in ctx.stages] == [((72,), (36,)), ((36,), (18,))]
    assert result.counts == {"spans": 1, "samples": 2, "ragged": 1, "stages": 2, "inserted": 0}
    assert inserted(ctx.gm) == [] and snapshot(ctx.gm) == before


def test_ragged_batch_refused_without_decode_support(next_ragged_graph):
    ctx = make_ctx(next_ragged_graph, layers=(1, 2), serves_decode=False)
    run_until(ctx, "insert_span_sizes")
    with pytest.raises(UnsupportedGraph, match=r"different visual-token counts \[\['72'\], \['36'\]\]"):
        insert_span_sizes.run(ctx)


def test_recompiled_batch_gets_one_symbol_per_image(qwen_graphs):
    """After a new image size, Dynamo's automatic dynamic shapes give each sample's feature piece its
    own symbol, although both images have one size: the graph cannot know they stay equal, so the
    samples get a row each (and a bare backend, which serves no decode step, is refused)."""
    ctx, result, _ = spans(qwen_graphs[1], layers=(1,), serves_decode=True)
    (a,), (b,) = ctx.span_lens
    assert a.target is b.target is SYM_SIZE and a is not b
    assert str(a.meta["val"]) != str(b.meta["val"])
    assert inserted_counts(ctx.gm)[SYM_SIZE] == 2
    assert result.counts["ragged"] == 1 and result.counts["inserted"] == 2
    bare = make_ctx(qwen_graphs[1], layers=(1,))
    run_until(bare, "insert_span_sizes")
    with pytest.raises(UnsupportedGraph, match="different visual-token counts"):
        insert_span_sizes.run(bare)


@pytest.mark.parametrize("layers", [(1,), (0, 2)])
def test_every_inserted_size_node_is_used(qwen_dynamic_graph, layers):
    """After the whole pipeline, every size node this pass inserted feeds something (no target count
    is made for a stage that does not exist)."""
    ctx, _, _ = spans(qwen_dynamic_graph, layers=layers)
    sizes = [n for n in inserted(ctx.gm) if n.target in (SYM_SIZE, num_targets)]
    run_after(ctx, "insert_span_sizes")
    assert sizes and all(n.users for n in sizes)
