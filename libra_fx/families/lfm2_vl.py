"""LFM2-VL: a SigLIP2 (NaFlex) tower and a hybrid decoder, short-convolution blocks beside attention layers.

A convolution block pads its input to ``T + k − 1`` positions inside; after a stage it convolves the
shorter sequence, and its cache keeps the last ``k − 1`` tokens of it (contract §9). Stage layers
must be attention layers (the generic :meth:`FamilyAdapter.check_stage_layers`, from ``layer_types``);
the convolution lengths are sizes derived from the sequence length, so the length is kept symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_fx.families.base import FamilyAdapter, FamilyFixture, _pixels

LFM2_VL = FamilyAdapter(
    "LFM2-VL", ("Lfm2VlForConditionalGeneration", "Lfm2VlModel"), ("modeling_lfm2_vl",),
    span_notes=("one span per image piece of the tower (a tiled image: one per tile and one for its thumbnail); "
                "convolution layers (not stage layers) convolve the compressed sequence"),
    symbolic_length=True,
)


@dataclass(frozen=True)
class Lfm2VlFixture(FamilyFixture):
    """One image is ``grid`` patches of the NaFlex tower (flattened, with its spatial shape and patch mask)."""

    grid: tuple[int, int] = (8, 8)

    def vision_inputs(self, model, batch, gen, token="image"):
        vision = model.config.vision_config
        patches = self.grid[0] * self.grid[1]
        return {"pixel_values": _pixels(model, (batch, patches, 3 * vision.patch_size ** 2), gen),
                "spatial_shapes": torch.tensor([list(self.grid)] * batch),
                "pixel_attention_mask": torch.ones(batch, patches, dtype=torch.bool)}


LFM2_VL_FIXTURE = Lfm2VlFixture(
    LFM2_VL, ("lfm2_vl",),
    tiny=dict(text_config=dict(layer_types=["conv", "full_attention", "full_attention", "conv"]),
              vision_config=dict(num_patches=64), projector_hidden_size=64),
)
