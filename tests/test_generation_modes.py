"""The generation-mode matrix (docs/methods.md): every way ``generate()`` drives the model, on a compressed
prefill, against the plain model (identity setting, bit for bit) and against the hook oracle.

- **identity:** ``fastv`` at a ratio that removes no token equals the plain model bit for bit, in
  tokens and in every step's logits;
- **compressed:** ``libra`` R=0.5 gives the hook oracle's tokens, logits within 1e-4. Prompt lookup
  keeps greedy's tokens by construction, so its oracle is the greedy oracle, fed one token a step.
  Assisted generation prefills the prompt together with the draft's candidates; the importance query
  would be a candidate, so that prefill runs uncompressed, with a warning, and equals the plain model.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import libra_fx
from libra_fx.conformance.check import NO_TOKEN_REMOVED
from libra_fx.conformance.oracle import HookOracle
from libra_fx.testing import tiny_llava, tiny_llava_inputs

NEW_TOKENS = 6
COMPRESSED = dict(method="libra", ratio=0.5, layers=(1,))


def fresh(seed=0):
    model = tiny_llava(seed=seed)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


MODES = {
    "greedy": {},
    "beams=2": dict(num_beams=2),
    "beams=3": dict(num_beams=3),
    "sampling, 2 sequences": dict(do_sample=True, num_return_sequences=2),
    "prompt lookup": dict(prompt_lookup_num_tokens=3),
    "assisted": dict(assistant_model=fresh(seed=3)),
    "two turns": {},
}
AS_GREEDY = ("prompt lookup",)  # its tokens are greedy's: the greedy oracle, one token a step


def run(model, mode: str, inputs: dict, **kwargs):
    """Tokens and per-step logits of ``mode``; "two turns" continues the returned cache with 5 new tokens."""
    def generate(**x):
        torch.manual_seed(1)
        with torch.no_grad():
            return model.generate(**x, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                  **kwargs)

    out = generate(**inputs)
    if mode != "two turns":
        return out.sequences, torch.stack(out.logits, 1)
    follow_up = torch.randint(1, 99, (out.sequences.shape[0], 5), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([out.sequences, follow_up], 1)
    second = generate(input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(
        ids[:, inputs["attention_mask"].shape[1]:])], 1), past_key_values=out.past_key_values)
    return second.sequences, torch.cat([torch.stack(out.logits, 1), torch.stack(second.logits, 1)], 1)


def mode_inputs(model):
    """One prompt (transformers' candidate-based modes take one sample; left-padded batches are matched
    against the oracles in tests/test_generation.py and tests/test_conformance.py)."""
    inputs = tiny_llava_inputs(model, batch=1)
    return dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))


def compressed_run(mode, model, inputs):
    """The compiled model's run; a candidate prefill must warn, every other mode must compress silently."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", libra_fx.LibraFallbackWarning)
        result = run(model, mode, inputs, **MODES[mode])
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, libra_fx.LibraFallbackWarning)]
    if mode == "assisted":
        assert fallbacks and "candidate token(s) in one forward (assisted generation)" in fallbacks[0]
    else:
        assert not fallbacks and any(r.compressed for r in model.libra_backend.records)
    return result


@pytest.fixture(scope="module")
def models():
    """One compiled model per setting for the whole matrix (each mode adds only its own shapes' graphs),
    and the plain model (the oracle hooks into it)."""
    return dict(identity=libra_fx.compile(fresh(), compiler="eager", **NO_TOKEN_REMOVED),
                compressed=libra_fx.compile(fresh(), compiler="eager", **COMPRESSED), plain=fresh())


@pytest.mark.parametrize("mode", MODES)
def test_identity_setting_equals_the_plain_model(mode, models):
    model = models["identity"]
    inputs = mode_inputs(model)
    tokens, logits = compressed_run(mode, model, inputs)
    want_tokens, want_logits = run(models["plain"], mode, inputs, **MODES[mode])
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(logits, want_logits)


@pytest.mark.parametrize("mode", MODES)
def test_compressed_generation_matches_the_oracle(mode, models):
    plain, model = models["plain"], models["compressed"]
    inputs = mode_inputs(model)
    tokens, logits = compressed_run(mode, model, inputs)
    if mode == "assisted":  # uncompressed (warned above): the plain model's greedy tokens
        want_tokens, want_logits = run(plain, "greedy", inputs)
    else:
        with HookOracle(plain, **COMPRESSED):
            want_tokens, want_logits = run(plain, mode, inputs, **({} if mode in AS_GREEDY else MODES[mode]))
    assert torch.equal(tokens, want_tokens)
    assert (logits - want_logits).abs().max().item() <= 1e-4


def test_a_multi_token_step_on_a_compressed_cache_equals_one_token_at_a_time(models):
    """A manual 5-token step after a compressed prefill, against the same tokens fed one per step."""
    model = models["compressed"]
    inputs = mode_inputs(model)
    step = torch.randint(1, 99, (1, 5), generator=torch.Generator().manual_seed(4))
    masks = [torch.cat([inputs["attention_mask"], torch.ones_like(step[:, :k])], 1) for k in range(1, 6)]
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        together = model(input_ids=step, attention_mask=masks[-1], past_key_values=cache, use_cache=True).logits
        cache = model(**inputs, use_cache=True).past_key_values
        alone = [model(input_ids=step[:, k:k + 1], attention_mask=masks[k], past_key_values=cache,
                       use_cache=True).logits[:, 0] for k in range(5)]
    assert (together - torch.stack(alone, 1)).abs().max().item() <= 1e-5


def test_a_crop_to_an_absolute_length_is_followed_on_the_compressed_layers(models):
    """transformers before 5.2x cropped every layer to one absolute length, which leaves the shorter,
    compressed layers too long: they are cut by the count layer 0 lost. A crop into the prompt is refused."""
    model = models["compressed"]
    inputs = mode_inputs(model)
    step = torch.randint(1, 99, (1, 3), generator=torch.Generator().manual_seed(4))
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1)

    def prefill():
        return model(**inputs, use_cache=True).past_key_values

    def next_token(cache, k):
        return model(input_ids=step[:, k:k + 1], attention_mask=mask[:, :mask.shape[1] - 2 + k],
                     past_key_values=cache).logits

    with torch.no_grad():
        reference = prefill()
        next_token(reference, 0)
        want = next_token(reference, 1)
        cache = prefill()
        model(input_ids=step, attention_mask=mask, past_key_values=cache)  # 3 candidates, 2 of them rejected:
        for layer in cache.layers[:2]:  # an absolute crop cuts only the full-length layers 0 and 1
            layer.crop(-2)
        got = next_token(cache, 1)
        assert [layer.get_seq_length() for layer in cache.layers] == [
            layer.get_seq_length() for layer in reference.layers]
        assert (got - want).abs().max().item() <= 1e-5
        cache.crop(-3)
        with pytest.raises(ValueError, match="cropped to .* entries, into its compressed prompt"):
            next_token(cache, 0)
