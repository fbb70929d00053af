"""rewire_sequence: every node after a stage reads the compressed hidden states, the new length,
and per-token data (RoPE cos/sin, masks) gathered by the stage's ``source``."""

import dataclasses
import operator

import pytest
import torch
import torch.fx as fx
from passkit import (flat_args, in_module, inserted, inserted_counts, layer_of, make_ctx, qwen_inputs, run_alone,
                     run_pass, run_until, visual_graphs)

from libra_fx.errors import UnsupportedGraph
from libra_fx.families import QWEN2_VL
from libra_fx.passes import fx_utils, rewire_sequence
from libra_fx.passes.context import RewriteContext, Stage
from libra_fx.runtime import compat
from libra_fx.sequence.gather import gather_mask, gather_tokens
from libra_fx.sequence.splice import compress_visual_tokens

SEQ = 51


def rewired(gm, **config):
    ctx, result, before = run_alone(gm, "rewire_sequence", inserted_counts, **config)
    return ctx, result, inserted_counts(ctx.gm) - before


def check_no_old_input_survives(ctx):
    """No node after a stage reads, from before it, anything of the old length (a KEEP input only)."""
    for stage in ctx.stages:
        for node in stage.region:
            if node.op == "output":
                continue
            for arg in node.all_input_nodes:
                if arg not in stage.region and not arg.meta.get(fx_utils.INSERTED):
                    assert rewire_sequence.classify(ctx, arg) == rewire_sequence.KEEP, (node, arg)


def test_later_layers_read_the_compressed_hidden_states(llava_graph):
    ctx, result, _ = rewired(llava_graph, layers=(1, 2))
    for stage in ctx.stages:
        # the layer's output now feeds only the compression node
        assert [u.target for u in stage.layer_output.users] == [compress_visual_tokens]
        readers = [u for u in stage.hidden.users if not u.meta.get(fx_utils.INSERTED)]
        assert readers and all(layer_of(u) == stage.layer + 1 for u in readers)
    assert ctx.stages[1].region < ctx.stages[0].region  # a later stage's region lies inside the earlier one's
    assert result.counts["stages"] == 2 and result.counts["rewired_hidden"] == 2
    assert result.counts["later_nodes"] == sum(len(s.region) for s in ctx.stages)
    check_no_old_input_survives(ctx)


def test_rope_and_mask_gathered(llava_graph):
    ctx, result, new = rewired(llava_graph, layers=(1, 2))
    first, second = ctx.stages
    # layers 2 and 3 each read a cos and a sin (4 gathers), then layer 3's are gathered again;
    # the padding mask once per stage
    assert new == {gather_tokens: 6, gather_mask: 2}
    assert (result.counts["rewired_per_token"], result.counts["rewired_mask"], result.counts["inserted"]) == (6, 2, 8)
    tokens = inserted(ctx.gm, gather_tokens)
    for node in tokens:
        table, source, dim, batch_dim = node.args
        assert (dim, batch_dim) == (2, 0)  # [B|1, 1, T, d] tables
        assert node.users and all(u in first.region or u.target is gather_tokens for u in node.users)
    by_stage = {s.source: [n for n in tokens if n.args[1] is s.source] for s in ctx.stages}
    assert len(by_stage[first.source]) == 4 and len(by_stage[second.source]) == 2
    for node in by_stage[first.source]:
        table = node.args[0]
        assert not table.meta.get(fx_utils.INSERTED) and table not in first.region
        assert tuple(fx_utils.value(table).shape)[2] == SEQ
        assert any(in_module(a, "rotary_emb") for a in fx_utils.ancestors(table) | {table})
    assert all(n.args[0].target is gather_tokens for n in by_stage[second.source])  # re-gathered
    m0, m1 = inserted(ctx.gm, gather_mask)
    assert m0.args[1] is first.source and tuple(fx_utils.value(m0.args[0]).shape) == (2, 1, SEQ, SEQ)
    assert m1.args == (m0, second.source)
    assert second.importance.args[2] is m0  # the second stage's importance row sees the compressed mask
    assert m0.users and all(layer_of(u) == 2 or u in (m1, second.importance) for u in m0.users)
    assert m1.users and all(layer_of(u) == 3 for u in m1.users)


