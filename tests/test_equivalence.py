"""The backend's logits equal the independent eager oracle (tests/oracle.py), contract §1–§6."""

from __future__ import annotations

import pytest
import torch

import libra_fx
from libra_fx import DECODER_METHODS
from libra_fx.testing import tiny_llava, tiny_llava_inputs
from harness import ReusedTrace
from oracle import oracle_logits

MODELS = {
    ("sdpa", "gqa"): dict(attn="sdpa", num_kv_heads=2),
    ("sdpa", "mha"): dict(attn="sdpa", num_kv_heads=4),
    ("eager", "gqa"): dict(attn="eager", num_kv_heads=2),
    ("eager", "mha"): dict(attn="eager", num_kv_heads=4),
}
SCHEDULES = {"one stage": (1,), "two stages": (0, 2)}


@pytest.fixture(scope="module")
def models():
    return {key: tiny_llava(seed=i, **kw) for i, (key, kw) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def traces(models):
    """One Dynamo trace per model for the whole product (every case has inputs of one shape)."""
    return {key: ReusedTrace(model) for key, model in models.items()}


def assert_matches_oracle(logits, model, inputs, tol, **cfg):
    want, counts = oracle_logits(model, **inputs, **cfg)
    got = logits[:, -1].float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= tol, (got - want).abs().max().item()
    return counts


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("ratio", [0.25, 0.75])
@pytest.mark.parametrize("method", list(DECODER_METHODS))
@pytest.mark.parametrize("model_key", list(MODELS), ids="-".join)
def test_rewritten_graph_matches_oracle(models, traces, model_key, method, ratio, schedule):
    model = models[model_key]
    inputs = tiny_llava_inputs(model, batch=2, seed=int(ratio * 100))
    cfg = dict(method=method, ratio=ratio, layers=SCHEDULES[schedule])
    logits, be = traces[model_key](inputs, compiler="eager", **cfg)
    assert be.last.compressed, be.last
    counts = assert_matches_oracle(logits, model, inputs, 1e-5, **cfg)
    n_text = inputs["input_ids"].shape[1] - 36
    assert logits.shape[1] == n_text + counts[-1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_left_padded_batch_matches_oracle(models, run_backend, attn, dynamic):
    model = models[(attn, "gqa")]
    inputs = tiny_llava_inputs(model, batch=3, pad=(0, 2, 5))
    cfg = dict(method="libra", ratio=0.5, layers=(0, 2))
    logits, be = run_backend(model, inputs, dynamic=dynamic, compiler="eager", **cfg)
    assert be.last.compressed, be.last
    assert_matches_oracle(logits, model, inputs, 1e-5, **cfg)


@pytest.mark.parametrize("method", ["libra", "fastv", "turbo"])
def test_symbolic_sequence_length_matches_oracle(models, run_backend, method):
    model = models[("sdpa", "gqa")]
    cfg = dict(method=method, ratio=0.5, layers=(1, 2))
    for prefix in (3, 9):  # two prompt lengths through the same compiled graph
        inputs = tiny_llava_inputs(model, batch=2, prefix=prefix)
        logits, be = run_backend(model, inputs, dynamic=True, compiler="eager", **cfg)
        assert be.last.compressed, be.last
        assert_matches_oracle(logits, model, inputs, 1e-5, **cfg)


@pytest.mark.parametrize(
    "model_key, method, layers, dynamic",
    [
        (("sdpa", "gqa"), "libra", (0, 2), True),
        (("sdpa", "mha"), "turbo", (1,), False),
    ],
    ids=["libra-sdpa-dynamic", "turbo-sdpa-static"],  # fastv's ops (a top-k and gathers) are libra's: eager below
)
def test_inductor_matches_oracle(request, models, run_backend, model_key, method, layers, dynamic):
    if method == "turbo":  # Inductor's default (vectorized) CPU kernels; the suite's other Inductor tests: scalar
        request.getfixturevalue("vectorized_inductor")
    model = models[model_key]
    inputs = tiny_llava_inputs(model, batch=2)
    cfg = dict(method=method, ratio=0.5, layers=layers)
    logits, be = run_backend(model, inputs, dynamic=dynamic, **cfg)
    assert be.last.compressed, be.last
    assert_matches_oracle(logits, model, inputs, 1e-4, **cfg)


def test_bfloat16_matches_oracle(run_backend):
    model = tiny_llava(dtype=torch.bfloat16)
    inputs = tiny_llava_inputs(model, batch=2)
    cfg = dict(method="libra", ratio=0.5, layers=(1,))
    logits, be = run_backend(model, inputs, compiler="eager", **cfg)
    assert be.last.compressed, be.last
    want, _ = oracle_logits(model, **inputs, **cfg)
    assert torch.allclose(logits[:, -1].float(), want, atol=3e-2, rtol=3e-2)


def test_graph_breaks_still_compress(models, run_backend):
    """Without ``fullgraph`` LLaVA's forward breaks at the placeholder check; the decoder's graph
    still holds the visual-token insertion and is compressed, the other graphs are left alone."""
    model = models[("sdpa", "gqa")]
    inputs = tiny_llava_inputs(model, batch=2)
    cfg = dict(method="libra", ratio=0.5, layers=(1,))
    logits, be = run_backend(model, inputs, fullgraph=False, compiler="eager", **cfg)
    assert len(be.records) > 1
    assert sum(r.compressed for r in be.records) == 1
    assert all("no visual tokens" in r.reason for r in be.records if not r.compressed)
    assert_matches_oracle(logits, model, inputs, 1e-5, **cfg)


@pytest.mark.parametrize("method", ["libra", "fastv"])
def test_two_adjacent_images_are_two_spans(method):
    """Issue 14, case 5 (contract §1: a span is one image): two images with no text between them form one
    run of 72 placeholders, compressed as two spans of 36, as the oracle does; one span of 72 differs."""
    cfg = dict(method=method, ratio=0.5, layers=(1,))
    model = tiny_llava()
    inputs = tiny_llava_inputs(model, images=2)
    cut = 5 + 36  # prefix, image 1; then 3 text tokens that go
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :cut], inputs["input_ids"][:, cut + 3:]], 1)
    want, _ = oracle_logits(model, **inputs, **cfg)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model.forward, backend=libra_fx.backend(compiler="eager", **cfg))(**inputs).logits
    if method == "fastv":  # 18 of each 36 kept (libra's compensation token depends on the merges)
        assert got.shape[1] == inputs["input_ids"].shape[1] - 36
    assert (got[:, -1] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["libra", "fastv"])
