"""mask_padding_slots (adaptive vision-side methods, ``VisionMethod.adaptive``): every decoder attention gets a
``mask_padding_slots(mask, valid)`` mask; SDPA also ``is_causal=False``. The vision tower is untouched."""

import warnings

import pytest
from passkit import calls, in_module, inserted, make_ctx, run_until

from libra_fx.errors import UnsupportedGraph
from libra_fx.passes import fx_utils, mask_padding_slots
from libra_fx.passes.matchers import find_attention
from libra_fx.runtime import compat
from libra_fx.sequence.vision import mask_padding_slots as mask_fn


def masked(gm, serves_decode=True, method="prumerge"):
    ctx = make_ctx(gm, method=method, serves_decode=serves_decode)
    run_until(ctx, "mask_padding_slots")
    sdpa = {n: (n.args, dict(n.kwargs)) for n in calls(ctx.gm, fx_utils.SDPA)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # serves_decode=True: no warning
        result = mask_padding_slots.run(ctx) if serves_decode else None
    return ctx, result, sdpa


def decoder_sdpa(ctx):
    return [n for n in calls(ctx.gm, fx_utils.SDPA) if in_module(n, "language_model.layers.")]


def test_every_decoder_sdpa_masked(llava_graph):
    ctx, result, before = masked(llava_graph)
    valid = ctx.side_outputs["valid"]
    attn = decoder_sdpa(ctx)
    assert len(attn) == ctx.num_layers == 4
    (made,) = inserted(ctx.gm, mask_fn)  # one per distinct original mask: the layers share theirs
    original = before[attn[0]][1]["attn_mask"]
    assert original is not None and made.args == (original, valid)
    for node in attn:
        assert node.kwargs["attn_mask"] is made
        assert node.kwargs["is_causal"] is False
        assert node.args == before[node][0]  # q, k, v unchanged
    assert result.matched == ["4 decoder attention calls ignore the padding slots"]
    assert result.counts == dict(attention_calls=4, masks=1)


@pytest.mark.skipif(not compat.skips_causal_mask_when_compiled(), reason="transformers < 5.18 builds the causal "
                    "mask whenever Dynamo traces: no mask-less is_causal SDPA in a captured graph")
def test_causal_sdpa_without_mask_gets_one(llava_two_images):
    """No padding: the decoder's SDPA is ``is_causal=True`` with no mask; it gets the slot mask of
    plain causal attention, and ``is_causal=False``."""
    ctx, _, before = masked(llava_two_images)
    attn = decoder_sdpa(ctx)
    assert all(before[n][1].get("is_causal") is True and before[n][1].get("attn_mask") is None for n in attn)
    (made,) = inserted(ctx.gm, mask_fn)
    assert made.args == (None, ctx.side_outputs["valid"])
    assert all(n.kwargs["attn_mask"] is made and n.kwargs["is_causal"] is False for n in attn)


def test_vision_tower_attention_untouched(llava_graph):
    ctx, _, before = masked(llava_graph)
    tower = [n for n in calls(ctx.gm, fx_utils.SDPA) if in_module(n, "vision_tower")]
    assert len(tower) == 2
    assert all((n.args, dict(n.kwargs)) == before[n] for n in tower)


def test_eager_scores_mask_replaced(llava_eager_graph):
    ctx, result, _ = masked(llava_eager_graph)
    (made,) = inserted(ctx.gm, mask_fn)
    valid = ctx.side_outputs["valid"]
    assert made.args[1] is valid
    for index in sorted(ctx.decoder):
        site = find_attention(index, ctx.decoder[index])  # matched again on the edited graph
        assert site.mask is made  # softmax(q·kᵀ·s + mask_padding_slots(mask, valid))
    assert result.matched == ["4 decoder attention calls ignore the padding slots"]


def test_bare_backend_warns_about_decode(llava_graph):
    ctx = make_ctx(llava_graph, method="prumerge", serves_decode=False)
    run_until(ctx, "mask_padding_slots")
    with pytest.warns(UserWarning, match="prumerge under a bare torch.compile"):
        mask_padding_slots.run(ctx)


def test_positional_is_causal_is_refused(llava_two_images):
    ctx = make_ctx(llava_two_images, method="prumerge", serves_decode=True)
    run_until(ctx, "mask_padding_slots")
    node = decoder_sdpa(ctx)[2]
    node.args = node.args[:3] + (None, 0.0, True)  # (q, k, v, attn_mask, dropout_p, is_causal)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")}
    with pytest.raises(UnsupportedGraph, match="decoder layer 2: SDPA with a positional is_causal argument"):
        mask_padding_slots.run(ctx)
