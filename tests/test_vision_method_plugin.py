"""A vision-side method is one class plus its registry entry (issue 27): toy methods defined here, registered
for the test and removed after, run through ``libra_fx.compile`` on the tiny LLaVA, against the plain
model run on ``inputs_embeds`` built by hand from the kept visual tokens only.

- ``toy_even``: every other patch, at the projector's input (features only, fixed count);
- ``toy_norm``: the ``Nt`` projected features of largest norm, at the projector's output, kept in
  descending norm (its own ``order`` option);
- ``toy_above_mean``: the projected features whose norm is above the image's mean (adaptive: its
  padding slots are masked in every decoder attention);
- ``toy_cls``: the [CLS] token's feature (which LLaVA drops before the projector), then every fourth
  patch, as VisionZip keeps the [CLS] among its dominant tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import libra_fx
from libra_fx.methods import (Signal, VisionMethod, VisionOptions, VisionSlots, get_method, register_vision_method,
                              unregister_vision_method)
from libra_fx.methods.selectors import num_targets
from libra_fx.methods.vision import kept_layout, pruned_slots
from libra_fx.runtime import compat
from libra_fx.testing import tiny_llava, tiny_llava_inputs

RATIO = 0.75


# ------------------------------------------------------------------------------------------------
# The toy methods: each is all a new method needs (its registry entry is the fixture's register call)
# ------------------------------------------------------------------------------------------------


class KeepEven(VisionMethod):
    name = "toy_even"
    summary = "toy: every other patch, at the projector's input"

    def capacity(self, n, ratio):
        return (n + 1) // 2

    def slots(self, inputs, ratio, slots, options):
        s, n, _ = inputs.features.shape
        keep = (torch.arange(n, device=inputs.features.device) % 2 == 0).expand(s, n)
        return pruned_slots(inputs.features, keep, slots)


@dataclass(frozen=True)
class NormOptions(VisionOptions):
    ORDERS: ClassVar[tuple[str, ...]] = ("spatial", "norm")


class TopNorm(VisionMethod):
    name = "toy_norm"
    summary = "toy: the Nt projected features of largest norm"
    options = NormOptions
    signal = Signal(features="projector_output")

    def capacity(self, n, ratio):
        return num_targets(n, ratio)

    def slots(self, inputs, ratio, slots, options):
        norm = inputs.features.float().norm(dim=-1)
        keep = torch.zeros_like(norm, dtype=torch.bool).scatter(1, norm.topk(slots, dim=-1).indices, True)
        by_norm = torch.sort(norm, dim=-1, descending=True, stable=True).indices
        key = None if options.order == "spatial" else by_norm.argsort(-1)  # each patch's place by norm
        return pruned_slots(inputs.features, keep, slots, key)


class AboveMean(VisionMethod):
    name = "toy_above_mean"
    summary = "toy: the projected features whose norm is above the image's mean"
    signal = Signal(features="projector_output")
    adaptive = True
    typical_kept = 0.5

    def capacity(self, n, ratio):
        return n

    def slots(self, inputs, ratio, slots, options):
        norm = inputs.features.float().norm(dim=-1)
        return pruned_slots(inputs.features, norm > norm.mean(-1, keepdim=True), slots)


class ClsAndEveryFourth(VisionMethod):
    name = "toy_cls"
    summary = "toy: the [CLS] feature, then every fourth patch"
    signal = Signal(cls_token=True, cls_feature=True)

    def capacity(self, n, ratio):
        return 1 + (n + 3) // 4

    def slots(self, inputs, ratio, slots, options):
        s, n, _ = inputs.features.shape
        patches = pruned_slots(inputs.features, (torch.arange(n) % 4 == 0).expand(s, n), slots - 1)
        first = torch.ones(s, 1, dtype=torch.bool)
        return VisionSlots(torch.cat([inputs.cls[:, None], patches.features], 1),  # a slot of no patch: rank N − 1
                           torch.cat([torch.full((s, 1), n - 1), patches.ranks], 1),
                           torch.cat([~first, patches.kept], 1), torch.cat([first, patches.valid], 1))


TOYS = (KeepEven(), TopNorm(), AboveMean(), ClsAndEveryFourth())


@pytest.fixture
def toys():
    for toy in TOYS:
        register_vision_method(toy)
    try:
        yield
    finally:
        for toy in TOYS:
            unregister_vision_method(toy.name)
    assert not any(toy.name in libra_fx.METHODS for toy in TOYS)


# ------------------------------------------------------------------------------------------------
# By hand: the plain model on the kept visual tokens only
# ------------------------------------------------------------------------------------------------


def projected(model, pixel_values):
    """The projected features of each image's patches ``[S, N, D]`` and of its [CLS] token ``[S, D]``."""
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values, output_hidden_states=True)
        x = model.model.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer])
        return x[:, 1:], x[:, 0]


CLS = -1  # the [CLS] token among the kept "patches" of kept_by_hand


def kept_by_hand(name, feats, order="spatial"):
    """Each image's kept patches (``CLS``: its [CLS] token), in slot order, computed without the library."""
    out = []
    for f in feats:
        n, norm = f.shape[0], [float(v) for v in f.float().norm(dim=-1)]
        if name == "toy_even":
            out.append(list(range(0, n, 2)))
        elif name == "toy_cls":
            out.append([CLS] + list(range(0, n, 4)))
        elif name == "toy_norm":
            k = max(1, min(n, int(n * (1 - RATIO) + 0.5)))
            best = sorted(range(n), key=lambda j: (-norm[j], j))[:k]
            out.append(best if order == "norm" else sorted(best))
        else:
            out.append([j for j in range(n) if norm[j] > sum(norm) / n])
    return out


