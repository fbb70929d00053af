"""Sanity tests of the independent reference oracle (tests/oracle.py) itself."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import oracle  # noqa: E402
from oracle import oracle_logits  # noqa: E402

from libra_fx.testing import tiny_llava, tiny_llava_inputs  # noqa: E402

METHODS = ["libra", "fastv", "turbo", "merge", "pti", "igm_pos", "igm_neg"]
WITH_COMP = {"libra", "igm_neg"}


@pytest.fixture(scope="module")
def models():
    return {attn: tiny_llava(attn=attn) for attn in ("sdpa", "eager")}


# ---------------------------------------------------------------- (a) ratio 0 == plain model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kw", [dict(batch=1), dict(batch=3, pad=(0, 2, 3))], ids=["B1", "padded3"])
def test_ratio_zero_reproduces_model(models, attn, kw):
    model = models[attn]
    inputs = tiny_llava_inputs(model, **kw)
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1].float()
    for extra in (dict(ratio=0.0), dict(ratio=0.5, layers=())):
        got, counts = oracle_logits(model, **inputs, **extra)
        assert counts == []
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_ratio_zero_mha_and_no_image():
    model = tiny_llava(attn="eager", num_kv_heads=4, seed=3)
    inputs = tiny_llava_inputs(model, batch=2, pad=(1,))
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
    got, _ = oracle_logits(model, **inputs, ratio=0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # no visual token: compression leaves the sequence exactly as it is
    text_only = tiny_llava_inputs(model, batch=1, with_image=False)
    with torch.no_grad():
        ref = model(**text_only).logits[:, -1]
    got, counts = oracle_logits(model, **text_only, method="libra", ratio=0.5, layers=(1,))
    assert counts == [0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_compression_after_last_layer_does_not_touch_last_text_token(models):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
    for method in METHODS:
        got, counts = oracle_logits(model, **inputs, method=method, ratio=0.5, layers=(3,))
        assert counts == ([19] if method in WITH_COMP else [18])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_compression_changes_logits(models):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=1)
    ref, _ = oracle_logits(model, **inputs, ratio=0)
    outs = {}
    for method in METHODS:
        outs[method], _ = oracle_logits(model, **inputs, method=method, ratio=0.5, layers=(1,))
        assert torch.isfinite(outs[method]).all()
        assert not torch.allclose(outs[method], ref, atol=1e-6), method
    # pti + average differs from libra (IGM) on the same targets
    assert not torch.allclose(outs["libra"], outs["pti"], atol=1e-6)


# ---------------------------------------------------------------- (b) token counts


@pytest.mark.parametrize("method", METHODS)
def test_counts_two_stages(models, method):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=1)
    _, counts = oracle_logits(model, **inputs, method=method, ratio=0.5, layers=(1, 2))
    expected = [19, 11] if method in WITH_COMP else [18, 9]
    assert counts == expected


def test_counts_rounding_and_clamp(models):
    model = models["eager"]
    inputs = tiny_llava_inputs(model, batch=1)
    # 36 -> 18 -> 9 -> round_half_up(4.5) = 5, plus 1, 2, 3 compensation tokens
    _, counts = oracle_logits(model, **inputs, method="libra", ratio=0.5, layers=(0, 1, 2))
    assert counts == [19, 11, 8]
    _, counts = oracle_logits(model, **inputs, method="fastv", ratio=0.5, layers=(0, 1, 2))
    assert counts == [18, 9, 5]
    # 36 * 0.75 = 27 ; 27 * 0.75 = 20.25 -> 20
    _, counts = oracle_logits(model, **inputs, method="libra", ratio=0.25, layers=(0, 2))
    assert counts == [28, 22]
    # Nt = N: libra keeps every token and still adds a compensation token
    _, counts = oracle_logits(model, **inputs, method="libra", ratio=0.01, layers=(1,))
    assert counts == [37]


def test_num_targets():
    assert oracle.num_targets(36, 0.5) == 18
    assert oracle.num_targets(9, 0.5) == 5  # round half up
    assert oracle.num_targets(36, 0.25) == 27
    assert oracle.num_targets(27, 0.25) == 20
    assert oracle.num_targets(3, 0.99) == 1  # clamp to >= 1
    assert oracle.num_targets(1, 0.9) == 1
    assert oracle.num_targets(5, 0.0) == 5


def test_positions_after_stages(models):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=1)  # prefix 5, image 5..40, suffix 41..47
    trace = {}
    oracle._run(model, **inputs, method="libra", ratio=0.5, layers=(0, 1), trace=trace)
    pos1, pos2 = (p[0] for p in trace["positions"])
    kinds1, kinds2 = (k[0] for k in trace["kinds"])
    assert pos1[:5] == [0, 1, 2, 3, 4] and pos1[-7:] == list(range(41, 48))
    vis1 = [p for p, k in zip(pos1, kinds1) if k == "vis"]
    assert len(vis1) == 18 and all(5 <= p <= 40 for p in vis1) and vis1 == sorted(vis1)
    # PTI: one target per interval of two span ranks
    assert all(5 + 2 * i <= p <= 5 + 2 * i + 1 for i, p in enumerate(vis1))
    assert [p for p, k in zip(pos1, kinds1) if k == "comp"] == [40]
    vis2 = [p for p, k in zip(pos2, kinds2) if k == "vis"]
    assert len(vis2) == 9 and set(vis2) <= set(vis1)
    # layout: merged targets, then the carried compensation token, then the new one
    assert kinds2[5:5 + 11] == ["vis"] * 9 + ["comp", "comp"]
    assert pos2[5 + 9:5 + 11] == [40, 40]


# ---------------------------------------------------------------- importance == eager attention row


@pytest.mark.parametrize("kw", [dict(batch=1), dict(batch=3, pad=(0, 2, 3))], ids=["B1", "padded3"])
def test_alpha_is_eager_last_attention_row(models, kw):
    model = models["eager"]
    assert_alpha_is_eager_last_attention_row(model, tiny_llava_inputs(model, **kw))


def assert_alpha_is_eager_last_attention_row(model, inputs, layers=(0, 2)):
    """The oracle's α at each layer equals the head mean of the eager model's last attention row."""
    with torch.no_grad():
        attns = model(**inputs, output_attentions=True).attentions
    for layer in layers:
        trace = {}
        oracle._run(model, **inputs, method="libra", ratio=0.5, layers=(layer,), trace=trace)
        alpha = torch.tensor(trace["alpha"][0])
        ref = attns[layer][:, :, -1, :].float().mean(dim=1)
        torch.testing.assert_close(alpha, ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- (c) batch == alone


@pytest.mark.parametrize("method", ["libra", "turbo", "igm_neg"])
def test_batch_equals_alone(models, method):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=2, seed=1)
    batched, counts = oracle_logits(model, **inputs, method=method, ratio=0.5, layers=(0, 2))
    for b in range(2):
        alone = {k: v[b:b + 1] for k, v in inputs.items()}
        single, c = oracle_logits(model, **alone, method=method, ratio=0.5, layers=(0, 2))
        if b == 0:
            assert c == counts
        torch.testing.assert_close(batched[b:b + 1], single, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- token maths by hand


def test_pti_and_topk_ties():
    assert oracle.select_pti([0.1, 0.3, 0.2, 0.2], 2) == [1, 2]
    # N=5, Nt=2: intervals ranks 0..1 and 2..4
    assert oracle.select_pti([0.0, 0.0, 0.1, 0.5, 0.5], 2) == [0, 3]
    assert oracle.select_pti([1.0, 2.0, 3.0], 3) == [0, 1, 2]
    assert oracle.select_topk_alpha([1.0, 2.0, 2.0, 1.0], 2) == [1, 2]
    assert oracle.select_topk_alpha([3.0, 1.0, 3.0, 3.0], 2) == [0, 2]


def test_igm_by_hand():
    H = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    alpha = [0.1, 0.3, 0.2, 0.2]
    eta = sum(alpha) / 4
    merged, comp = oracle.compress_igm(alpha, H, [1, 2], tau=0.7, eta=eta)
    w0 = math.exp(0.1 / eta) / (math.exp(0.1 / eta) + math.exp(0.3 / eta))
    torch.testing.assert_close(merged[0], w0 * H[0] + (1 - w0) * H[1])
    torch.testing.assert_close(merged[1], H[2])
    torch.testing.assert_close(comp, H[3])  # Q = {3}
    # tau = -inf: token 3 joins target 1 (cos 0 > cos -0.995), no compensation
    merged, comp = oracle.compress_igm(alpha, H, [1, 2], tau=-math.inf, eta=eta, make_compensation=False)
    assert comp is None
    torch.testing.assert_close(merged[1], 0.5 * H[2] + 0.5 * H[3])
    # tau = +inf: targets unchanged, compensation over all non-targets {0, 3}
    merged, comp = oracle.compress_igm(alpha, H, [1, 2], tau=math.inf, eta=eta)
    torch.testing.assert_close(merged[0], H[1])
    w = torch.softmax(torch.tensor([0.1 / eta, 0.2 / eta]), 0)
    torch.testing.assert_close(comp, w[0] * H[0] + w[1] * H[3])
    # Q empty -> all non-targets; Nt = N -> all span tokens
    merged, comp = oracle.compress_igm([0.5, 0.5], torch.tensor([[1.0, 0.0], [1.0, 0.0]]), [0], 0.7, 0.5)
    torch.testing.assert_close(comp, torch.tensor([1.0, 0.0]))
    merged, comp = oracle.compress_igm([0.2, 0.6], H[:2], [0, 1], 0.7, 0.4)
    w = torch.softmax(torch.tensor([0.5, 1.5]), 0)
    torch.testing.assert_close(comp, w[0] * H[0] + w[1] * H[1])


def test_average_and_turbo_by_hand():
    H = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    merged = oracle.compress_average(H, [1, 2])
    torch.testing.assert_close(merged[0], (H[0] + H[1]) / 2)
    torch.testing.assert_close(merged[1], (H[2] + H[3]) / 2)
    # turbo: tokens 0 and 1 are near duplicates (r ~ 1), tokens 2, 3 are distinct (r ~ 0.1 / 0)
    assert oracle.select_topk_informativity([0.25, 0.25, 0.25, 0.25], H, 2) == [2, 3]
    assert oracle.select_topk_informativity([0.1, 0.7, 0.1, 0.1], H, 1) == [1]