def test_a_ratio_per_stage_matches_oracle(models, traces, method):
    """``ratio=(0.25, 0.75)`` with ``layers=(0, 2)``: each stage at its own ratio (the oracle's stages too);
    a tuple of one ratio repeated is the scalar ratio, bit for bit."""
    model = models[("sdpa", "gqa")]
    inputs = tiny_llava_inputs(model, batch=2, seed=7)
    cfg = dict(method=method, ratio=(0.25, 0.75), layers=(0, 2))
    logits, be = traces[("sdpa", "gqa")](inputs, compiler="eager", **cfg)
    assert be.last.compressed, be.last
    counts = assert_matches_oracle(logits, model, inputs, 1e-5, **cfg)
    compensation = int(method == "libra")
    assert counts == [27 + compensation, 7 + 2 * compensation]  # 36 → round(36·0.75) = 27 → round(27·0.25) = 7
    assert counts == libra_fx.visual_token_counts(36, (0.25, 0.75), 2, method)
    same, _ = traces[("sdpa", "gqa")](inputs, compiler="eager", method=method, ratio=(0.5, 0.5), layers=(0, 2))
    scalar, _ = traces[("sdpa", "gqa")](inputs, compiler="eager", method=method, ratio=0.5, layers=(0, 2))
    assert torch.equal(same, scalar)
