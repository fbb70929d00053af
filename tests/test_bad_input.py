"""Wrong settings raise a clear ValueError; graphs the passes cannot understand are compiled
uncompressed with a warning (or raise under ``strict=True``); never a silently wrong result."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

import libra_fx
from libra_fx.testing import tiny_llava, tiny_llava_inputs
from oracle import oracle_logits


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\), or a tuple of them"):
        libra_fx.backend(ratio=ratio)


@pytest.mark.parametrize("settings, message", [
    (dict(ratio=(0.5, 0.25), layers=(7,)), r"ratio=\(0.5, 0.25\) gives 2 stage\(s\) but layers=\(7,\) has 1: give one ratio per stage"),
    (dict(ratio=(0.5, 0.0), layers=(1, 2)), r"a per-stage ratio must be a tuple of numbers in \(0, 1\).*leave a layer out"),
    (dict(ratio=(0.5, 1.0), layers=(1, 2)), r"a per-stage ratio must be a tuple of numbers in \(0, 1\)"),
    (dict(ratio=(), layers=()), r"a per-stage ratio must be a tuple of numbers in \(0, 1\)"),
    (dict(ratio=(0.5,), method="prumerge_fixed"), r"prumerge_fixed compresses once, before the decoder: give one ratio"),
])
def test_a_wrong_per_stage_ratio_is_named(settings, message):
    with pytest.raises(ValueError, match=message):
        libra_fx.backend(**settings)


def test_config_or_settings_not_both():
    config = libra_fx.CompressionConfig(ratio=0.25, layers=(1,))
    assert libra_fx.backend(config=config).config is config
    with pytest.raises(ValueError, match="give either config= or ratio, layers, not both"):
        libra_fx.backend(ratio=0.3, layers=(1,), config=config)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'tome'; valid methods: libra, fastv, turbo, merge, pti, igm_pos, igm_neg"):
        libra_fx.backend(method="tome")


@pytest.mark.parametrize("layers", [(-1,), (3, 1), (2, 2), 5, ("7",)])
def test_malformed_layers(layers):
    with pytest.raises(ValueError, match="layers must be"):
        libra_fx.backend(layers=layers)


@pytest.mark.parametrize("kw, message", [(dict(eta=0), "eta must be"), (dict(eta="max"), "eta must be"),
                                         (dict(tau="high"), "tau must be"), (dict(compiler="tvm"), "compiler must be")])
def test_other_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        libra_fx.backend(**kw)


@pytest.mark.parametrize("method, options, message", [
    ("prumerge", dict(positions="shifted"), "positions must be one of 'original', 'repacked', got 'shifted'"),
    ("prumerge_plus", dict(order="descending"), "order must be one of 'spatial', 'attention', got 'descending'"),
    ("prumerge_fixed", dict(order=None), "order must be one of 'spatial', 'attention', got None"),
    ("prumerge", dict(tau=0.5), "method 'prumerge' takes order, positions; got tau"),
])
def test_prumerge_layout_options(method, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        libra_fx.method(method, **options)
    with pytest.raises(ValueError, match="give tau/eta inside"):
        libra_fx.backend(method=libra_fx.method(method), tau=0.5)


def test_layer_index_beyond_the_model_names_the_layer_count(run_backend):
    model = tiny_llava(num_layers=4)
    with pytest.raises(BackendCompilerFailed) as info:
        run_backend(model, tiny_llava_inputs(model), layers=(1, 4), compiler="eager")
    assert isinstance(info.value.inner_exception, ValueError)
    assert "layer index 4 is out of range: the model has 4 decoder layers" in str(info.value)


class NoDecoderLayers(torch.nn.Module):
    """Puts 'visual features' into token embeddings, but has no ``layers.<i>`` decoder."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 16)
        self.proj = torch.nn.Linear(3, 16)
        self.head = torch.nn.Linear(16, 128)

    def forward(self, input_ids, pixel_values):
        embeds = self.embed(input_ids)
        features = self.proj(pixel_values.flatten(2).transpose(1, 2)).reshape(-1, 16)
        embeds = embeds.masked_scatter((input_ids == 100)[..., None], features)
        return self.head(embeds.cumsum(1))


