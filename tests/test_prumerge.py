"""The vision-side methods (``prumerge``, ``prumerge_plus``, ``prumerge_fixed``) against the independent
eager oracle (``tests/oracle_prumerge.py``): forward logits (Inductor and the eager FX graph),
``generate()``, batches whose images keep different counts, fallbacks, settings, FLOPs and the
kept-token map."""

from __future__ import annotations

import pytest
import torch

import libra_fx
from libra_fx.reports import flops
from libra_fx.passes.fx_utils import value
from libra_fx.runtime import compat
from libra_fx.testing import tiny_llava, tiny_llava_inputs
from oracle_prumerge import image_slots, prumerge_oracle_generate, prumerge_oracle_logits

pytestmark = pytest.mark.filterwarnings("ignore:libra_fx.*bare torch.compile")

VISION = ["prumerge", "prumerge_plus", "prumerge_fixed"]
RATIO = 0.75  # read by prumerge_fixed only: 64 patches → 16
TINY = dict(image_size=64, num_layers=2)  # 64 patches per image: the 32-neighbour merge leaves some out
NEW_TOKENS = 4
REFERENCE = dict(order="attention", positions="repacked")  # the reference's layout
OURS = dict(order="spatial", positions="original")


@pytest.fixture(scope="module")
def models():
    return {"sdpa": tiny_llava(seed=0, **TINY), "eager": tiny_llava(seed=1, attn="eager", **TINY)}


def check(model, inputs, logits, be, method, layout, tol):
    assert be.last.compressed, be.last
    want, counts = prumerge_oracle_logits(model, **inputs, method=method, ratio=RATIO, **layout)
    diff = (logits[:, -1].float() - want).abs().max().item()
    assert diff <= tol, diff
    valid = be.side_outputs["valid"]  # non-padding slots per sample: its text + its images' tokens
    text = (inputs["input_ids"] != model.config.image_token_id).sum(1).tolist()
    k = len(counts) // len(text)
    assert valid.sum(-1).tolist() == [text[b] + sum(counts[b * k:(b + 1) * k]) for b in range(len(text))]
    return counts, diff


@pytest.mark.parametrize("method", VISION)
def test_inductor_matches_oracle(models, run_backend, method):
    """Acceptance: a left-padded batch whose images keep different counts, through Inductor, ≤ 1e-4."""
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=2, pad=(0, 3), seed=0)  # the two images keep different counts
    logits, be = run_backend(model, inputs, method=libra_fx.method(method, **REFERENCE), ratio=RATIO, strict=True)
    counts, _ = check(model, inputs, logits, be, method, REFERENCE, 1e-4)
    if method != "prumerge_fixed":
        assert len(set(counts)) > 1, counts  # the batch really is ragged


@pytest.mark.parametrize("method, attn, case, layout", [
    ("prumerge", "eager", dict(batch=3, pad=(0, 2, 5)), OURS),
    ("prumerge_plus", "sdpa", dict(batch=2, images=2), dict(order="attention", positions="original")),
    ("prumerge_fixed", "eager", dict(batch=2, pad=(0, 1)), dict(order="spatial", positions="repacked")),
], ids=["prumerge-eager-padded", "plus-two-images", "fixed-eager-padded"])
def test_fx_graph_matches_oracle(models, run_backend, method, attn, case, layout):
    model = models[attn]
    inputs = tiny_llava_inputs(model, **case)
    logits, be = run_backend(model, inputs, method=libra_fx.method(method, **layout), ratio=RATIO, strict=True,
                             compiler="eager")
    check(model, inputs, logits, be, method, layout, 1e-5)


def test_symbolic_length_matches_oracle(models, run_backend):
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=2, prefix=9)
    logits, be = run_backend(model, inputs, dynamic=True, method=libra_fx.method("prumerge", **REFERENCE),
                             strict=True, compiler="eager")
    ids = next(n for n in be.last.after.graph.find_nodes(op="placeholder") if "input_ids" in n.name)
    assert isinstance(value(ids).shape[1], torch.SymInt)  # one graph for every prompt length
    check(model, inputs, logits, be, "prumerge", REFERENCE, 1e-5)


def generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, -NEW_TOKENS:], torch.stack(out.logits, 1).float()


