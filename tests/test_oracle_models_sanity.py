"""Sanity tests of the oracle (tests/oracle.py) on Qwen2-VL, Qwen2.5-VL (M-RoPE), the Qwen2-VL video
input and LLaVA-NeXT: with no stage it is the plain model (forward and greedy generate), and with
stages it does what contract §1 and §5 say about spans and M-RoPE positions."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import oracle
from families import FAMILIES, build, make_inputs, qwen_two_images, sample
from oracle import oracle_generate, oracle_logits
from test_oracle_sanity import assert_alpha_is_eager_last_attention_row

N_NEW = 5
BATCHES = {"B1": dict(batch=1), "B2-left-padded": dict(batch=2, pad=(0, 3))}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, attn="sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = build(family, attn=attn)
        return cache[family, attn]

    return get


def hf_generate(model, inputs, n=N_NEW):
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=None, max_new_tokens=n, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    return out.sequences[:, inputs["input_ids"].shape[1]:], [x.float() for x in out.logits]


# ---------------------------------------------------------------- ratio 0 == the plain model


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_stage_reproduces_forward(models, family, batch):
    model = models(family)
    inputs = make_inputs(family, model, **BATCHES[batch])
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1].float()
    for extra in (dict(ratio=0.0), dict(ratio=0.5, layers=())):
        got, counts = oracle_logits(model, **inputs, **extra)
        assert counts == []
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_stage_reproduces_generate(models, family, batch):
    model = models(family)
    inputs = make_inputs(family, model, **BATCHES[batch])
    ref_tokens, ref_logits = hf_generate(model, inputs)
    tokens, steps = oracle_generate(model, **inputs, ratio=0.0, max_new_tokens=N_NEW)
    assert torch.equal(tokens, ref_tokens)
    for got, ref in zip(steps, ref_logits, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_no_stage_two_qwen_images_of_different_sizes(models):
    model = models("qwen2_vl")
    inputs = qwen_two_images(model)
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1].float()
    got, _ = oracle_logits(model, **inputs, ratio=0.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    ref_tokens, ref_logits = hf_generate(model, inputs, n=3)
    tokens, steps = oracle_generate(model, **inputs, ratio=0.0, max_new_tokens=3)
    assert torch.equal(tokens, ref_tokens)
    for got, ref in zip(steps, ref_logits, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_after_the_last_layer_changes_nothing(models, family):
    """Compressing after the last decoder layer cannot touch the last text token."""
    model = models(family)
    inputs = make_inputs(family, model, batch=2, pad=(0, 2))
    ref, _ = oracle_logits(model, **inputs, ratio=0.0)
    got, counts = oracle_logits(model, **inputs, method="libra", ratio=0.5, layers=(3,))
    assert len(counts) == 1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # ... and an earlier stage does change the logits (the acceptance tests are not vacuous)
    got, _ = oracle_logits(model, **inputs, method="libra", ratio=0.5, layers=(1,))
    assert (got - ref).abs().max().item() > 1e-3


# ---------------------------------------------------------------- spans


@pytest.mark.parametrize("family, n_visual", [("qwen2_vl", 16), ("qwen2_vl_video", 32), ("llava_next", 72)])
def test_every_placeholder_is_a_visual_token_of_one_span(models, family, n_visual):
    """One span per image / video: LLaVA-NeXT's image_newline rows are part of the image's span,
    a Qwen2-VL video (4 frames) is one span."""
    model = models(family)
    inputs = make_inputs(family, model)
    ids = inputs["input_ids"][0]
    placeholder = model.config.video_token_id if family == "qwen2_vl_video" else model.config.image_token_id
    assert int((ids == placeholder).sum()) == n_visual
    _, counts = oracle_logits(model, **inputs, method="libra", ratio=0.5, layers=(1,))
    assert counts == [oracle.num_targets(n_visual, 0.5) + 1]
    _, counts = oracle_logits(model, **inputs, method="fastv", ratio=0.5, layers=(0, 2))
    assert counts == [n_visual // 2, oracle.num_targets(n_visual // 2, 0.5)]


def test_two_qwen_images_are_two_spans(models):
    model = models("qwen2_vl")
    inputs = qwen_two_images(model)  # 16 + 8 visual tokens
    _, counts = oracle_logits(model, **inputs, method="libra", ratio=0.5, layers=(1,))
    assert counts == [(8 + 1) + (4 + 1)]


# ---------------------------------------------------------------- M-RoPE positions (contract §5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen2_vl_video"])
def test_mrope_positions_after_stages(models, family):
    model = models(family)
    inputs = make_inputs(family, model, batch=2, pad=(0, 2))
    trace = {}
    oracle._run(model, **inputs, method="libra", ratio=0.5, layers=(0, 1), trace=trace)
    ref, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs.get("image_grid_thw"),
                                        video_grid_thw=inputs.get("video_grid_thw"),
                                        attention_mask=inputs["attention_mask"])
    for b in range(2):
        ids = inputs["input_ids"][b]
        visual = ids == (model.config.video_token_id if family == "qwen2_vl_video" else model.config.image_token_id)
        triples = [tuple(int(x) for x in ref[:, b, t]) for t in range(ids.shape[0])]
        assert trace["input_positions"][b] == triples
        span = [triples[t] for t in range(ids.shape[0]) if visual[t]]
        text = [triples[t] for t in range(ids.shape[0]) if not visual[t]]
        n = len(span)
        for stage, (pos, kinds) in enumerate(zip(trace["positions"], trace["kinds"])):
            pos, kinds = pos[b], kinds[b]
            assert all(isinstance(p, tuple) and len(p) == 3 for p in pos)
            assert [p for p, k in zip(pos, kinds) if k == "text"] == text  # text keeps its triples
            kept = [p for p, k in zip(pos, kinds) if k == "vis"]
            comp = [p for p, k in zip(pos, kinds) if k == "comp"]
            assert comp == [span[-1]] * (stage + 1)  # the span's last input triple, all 3 components
            if stage == 0:  # PTI: the target of interval i is one of its two span ranks, triple kept
                assert len(kept) == n // 2
                assert all(p in (span[2 * i], span[2 * i + 1]) for i, p in enumerate(kept))
            else:
                assert len(kept) == n // 4 and all(p in span for p in kept)


def test_mrope_decode_positions_continue_from_the_uncompressed_prompt(models):
    """A left-padded batch generates, sample by sample, what each prompt generates alone (so
    padding and decode positions follow generate's rule: last prompt triple + 1 + t)."""
    family = "qwen2_5_vl"
    model = models(family)
    pad = (0, 3)
    inputs = make_inputs(family, model, batch=2, pad=pad)
    tokens, steps = oracle_generate(model, **inputs, method="libra", ratio=0.5, layers=(0, 2), max_new_tokens=N_NEW)
    for b, p in enumerate(pad):
        alone = sample(inputs, b, p)
        t, s = oracle_generate(model, **alone, method="libra", ratio=0.5, layers=(0, 2), max_new_tokens=N_NEW)
        assert torch.equal(tokens[b:b + 1], t)
        for got, ref in zip(steps, s):
            torch.testing.assert_close(got[b:b + 1], ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- importance == the model's attention row


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_alpha_is_the_eager_last_attention_row(models, family):
    model = models(family, "eager")
    assert_alpha_is_eager_last_attention_row(model, make_inputs(family, model, batch=2, pad=(0, 2)))


def test_oracle_refuses_unknown_inputs(models):
    model = models("qwen2_vl")
    inputs = make_inputs("qwen2_vl", model)
    with pytest.raises(TypeError, match="does not take"):
        oracle_logits(model, **inputs, image_grid=inputs["image_grid_thw"])
