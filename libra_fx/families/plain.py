"""Families of the plain LLaVA-like shape with towers of their own: features scattered at
placeholder tokens, 1-D positions, a causal decoder (sliding-window layers included: Cohere2's).

FastVLM and PerceptionLM use timm towers, which cannot be installed next to a CPU torch here; their
fixtures' tiny models use a transformers stand-in tower of the same output layout (``stand_in``)."""

from __future__ import annotations

from transformers import CLIPVisionConfig, ConvNextConfig

from libra_fx.families.base import FamilyAdapter, FamilyFixture


def _convnext_tower() -> dict:
    """A 2-stage ConvNeXt: a ``[B, 32, H/8, W/8]`` feature map, as FastViTHD's (``hidden_size``: its width)."""
    return dict(ConvNextConfig(patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32)
                .to_dict(), hidden_size=32)


def _clip_tower() -> dict:
    """A 2-layer CLIP tower: ``[N, 1 + 16, 32]`` (a [CLS] token first), as PE's (``model_args``: its width)."""
    return dict(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8).to_dict(), model_args={"embed_dim": 32})

_SLIDING = ("one span per image; the decoder's sliding-window layers count the window in original positions "
            "(contract §5)")

INTERNVL = FamilyAdapter(
    "InternVL", ("InternVLForConditionalGeneration", "InternVLModel"), ("modeling_internvl",),
    span_notes="one span per tile (its pixel-shuffled features: one tile per image, or tiles and a thumbnail)",
)

AYA_VISION = FamilyAdapter(
    "Aya Vision", ("AyaVisionForConditionalGeneration", "AyaVisionModel"), ("modeling_aya_vision",),
    span_notes=_SLIDING,
)

COHERE2_VISION = FamilyAdapter(
    "Cohere2-Vision", ("Cohere2VisionForConditionalGeneration", "Cohere2VisionModel"), ("modeling_cohere2_vision",),
    span_notes=_SLIDING,
)

DEEPSEEK_VL = FamilyAdapter(
    "DeepSeek-VL", ("DeepseekVLForConditionalGeneration", "DeepseekVLModel"), ("modeling_deepseek_vl",),
)

JANUS = FamilyAdapter(
    "Janus", ("JanusForConditionalGeneration", "JanusModel"), ("modeling_janus",),
    span_notes="one span per image (understanding path; image generation is not compressed)",
)

FAST_VLM = FamilyAdapter(
    "FastVLM", ("FastVlmForConditionalGeneration", "FastVlmModel"), ("modeling_fast_vlm",),
)

PERCEPTION_LM = FamilyAdapter(
    "PerceptionLM", ("PerceptionLMForConditionalGeneration", "PerceptionLMModel"), ("modeling_perception_lm",),
    span_notes="one span per image (its tiles' pooled features)",
)

INTERNVL_FIXTURE = FamilyFixture(INTERNVL, ("internvl",),
                                 tiny=dict(vision_config=dict(image_size=[64, 64], patch_size=[8, 8])))
AYA_VISION_FIXTURE = FamilyFixture(AYA_VISION, ("aya_vision",), tiny=dict(vision_config=dict(image_size=64)))
COHERE2_VISION_FIXTURE = FamilyFixture(COHERE2_VISION, ("cohere2_vision",),
                                       tiny=dict(vision_config=dict(image_size=64)))
DEEPSEEK_VL_FIXTURE = FamilyFixture(DEEPSEEK_VL, ("deepseek_vl",))
JANUS_FIXTURE = FamilyFixture(
    JANUS, ("janus",),
    tiny=dict(vision_config=dict(projection_dim=64),  # the aligner's output: the text width
              vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                             channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=16, image_token_embed_dim=16)),
)
FAST_VLM_FIXTURE = FamilyFixture(
    FAST_VLM, ("fast_vlm",), tiny=dict(vision_config=_convnext_tower),
    stand_in="timm FastViTHD tower replaced by a transformers ConvNeXt (same [B, C, h, w] map)",
)
PERCEPTION_LM_FIXTURE = FamilyFixture(
    PERCEPTION_LM, ("perception_lm",), tiles=1, tiny=dict(vision_config=_clip_tower, vision_use_cls_token=True),
    stand_in="timm PE tower replaced by a transformers CLIP tower (same [N, 1+T, C] layout)",
)
