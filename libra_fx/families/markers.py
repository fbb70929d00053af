"""Families whose images carry text marker tokens between their placeholders (contract §1).

- **Mistral3** (Pixtral): ``[IMG]`` placeholders row by row, an ``[IMG_BREAK]`` after each row and
  ``[IMG_END]`` after the last. The tower hands the decoder one feature piece per image: one span per
  image, its rows apart.
- **Idefics3, SmolVLM**: an image is split into tiles plus a downscaled global view, each wrapped in
  ``<fake_token_around_image><row_r_col_c>`` (``<global-img>``) markers, rows ended by newlines. The
  model hands the decoder one feature piece per *sample* (all its tiles), so a sample's visual tokens
  are one span: exactly one image per sample is compressed. A call with a sample of several images is
  refused by :meth:`TiledAdapter.refused_inputs` (it reads ``input_ids``; a bare ``torch.compile``
  cannot, so there the family is refused).

The markers are text: never merged, they keep their places and positions. Their ids are the
processor's; the fixtures' tiny prompts use ids of their own (``MARKERS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_fx.families.base import FamilyAdapter, FamilyFixture, VisionTower, _pixels

MARKERS = dict(break_=120, end=121, around=122, global_=123, newline=124, first_tile=125)  # tiny prompts only


@dataclass(frozen=True)
class PixtralFixture(FamilyFixture):
    """Images of ``image_size`` (h, w) pixels, their placeholders in rows of the merged patch grid."""

    image_size: tuple[int, int] = (48, 64)

    def vision_inputs(self, model, batch, gen, token="image"):
        h, w = self.image_size
        return dict(pixel_values=_pixels(model, (batch, 3, h, w), gen), image_sizes=torch.tensor([[h, w]] * batch))

    def wrap_placeholders(self, config, placeholders):
        rows = self.image_size[0] // (config.vision_config.patch_size * config.spatial_merge_size)
        width = len(placeholders) // rows
        out = []
        for r in range(rows):
            out += placeholders[r * width:(r + 1) * width] + [MARKERS["break_" if r < rows - 1 else "end"]]
        return out


@dataclass(frozen=True)
class TiledFixture(FamilyFixture):
    """Images as ``grid`` (rows, cols) tiles plus the global view (``pixel_values [B, tiles + 1, 3, S, S]``)."""

    grid: tuple[int, int] = (1, 2)

    def vision_inputs(self, model, batch, gen, token="image"):
        side = model.config.vision_config.image_size
        tiles = self.grid[0] * self.grid[1] + 1
        return {"pixel_values": _pixels(model, (batch, tiles, 3, side, side), gen)}

    def wrap_placeholders(self, config, placeholders):
        rows, cols = self.grid
        n = len(placeholders) // (rows * cols + 1)
        image = placeholders[:n]
        out = []
        for r in range(rows):
            for c in range(cols):
                out += [MARKERS["around"], MARKERS["first_tile"] + r * cols + c] + image
            out.append(MARKERS["newline"])
        return out + [MARKERS["newline"], MARKERS["around"], MARKERS["global_"]] + image + [MARKERS["around"]]


@dataclass(frozen=True)
class TiledAdapter(FamilyAdapter):
    """Images as tiles plus a global view, one feature piece per sample: one image per sample is compressed."""

    bare_backend: str = ("the images of each sample are counted from input_ids before the call, which a bare "
                         "torch.compile with libra_fx.backend cannot do: use libra_fx.compile(model, ...)")

    def refused_inputs(self, model, kwargs):
        """A sample with more than one image: its images' tiles reach the decoder as one piece. Images are
        counted as the placeholder runs that follow the token before a sample's last run (the global
        view's marker, which every image has once, split into tiles or not)."""
        if kwargs.get("pixel_values") is None:
            return super().refused_inputs(model, kwargs)
        ids = kwargs.get("input_ids")
        if ids is None:
            return f"{self.name} images are counted from input_ids, and this call passes inputs_embeds"
        image = ids == model.config.image_token_id
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        for b in range(ids.shape[0]):
            at = starts[b].nonzero().flatten()
            if len(at) and at[0] > 0:
                before = ids[b, at - 1]
                images = int((before == before[-1]).sum())
                if images > 1:
                    return (f"sample {b} holds {images} images; {self.name} hands the decoder all tiles of a sample as "
                            "one piece, so only one image per sample is compressed (contract §1)")
        return super().refused_inputs(model, kwargs)


MISTRAL3 = FamilyAdapter(
    "Mistral3", ("Mistral3ForConditionalGeneration", "Mistral3Model"), ("modeling_mistral3",),
    span_notes="one span per image: its rows of placeholders, with the [IMG_BREAK] text tokens between them",
)

IDEFICS3 = TiledAdapter(
    "Idefics3", ("Idefics3ForConditionalGeneration", "Idefics3Model"), ("modeling_idefics3",),
    span_notes=("one span per image: its tiles and global view, with the tile markers (text) between them; "
                "one image per sample"),
    vision_tower=VisionTower(cls_token=False, projector="connector"),
)

SMOLVLM = TiledAdapter(
    "SmolVLM", ("SmolVLMForConditionalGeneration", "SmolVLMModel"), ("modeling_smolvlm",),
    span_notes=IDEFICS3.span_notes, vision_tower=IDEFICS3.vision_tower,
)

MISTRAL3_FIXTURE = PixtralFixture(MISTRAL3, ("mistral3",), tiny=dict(vision_config=dict(image_size=64, head_dim=16)))
IDEFICS3_FIXTURE = TiledFixture(IDEFICS3, ("idefics3",))
SMOLVLM_FIXTURE = TiledFixture(SMOLVLM, ("smolvlm",))
