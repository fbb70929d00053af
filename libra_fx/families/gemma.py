"""The Gemma families: masks that are not causal inside the prompt, built from ``token_type_ids``.

- Gemma3: each image's tokens attend to each other in both directions (``token_type_ids = 1`` on
  the placeholders); half of the tiny decoder's layers are sliding-window layers.
- PaliGemma: a prefix-LM mask: the prefix (``token_type_ids = 0``: the image and the prompt) is
  bidirectional, the suffix (``1``) causal.

The mask is built from ``token_type_ids`` before the decoder, so the passes re-index it by source
like any other (contract §5): a kept token keeps its original row and column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_fx.families.base import FamilyAdapter, FamilyFixture

GEMMA3 = FamilyAdapter(
    "Gemma3", ("Gemma3ForConditionalGeneration", "Gemma3Model"), ("modeling_gemma3",),
    span_notes=("one span per image; its tokens attend to each other in both directions (token_type_ids), "
                "kept tokens keep their rows and columns (contract §5); sliding-window layers count original "
                "positions"),
)

PALIGEMMA = FamilyAdapter(
    "PaliGemma", ("PaliGemmaForConditionalGeneration", "PaliGemmaModel"), ("modeling_paligemma",),
    span_notes=("one span per image; prefix-LM mask: the prefix (image and prompt, token_type_ids 0) attends in "
                "both directions, the suffix causally; kept tokens keep their rows and columns (contract §5)"),
)


@dataclass(frozen=True)
class Gemma3Fixture(FamilyFixture):
    """An image is ``<start_of_image> placeholders <end_of_image>``, its placeholders of type 1."""

    def wrap_placeholders(self, config, placeholders):
        return [config.boi_token_index, *placeholders, config.eoi_token_index]

    def complete_inputs(self, config, inputs):
        return dict(inputs, token_type_ids=(inputs["input_ids"] == config.image_token_id).long())

    def adapt_tiny(self, model):
        """The projector's weight starts at zero (every image token the same vector: merges decided by
        rounding); drawn like the other weights instead."""
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            weight.normal_(std=model.config.text_config.initializer_range)


@dataclass(frozen=True)
class PaliGemmaFixture(FamilyFixture):
    """The example prompts' prefix is everything up to ``suffix`` tokens before the end (type 0), so
    the prefix holds the image and text on both sides of it; the suffix (type 1) is causal."""

    suffix: int = 3

    def complete_inputs(self, config, inputs):
        types = torch.zeros_like(inputs["input_ids"])
        types[:, -self.suffix:] = 1
        return dict(inputs, token_type_ids=types)


GEMMA3_FIXTURE = Gemma3Fixture(
    GEMMA3, ("gemma3", "shieldgemma2"),
    tiny=dict(mm_tokens_per_image=16, text_config=dict(layer_types=["sliding_attention", "full_attention"] * 2)),
)
PALIGEMMA_FIXTURE = PaliGemmaFixture(PALIGEMMA, ("paligemma",), tiny=dict(projection_dim=64, hidden_size=64))