def logits_by_hand(model, inputs, name, positions, order="spatial"):
    """Per sample: the plain model's logits on ``[text, kept visual tokens, text]`` (``[T', V]``)."""
    ids, image = inputs["input_ids"], model.config.image_token_id
    feats, cls = projected(model, inputs["pixel_values"])
    kept = kept_by_hand(name, feats, order)
    embed = model.get_input_embeddings()
    logits = []
    for b in range(ids.shape[0]):
        where = (ids[b] == image).nonzero().flatten()
        start, n = int(where[0]), len(where)
        keep = torch.tensor(kept[b])
        visual = torch.where((keep == CLS)[:, None], cls[b], feats[b, keep.clamp_min(0)])
        at = torch.where(keep == CLS, n - 1, keep)  # the [CLS], a slot of no patch, takes the span's last position
        rows = torch.cat([embed(ids[b, :start]), visual, embed(ids[b, start + n:])])
        original = torch.cat([torch.arange(start), start + at, torch.arange(start + n, ids.shape[1])])
        pos = original if positions == "original" else torch.arange(len(original))
        with torch.no_grad():
            logits.append(model(inputs_embeds=rows[None], position_ids=pos[None]).logits[0])
    return logits, kept


def compiled(method, **options):
    """A fresh tiny LLaVA (the plain model's weights) compiled with ``method``, and its backend."""
    compat.reset_dynamo()
    cm = libra_fx.compile(tiny_llava(seed=0), method=libra_fx.method(method, **options), ratio=RATIO,
                          compiler="eager", strict=True)
    return cm, cm.libra_backend


@pytest.fixture(scope="module")
def model():
    """The plain model (never compiled): the reference runs."""
    return tiny_llava(seed=0)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_registration_is_public_and_reversible(toys):
    assert {"toy_even", "toy_norm", "toy_above_mean", "toy_cls"} <= set(libra_fx.VISION_METHODS)
    assert "toy_even" not in libra_fx.DECODER_METHODS and libra_fx.methods.is_vision_method("toy_norm")
    assert libra_fx.method("toy_norm", order="norm").items() == (("order", "norm"), ("positions", "original"))
    with pytest.raises(ValueError, match="order must be one of 'spatial', got 'attention'"):
        libra_fx.method("toy_even", order="attention")
    with pytest.raises(ValueError, match="already registered"):
        register_vision_method(KeepEven())
    with pytest.raises(ValueError, match="already registered"):
        register_vision_method(type("Shadow", (KeepEven,), {"name": "prumerge"})())
    with pytest.raises(ValueError, match="not a registered vision method"):
        unregister_vision_method("prumerge")
    cfg = libra_fx.CompressionConfig.build(method="toy_even", layers=(1, 2))
    assert cfg.layers == () and cfg.active and get_method("toy_even").side == "vision"


@pytest.mark.parametrize("name, options, case", [
    ("toy_even", dict(positions="original"), dict(batch=1)),
    ("toy_even", dict(positions="repacked"), dict(batch=2, seed=1)),
    ("toy_norm", dict(order="norm", positions="original"), dict(batch=2, seed=2)),
    ("toy_above_mean", dict(positions="repacked"), dict(batch=2, seed=3)),
    ("toy_above_mean", dict(positions="original"), dict(batch=1, seed=4)),
    ("toy_cls", dict(positions="original"), dict(batch=2, seed=5)),
], ids=["even-original", "even-repacked-B2", "norm-order-B2", "above-mean-repacked-B2", "above-mean-original",
        "cls-feature-B2"])
def test_compiled_toy_equals_the_plain_model_on_the_kept_tokens(toys, model, name, options, case):
    inputs = tiny_llava_inputs(model, **case)
    with torch.no_grad():
        plain = model(**inputs).logits
    cm, be = compiled(name, **options)
    assert all(torch.equal(p, q) for p, q in zip(cm.parameters(), model.parameters()))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        out = cm(**inputs).logits
    assert be.last.compressed, be.last
    want, kept = logits_by_hand(model, inputs, name, options["positions"], options.get("order", "spatial"))

    n, t = 36, inputs["input_ids"].shape[1]
    slots = get_method(name).capacity(n, RATIO)
    (vision,) = [p for p in be.last.passes if p.name == "insert_vision_stage"]
    assert {k: vision.counts[k] for k in ("images", "patches_per_image", "slots_per_image")} == dict(
        images=case["batch"], patches_per_image=n, slots_per_image=slots)
    assert out.shape[1] == t - n + slots  # the decoder sees the slots, not the patches
    valid = be.side_outputs["valid"]
    assert valid.sum(-1).tolist() == [t - n + len(k) for k in kept]  # every kept token, padding slots aside
    for b, logits in enumerate(want):
        got = out[b][valid[b]]
        assert got.shape == logits.shape
        assert (got - logits).abs().max().item() <= 1e-5
        assert (out[b, -1] - plain[b, -1]).abs().max().item() > 1e-3  # compression changed the output
    if name == "toy_above_mean" and case["batch"] == 2:
        assert len(set(map(len, kept))) > 1, kept  # the batch's images keep different counts


def test_kept_layout_orders_and_bounds():
    keep = torch.tensor([[True, False, True, True], [False, False, False, True]])
    ranks, kept = kept_layout(keep, 3)
    assert ranks.tolist() == [[0, 2, 3], [3, 3, 3]] and kept.tolist() == [[True] * 3, [True, False, False]]
    ranks, _ = kept_layout(keep, 3, key=torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3]]))
    assert ranks[0].tolist() == [2, 3, 0]  # ascending key
    with pytest.raises(RuntimeError, match="kept more patches than its 2 slots"):
        kept_layout(keep, 2)
