"""Family adapters and per-model state: an unknown family is refused, never rewritten; two compiled
models in one process do not interfere. The unknown family is Gemma3 with its adapter taken out
(rewritten as if its masks were causal, it was off by 0.025 at a ratio that removes nothing)."""

from __future__ import annotations

import warnings

import pytest
import torch

import libra_fx
from libra_fx import families
from libra_fx.testing import tiny_llava, tiny_llava_inputs
from families import build, ragged_llava_next, tiny_gemma3

NO_TOKEN_REMOVED = dict(method="fastv", ratio=0.001, layers=(1,))  # round(N·0.999) = N for every span here


@pytest.fixture
def no_gemma3_adapter(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if f is not families.GEMMA3))


def test_an_unknown_family_under_the_bare_backend_warns_and_equals_the_plain_model(no_gemma3_adapter):
    model, inputs = tiny_gemma3()
    with torch.no_grad():
        want = model(**inputs).logits
    torch._dynamo.reset()
    be = libra_fx.backend(compiler="eager", **NO_TOKEN_REMOVED)
    with pytest.warns(libra_fx.LibraFallbackWarning, match=r"the model \(modeling_gemma3, .*belongs to no family"):
        with torch.no_grad():
            got = torch.compile(model.forward, backend=be)(**inputs).logits
    assert be.records and not any(r.compressed for r in be.records)
    assert torch.equal(got, want)


def test_an_unknown_family_under_the_bare_backend_raises_under_strict(no_gemma3_adapter):
    model, inputs = tiny_gemma3()
    torch._dynamo.reset()
    be = libra_fx.backend(compiler="eager", strict=True, **NO_TOKEN_REMOVED)
    with pytest.raises(Exception, match="belongs to no family libra-fx has an adapter for"):
        with torch.no_grad():
            torch.compile(model.forward, backend=be)(**inputs)


def test_an_unknown_family_through_compile_is_named_unsupported(no_gemma3_adapter):
    model, inputs = tiny_gemma3()
    with torch.no_grad():
        want = model(**inputs).logits
    torch._dynamo.reset()
    with pytest.warns(libra_fx.LibraFallbackWarning, match="Gemma3ForConditionalGeneration is not a supported"):
        compiled = libra_fx.compile(model, compiler="eager", **NO_TOKEN_REMOVED)
    with torch.no_grad():
        assert torch.equal(compiled(**inputs).logits, want)


def test_every_supported_class_has_one_adapter():
    """(The identity check of every family is part of its verification: tests/test_conformance.py.)"""
    classes = [c for f in families.FAMILIES for c in f.classes]
    assert len(classes) == len(set(classes)) and len(families.FAMILIES) >= 16


# -------------------------------------------------------------------------------------------------
# Two compiled models in one process
# -------------------------------------------------------------------------------------------------

NEW_TOKENS = 3
SETTINGS = {  # three models, two of one class, each with state that decode steps read
    "llava prumerge_plus (vision-side layout)": dict(method="prumerge_plus", fullgraph=True),
    "llava libra": dict(method="libra", ratio=0.5, layers=(1,)),
    "llava-next ragged fastv (empty slots)": dict(method="fastv", ratio=0.5, layers=(0, 2)),
}


def _model_and_inputs(name):
    if name.startswith("llava-next"):
        model = build("llava_next")
        return model, ragged_llava_next(model)[0]
    model = tiny_llava(image_size=64, num_layers=2, seed=len(name))
    model.generation_config.eos_token_id = None
    return model, tiny_llava_inputs(model, batch=2, pad=(0, 3), seed=1)


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def test_two_models_interleaved_equal_each_alone():
    alone = {}
    for name, cfg in SETTINGS.items():
        torch._dynamo.reset()
        model, inputs = _model_and_inputs(name)
        alone[name] = _generate(libra_fx.compile(model, compiler="eager", **cfg), inputs)

    torch._dynamo.reset()
    compiled = {}
    for name, cfg in SETTINGS.items():
        model, inputs = _model_and_inputs(name)
        compiled[name] = (libra_fx.compile(model, compiler="eager", **cfg), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        for _ in range(2):  # interleaved: each model's prefill and decode between the others'
            for name, (model, inputs) in compiled.items():
                tokens, logits = _generate(model, inputs)
                assert torch.equal(tokens, alone[name][0]), name
                assert torch.equal(logits, alone[name][1]), name
    for model, _ in compiled.values():
        assert any(r.compressed for r in model.libra_backend.records)
