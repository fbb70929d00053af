"""``libra-fx families``: every adapted family verified on tiny models, a row with a reason for every
other class, the table in docs/models.md, and the generic hook oracle (against ``tests/oracle.py``, and
catching a deliberately wrong rewrite)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import libra_fx
from libra_fx import families
from libra_fx.conformance import table
from libra_fx.conformance.check import CASES, check_refusal, verify
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.oracle import HookOracle
from libra_fx.conformance.tiny import fixture_for, tiny_model
from libra_fx.families.base import _FeatureCount
from libra_fx.testing import tiny_llava, tiny_llava_inputs
from families import build, make_inputs
from harness import assert_runs_uncompressed_with_a_warning
from oracle import oracle_logits

BY_TYPE = {fixture_for(f).model_types[0]: f for f in families.FAMILIES}


# The suite runs a lighter matrix than ``libra-fx families`` (which runs every check on every row), for its
# time budget; each row still gets the oracle (libra, fastv; one and two stages; the left-padded B=2; but
# see FEWER_CASES) and the identity check:
INDUCTOR = ("cohere2_vision",)  # Inductor costs about a minute per family on 2 cores: a sample here;
# LLaVA, LLaVA-NeXT and Qwen2-VL have Inductor tests of their own
WITH_B1 = ("llava",)  # B=1 is one more trace: a causal family here (B=1 of LLaVA-NeXT, Qwen2-VL:
# tests/test_models.py)
TWINS = {"llava_next_video": "llava_next", "video_llava": "llava", "vipllava": "llava", "smolvlm": "idefics3",
         "qwen3_vl": "qwen3_vl_moe", "aya_vision": "cohere2_vision", "janus": "deepseek_vl"}  # same adapter and
# decoder kind as the row named, which the suite runs: the command verifies them
VIDEO_TESTED_ELSEWHERE = ("qwen2_vl", "qwen2_5_vl")  # their videos: tests/test_models.py (and the command)
GENERATE_TESTED_ELSEWHERE = ("llava_next", "qwen2_vl", "qwen2_5_vl")  # libra, two stages, the left-padded B=2
# against their own oracles: tests/test_models.py
SUITE_CASES = [case for case in CASES if case[2] == 2]
FEWER_CASES = {"qwen3_5": [("libra", (1, 2), 2)]}  # about 13 s a case (the fake propagation of its chunked
# scans): the two-stage libra only, whose prompt of two chunks compresses into one
NOT_IN_SUITE = {"qwen3_5_moe": "Qwen3.5's adapter and chunked scans with Qwen3-VL-MoE's routing rows, both verified "
                               "here; `libra-fx families --only qwen3_5_moe` verifies it",
                **{twin: f"{row}'s adapter and decoder kind, verified here; `libra-fx families --only {twin}` verifies it"
                   for twin, row in TWINS.items()}}


@pytest.mark.parametrize("model_type", list(BY_TYPE))
def test_family_is_verified(model_type):
    """What ``libra-fx families`` runs on the row, in the suite's lighter matrix (above): oracle prefill
    (eager ≤ 1e-5, Inductor ≤ 1e-4), generate, identity."""
    family = BY_TYPE[model_type]
    assert set(WITH_B1) | set(TWINS) | set(TWINS.values()) | set(INDUCTOR) | set(FEWER_CASES) | set(NOT_IN_SUITE) \
        | set(GENERATE_TESTED_ELSEWHERE) <= set(BY_TYPE)
    if model_type in NOT_IN_SUITE:
        pytest.skip(NOT_IN_SUITE[model_type])
    modalities = ("image",) if model_type in VIDEO_TESTED_ELSEWHERE else None
    cases = CASES if model_type in WITH_B1 else FEWER_CASES.get(model_type, SUITE_CASES)
    result = verify(family, modalities, inductor=model_type in INDUCTOR, cases=cases,
                    generate=model_type not in GENERATE_TESTED_ELSEWHERE)
    assert result.passed, "\n".join(f"{c.name}: {c.detail}" for c in result.failures())


def test_every_class_has_a_row_and_every_unverified_row_a_reason():
    rows = table.rows(verify=False)
    assert [r.model_type for r in rows] == list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    adapted = [r for r in rows if r.status == "adapter (not run)"]
    assert len(adapted) >= 15
    assert {r.model_type for r in adapted} == {t for f in families.FAMILIES for t in fixture_for(f).model_types}
    assert all(r.status in ("refused", "not built") and r.note for r in rows if r not in adapted)
    by_type = {r.model_type: r for r in rows}
    assert "cross-attention" in by_type["mllama"].note and "encoder-decoder" in by_type["florence2"].note
    assert by_type["ovis2"].status == "refused" and "visual vocabulary" in by_type["ovis2"].note


def test_models_table_is_the_commands_output():
    """``libra-fx families --markdown`` (docs/models.md), each adapted row as its verification test above asserts it."""
    rows = [table.Row(r.model_type, r.class_name, "verified" if r.status == "adapter (not run)" else r.status, r.note)
            for r in table.rows(verify=False)]
    page = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    documented = re.search(r"^transformers (\S+): \d+ image-text-to-text classes", page, re.M)[1]
    if documented != transformers.__version__:
        pytest.skip(f"docs/models.md's table is for transformers {documented}, this is {transformers.__version__}")
    assert table.markdown(rows) in page, "regenerate the table in docs/models.md: libra-fx families --markdown"


def test_sliding_window_families_are_verified_past_the_window():
    """Aya Vision and Cohere2-Vision: the check's prefill prompts are longer than the tiny decoder's
    window, and the stage layers (1, 2) are sliding-window layers, so their verification covers §5's rule."""
    for model_type in ("aya_vision", "cohere2_vision"):
        model = tiny_model(BY_TYPE[model_type])
        text = model.config.text_config
        assert text.layer_types[1] == text.layer_types[2] == "sliding_attention"
        prompt = example_inputs(model, BY_TYPE[model_type], 1, text_len=text.sliding_window)["input_ids"]
        assert prompt.shape[1] > text.sliding_window


