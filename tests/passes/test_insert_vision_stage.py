"""insert_vision_stage (PruMerge): one ``vision_merge`` node at the projector's input, fed by the
[CLS] attention of the vision tower's last layer, and one ``vision_compress`` node right after the
features enter the embeddings; its stage (layer -1) is prepended, and ``source``/``valid``/``positions``
become side outputs."""

import dataclasses
import operator

import pytest
import torch
from passkit import in_module, inserted, inserted_counts, make_ctx, position, run_until

from libra_fx.errors import UnsupportedGraph
from libra_fx.families import LLAVA, LLAVA_NEXT, QWEN2_VL
from libra_fx.families.base import VisionTower
from libra_fx.passes import fx_utils, insert_vision_stage
from libra_fx.passes.matchers import AttentionKind
from libra_fx.sequence.splice import visual_span_mask
from libra_fx.sequence.vision import vision_compress, vision_merge

SYM_SIZE = torch.ops.aten.sym_size.int


def vision_stage(gm, method="prumerge", **config):
    ctx = make_ctx(gm, method=method, **config)
    run_until(ctx, "insert_vision_stage")
    assert inserted(ctx.gm) == [] and ctx.stages == []  # the decoder-side passes were skipped
    result = insert_vision_stage.run(ctx)
    return ctx, result


def test_prumerge_stage_prepended(llava_graph):
    ctx, result = vision_stage(llava_graph)
    assert inserted_counts(ctx.gm) == {vision_merge: 1, visual_span_mask: 1, vision_compress: 1, operator.getitem: 8,
                                       SYM_SIZE: 1}
    (merge,) = inserted(ctx.gm, vision_merge)
    (node,) = inserted(ctx.gm, vision_compress)
    (span,) = inserted(ctx.gm, visual_span_mask)
    visual = ctx.scatters[0]
    (stage,) = ctx.stages
    site = stage.attention
    assert stage.layer == -1 and stage.layer_output is visual and stage.layer_nodes == []
    assert stage.span_lens == ((36,),)
    # the merge reads the projector's input, [CLS] dropped: [images, patches, tower width]
    features = merge.args[0]
    assert merge.args[1:] == (site.query, site.key) and tuple(fx_utils.value(features).shape) == (2, 36, 32)
    options = (("order", "spatial"), ("positions", "original"))
    assert merge.kwargs == dict(method="prumerge", ratio=0.5, slots=10, options=options)  # 9 IQR + the extra token
    slots, ranks, valid = [next(u for u in merge.users if u.args == (merge, i)) for i in range(3)]
    assert [in_module(u, "multi_modal_projector.") for u in slots.users] == [True]
    assert not any(in_module(u, "multi_modal_projector.") for u in features.users)
    assert node.args == (visual, span, ranks, valid)
    assert node.kwargs == dict(span_len=36, spans_per_sample=1, slots=10, positions="original")
    assert span.args == (ctx.visual_mask,)
    outs = [stage.hidden, stage.kinds, stage.source, ctx.side_outputs["valid"], stage.positions]
    assert [(o.target, o.args) for o in outs] == [(operator.getitem, (node, i)) for i in range(5)]
    assert stage.new_len.target is SYM_SIZE and stage.new_len.args == (stage.hidden, 1)
    assert ctx.side_outputs == {"source": stage.source, "valid": outs[3], "positions": outs[4]}
    # the [CLS] query and keys of the tower's last encoder layer (of 2), bidirectional SDPA
    assert site.kind is AttentionKind.SDPA and site.mask is None
    assert in_module(site.node, "vision_tower.encoder.layers.1.")
    assert tuple(fx_utils.value(site.query).shape) == (2, 2, 1 + 36, 16)
    # the merge before the projector, the splice right after the features enter, before decoder layer 0
    at = position(ctx.gm)
    assert at[site.node] < at[merge] < at[visual] < at[span] < at[node] < at[stage.new_len] < min(
        at[n] for n in ctx.decoder[0])
    assert result.matched == [
        f"vision tower 'model.vision_tower.encoder': [CLS] attention of layer 1 (sdpa {site.node.name})",
        f"projector input {features.name}: merged into 10 slots per image (order=spatial, positions=original)",
        "before decoder layer 0: prumerge 36 → at most 10 tokens per image",
    ]


def test_record_adds_records0(llava_graph):
    ctx, _ = vision_stage(llava_graph, record=True)
    (merge,) = inserted(ctx.gm, vision_merge)
    assert merge.kwargs["record"] is True
    assert list(ctx.side_outputs) == ["source", "valid", "positions", "records0"]
    assert ctx.side_outputs["records0"].args == (merge, 3)
    assert inserted_counts(ctx.gm)[operator.getitem] == 9


def test_projector_input_is_found_by_the_adapters_name(llava_graph):
    ctx = make_ctx(llava_graph, method="prumerge", family=dataclasses.replace(LLAVA, vision_tower=VisionTower(projector="mm_projector")))
    run_until(ctx, "insert_vision_stage")
    with pytest.raises(UnsupportedGraph, match=r"'mm_projector' module .* takes 0 \[2, 36, D\] inputs"):
        insert_vision_stage.run(ctx)


def test_two_images_per_prompt(llava_two_images):
    ctx, result = vision_stage(llava_two_images, method="prumerge_fixed", ratio=0.75)
    (node,) = inserted(ctx.gm, vision_compress)
    assert node.kwargs["spans_per_sample"] == 2 and node.kwargs["span_len"] == 36
    assert fx_utils.value(ctx.stages[0].attention.query).shape[0] == 4  # B·k images through the tower
    assert result.matched[-1].startswith("before decoder layer 0: prumerge_fixed 36 → at most ")


def test_family_without_vision_methods_is_refused(llava_graph):
    ctx = make_ctx(llava_graph, method="prumerge", family=LLAVA_NEXT)
    run_until(ctx, "insert_vision_stage")
    refusal = r"prumerge needs a vision tower with a \[CLS\] token .* LLaVA-NeXT's does not"
    with pytest.raises(UnsupportedGraph, match=refusal):
        insert_vision_stage.run(ctx)
    assert ctx.stages == [] and inserted(ctx.gm) == []


def test_tower_outside_the_graph_is_refused(qwen_graph):
    """Qwen2-VL's forward breaks the graph around the vision tower: the features are a graph input."""
    pretend = dataclasses.replace(QWEN2_VL, vision_tower=VisionTower())
    ctx = make_ctx(qwen_graph, method="prumerge", family=pretend)
    run_until(ctx, "insert_vision_stage")
    with pytest.raises(UnsupportedGraph, match="needs the vision tower inside the compiled graph"):
        insert_vision_stage.run(ctx)


def test_ragged_spans_are_refused(next_ragged_graph):
    pretend = dataclasses.replace(LLAVA_NEXT, vision_tower=VisionTower())
    ctx = make_ctx(next_ragged_graph, method="prumerge", family=pretend, serves_decode=True)
    run_until(ctx, "insert_vision_stage")
    with pytest.raises(UnsupportedGraph, match=r"images of one static token count per graph, got spans 72 \| 36"):
        insert_vision_stage.run(ctx)
