"""Masks after a stage keep their meaning (contract §5), on the families whose masks are not causal:
Gemma3 (each image bidirectional, sliding-window layers) and PaliGemma (prefix-LM), against the
generic hook oracle, which re-indexes masks on its own (not with ``gather_mask``). The rule before
issue #16 (causal in the compressed order) is caught failing. Their full verification (prefill,
``generate``, identity) is ``tests/test_conformance.py::test_family_is_verified``."""

from __future__ import annotations

import pytest
import torch

import libra_fx
import libra_fx.passes.rewire_sequence as rewire_sequence
from libra_fx.conformance.check import EAGER_TOL, tiny_model
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.oracle import HookOracle
from libra_fx.families import GEMMA3, PALIGEMMA
from harness import causal_rule_gather_mask

FAMILIES = {"gemma3": GEMMA3, "paligemma": PALIGEMMA}
LAYERS = (1, 2)


@pytest.mark.parametrize("model_type", ["gemma3", "paligemma"])
def test_the_causal_rule_fails_the_oracle(model_type, monkeypatch):
    """With the causal rule the compiled model is far off the oracle (Δ ≈ 0.1); with today's rule the same
    case (libra, layers (1, 2), the left-padded B=2 of the verification's prefill, longer than Gemma3's
    window) is within 1e-5: ``tests/test_conformance.py::test_family_is_verified``."""
    family = FAMILIES[model_type]
    reference = tiny_model(family)
    window = getattr(reference.config.get_text_config(), "sliding_window", None)
    inputs = example_inputs(reference, family, 2, pad=(0, 3), text_len=window)
    with torch.no_grad(), HookOracle(reference, "libra", 0.5, LAYERS) as oracle:
        want = reference(**inputs).logits
        valid = oracle.valid()
    monkeypatch.setattr(rewire_sequence, "gather_mask", causal_rule_gather_mask)
    torch._dynamo.reset()
    compiled = libra_fx.compile(tiny_model(family), compiler="eager", method="libra", ratio=0.5, layers=LAYERS)
    with torch.no_grad():
        got = compiled(**inputs).logits
    assert got.shape == want.shape and any(r.compressed for r in compiled.libra_backend.records)
    assert (got - want)[valid].abs().max() > 100 * EAGER_TOL


@pytest.mark.parametrize("model_type", ["gemma3", "paligemma"])
def test_decode_logits_equal_the_oracle(model_type):
    """Every step's logits, not only the tokens: the oracle takes each cached key's column by its
    source; the compiled model cuts transformers' decode mask to each layer's cache (its first
    ``kv_len`` columns). They agree because a new token is text after the prompt: its row is causal
    over the whole prompt (Gemma3 passes no ``token_type_ids`` in decode, PaliGemma builds its prefix
    blocks in the first step only), so only the padding columns, in front, are hidden."""
    family = FAMILIES[model_type]
    reference = tiny_model(family)
    inputs = example_inputs(reference, family, 2, pad=(0, 3))
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), HookOracle(reference, "libra", 0.5, LAYERS):
        want = reference.generate(**inputs, **settings)
    torch._dynamo.reset()
    compiled = libra_fx.compile(tiny_model(family), compiler="eager", method="libra", ratio=0.5, layers=LAYERS)
    with torch.no_grad():
        got = compiled.generate(**inputs, **settings)
    assert torch.equal(got.sequences, want.sequences)
    error = (torch.stack(got.logits) - torch.stack(want.logits)).abs().max().item()
    assert error <= EAGER_TOL


def test_gemma3_and_paligemma_checks_cover_their_masks():
    """What their verification runs on: Gemma3's prefill prompts are longer than its window, and its
    stage layers are a global and a sliding-window layer (at layer 2 the image lies outside the last
    token's window: α = 0 on the span, uniform merge weights, contract §4); PaliGemma's prefix holds
    text before and after the image, and the prompt ends in a causal suffix."""
    model = tiny_model(GEMMA3)
    text = model.config.text_config
    assert [text.layer_types[i] for i in LAYERS] == ["full_attention", "sliding_attention"]
    ids = example_inputs(model, GEMMA3, 1, text_len=text.sliding_window)["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()
    assert ids.shape[0] > text.sliding_window and ids.shape[0] - 1 - image.max() >= text.sliding_window

    model = tiny_model(PALIGEMMA)
    inputs = example_inputs(model, PALIGEMMA, 2, pad=(0, 3))
    image = inputs["input_ids"] == model.config.image_token_id
    types, real = inputs["token_type_ids"], inputs["attention_mask"].bool()
    first, last = (image.int().argmax(1), image.shape[1] - 1 - image.flip(1).int().argmax(1))
    for b in range(2):
        prefix = (types[b] == 0) & real[b]
        assert prefix[: first[b]].any() and prefix[last[b] + 1:].any() and types[b, -1] == 1
