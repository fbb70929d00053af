"""LLaVA-1.5 and LLaVA-NeXT: the generic shape (CLIP-like tower, 1-D positions, causal decoder)."""

from __future__ import annotations

from libra_fx.families.base import FamilyAdapter

LLAVA = FamilyAdapter(
    "LLaVA-1.5", ("LlavaForConditionalGeneration", "LlavaModel"), ("modeling_llava",),
    span_notes="one span per image; the [CLS] token is dropped before the projector",
    vision_methods=True,
)

LLAVA_NEXT = FamilyAdapter(
    "LLaVA-NeXT", ("LlavaNextForConditionalGeneration", "LlavaNextModel"), ("modeling_llava_next",),
    span_notes=("one span per image: its base tile, its any-resolution tiles and the image_newline token after "
                "each row of the tiled feature map (the model scatters them together, so they are visual tokens); "
                "images of different sizes give samples different span lengths (empty slots)"),
)
