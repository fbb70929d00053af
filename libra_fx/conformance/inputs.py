"""Example prompts for a tiny model of any adapted family: ``[pad] text <image> text`` per sample.

The family's fixture says what its vision inputs look like (:meth:`FamilyFixture.vision_inputs`) and
how its placeholders are wrapped (:meth:`FamilyFixture.wrap_placeholders`). How many placeholders
an image needs is asked of the model itself: its ``get_placeholder_mask`` is handed the features,
whose size is read there, before the prompt is built.
"""

from __future__ import annotations

import torch

from libra_fx.conformance.tiny import PAD_TOKEN_ID, fixture_for
from libra_fx.families.base import placeholder_owner

TEXT_IDS = (3, 100)  # text token ids are drawn from this range; special ids start at 100
# a static prompt length equal to one of the tiny models' widths could not be told apart from it in a
# graph (the passes then refuse to rewrite): the example prompts avoid these lengths
WIDTHS = frozenset({8, 16, 32, 64, 128, 256})


def left_padded(pad: tuple[int, ...], batch: int, prefix: int, text, body) -> torch.Tensor:
    """``[B, T]`` ids: per sample ``pad[b]`` pad tokens, ``text(prefix + …)`` so that every row has one
    length, then the tensors of ``body()`` (called once per sample, in sample order)."""
    pad = tuple(pad) + (0,) * (batch - len(pad))
    width = max(pad)
    return torch.stack([torch.cat([torch.full((p,), PAD_TOKEN_ID), text(prefix + width - p), *body()]) for p in pad])


class _Counted(Exception):
    def __init__(self, features):
        self.features = features


def placeholders_per_sample(model, family, vision: dict, token: str) -> int:
    """How many ``token`` placeholders one sample of ``vision`` (inputs of batch 1) fills, counted by
    intercepting the model's own ``get_placeholder_mask`` (or Idefics3's ``inputs_merger``), which is
    handed the features (``token``: ``"image"`` or ``"video"``; ``family``: the adapter, whose shims are
    taken off meanwhile)."""
    base = placeholder_owner(model)
    inner = getattr(model, "model", model)
    name, base = ("get_placeholder_mask", base) if hasattr(base, "get_placeholder_mask") else ("inputs_merger", inner)

    def count(input_ids, inputs_embeds, *features, **named):
        named = dict(zip((f"{token}_features", "image_hidden_states", "video_features"), features), **named)
        found = named.get(f"{token}_features", named.get("image_hidden_states"))
        if found is not None:
            raise _Counted(found)
        return getattr(type(base), name)(base, input_ids, inputs_embeds, **named)

    ids = torch.full((1, 1), model.config.text_config.vocab_size - 1)
    with family.without_shims(model):
        setattr(base, name, count)
        try:
            with torch.no_grad():
                model(input_ids=ids, **vision)
        except _Counted as found:
            return found.features.numel() // model.config.text_config.hidden_size
        finally:
            delattr(base, name)
    raise ValueError(f"the model's forward never asked for a {token} placeholder mask")


def example_inputs(model, family, batch: int = 1, pad: tuple[int, ...] = (), seed: int = 0,
                   token: str = "image", prefix: int = 5, suffix: int = 7, text_len: int | None = None) -> dict:
    """A batch of ``batch`` prompts of one length, one image (or video) each, sample ``b`` left-padded
    by ``pad[b]`` (its text before the image that much shorter). ``family``: an adapter, or its fixture.

    ``text_len`` lengthens the text after the image (a prompt longer than a sliding window)."""
    fixture = fixture_for(family)
    gen = torch.Generator().manual_seed(seed)
    vision = fixture.vision_inputs(model, batch, gen, token)
    n = placeholders_per_sample(model, fixture.adapter,
                                fixture.vision_inputs(model, 1, torch.Generator().manual_seed(seed), token), token)
    token_id = getattr(model.config, f"{token}_token_id")
    pads = tuple(pad) + (0,) * (batch - len(pad))
    suffix = text_len or suffix
    while prefix + max(pads) + len(fixture.wrap_placeholders(model.config, [token_id] * n)) + suffix in WIDTHS:
        suffix += 1
    body = torch.tensor(fixture.wrap_placeholders(model.config, [token_id] * n))

    def text(k):
        return torch.randint(*TEXT_IDS, (k,), generator=gen)

    ids = left_padded(pads, batch, prefix, text, lambda: [body, text(suffix)])
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD_TOKEN_ID).long(), **vision)
    return fixture.complete_inputs(model.config, inputs)
