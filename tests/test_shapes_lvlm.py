"""The shapes-VQA task, its trainer, and the shipped checkpoint as a compression benchmark."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import libra_fx
from libra_fx import shapes_task as st

N_HELDOUT = 256  # small and fast; benchmarks/fidelity.py uses 1024


def test_heldout_split_is_fixed_by_seed_and_well_formed():
    a, b = st.heldout(64), st.heldout(64)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["input_ids"].shape == (64, st.PROMPT_LEN)
    assert (a["input_ids"] == st.IMAGE_TOKEN_ID).sum(1).eq(st.NUM_VISUAL_TOKENS).all()
    assert set(a["answer"].tolist()) <= set(st.ANSWER_IDS.tolist())
    assert not torch.equal(st.heldout(64, seed=1)["input_ids"], a["input_ids"])
    for scene in a["scenes"]:  # (colour, shape) pairs are unique, so every reference is unambiguous
        assert len({(o.colour, o.shape) for o in scene}) == len(scene)


def test_training_smoke(tmp_path):
    """A few steps of the training script on a tiny model; the checkpoint reloads."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from train_shapes_lvlm import main

    result = main(["--out", str(tmp_path), "--steps", "3", "--images", "2", "--layers", "2", "--hidden", "32",
                   "--eval-n", "8", "--eval-every", "3", "--warmup", "1", "--no-dependence", "--quiet"])
    assert result["steps"] == 3 and torch.isfinite(torch.tensor(result["curve"][-1]["loss"]))
    assert {"config.json", "model.safetensors", "training.json"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "training.json").read_text())["heldout_accuracy"] >= 0
    model = st.load_shapes_lvlm(tmp_path)
    assert model.config.text_config.num_hidden_layers == 2


@pytest.fixture(scope="module")
def shipped():
    model = st.load_shapes_lvlm()
    data = st.heldout(N_HELDOUT)
    return model, data, st.accuracy(model, data)


def test_shipped_checkpoint_is_accurate(shipped):
    model, data, acc = shipped
    assert model.config.text_config.num_hidden_layers == 8
    assert acc >= 0.95, acc


def test_libra_half_ratio_one_stage_keeps_98_percent(shipped):
    model, data, acc = shipped
    torch._dynamo.reset()
    be = libra_fx.backend(0.5, st.DEFAULT_LAYERS, "libra", compiler="eager", strict=True)
    forward = torch.compile(model.forward, backend=be, fullgraph=True)
    compressed = st.accuracy(model, data, forward=forward)
    torch._dynamo.reset()
    assert be.records and all(r.compressed for r in be.records)
    assert compressed >= 0.98 * acc, (compressed, acc)


def test_visual_tokens_matter_after_the_default_compression_layer(shipped):
    """The validity check: a model that no longer needs the picture after the compression layer
    cannot rank decoder-side methods. Dropping every visual token there must cost ≥ 30 points."""
    model, data, acc = shipped
    with st.drop_visual_after(model, st.DEFAULT_LAYERS[0]):
        dropped = st.accuracy(model, data)
    assert acc - dropped >= 0.30, (acc, dropped)
    with st.drop_visual_after(model, model.config.text_config.num_hidden_layers - 1):  # after the last: no-op
        assert st.accuracy(model, data) == acc
