"""insert_compression: one ``compress_visual_tokens`` node per stage right after the stage layer,
its ``(hidden', span', source)`` getitems and ``sym_size(hidden', 1)``; nothing uses them yet."""

import operator

import torch
from passkit import inserted, inserted_counts, position, run_alone

from libra_fx.passes import fx_utils
from libra_fx.sequence.splice import compress_visual_tokens, visual_span_mask

SYM_SIZE = torch.ops.aten.sym_size.int


def compressed(gm, **config):
    ctx, result, already = run_alone(gm, "insert_compression", lambda g: set(inserted(g)), **config)
    new = [n for n in inserted(ctx.gm) if n not in already]
    return ctx, result, new


def test_one_node_per_stage_with_its_getitems(llava_graph):
    ctx, result, new = compressed(llava_graph, layers=(1, 2))
    nodes = [n for n in new if n.target is compress_visual_tokens]
    assert len(nodes) == 2
    counts = inserted_counts(ctx.gm)
    assert counts[compress_visual_tokens] == 2
    assert counts[visual_span_mask] == 1  # the first stage's span; later stages take the previous span'
    assert counts[operator.getitem] == 3 * 2
    assert counts[SYM_SIZE] == 2
    assert len(new) == 1 + 2 * (1 + 3 + 1)
    at = position(ctx.gm)
    (span0,) = inserted(ctx.gm, visual_span_mask)
    assert span0.args == (ctx.visual_mask,)
    for i, (stage, node) in enumerate(zip(ctx.stages, nodes)):
        assert node.args == (stage.layer_output, stage.importance, span0 if i == 0 else ctx.stages[i - 1].kinds)
        assert node.kwargs == dict(span_lens=stage.span_lens, carried=i, method="libra", ratio=0.5,
                                   options=(("tau", 0.7), ("eta", "mean")))
        assert [(g.target, g.args) for g in (stage.hidden, stage.kinds, stage.source)] == \
            [(operator.getitem, (node, j)) for j in range(3)]
        assert stage.new_len.target is SYM_SIZE and stage.new_len.args == (stage.hidden, 1)
        assert at[stage.layer_output] < at[node] < at[stage.new_len]
        # program order: right after the layer, before the next layer's first node
        assert all(at[n] < at[node] for n in stage.layer_nodes)
        assert all(at[n] > at[stage.new_len] for n in ctx.decoder[stage.layer + 1])
        # nothing of the graph uses them yet: rewire_sequence does
        assert all(u.meta.get(fx_utils.INSERTED) for u in (*stage.hidden.users, *stage.source.users))
        assert not stage.new_len.users
    assert ctx.side_outputs == {}
    assert result.counts == {"stages": 2, "compensation": 2, "inserted": len(new)}


def test_method_without_compensation(llava_graph):
    ctx, result, _ = compressed(llava_graph, layers=(1, 2), method="fastv", ratio=0.75)
    nodes = inserted(ctx.gm, compress_visual_tokens)
    assert [n.kwargs["carried"] for n in nodes] == [0, 0]
    assert all(n.kwargs["method"] == "fastv" and n.kwargs["options"] == () for n in nodes)
    assert result.counts == {"stages": 2, "compensation": 0, "inserted": 1 + 2 * (1 + 3 + 1)}


def test_two_spans_per_sample(llava_two_images):
    ctx, result, _ = compressed(llava_two_images, layers=(1,))
    (node,) = inserted(ctx.gm, compress_visual_tokens)
    assert node.kwargs["span_lens"] == ((36, 36),)
    assert result.counts == {"stages": 1, "compensation": 1, "inserted": 1 + 1 + 3 + 1}


def test_record_adds_records_side_outputs(llava_graph):
    ctx, result, new = compressed(llava_graph, layers=(1, 2), record=True)
    nodes = inserted(ctx.gm, compress_visual_tokens)
    assert all(n.kwargs["record"] is True for n in nodes)
    assert list(ctx.side_outputs) == ["records0", "records1"]
    for node, name in zip(nodes, ctx.side_outputs):
        rec = ctx.side_outputs[name]
        assert rec.target is operator.getitem and rec.args == (node, 3) and rec.meta[fx_utils.INSERTED]
    assert inserted_counts(ctx.gm)[operator.getitem] == 4 * 2
    assert result.counts == {"stages": 2, "records": 2, "compensation": 2, "inserted": len(new)}


def test_empty_slots_only_for_a_ragged_batch(next_ragged_graph, llava_graph):
    ctx, result, _ = compressed(next_ragged_graph, layers=(1, 2), serves_decode=True)
    nodes = inserted(ctx.gm, compress_visual_tokens)
    assert [n.kwargs["span_lens"] for n in nodes] == [((72,), (36,)), ((36,), (18,))]
    assert list(ctx.side_outputs) == ["empty_slots"]
    empty = ctx.side_outputs["empty_slots"]
    assert empty.meta[fx_utils.INSERTED]
    assert empty.args == tuple(s.source for s in ctx.stages)
    at = position(ctx.gm)
    assert at[empty] > at[ctx.stages[-1].new_len]
    assert result.counts["empty_slots"] == 1
    ctx, result, _ = compressed(llava_graph, layers=(1, 2))
    assert "empty_slots" not in ctx.side_outputs and "empty_slots" not in result.counts
