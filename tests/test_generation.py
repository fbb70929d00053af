"""``libra_fx.compile`` + ``generate()``: compressed prefill, per-layer KV caches, decode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import libra_fx
from libra_fx.testing import tiny_llava, tiny_llava_inputs
from oracle import oracle_generate

NEW_TOKENS = 8


def compiled_model(attn="sdpa", **cfg):
    torch._dynamo.reset()
    model = tiny_llava(attn=attn)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return libra_fx.compile(model, compiler="eager", **cfg)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, -NEW_TOKENS:], torch.stack(out.logits, 1).float()


CASES = {
    "B=1": dict(batch=1),
    "B=4 equal length": dict(batch=4),
    "B=3 left-padded": dict(batch=3, pad=(0, 2, 5)),
    "two images": dict(batch=2, images=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method, layers", [("libra", (1,)), ("fastv", (0, 2))], ids=["libra", "fastv-2-stages"])
def test_greedy_generation_matches_oracle(case, method, layers):
    cfg = dict(method=method, ratio=0.5, layers=layers)
    model = compiled_model(**cfg)
    inputs = tiny_llava_inputs(model, **CASES[case])
    tokens, logits = generate(model, inputs)
    assert any(r.compressed for r in model.libra_backend.records)
    want_tokens, want_logits = oracle_generate(model, **inputs, max_new_tokens=NEW_TOKENS, **cfg)
    assert torch.equal(tokens, want_tokens)
    assert (logits - torch.stack(want_logits, 1)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_sample_of_a_padded_batch_equals_its_prompt_alone(attn):
    model = compiled_model(attn=attn, method="libra", ratio=0.5, layers=(1, 2))
    batch = tiny_llava_inputs(model, batch=3, pad=(0, 2, 5))
    tokens, logits = generate(model, batch)
    for b, pad in enumerate((0, 2, 5)):
        alone = {k: v[b:b + 1, pad:] if k != "pixel_values" else v[b:b + 1] for k, v in batch.items()}
        alone.pop("attention_mask")
        t, lg = generate(model, alone)
        assert torch.equal(tokens[b:b + 1], t)
        torch.testing.assert_close(logits[b:b + 1], lg, atol=1e-4, rtol=0)


def test_recompilation_stays_bounded():
    """20 prompts whose lengths spread over 2×: two prefill graphs and one decode graph in all (the
    cache's growing length is dynamic from the first decode step)."""
    model = compiled_model(method="libra", ratio=0.5, layers=(1,))
    counters.clear()
    lengths = []
    for i, prefix in enumerate(range(5, 65, 3)):
        inputs = tiny_llava_inputs(model, batch=2, prefix=prefix, pad=(0, 1 + i % 3))
        lengths.append(inputs["input_ids"].shape[1])
        generate(model, inputs)
    assert len(lengths) == 20 and max(lengths) >= 2 * min(lengths)
    records = model.libra_backend.records
    prefill = [r for r in records if r.compressed]
    decode = [r for r in records if not r.compressed]
    assert counters["stats"]["unique_graphs"] == len(records)
    assert len(prefill) <= 2 and len(decode) == 1, [r.reason for r in records]


def test_use_cache_false_compresses_every_step():
    model = compiled_model(method="libra", ratio=0.5, layers=(1,))
    inputs = tiny_llava_inputs(model, batch=2, pad=(0, 3))
    tokens, _ = generate(model, inputs, use_cache=False)
    assert tokens.shape == (2, NEW_TOKENS)
    assert all(r.compressed for r in model.libra_backend.records)


def test_static_cache_is_refused_with_the_fix():
    model = compiled_model(method="libra", ratio=0.5, layers=(1,))
    with pytest.raises(ValueError, match="use the default dynamic cache"):
        generate(model, tiny_llava_inputs(model), cache_implementation="static")


def test_layer_beyond_the_model_is_refused_at_once():
    with pytest.raises(ValueError, match="the model has 4 decoder layers"):
        libra_fx.compile(tiny_llava(num_layers=4), layers=(4,))


def test_generate_on_a_compiled_module_warns_that_nothing_is_compressed():
    model = tiny_llava()
    optimized = torch.compile(model, backend=libra_fx.backend(layers=(1,)))
    with pytest.warns(UserWarning, match="runs the UNCOMPILED model"):
        optimized.generate
    with pytest.warns(UserWarning, match="runs the UNCOMPILED model"):
        torch.compile(model, backend="libra").generate


def test_a_sweep_of_many_compiled_models_compresses_every_one():
    """Issue 14, case 3: Dynamo keeps ``recompile_limit`` (8) compiled versions per code object, and every
    transformers forward shares its outermost one; a plain ``torch.compile`` baseline and a sweep of fresh
    models in one process used to send the ninth model to eager, uncompressed. Each compiled model now has
    a code object of its own. (The limit is lowered to 1 here, so that the baseline alone spends it.)"""
    torch._dynamo.reset()
    baseline = tiny_llava()
    baseline.forward = torch.compile(baseline.forward, backend="eager")
    inputs = tiny_llava_inputs(baseline, batch=1)
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        baseline(**inputs)
        baseline(**tiny_llava_inputs(baseline, batch=2))  # past the limit: this frame now runs eagerly
        for ratio in (0.25, 0.5, 0.75):
            model = libra_fx.compile(tiny_llava(), compiler="eager", method="fastv", ratio=ratio, layers=(1,))
            with warnings.catch_warnings():
                warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
                length = model(**inputs).logits.shape[1]
            assert length == inputs["input_ids"].shape[1] - round(36 * ratio), ratio
