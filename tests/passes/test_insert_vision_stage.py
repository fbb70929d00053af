"""insert_vision_stage: one ``vision_merge`` node where the method's signal says (PruMerge: the
projector's input, fed by the [CLS] attention of the vision tower's last layer; toy methods here: the
projector's output, features only, or the attention of the layer the features come from), and one
``vision_compress`` node right after the features enter the embeddings; its stage (layer -1) is
prepended, and ``source``/``valid``/``positions`` become side outputs."""

import dataclasses
import operator

import pytest
import torch
from passkit import in_module, inserted, inserted_counts, make_ctx, position, run_until

from libra_fx.errors import UnsupportedGraph
from libra_fx.families import LLAVA, LLAVA_NEXT, QWEN2_VL
from libra_fx.families.base import VisionTower
from libra_fx.methods import Signal, VisionMethod, register_vision_method, unregister_vision_method
from libra_fx.methods.vision import pruned_slots
from libra_fx.passes import fx_utils, insert_vision_stage
from libra_fx.passes.matchers import AttentionKind
from libra_fx.sequence.splice import visual_span_mask
from libra_fx.sequence.vision import vision_compress, vision_merge

SYM_SIZE = torch.ops.aten.sym_size.int


class FirstPatches(VisionMethod):
    """A toy: the first ``C = N // 4`` patches, read at the projector's output (features only)."""

    name = "toy_first"
    summary = "toy: the first quarter of the patches"
    signal = Signal(features="projector_output")

    def capacity(self, n, ratio):
        return max(1, n // 4)

    def slots(self, inputs, ratio, slots, options):
        s, n, _ = inputs.features.shape
        return pruned_slots(inputs.features, (torch.arange(n) < slots).expand(s, n), slots)


class FeatureLayerAttention(FirstPatches):
    """A toy with VisionZip's signal: the [CLS] attention of the layer the projector's features come from."""

    name = "toy_feature_layer"
    signal = Signal(features="projector_input", attention="feature", cls_token=True)


class WithClsFeature(FirstPatches):
    """A toy that also reads the [CLS] token's feature (VisionZip keeps it among its dominant tokens)."""

    name = "toy_cls_feature"
    signal = Signal(features="projector_input", cls_token=True, cls_feature=True)


@pytest.fixture
def toys():
    methods = (FirstPatches(), FeatureLayerAttention(), WithClsFeature())
    for m in methods:
        register_vision_method(m)
    yield
    for m in methods:
        unregister_vision_method(m.name)


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
    assert result.counts == dict(images=2, patches_per_image=36, slots_per_image=10, attention_inputs=2,
                                 cls_feature=0, records=0, inserted=12)


def test_record_adds_records0(llava_graph):
    ctx, result = vision_stage(llava_graph, record=True)
    (merge,) = inserted(ctx.gm, vision_merge)
    assert merge.kwargs["record"] is True
    assert list(ctx.side_outputs) == ["source", "valid", "positions", "records0"]
    assert ctx.side_outputs["records0"].args == (merge, 3)
    assert inserted_counts(ctx.gm)[operator.getitem] == 9
    assert result.counts["records"] == 1 and result.counts["inserted"] == 13


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
    assert result.counts["images"] == 4 and result.counts["slots_per_image"] == 10  # 9 patches + the extra token


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


def test_features_only_method_at_the_projector_output(llava_graph, toys):
    """No tower attention: the merge takes the projector's output alone, and the nodes after the projector
    read its slots."""
    ctx, result = vision_stage(llava_graph, method="toy_first")
    (merge,) = inserted(ctx.gm, vision_merge)
    (features,) = merge.args
    assert in_module(features, "multi_modal_projector.") and tuple(fx_utils.value(features).shape) == (2, 36, 64)
    assert merge.kwargs == dict(method="toy_first", ratio=0.5, slots=9, options=(("order", "spatial"),
                                                                                   ("positions", "original")))
    assert list(features.users) == [merge]  # every reader of the projected features now reads the slots
    slots = next(u for u in merge.users if u.args == (merge, 0))
    assert slots.users and not any(in_module(u, "multi_modal_projector.") for u in slots.users)
    at = position(ctx.gm)
    assert at[features] < at[merge] < at[ctx.scatters[0]]
    assert ctx.stages[0].attention is None
    assert result.matched == [f"projector output {features.name}: merged into 9 slots per image "
                              "(order=spatial, positions=original)",
                              "before decoder layer 0: toy_first 36 → at most 9 tokens per image"]
    assert result.counts["attention_inputs"] == 0 and result.counts["slots_per_image"] == 9


def test_attention_of_the_feature_layer(llava_graph, toys):
    """``attention="feature"``: the last tower layer the features come from (``vision_feature_layer=-2``: layer 0
    of the tiny tower's 2), not the tower's last."""
    ctx, result = vision_stage(llava_graph, method="toy_feature_layer")
    (merge,) = inserted(ctx.gm, vision_merge)
    site = ctx.stages[0].attention
    assert merge.args[1:] == (site.query, site.key) and in_module(site.node, "vision_tower.encoder.layers.0.")
    assert result.matched[0] == (f"vision tower 'model.vision_tower.encoder': [CLS] attention of layer 0 "
                                 f"(sdpa {site.node.name})")


def test_cls_token_is_asked_of_the_adapter(llava_graph, toys):
    """A tower without [CLS] (``VisionTower(cls_token=False)``) refuses PruMerge, not a features-only method."""
    no_cls = dataclasses.replace(LLAVA, vision_tower=VisionTower(cls_token=False))
    ctx = make_ctx(llava_graph, method="prumerge", family=no_cls)
    run_until(ctx, "insert_vision_stage")
    with pytest.raises(UnsupportedGraph, match=r"prumerge needs a \[CLS\] token before each image's patches in the "
                                               r"vision tower's attention; LLaVA-1.5's tower has none"):
        insert_vision_stage.run(ctx)
    assert ctx.stages == [] and inserted(ctx.gm) == []
    ctx = make_ctx(llava_graph, method="toy_first", family=no_cls)
    run_until(ctx, "insert_vision_stage")
    insert_vision_stage.run(ctx)
    assert len(inserted(ctx.gm, vision_merge)) == 1


def test_family_without_a_vision_tower_refuses_every_vision_method(llava_graph, toys):
    ctx = make_ctx(llava_graph, method="toy_first", family=LLAVA_NEXT)
    run_until(ctx, "insert_vision_stage")
    with pytest.raises(UnsupportedGraph, match="toy_first is a vision-side method, verified only on the families "
                                               "whose adapter describes their vision tower; LLaVA-NeXT's does not"):
        insert_vision_stage.run(ctx)


def test_cls_feature_is_the_row_the_projector_input_drops(llava_graph, toys):
    ctx, result = vision_stage(llava_graph, method="toy_cls_feature")
    (merge,) = inserted(ctx.gm, vision_merge)
    (features,) = merge.args
    cls = merge.kwargs["cls"]
    assert features.target is operator.getitem and features.args[1] == (slice(None), slice(1, None))
    assert cls.target is operator.getitem and cls.args == (features.args[0], (slice(None), 0))
    assert tuple(fx_utils.value(features.args[0]).shape) == (2, 37, 32)  # [images, 1 + patches, tower width]
    assert result.counts["cls_feature"] == 1 and result.counts["attention_inputs"] == 0
    no_cls = dataclasses.replace(LLAVA, vision_tower=VisionTower(cls_token=False))
    ctx = make_ctx(llava_graph, method="toy_cls_feature", family=no_cls)
    run_until(ctx, "insert_vision_stage")
    with pytest.raises(UnsupportedGraph, match="toy_cls_feature needs a \\[CLS\\] token"):
        insert_vision_stage.run(ctx)