def test_literal_lengths_replaced(llava_graph):
    """Static shapes: ints equal to T in the later nodes become the stage's ``sym_size(hidden', 1)``."""
    ctx, result, _ = rewired(llava_graph, layers=(1, 2))
    first, second = ctx.stages
    mine = [n for n in first.region if not n.meta.get(fx_utils.INSERTED) and n.op != "output"]
    # the second stage reads the first one's length node: a length input rewired, not a literal
    assert result.counts["literal_lengths"] > 0 and result.counts["rewired_length"] == 1
    assert not [n for n in mine if SEQ in [a for a in flat_args(n) if type(a) is int]]
    views = [n for n in mine if fx_utils.target_name(n) in ("view", "reshape", "expand")]
    lengths = {a for n in views for a in flat_args(n) if a in (first.new_len, second.new_len)}
    assert lengths == {first.new_len, second.new_len}
    # layer 2 reads the first stage's length, layer 3 the second's
    assert all(second.new_len not in flat_args(n) for n in views if layer_of(n) == 2)
    assert all(first.new_len not in flat_args(n) for n in views if layer_of(n) == 3)


def test_nothing_before_the_stage_changes(llava_graph):
    ctx = make_ctx(llava_graph, layers=(2,))
    run_until(ctx, "rewire_sequence")
    stage = ctx.stages[0]
    earlier = [n for n in ctx.gm.graph.nodes if n not in fx_utils.descendants(stage.layer_output)]
    before = {n: (n.args, dict(n.kwargs)) for n in earlier}
    rewire_sequence.run(ctx)
    assert all((n.args, dict(n.kwargs)) == before[n] for n in earlier)


def test_vision_stage_rewires_the_whole_decoder(llava_graph):
    ctx, result, new = rewired(llava_graph, method="prumerge", serves_decode=True)
    (stage,) = ctx.stages
    assert stage.layer == -1
    assert new == {gather_tokens: 8, gather_mask: 1}  # cos and sin of all 4 layers, the mask once
    assert {layer_of(n) for n in stage.region} >= {0, 1, 2, 3}
    assert result.counts["stages"] == 1
    assert (result.counts["rewired_per_token"], result.counts["rewired_mask"], result.counts["inserted"]) == (8, 1, 9)
    check_no_old_input_survives(ctx)


def test_qwen_rope_tables_gathered(qwen_graph):
    """transformers 5 combines Qwen2-VL's M-RoPE sections in its rotary embedding: the layers read
    ``[B, 1, T, d]`` tables (gathered along dim 2, batch dim 0)."""
    ctx, _, new = rewired(qwen_graph, layers=(1,))
    assert new == {gather_tokens: 4, gather_mask: 1}
    assert all(n.args[2:] == (2, 0) for n in inserted(ctx.gm, gather_tokens))
    check_no_old_input_survives(ctx)


def test_qwen_three_row_tables_classified_along_dim_2_batch_dim_1(qwen_graph):
    """The ``[3, B, T(, d)]`` M-RoPE position ids and tables of the graph (before the stage) would be
    gathered along dim 2 with batch dim 1."""
    ctx = make_ctx(qwen_graph, layers=(1,))
    run_until(ctx, "rewire_sequence")
    rows = [n for n in ctx.gm.graph.nodes
            if isinstance(fx_utils.value(n), torch.Tensor) and fx_utils.value(n).dim() in (3, 4)
            and tuple(fx_utils.value(n).shape[:3]) == (3, 2, ctx.seq_len)]
    assert rows, "no [3, B, T, …] M-RoPE node in the Qwen2-VL graph"
    assert all(rewire_sequence.classify(ctx, n) == ("tokens", 2, 1) for n in rows)


def test_qwen_symbolic_length(qwen_dynamic_graph):
    ctx, result, new = rewired(qwen_dynamic_graph, layers=(1,))
    assert isinstance(ctx.seq_len, torch.SymInt)
    assert new[gather_tokens] == 4
    assert result.counts["literal_lengths"] == 0 and result.counts["rewired_length"] >= 1  # the length is a node
    check_no_old_input_survives(ctx)