@pytest.mark.parametrize("method, case, layout", [
    ("prumerge", dict(batch=1, seed=4), REFERENCE),
    ("prumerge", dict(batch=2, seed=3), OURS),  # kept per image: 4 and 2 (plus the extra token)
    ("prumerge_plus", dict(batch=2, pad=(0, 3), seed=0), REFERENCE),  # different counts
    ("prumerge_fixed", dict(batch=2, seed=4), REFERENCE),
], ids=["prumerge-B1", "prumerge-B2", "plus-B2-left-padded", "fixed-B2"])
def test_generation_matches_oracle(method, case, layout):
    """``generate()`` (transformers runs the tower inside the compiled forward), each sample's kept
    count its own: tokens equal, per-step logits ≤ 1e-4 (re-packed positions continue in decode)."""
    compat.reset_dynamo()
    model = tiny_llava(**TINY)
    model.generation_config.eos_token_id = None
    model = libra_fx.compile(model, method=libra_fx.method(method, **layout), ratio=RATIO, compiler="eager",
                             strict=True)
    inputs = tiny_llava_inputs(model, **case)
    tokens, logits = generate(model, inputs)
    assert [r.compressed for r in model.libra_backend.records][0]
    want_tokens, want_logits, counts = prumerge_oracle_generate(model, **inputs, method=method, ratio=RATIO,
                                                                max_new_tokens=NEW_TOKENS, **layout)
    assert torch.equal(tokens, want_tokens)
    assert (logits - torch.stack(want_logits, 1)).abs().max().item() <= 1e-4
    if case["batch"] == 2 and method != "prumerge_fixed":
        assert len(set(counts)) > 1, counts


def test_settings():
    cfg = libra_fx.CompressionConfig.build(method="prumerge", layers=(7, 15, 23), ratio=0.0)
    assert cfg.layers == () and cfg.active  # layers ignored, ratio unused by the adaptive methods
    assert not libra_fx.CompressionConfig.build(method="prumerge_fixed", ratio=0.0).active
    with pytest.raises(ValueError, match="prumerge_plus"):
        libra_fx.backend(method="prumerge+")  # the message lists the valid names
    libra_fx.compile(tiny_llava(**TINY), method="prumerge")  # default layers (7, 15, 23) do not matter
    assert set(libra_fx.VISION_METHODS) == set(VISION)


def test_features_from_outside_the_graph_fall_back(models):
    """Pre-encoded features (``mm_encoder_outputs``: no vision tower in the graph) cannot be compressed."""
    compat.reset_dynamo()
    model = models["sdpa"]
    inputs = tiny_llava_inputs(model, batch=1)
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
        be = libra_fx.backend(method="prumerge", compiler="eager")
        with pytest.warns(libra_fx.LibraFallbackWarning, match="vision tower inside the compiled graph"):
            out = torch.compile(model.forward, backend=be, fullgraph=True)(**inputs, mm_encoder_outputs={"image": encoded})
        torch.testing.assert_close(out.logits, model(**inputs, mm_encoder_outputs={"image": encoded}).logits)
    assert not be.last.compressed


def test_flops_report_and_token_map(models):
    shape = flops.preset("llava-1.5-7b")
    assert flops.visual_tokens_per_layer(shape, "prumerge") == [32] * 32  # the paper's average
    assert flops.visual_tokens_per_layer(shape, "prumerge_plus") == [144] * 32
    assert flops.visual_tokens_per_layer(shape, "prumerge_fixed", 0.75) == [145] * 32  # 144 patches + the extra token
    text = flops.report(shape, "prumerge", kept=40)
    assert "576 → 40 visual tokens before layer 0 (measured)" in text and "145 slots" in text
    assert f"{flops.total_flops(shape, method='prumerge', kept=40) / 1e12:.2f} T of 3.82 T" in text
    with pytest.raises(ValueError, match="kept"):
        flops.report(shape, "prumerge", kept=0)

    from libra_fx.reports.token_map import render, token_map

    model = models["sdpa"]
    inputs = tiny_llava_inputs(model)
    tmap = token_map(model, inputs, method="prumerge_plus")
    ((kept, _),) = image_slots(model, inputs["pixel_values"], "prumerge_plus", RATIO)
    assert len(tmap.labels) == 1 and int(tmap.targets[0].sum()) == len(kept)
    assert (tmap.labels[0][tmap.targets[0]] >= 0).all()
    assert render(tmap, inputs["pixel_values"][0]).size == (2 * 64 * 4 + 6, 64 * 4)  # (width, height)
