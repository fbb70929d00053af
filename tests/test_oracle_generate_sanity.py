"""Sanity tests of the oracle's generation path (``oracle.oracle_generate``, contract §5)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import oracle  # noqa: E402
from oracle import oracle_generate, oracle_logits  # noqa: E402

from libra_fx.testing import tiny_llava, tiny_llava_inputs  # noqa: E402

N_NEW = 8


@pytest.fixture(scope="module")
def models():
    return {attn: tiny_llava(attn=attn) for attn in ("sdpa", "eager")}


def hf_generate(model, inputs, n=N_NEW):
    """``model.generate`` greedy, EOS disabled (the oracle never stops early)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.max_new_tokens = n
    config.do_sample = False
    config.output_logits = True
    config.return_dict_in_generate = True
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], [x.float() for x in out.logits]


def check_steps(tokens, steps, batch, n=N_NEW):
    assert tokens.dtype == torch.long and tokens.shape == (batch, n)
    assert len(steps) == n
    for t, logits in enumerate(steps):
        assert logits.dtype == torch.float32 and logits.shape[0] == batch
        assert torch.isfinite(logits).all()
        assert torch.equal(tokens[:, t], logits.argmax(dim=-1))


# ---------------------------------------------------------------- (a) ratio 0 == model.generate


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kw", [dict(batch=1), dict(batch=3, pad=(0, 2, 3))], ids=["B1", "padded3"])
def test_ratio_zero_equals_generate(models, attn, kw):
    model = models[attn]
    inputs = tiny_llava_inputs(model, **kw)
    ref_tokens, ref_logits = hf_generate(model, inputs)
    for extra in (dict(ratio=0.0), dict(ratio=0.5, layers=())):
        tokens, steps = oracle_generate(model, **inputs, **extra, max_new_tokens=N_NEW)
        check_steps(tokens, steps, kw["batch"])
        assert torch.equal(tokens, ref_tokens)
        for got, ref in zip(steps, ref_logits):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_compression_after_last_layer_equals_generate(models):
    """A stage after the last layer leaves every cache full: generation is the plain model's."""
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=3, pad=(0, 2, 3))
    ref_tokens, ref_logits = hf_generate(model, inputs)
    tokens, steps = oracle_generate(model, **inputs, method="libra", ratio=0.5, layers=(3,))
    assert torch.equal(tokens, ref_tokens)
    for got, ref in zip(steps, ref_logits):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- (b) step 0 == oracle_logits


@pytest.mark.parametrize("method", ["libra", "fastv"])
@pytest.mark.parametrize("layers", [(1,), (0, 2)], ids=["L1", "L0_2"])
def test_step0_equals_oracle_logits(models, method, layers):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=2, seed=1)
    ref, counts = oracle_logits(model, **inputs, method=method, ratio=0.5, layers=layers)
    tokens, steps = oracle_generate(model, **inputs, method=method, ratio=0.5, layers=layers, max_new_tokens=N_NEW)
    check_steps(tokens, steps, 2)
    torch.testing.assert_close(steps[0], ref, atol=1e-6, rtol=0)
    plain_tokens, plain_steps = oracle_generate(model, **inputs, ratio=0.0, max_new_tokens=N_NEW)
    assert not torch.allclose(steps[1], plain_steps[1], atol=1e-6)  # compression reaches decode


def test_cache_lengths_per_layer(models):
    """Layers 0..L1 cache the full prompt, later layers the compressed one (contract §5)."""
    model = models["eager"]
    inputs = tiny_llava_inputs(model, batch=3, pad=(0, 2, 3))
    kv = []
    oracle._run(model, **inputs, method="libra", ratio=0.5, layers=(0, 2), positions="generate", kv=kv)
    T = inputs["input_ids"].shape[1]  # 3 + 5 + 36 + 7 = 51
    text = T - 36
    assert [k.shape[2] for k, _, _ in kv] == [T, text + 19, text + 19, text + 11]
    for k, v, valid in kv:
        assert k.shape == v.shape and k.shape[:2] == (3, 2) and valid.shape == (3, k.shape[2])
        assert valid.sum(dim=1).tolist() == [k.shape[2], k.shape[2] - 2, k.shape[2] - 3]


# ---------------------------------------------------------------- (c) left-padded batch == alone


@pytest.mark.parametrize("layers", [(1,), (0, 2)], ids=["L1", "L0_2"])
def test_padded_batch_equals_alone(models, layers):
    model = models["sdpa"]
    pad = (0, 2, 3)
    inputs = tiny_llava_inputs(model, batch=3, pad=pad)
    tokens, steps = oracle_generate(model, **inputs, method="libra", ratio=0.5, layers=layers)
    check_steps(tokens, steps, 3)
    for b, p in enumerate(pad):
        alone = dict(input_ids=inputs["input_ids"][b:b + 1, p:], pixel_values=inputs["pixel_values"][b:b + 1])
        single_tokens, single_steps = oracle_generate(model, **alone, method="libra", ratio=0.5, layers=layers)
        assert torch.equal(tokens[b:b + 1], single_tokens), b
        for got, ref in zip(steps, single_steps):
            torch.testing.assert_close(got[b:b + 1], ref, atol=1e-4, rtol=0)