def _ctx_with_table(shape, family, batch, seq):
    graph = fx.Graph()
    table = graph.placeholder("table")
    table.meta["val"] = torch.empty(shape)
    graph.output(table)
    ctx = RewriteContext(fx.GraphModule(torch.nn.Module(), graph), None, family=family)
    ctx.batch, ctx.seq_len = batch, seq
    return ctx, table


@pytest.mark.parametrize("batch", [1, 2])
def test_classify_batch_first_table(batch):
    ctx, table = _ctx_with_table((batch, 1, 29, 16), QWEN2_VL, batch, 29)
    assert rewire_sequence.classify(ctx, table) == ("tokens", 2, 0)


@pytest.mark.parametrize("batch", [3, 4])
def test_classify_batch_of_three_or_four_qwen(batch):
    ctx, table = _ctx_with_table((batch, 1, 29, 16), QWEN2_VL, batch, 29)
    assert rewire_sequence.classify(ctx, table) == ("tokens", 2, 0)


@pytest.fixture(scope="module")
def qwen_batch_of_three(qwen_model):
    (graph,) = visual_graphs(qwen_model, qwen_inputs(qwen_model, batch=3),
                             fullgraph=compat.takes_encoder_outputs(qwen_model))
    return graph


def test_qwen_batch_of_three_gathers_batch_first(qwen_batch_of_three):
    """The same on the real graph: a [B, 1, T, d] table whose B equals an M-RoPE row count (3) is
    gathered batch-first (it was taken for a [3, B, T, d] table, and check_shapes then refused a
    Qwen2-VL batch of 3 or 4 prompts)."""
    ctx, _, _ = rewired(qwen_batch_of_three, layers=(1,))
    assert [n.args[2:] for n in inserted(ctx.gm, gather_tokens)] == [(2, 0)] * 4


def test_classify_same_table_other_family_is_right():
    ctx, table = _ctx_with_table((3, 1, 29, 16), dataclasses.replace(QWEN2_VL, position_rows=()), 3, 29)
    assert rewire_sequence.classify(ctx, table) == ("tokens", 2, 0)


@pytest.mark.skipif(compat.unpads_image_features_by_data("lfm2_vl"), reason="transformers < 5.24: LFM2-VL unpads "
                    "each image with data-dependent sizes, so the samples' visual-token counts are distinct unbacked "
                    "symbols and a bare backend refuses the batch as ragged first")
def test_sizes_derived_from_the_length_are_computed_again(lfm2_graphs):
    """LFM2-VL's convolution layer keeps ``[..., -T:]`` of its ``T + 2`` outputs: with a symbolic
    length, ``-T`` is computed again from the stage's length (and its padding mask is gathered)."""
    from libra_fx.families import LFM2_VL

    ctx, result, new = rewired(lfm2_graphs["symbolic"], layers=(1,), family=LFM2_VL)
    (stage,) = ctx.stages
    copies = [n for n in inserted(ctx.gm) if n.target not in (gather_tokens, gather_mask)
              and stage.new_len in n.all_input_nodes]
    assert copies and all(n.users for n in copies)
    assert result.counts["rewired_sizes"] >= 1
    masks = [n for n in inserted(ctx.gm, gather_tokens) if tuple(fx_utils.value(n.args[0]).shape) == (2, ctx.seq_len, 1)]
    assert masks, "the convolution layer's padding mask (its [B, T, 1] view) is not gathered"
    check_no_old_input_survives(ctx)
    run_pass(ctx, "return_side_outputs")
    assert run_pass(ctx, "check_shapes").counts["checked"] > 0
    new_len = fx_utils.value(stage.new_len).node.expr
    for copy in copies:  # a size of the new length, e.g. -(T - 8)
        assert fx_utils.value(copy).node.expr.free_symbols == new_len.free_symbols


@pytest.mark.skipif(compat.unpads_image_features_by_data("lfm2_vl"), reason="transformers < 5.24: LFM2-VL unpads "
                    "each image with data-dependent sizes, so the samples' visual-token counts are distinct unbacked "
                    "symbols and a bare backend refuses the batch as ragged first")
