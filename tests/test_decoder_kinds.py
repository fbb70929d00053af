"""Decoders of other kinds (contract §5, §9): where a stage may go in DeepStack and hybrid decoders,
the DeepStack shim, the decode mask of a layer built from a compressed cache, and Llama4's tiny-model
fix-up. (Each family's verification: tests/test_conformance.py.)"""

from __future__ import annotations

import pytest
import torch

import libra_fx
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.tiny import tiny_model
from libra_fx.families import LFM2_VL, LLAMA4, QWEN3_5, QWEN3_VL
from libra_fx.families.qwen3_vl import add_deepstack_features
from libra_fx.runtime.compat import DEEPSTACK
from libra_fx.sequence.attention import fit_mask_to_cache


@pytest.fixture(scope="module")
def qwen3_vl():
    return tiny_model(QWEN3_VL)


def test_a_stage_before_the_last_deepstack_layer_is_refused(qwen3_vl):
    """The tiny Qwen3-VL adds DeepStack features after layer 0 only: layer 1 is the first allowed."""
    with pytest.raises(ValueError, match=r"layer 0: Qwen3-VL adds DeepStack .* the first layer allowed is 1"):
        libra_fx.compile(qwen3_vl, layers=(0, 2), compiler="eager")
    model = libra_fx.compile(qwen3_vl, layers=(1, 2), compiler="eager")
    with pytest.raises(ValueError, match="the first layer allowed is 1"):
        libra_fx.compile(model, layers=(0,), compiler="eager")  # reconfigured: checked again


def test_the_refusal_counts_the_configs_deepstack_layers():
    config = tiny_model(QWEN3_VL).config
    config.vision_config.deepstack_visual_indexes = [8, 16, 24]  # the published models' three
    with pytest.raises(ValueError, match=r"after decoder layers 0, 1, 2, .* the first layer allowed is 3"):
        QWEN3_VL.check_stage_layers(config, (2, 7))
    QWEN3_VL.check_stage_layers(config, (3, 7))


def test_a_stage_on_a_convolution_layer_is_refused():
    """LFM2-VL's tiny decoder: convolution layers 0 and 3, attention layers 1 and 2."""
    model = tiny_model(LFM2_VL)
    with pytest.raises(ValueError, match=r"layer 3 of LFM2-VL is a 'conv' layer, .* attention layers: \[1, 2\]"):
        libra_fx.compile(model, layers=(1, 3), compiler="eager")


def test_a_stage_on_a_gated_deltanet_layer_is_refused():
    """Qwen3.5's tiny decoder: Gated DeltaNet layers 0 and 3, full-attention layers 1 and 2."""
    model = tiny_model(QWEN3_5)
    with pytest.raises(ValueError, match=r"layer 0 of Qwen3.5 is a 'linear_attention' layer, .* attention layers: \[1, 2\]"):
        libra_fx.compile(model, layers=(0, 2), compiler="eager")


def test_the_tiny_qwen3_5_prompt_needs_fewer_chunks_once_compressed():
    """Its verification (tests/test_conformance.py) must cross a chunk boundary of the Gated DeltaNet scan
    (64 tokens): a prompt of two chunks whose half-compressed sequence fits in one."""
    model = tiny_model(QWEN3_5)
    ids = example_inputs(model, QWEN3_5, 2, pad=(0, 3))["input_ids"]
    visual = int((ids[0] == model.config.image_token_id).sum())
    assert ids.shape[1] > 64 >= ids.shape[1] - visual // 2


def test_the_deepstack_shim_adds_the_same_values_bit_for_bit(qwen3_vl):
    """transformers adds the features with a boolean index (a graph break); the shim without one."""
    text = qwen3_vl.model.language_model
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 64, generator=gen)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:5], mask[1, 1:4] = True, True
    features = torch.randn(6, 64, generator=gen)
    want = getattr(type(text), DEEPSTACK)(text, hidden, mask, features)
    assert torch.equal(add_deepstack_features(text, hidden, mask, features), want)


def test_a_decode_mask_as_long_as_the_cache_still_shows_empty_slots():
    """Llama4's first full-attention layer follows its chunked ones: transformers builds the full-attention
    decode mask from that layer's (compressed) cache, as long as it; a sample's empty slots in front
    must still be hidden, and its columns shifted behind them."""
    mask = torch.tensor([[[[0, 1, 1, 1, 1]]], [[[1, 1, 1, 1, 1]]]], dtype=torch.bool)  # sample 0: one pad
    key = torch.zeros(2, 1, 5, 4)
    got = fit_mask_to_cache(mask, key, empty=torch.tensor([2, 0]))
    assert got[:, 0, 0].tolist() == [[False, False, False, True, True], [True] * 5]


def test_llama4s_tiny_model_fix_is_applied_only_where_its_own_forward_fails():
    """transformers 5.24's Llama4 forward reads ``image_outputs`` off its language model's output, which
    has none: every call raises; 5.25's runs. The tiny model returns the field (its fixture's
    ``adapt_tiny``: ``Llama4Fixture``) exactly where the model as transformers made it raises."""
    model = tiny_model(LLAMA4)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 6, 128)
        fixed = vars(model.language_model).pop("forward", None) is not None  # the model as transformers made it
        try:
            model(input_ids=ids)
            raises = False
        except AttributeError as error:
            raises = "image_outputs" in str(error)
    assert fixed == raises


def test_qwen3_vl_videos_are_refused_by_name():
    """A timestamp before each frame splits a video's placeholders: such a call runs uncompressed."""
    images = dict(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=torch.zeros(1))
    assert QWEN3_VL.refused_inputs(None, images) is None
    assert "a timestamp (text) sits before each frame" in QWEN3_VL.refused_inputs(None, 
        dict(images, pixel_values_videos=torch.zeros(1)))