def test_decode_past_a_sliding_window_on_a_compressed_cache_is_refused():
    """Its layers keep their last window − 1 entries by count: past the window, decode is not exact yet."""
    family = BY_TYPE["cohere2_vision"]
    model = tiny_model(family)
    inputs = example_inputs(model, family, 1, text_len=model.config.text_config.sliding_window)
    torch._dynamo.reset()
    compiled = libra_fx.compile(model, compiler="eager", method="fastv", ratio=0.5, layers=(1,))
    with pytest.raises(libra_fx.UnsupportedGraph, match="decoding past the window is not supported yet"):
        with torch.no_grad():
            compiled.generate(**inputs, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method, layers", [("libra", (1, 2)), ("fastv", (1,)), ("turbo", (1, 2))])
def test_hook_oracle_agrees_with_the_per_family_oracle(family, method, layers):
    if family == "llava":
        model = tiny_llava()
        inputs = tiny_llava_inputs(model, batch=2, pad=(2, 0))
    else:
        model = build(family)
        inputs = make_inputs(family, model, batch=2, pad=(2, 0))
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    want, _ = oracle_logits(model, inputs["input_ids"], inputs.get("pixel_values"), inputs["attention_mask"],
                            method=method, ratio=0.5, layers=layers, **extra)
    with torch.no_grad(), HookOracle(model, method, 0.5, layers):
        got = model(**inputs).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hook_oracle_catches_a_wrong_rewrite(monkeypatch):
    """A rewrite that gives the kept tokens the first T' positions' RoPE (re-packed, not gathered)."""
    import libra_fx.passes.rewire_sequence as rewire

    def repacked(x, source, dim, batch_dim=0):
        return x.narrow(dim, 0, source.shape[-1])

    monkeypatch.setattr(rewire, "gather_tokens", repacked)
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    with torch.no_grad(), HookOracle(model, "fastv", 0.5, (1,)):
        want = model(**inputs).logits
    torch._dynamo.reset()
    compiled = libra_fx.compile(tiny_llava(), compiler="eager", method="fastv", ratio=0.5, layers=(1,))
    with torch.no_grad():
        got = compiled(**inputs).logits
    assert got.shape == want.shape and (got - want).abs().max() > 1e-3  # a correct rewrite: ~2e-7


def test_feature_count_stand_in_keeps_the_count_through_views():
    """Video-LLaVA flattens the features and PerceptionLM asks ``size()`` before the count check."""
    count = _FeatureCount(torch.zeros(2, 5, 8))
    assert count.flatten(0, 1).numel() == 80 and count.size()[:-1].numel() == -1
    assert count.shape[0] * count.shape[1] == -1 and count.dtype == torch.float32


def test_a_forward_that_never_reaches_the_backend_warns_once():
    """Dynamo not running the frame (here: disabled; in practice a skipped frame or its recompile limit)
    used to leave the model silently uncompressed."""
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    torch._dynamo.reset()
    compiled = libra_fx.compile(model, compiler="eager", layers=(1,))
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        with pytest.warns(libra_fx.LibraFallbackWarning, match="ran uncompressed: Dynamo ran the forward without"):
            compiled(**inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
            compiled(**inputs)  # once per model


def test_a_forward_that_never_reaches_the_backend_raises_under_strict():
    model = tiny_llava()
    torch._dynamo.reset()
    compiled = libra_fx.compile(model, compiler="eager", layers=(1,), strict=True)
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        with pytest.raises(libra_fx.UnsupportedGraph, match="ran uncompressed"):
            compiled(**tiny_llava_inputs(model))


def test_a_video_of_a_family_without_video_spans_is_refused_by_name():
    family = BY_TYPE["llava_next_video"]
    model = tiny_model(family)
    inputs = example_inputs(model, family, 1, token="video")
    assert_runs_uncompressed_with_a_warning(model, inputs, re.escape("LLaVA-NeXT-Video videos are not compressed yet"),
                                            method="fastv", ratio=0.5, layers=(1,))


@pytest.mark.parametrize("model_type", ["mllama", "idefics2", "got_ocr2", "ovis2"])
def test_a_refused_class_warns_and_equals_the_plain_model(model_type):
    """Rows without an adapter: compiled uncompressed, named in the warning, output that of a plain torch.compile
    (``libra-fx families`` runs this on every refused row that builds)."""
    check = check_refusal(model_type, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    assert check.passed and check.detail == "warns; equals the plain compiled model", check.detail