def _no_decoder_inputs():
    ids = torch.randint(0, 99, (1, 12))
    ids[0, 2:6] = 100
    return ids, torch.randn(1, 3, 2, 2)


def test_model_of_no_known_family_falls_back_with_a_warning():
    """The bare backend recognises no family in this graph: refused before any rewrite (the
    no-decoder message itself is checked in tests/passes/test_locate_decoder.py)."""
    model, (ids, pix) = NoDecoderLayers(), _no_decoder_inputs()
    torch._dynamo.reset()
    be = libra_fx.backend(layers=(0,), compiler="eager")
    with pytest.warns(libra_fx.LibraFallbackWarning, match=r"compiling this graph uncompressed: the model \(Embedding, Linear\) belongs to no family libra-fx has an adapter for"):
        out = torch.compile(model, backend=be)(ids, pix)
    assert not be.last.compressed
    torch.testing.assert_close(out, model(ids, pix))


def test_model_of_no_known_family_raises_under_strict():
    model, (ids, pix) = NoDecoderLayers(), _no_decoder_inputs()
    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed, match="belongs to no family"):
        torch.compile(model, backend=libra_fx.backend(layers=(0,), strict=True))(ids, pix)


def test_static_length_equal_to_head_dim_is_not_silently_rewritten(run_backend):
    """With static shapes a literal 64 may be the sequence length or the head dimension: the
    shape check refuses the rewrite instead of guessing; a symbolic length removes the doubt."""
    model = tiny_llava(hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=64)  # head_dim 64
    inputs = tiny_llava_inputs(model, prefix=14, suffix=14)  # T = 14 + 36 + 14 = 64
    cfg = dict(method="libra", ratio=0.5, layers=(1,))
    with pytest.warns(libra_fx.LibraFallbackWarning, match="mark_dynamic"):
        logits, be = run_backend(model, inputs, compiler="eager", **cfg)
    assert not be.last.compressed
    with torch.no_grad():
        torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)

    logits, be = run_backend(model, inputs, dynamic=True, compiler="eager", **cfg)
    assert be.last.compressed
    want, _ = oracle_logits(model, **inputs, **cfg)
    torch.testing.assert_close(logits[:, -1], want, atol=1e-5, rtol=1e-5)


