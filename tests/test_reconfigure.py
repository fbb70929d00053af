"""``libra_fx.compile`` called again on a model it compiled: the new settings apply to the graphs
already captured (no new Dynamo trace), and what cannot change is refused with a message."""

from __future__ import annotations

import pytest
import torch

import libra_fx
from libra_fx.testing import tiny_llava, tiny_llava_inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_second_compile_applies_its_settings_without_a_new_trace():
    inputs = tiny_llava_inputs(tiny_llava(), batch=2, pad=(0, 2))
    torch._dynamo.reset()
    model = libra_fx.compile(tiny_llava(), compiler="eager", ratio=0.5, layers=(1,))
    first = _logits(model, inputs)
    captured = len(model.libra_backend.records)
    libra_fx.compile(model, compiler="eager", method="fastv", ratio=0.25, layers=(1, 2))
    again = _logits(model, inputs)
    assert len(model.libra_backend.records) == 2 * captured  # each captured graph rewritten once more

    torch._dynamo.reset()
    fresh = libra_fx.compile(tiny_llava(), compiler="eager", method="fastv", ratio=0.25, layers=(1, 2))
    want = _logits(fresh, inputs)
    assert again.shape == want.shape != first.shape and torch.equal(again, want)
    assert model.libra_backend.config == fresh.libra_backend.config


@pytest.mark.parametrize("change, message", [
    (dict(compiler="inductor"), "compiled with compiler='eager'; a new compiler needs a fresh model"),
    (dict(fullgraph=True), "compiled with fullgraph=False"),
    (dict(method="prumerge"), "switching between decoder-side and vision-side methods"),
    (dict(layers=(1, 9)), "layer index 9 is out of range"),
])
def test_what_cannot_change_is_refused(change, message):
    model = libra_fx.compile(tiny_llava(), compiler="eager", layers=(1,))
    settings = dict(dict(compiler="eager", layers=(1,)), **change)
    with pytest.raises(ValueError, match=message):
        libra_fx.compile(model, **settings)
    assert model.libra_backend.config.layers == (1,)  # unchanged
