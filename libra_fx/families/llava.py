"""The LLaVA-like families: a tower whose features are scattered at placeholder tokens, 1-D positions
and a causal decoder — the generic :class:`FamilyAdapter`; their fixtures, with any-resolution images
for LLaVA-NeXT and its successors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_fx.families.base import FamilyAdapter, FamilyFixture, VisionTower, _pixels

# any-resolution tiny configs: 16-px base tiles of 4×4 patches, grid pinpoints up to 32×32
_ANYRES = dict(image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_config=dict(image_size=16, patch_size=4))


@dataclass(frozen=True)
class AnyResFixture(FamilyFixture):
    """Images as a base tile plus any-resolution tiles (``pixel_values [B, tiles, 3, S, S]`` and
    ``image_sizes``); videos as ``pixel_values_videos [B, frames, 3, S, S]``."""

    image_size: tuple[int, int] = (32, 24)

    def vision_inputs(self, model, batch, gen, token="image"):
        if token != "image":
            return super().vision_inputs(model, batch, gen, token)
        side = model.config.vision_config.image_size
        tiles = anyres_tiles(model.config, self.image_size)
        return dict(pixel_values=_pixels(model, (batch, tiles, 3, side, side), gen),
                    image_sizes=torch.tensor([list(self.image_size)] * batch))


def anyres_tiles(config, image_size: tuple[int, int]) -> int:
    """Tiles of an ``image_size`` (h, w) image: the base tile and those of its best grid pinpoint."""
    from transformers.image_processing_utils import select_best_resolution

    side = config.vision_config.image_size
    best_h, best_w = select_best_resolution(tuple(image_size), config.image_grid_pinpoints)
    return 1 + (best_h // side) * (best_w // side)


LLAVA = FamilyAdapter(
    "LLaVA-1.5", ("LlavaForConditionalGeneration", "LlavaModel"), ("modeling_llava",),
    span_notes="one span per image; the [CLS] token is dropped before the projector",
    vision_tower=VisionTower(cls_token=True),
)

LLAVA_NEXT = FamilyAdapter(
    "LLaVA-NeXT", ("LlavaNextForConditionalGeneration", "LlavaNextModel"), ("modeling_llava_next",),
    span_notes=("one span per image: its base tile, its any-resolution tiles and the image_newline token after "
                "each row of the tiled feature map (the model scatters them together, so they are visual tokens); "
                "images of different sizes give samples different span lengths (empty slots)"),
)

LLAVA_ONEVISION = FamilyAdapter(
    "LLaVA-OneVision", ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),
    ("modeling_llava_onevision",),
    span_notes="one span per image (tiles and image_newline tokens, as LLaVA-NeXT); one per video (all its frames)",
    modalities=("image", "video"),
)

LLAVA_NEXT_VIDEO = FamilyAdapter(
    "LLaVA-NeXT-Video", ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel"),
    ("modeling_llava_next_video",),
    span_notes="one span per image (as LLaVA-NeXT)",
)

VIDEO_LLAVA = FamilyAdapter(
    "Video-LLaVA", ("VideoLlavaForConditionalGeneration", "VideoLlavaModel"), ("modeling_video_llava",),
    span_notes="one span per image",
)

VIPLLAVA = FamilyAdapter(
    "VipLlava", ("VipLlavaForConditionalGeneration", "VipLlavaModel"), ("modeling_vipllava",),
    span_notes="one span per image (features of several tower layers, concatenated per patch)",
)

LLAVA_FIXTURE = FamilyFixture(LLAVA, ("llava",))
LLAVA_NEXT_FIXTURE = AnyResFixture(LLAVA_NEXT, ("llava_next",), tiny=_ANYRES)
LLAVA_ONEVISION_FIXTURE = AnyResFixture(LLAVA_ONEVISION, ("llava_onevision",), tiny=_ANYRES)
LLAVA_NEXT_VIDEO_FIXTURE = AnyResFixture(LLAVA_NEXT_VIDEO, ("llava_next_video",), tiny=_ANYRES)
VIDEO_LLAVA_FIXTURE = FamilyFixture(VIDEO_LLAVA, ("video_llava",), frames=8)
VIPLLAVA_FIXTURE = FamilyFixture(VIPLLAVA, ("vipllava",), tiny=dict(vision_feature_layers=[-2, -1]))