class WhereInsertion(torch.nn.Module):
    """An 'LVLM' that merges visual features with ``torch.where`` instead of ``masked_scatter``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 16)
        self.proj = torch.nn.Linear(3, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 48) for _ in range(2)])

    def forward(self, input_ids, pixel_values):
        embeds = self.embed(input_ids)
        features = self.proj(pixel_values.flatten(2).transpose(1, 2)).mean(1, keepdim=True)
        h = torch.where((input_ids == 100)[..., None], features, embeds)
        for layer in self.layers:
            q, k, v = layer(h)[:, None].chunk(3, dim=-1)
            h = h + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]
        return h


def test_unsupported_visual_insertion_warns():
    model, (ids, pix) = WhereInsertion(), _no_decoder_inputs()
    torch._dynamo.reset()
    be = libra_fx.backend(layers=(0,), compiler="eager")
    with pytest.warns(libra_fx.LibraFallbackWarning, match="no masked_scatter of visual features"):
        out = torch.compile(model, backend=be)(ids, pix)
    torch.testing.assert_close(out, model(ids, pix))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def test_unsupported_architecture_runs_uncompressed_with_a_warning_naming_it():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch._dynamo.reset()
    with pytest.warns(libra_fx.LibraFallbackWarning, match="LlamaForCausalLM is not a supported architecture"):
        model = libra_fx.compile(model, layers=(0,), compiler="eager")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert model.libra_backend.records and not any(r.compressed for r in model.libra_backend.records)
    assert "not a supported architecture" in model.libra_backend.last.reason


def test_unsupported_architecture_raises_under_strict():
    with pytest.raises(libra_fx.UnsupportedGraph, match="LlamaForCausalLM is not a supported architecture"):
        libra_fx.compile(_tiny_llama(), layers=(0,), strict=True)


def test_an_already_compiled_model_is_named_as_such():
    """``libra_fx.compile(torch.compile(model))``: the wrapper, not the model, is what is unsupported."""
    model = tiny_llava()
    with pytest.warns(libra_fx.LibraFallbackWarning, match=r"already wrapped by torch.compile \(LlavaForConditionalGeneration inside\); pass the original model"):
        libra_fx.compile(torch.compile(model), compiler="eager")


@pytest.mark.parametrize("placeholders", [35, 37])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_a_placeholder_count_that_does_not_match_the_features_names_the_mismatch(placeholders, ratio):
    """Inside the compiled graph transformers' feature-count check fails with Dynamo's bare "Runtime
    assertion failed for expression u0 >= 1"; libra_fx.compile gives the model's own message."""
    from libra_fx.testing import IMAGE_TOKEN_ID

    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    ids = inputs["input_ids"]
    first = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0, 0])
    if placeholders < 36:
        ids = ids.clone().index_fill_(1, torch.tensor([first]), 5)
    else:
        ids = torch.cat([ids[:, :first], torch.tensor([[IMAGE_TOKEN_ID]]), ids[:, first:]], dim=1)
    torch._dynamo.reset()
    compiled = libra_fx.compile(model, compiler="eager", ratio=ratio, layers=(1,))
    with pytest.raises(ValueError, match=f"libra_fx: Image features and image tokens do not match, tokens: {placeholders}"):
        with torch.no_grad():
            compiled(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_pixel_values_passed_again_on_a_second_turn_names_the_mismatch():
    """Turn 2 of a conversation continues the returned cache with new text only; passing the image again
    gives transformers' own message, not Dynamo's bare assertion (issue 14, case 7)."""
    model = libra_fx.compile(tiny_llava(), compiler="eager", ratio=0.5, layers=(1,))
    inputs = tiny_llava_inputs(model)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], 1)
        with pytest.raises(ValueError, match="libra_fx: Image features and image tokens do not match, tokens: 0"):
            model.generate(input_ids=ids, pixel_values=inputs["pixel_values"], past_key_values=first.past_key_values,
                           max_new_tokens=2)


def _with_an_empty_sample(model):
    inputs = tiny_llava_inputs(model, batch=2)
    mask = torch.ones_like(inputs["input_ids"])
    mask[1] = 0
    return dict(inputs, attention_mask=mask)


@pytest.mark.parametrize("ratio", [0.001, 0.5])
def test_a_sample_that_is_all_padding_gives_the_uncompressed_result(ratio):
    """Issue 14, case 6: an all-zero attention_mask row used to crash (``index -1``). Under SDPA its fully
    masked rows attend to nothing, compressed or not: the bare backend compresses, and that sample's
    text positions equal the plain model's."""
    plain = tiny_llava()
    inputs = _with_an_empty_sample(plain)
    with torch.no_grad():
        want = plain(**inputs).logits
        got = torch.compile(tiny_llava().forward, backend=libra_fx.backend(
            method="fastv", ratio=ratio, layers=(1,), compiler="eager"))(**inputs).logits
    suffix = 7  # the text after the image (tiny_llava_inputs)
    assert torch.equal(got[1, -suffix:], want[1, -suffix:])
    assert (got.shape[1] < want.shape[1]) == (ratio == 0.5)


def test_a_sample_that_is_all_padding_under_eager_attention_runs_uncompressed_with_a_warning():
    """Eager attention averages the values of a fully masked row, which compression would change."""
    plain = tiny_llava(attn="eager")
    inputs = _with_an_empty_sample(plain)
    model = libra_fx.compile(tiny_llava(attn="eager"), compiler="eager", method="fastv", ratio=0.5, layers=(1,))
    with torch.no_grad():
        want = plain(**inputs).logits
        with pytest.warns(libra_fx.LibraFallbackWarning, match=r"sample\(s\) \[1\] of this batch are all padding"):
            got = model(**inputs).logits
    assert torch.equal(got, want)
