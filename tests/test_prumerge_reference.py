"""Acceptance (issue #15): on the shipped shapes model's vision tower, with the reference's layout
(attention order, re-packed positions, extra token), libra-fx's PruMerge keeps the reference's
patches in the reference's order on every picture of a held-out set of 64, and its merged slot
features (before the projector) agree within 1e-5. The reference is ``tests/oracle_prumerge.py``'s
port of 42Shawn/LLaVA-PruMerge's ``token_prune_merge_advanced[_plus]``."""

from __future__ import annotations

import warnings

import pytest
import torch

import libra_fx
from libra_fx import shapes_task as st
from libra_fx.runtime import compat
from libra_fx.sequence.vision import vision_merge
from oracle_prumerge import image_slots

PICTURES = 64
CASES = [("prumerge", 0.0), ("prumerge_plus", 0.0), ("prumerge_fixed", 0.75)]


@pytest.fixture(scope="module")
def shipped():
    model = st.load_shapes_lvlm()
    data = st.heldout(4 * PICTURES)  # four questions per picture
    return model, {"input_ids": data["input_ids"][::4], "pixel_values": data["pixel_values"][::4]}


def attention_inputs(model, pixel_values):
    """The tower's last-layer attention inputs as the graph's kernel takes them (``[S, H, 1+N, d]``),
    and the features the projector takes."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        attn = tower.encoder.layers[-1].self_attn
        x = tower.encoder.layers[-1].layer_norm1(hidden[-2])
        s, t, _ = x.shape

        def heads(proj):
            return proj(x).view(s, t, -1, attn.head_dim).transpose(1, 2)

        return heads(attn.q_proj), heads(attn.k_proj), hidden[model.config.vision_feature_layer][:, 1:]


@pytest.mark.parametrize("method, ratio", CASES)
def test_shipped_tower_matches_the_reference(shipped, method, ratio):
    model, inputs = shipped
    spec = libra_fx.method(method, order="attention", positions="repacked")
    reference = image_slots(model, inputs["pixel_values"], method, ratio, order="attention")

    compat.reset_dynamo()  # the kept patches, in slot order, as the compiled graph records them
    be = libra_fx.backend(ratio, (), spec, compiler="eager", strict=True, record=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.compile(model.forward, backend=be, fullgraph=True)(**inputs)
    (record,) = be.side_outputs["records0"]
    assert [r.tolist() for r in record["targets"]] == [kept for kept, _ in reference]

    slots = spec.method.capacity(st.NUM_VISUAL_TOKENS, ratio)  # the merged features, before the projector
    q, k, features = attention_inputs(model, inputs["pixel_values"])
    with torch.no_grad():
        merged, _, valid = vision_merge(features, q, k, method=method, ratio=ratio, slots=slots, options=spec.items())
    for img, (_, want) in enumerate(reference):
        assert int(valid[img].sum()) == len(want)
        assert (merged[img, : len(want)] - want).abs().max().item() <= 1e-5, img
