"""Images with text markers between their placeholders (contract §1): Mistral3's row breaks, Idefics3's and
SmolVLM's tile markers. A span is one image, not one run of placeholders; the markers are text.
(``test_conformance.py`` verifies the three families; this file shows the checks there can fail.)"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import libra_fx
from libra_fx import families
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.oracle import HookOracle
from libra_fx.conformance.tiny import fixture_for, tiny_model
from libra_fx.families.markers import IDEFICS3, MARKERS, MISTRAL3
from harness import assert_runs_uncompressed_with_a_warning

BY_TYPE = {fixture_for(f).model_types[0]: f for f in families.FAMILIES}


def _runs(row: torch.Tensor) -> int:
    return int((row[1:] & ~row[:-1]).sum() + row[0])


def _two_images(model, family) -> dict:
    """One sample: text, image, text, image, text (the example prompt's image twice)."""
    one = example_inputs(model, family, 1)
    ids = one["input_ids"][0]
    placeholder = (ids == model.config.image_token_id).nonzero().flatten()
    first, last = placeholder[0].item(), placeholder[-1].item()
    start = first - (2 if family is IDEFICS3 else 0)  # Idefics3's image begins with its first tile's markers
    end = last + 2  # the image's last marker: <fake_token_around_image>, or Pixtral's [IMG_END]
    image = ids[start:end]
    ids = torch.cat([ids[:start], image, torch.tensor([5, 6, 7]), image, ids[end:]])[None]
    pixels = torch.cat([one["pixel_values"]] * 2, dim=1 if family is IDEFICS3 else 0)
    extra = {"image_sizes": torch.cat([one["image_sizes"]] * 2)} if "image_sizes" in one else {}
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, **extra)


@pytest.mark.parametrize("model_type", ["mistral3", "idefics3"])
def test_a_span_is_an_image_not_a_run_of_placeholders(model_type):
    """The compiled model equals the hook oracle told each image's placeholder count, and differs from
    one that takes every run of placeholders for an image (what the verification would pass otherwise)."""
    family = BY_TYPE[model_type]
    model = tiny_model(family)
    inputs = _two_images(model, family) if family is MISTRAL3 else example_inputs(model, family, 2, pad=(0, 3))
    ids = inputs["input_ids"]
    placeholders = ids == model.config.image_token_id
    images = 2 if family is MISTRAL3 else 1
    assert _runs(placeholders[0]) >= 3 * images  # rows, or tiles and the global view
    per_image = [int(placeholders[0].sum()) // images] * images
    with torch.no_grad(), HookOracle(model, "libra", 0.5, (1, 2), images=per_image):
        want = model(**inputs).logits[:, -1]
    with torch.no_grad(), HookOracle(model, "libra", 0.5, (1, 2)):
        by_runs = model(**inputs).logits[:, -1]
    torch._dynamo.reset()
    compiled = libra_fx.compile(tiny_model(family), compiler="eager", method="libra", ratio=0.5, layers=(1, 2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        got = compiled(**inputs).logits[:, -1]
    assert (got - want).abs().max() <= 1e-5
    assert (got - by_runs).abs().max() > 1e-3


def test_markers_keep_their_places_in_the_prompt():
    """The example prompts interleave the markers as the processors do."""
    model = tiny_model(MISTRAL3)
    ids = example_inputs(model, MISTRAL3, 1)["input_ids"][0].tolist()
    body = ids[ids.index(model.config.image_token_id):]
    assert body[4] == MARKERS["break_"] and body[14] == MARKERS["end"]  # 3 rows of 4 ([IMG_BREAK] after rows 1, 2)
    model = tiny_model(IDEFICS3)
    ids = example_inputs(model, IDEFICS3, 1)["input_ids"][0].tolist()
    start = ids.index(MARKERS["around"])
    assert ids[start + 1] == MARKERS["first_tile"] and ids[start + 2] == model.config.image_token_id


def test_an_idefics3_sample_with_two_images_runs_uncompressed_with_a_warning():
    """Its tiles reach the decoder as one piece per sample: the images cannot be told apart in the graph."""
    model = tiny_model(IDEFICS3)
    assert_runs_uncompressed_with_a_warning(model, _two_images(model, IDEFICS3),
                                            re.escape("sample 0 holds 2 images; Idefics3 hands"), layers=(1,))
    one = example_inputs(model, IDEFICS3, 1)
    assert IDEFICS3.refused_inputs(model, one) is None
    assert "inputs_embeds" in IDEFICS3.refused_inputs(model, dict(one, input_ids=None))


def test_idefics3_under_a_bare_backend_is_refused_by_name():
    model = tiny_model(IDEFICS3)
    inputs = example_inputs(model, IDEFICS3, 1)
    torch._dynamo.reset()
    with torch.no_grad():
        want = torch.compile(model.forward, backend="eager")(**inputs).logits
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend=libra_fx.backend(method="libra", ratio=0.5, layers=(1,),
                                                                    compiler="eager"))
    with pytest.warns(libra_fx.LibraFallbackWarning, match="Idefics3: the images of each sample are counted from "
                                                           "input_ids before the call"):
        with torch.no_grad():
            got = forward(**inputs).logits
    assert torch.equal(got, want)