def test_a_static_graph_with_derived_sizes_is_refused_by_name(lfm2_graphs):
    """The same graph with static shapes knows ``T + 2`` only as an int: refused, saying what to do."""
    from libra_fx.families import LFM2_VL

    ctx = make_ctx(lfm2_graphs["static"], layers=(1,), family=LFM2_VL)
    with pytest.raises(UnsupportedGraph, match=r"mark the sequence dimension dynamic"):
        run_until(ctx, "return_side_outputs")
        run_pass(ctx, "return_side_outputs")
        run_pass(ctx, "check_shapes")


@pytest.mark.parametrize("layers, refused", [((0,), True), ((1,), False)])
def test_a_stage_before_a_deepstack_layer_is_refused(qwen3_vl_graph, layers, refused):
    """Qwen3-VL adds visual features again after layer 0: a stage there would need them merged too
    (a bare backend knows no config: the graph shows it, a node after the stage reading the visual
    positions)."""
    from libra_fx.families import QWEN3_VL

    ctx = make_ctx(qwen3_vl_graph, layers=layers, family=QWEN3_VL)
    run_until(ctx, "rewire_sequence")
    if refused:
        with pytest.raises(UnsupportedGraph, match=r"reads where the visual tokens were .*DeepStack"):
            rewire_sequence.run(ctx)
    else:
        rewire_sequence.run(ctx)
        check_no_old_input_survives(ctx)


def _chunk_padding_graph():
    """``pad(query, (0, 0, 0, (64 - T % 64) % 64))`` with a symbolic ``T`` (81) and the lengths of two stages."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env, graph = ShapeEnv(), fx.Graph()
    lengths = {}
    for name, hint in (("length", 81), ("first", 50), ("second", 30)):
        lengths[name] = graph.placeholder(name)
        lengths[name].meta["val"] = env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)
    query = graph.placeholder("query")
    mod = graph.call_function(operator.mod, (lengths["length"], 64))
    sub = graph.call_function(operator.sub, (64, mod))
    pad = graph.call_function(operator.mod, (sub, 64))
    for node in (mod, sub, pad):
        node.meta["val"] = node.target(*(fx_utils.value(a) if isinstance(a, fx.Node) else a for a in node.args))
    graph.output(graph.call_function(torch.nn.functional.pad, (query, (0, 0, 0, pad))))
    return fx.GraphModule(torch.nn.Module(), graph), lengths


@pytest.mark.parametrize("chunk_scans, padded", [(True, [128, 128]), (False, [64, 64])])
def test_a_chunk_padding_keeps_the_padded_length(chunk_scans, padded):
    """Qwen3.5's Gated DeltaNet pads T up to a multiple of 64 and scans the chunks in a loop unrolled for
    T's chunk count: after each stage the pad is ``T + pad − T'``, so the padded length stays the
    prompt's (T = 81: 128 at T' = 50, then at T'' = 30). Without ``chunk_scans`` it is computed again
    from the new length (64)."""
    from libra_fx.families import QWEN3_5

    gm, lengths = _chunk_padding_graph()
    ctx = RewriteContext(gm, None, family=dataclasses.replace(QWEN3_5, chunk_scans=chunk_scans))
    ctx.seq_len, ctx.batch = fx_utils.value(lengths["length"]), 2
    (user,) = gm.graph.find_nodes(op="call_function", target=torch.nn.functional.pad)
    got = []
    for name, new_len in (("first", 50), ("second", 30)):
        stage = Stage(layer=1, layer_nodes=[], layer_output=None, new_len=lengths[name])
        ctx.derived[stage.new_len] = rewire_sequence.LENGTH
        arg = user.args[1][3]
        kind = rewire_sequence.classify(ctx, arg)
        assert kind == rewire_sequence.SIZES
        made = rewire_sequence._replacement(ctx, stage, arg, kind, {}, user)
        assert rewire_sequence._made_key(kind, made) == ("kept_padded" if chunk_scans else "rewired_sizes")
        user.args = (user.args[0], (0, 0, 0, made))
        gm.recompile()
        got.append(gm(81, 50, 30, torch.zeros(1, 1, new_len, 1)).shape[2])
    assert got == padded
