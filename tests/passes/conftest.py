"""Fixtures of the per-pass tests: the Dynamo FX graphs of the tiny models, each captured once per
session (nothing compiled, no Inductor).

A test never edits a captured graph: it builds a fresh context on a clone (``passkit.make_ctx``),
runs the passes before the one it tests (``passkit.run_until``), then calls that pass alone. The
helpers live in ``passkit.py`` beside this file, so that the tests can import them (``from conftest
import …`` would be ambiguous with ``tests/conftest.py``).

=====================  ==========================================================================
``llava_graph``        tiny LLaVA (4 layers, SDPA), B=2, sample 1 left-padded by 3: T=51, one image
                       of 36 tokens per sample, a ``[B, 1, T, T]`` padding mask
``llava_two_images``   tiny LLaVA, B=2, two images per prompt (two spans of 36), no mask (causal)
``llava_eager_graph``  tiny LLaVA with ``attn="eager"``, B=1
``llava_text_graph``   tiny LLaVA, text only (no masked_scatter)
``qwen_graph``         tiny Qwen2-VL (M-RoPE), B=2 left-padded, as generate() runs it (features computed
                       before forward); ``qwen_graphs[1]``: the same after a new image size (recompiled)
``qwen_dynamic_graph`` tiny Qwen2-VL, B=1, recompiled for a second image size: symbolic image size and
                       sequence length
``next_ragged_graph``  tiny LLaVA-NeXT, a batch of two images of 72 and 36 visual tokens
``lfm2_graphs``        tiny LFM2-VL (convolution layers 0 and 3: ``T + 2`` inside), B=2 left-padded:
                       ``static`` and ``symbolic`` (the length kept symbolic, as libra_fx.compile does)
``qwen3_vl_graph``     tiny Qwen3-VL (DeepStack after layer 0), B=1, as generate() runs it
=====================  ==========================================================================
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
for path in (HERE, os.path.dirname(HERE)):  # passkit here; families.py in tests/
    if path not in sys.path:
        sys.path.insert(0, path)

from passkit import capture_graph, make_ctx, qwen_inputs, run_until, visual_graphs  # noqa: E402

from libra_fx import testing  # noqa: E402
from libra_fx.families import QWEN2_VL  # noqa: E402
from libra_fx.runtime import compat  # noqa: E402

__all__ = ["make_ctx", "run_until"]  # the helpers, re-exported (the tests import them from passkit)


@pytest.fixture(scope="session")
def llava_model():
    return testing.tiny_llava()


@pytest.fixture(scope="session")
def llava_graph(llava_model):
    return capture_graph(llava_model, testing.tiny_llava_inputs(llava_model, batch=2, pad=(0, 3)))


@pytest.fixture(scope="session")
def llava_two_images(llava_model):
    return capture_graph(llava_model, testing.tiny_llava_inputs(llava_model, batch=2, images=2))


@pytest.fixture(scope="session")
def llava_text_graph(llava_model):
    return capture_graph(llava_model, testing.tiny_llava_inputs(llava_model, with_image=False))


@pytest.fixture(scope="session")
def llava_eager_graph():
    model = testing.tiny_llava(attn="eager")
    return capture_graph(model, testing.tiny_llava_inputs(model))


@pytest.fixture(scope="session")
def qwen_model():
    model = testing.tiny_qwen2_vl("2")
    QWEN2_VL.install_shims(model)  # as libra_fx.compile does: a new image size gives a symbolic size
    return model


@pytest.fixture(scope="session")
def qwen_graphs(qwen_model):
    """B=2 (sample 1 left-padded): an 8×8 patch grid per image (16 tokens), then 8×12 (24 tokens)
    through the same compiled forward: a static graph, then the recompiled one with symbolic sizes."""
    graphs = visual_graphs(qwen_model, qwen_inputs(qwen_model, batch=2, pad=(0, 2)),
                           qwen_inputs(qwen_model, batch=2, pad=(0, 2), grid=(8, 12), seed=1),
                           fullgraph=compat.takes_encoder_outputs(qwen_model))
    assert len(graphs) == 2
    return graphs


@pytest.fixture(scope="session")
def qwen_graph(qwen_graphs):
    return qwen_graphs[0]


@pytest.fixture(scope="session")
def qwen_dynamic_graph(qwen_model):
    """B=1: two image sizes in a row; the recompiled graph has a symbolic image size and length."""
    static, dynamic = visual_graphs(qwen_model, qwen_inputs(qwen_model, batch=1),
                                    qwen_inputs(qwen_model, batch=1, grid=(8, 12), seed=1),
                                    fullgraph=compat.takes_encoder_outputs(qwen_model))
    return dynamic


@pytest.fixture(scope="session")
def next_ragged_graph():
    from families import ragged_llava_next

    model = testing.tiny_llava_next()
    batch, _ = ragged_llava_next(model)  # 72 and 36 visual tokens
    return capture_graph(model, batch, fullgraph=False)


@pytest.fixture(scope="session")
def lfm2_graphs():
    from libra_fx.conformance.check import tiny_model
    from libra_fx.conformance.inputs import example_inputs
    from libra_fx.families import LFM2_VL
    from libra_fx.runtime.compat import dynamic_values
    from libra_fx.runtime.dynamic_shapes import symbolic_length

    model = tiny_model(LFM2_VL)
    graphs = {}
    for kind in ("static", "symbolic"):
        inputs = example_inputs(model, LFM2_VL, 2, pad=(0, 3))  # fresh tensors: the marks stay on them
        length = symbolic_length((), inputs, LFM2_VL.token_inputs) if kind == "symbolic" else None
        with dynamic_values(length):
            graphs[kind] = capture_graph(model, inputs, fullgraph=False)
    return graphs


@pytest.fixture(scope="session")
def qwen3_vl_graph():
    import torch

    from libra_fx.conformance.check import tiny_model
    from libra_fx.conformance.inputs import example_inputs
    from libra_fx.families import QWEN3_VL

    model = tiny_model(QWEN3_VL)
    QWEN3_VL.install_shims(model)  # the DeepStack injections without a graph break, as libra_fx.compile does
    inputs = QWEN3_VL.prepare_forward(model, example_inputs(model, QWEN3_VL, 1))
    if not compat.takes_encoder_outputs(model):  # transformers 5.17: the tower inside forward (graph breaks)
        return capture_graph(model, inputs, fullgraph=False)
    with torch.no_grad():
        features = model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                  return_dict=True)
    return capture_graph(model, dict(inputs, mm_encoder_outputs={"image": features}))
