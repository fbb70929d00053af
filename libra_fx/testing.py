"""Tiny random-weight LLaVA, Qwen2-VL and LLaVA-NeXT models of hand-written configs, and their inputs
(no hub access). The weights are drawn by the one factory, :func:`libra_fx.conformance.tiny.build`;
the tiny models of every family's own config: :func:`libra_fx.conformance.tiny.tiny_model`.

Used by the tests, the examples and the benchmarks::

    model = tiny_llava(num_layers=4, attn="sdpa")
    inputs = tiny_llava_inputs(model, batch=2)
    logits = model(**inputs).logits
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from libra_fx.conformance.inputs import left_padded
from libra_fx.conformance.tiny import PAD_TOKEN_ID, build
from libra_fx.families.llava import anyres_tiles

IMAGE_TOKEN_ID = 100


def tiny_llava_config(
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    image_size: int = 48,
    patch_size: int = 8,
    vocab_size: int = 128,
    attn: str = "sdpa",
) -> LlavaConfig:
    """A LLaVA config with a 2-layer CLIP tower and a Llama language model.

    The tower yields ``(image_size // patch_size) ** 2`` visual tokens per image (36 by default).
    ``num_kv_heads < num_heads`` gives grouped-query attention.
    """
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        pad_token_id=PAD_TOKEN_ID,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        attn_implementation=attn,
    )


def num_visual_tokens(model: LlavaForConditionalGeneration) -> int:
    """Visual tokens per image that the model's tower produces (CLS dropped)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> LlavaForConditionalGeneration:
    """A random-weight tiny LLaVA in eval mode, already run once eagerly.

    The eager run installs transformers' output-capturing hooks; without it the first
    ``fullgraph`` trace of a never-run model fails on a lock in ``output_capturing.py``.
    """
    return build(LlavaForConditionalGeneration, tiny_llava_config(**config_kwargs), seed, dtype=dtype,
                 warm_up=tiny_llava_inputs)


def tiny_llava_inputs(
    model: LlavaForConditionalGeneration,
    batch: int = 1,
    prefix: int = 5,
    suffix: int = 7,
    pad: tuple[int, ...] = (),
    with_image: bool = True,
    seed: int = 0,
    images: int = 1,
) -> dict[str, torch.Tensor]:
    """A batch of prompts ``[pad] prefix-text [image tokens] suffix-text``.

    ``images=2`` gives ``[pad] prefix [image 1] 3 text tokens [image 2] suffix`` (two spans).

    ``pad[b]`` left-pads sample ``b`` (its ``attention_mask`` is 0 there); an ``attention_mask``
    is returned only when ``pad`` is given (``pad=(0,)`` gives one of all ones).
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    n_img = num_visual_tokens(model) if with_image else 0
    padded = bool(pad)

    def text(n):
        ids = torch.randint(1, vocab, (n,), generator=gen)
        return torch.where(ids == IMAGE_TOKEN_ID, ids + 1, ids)

    def image_and_text(i):
        return [torch.full((n_img,), IMAGE_TOKEN_ID), text(suffix if i == images - 1 else 3)]

    ids = left_padded(pad, batch, prefix, text, lambda: [part for i in range(images) for part in image_and_text(i)])
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if padded:
        inputs["attention_mask"] = (ids != PAD_TOKEN_ID).long()
    if with_image:
        vision = model.config.vision_config
        dtype = next(model.parameters()).dtype
        inputs["pixel_values"] = torch.randn(
            batch * images, 3, vision.image_size, vision.image_size, generator=gen
        ).to(dtype)
    return inputs


def synthetic_image(size: int, seed: int = 0) -> torch.Tensor:
    """A ``[3, size, size]`` picture — a soft gradient with three coloured discs — normalised
    like CLIP inputs, so kept-token maps have something to show."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.3 + 0.3 * xx, 0.35 + 0.2 * yy, 0.5 - 0.2 * xx])
    for colour in ([0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.95, 0.85, 0.1]):
        cy, cx, r = (torch.rand(3, generator=gen) * torch.tensor([0.6, 0.6, 0.12]) + torch.tensor([0.2, 0.2, 0.1]))
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img = torch.where(disc, torch.tensor(colour)[:, None, None], img)
    return (img - 0.45) / 0.27


# --------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL (M-RoPE, images of any size, video) and LLaVA-NeXT (any-resolution tiles)
# --------------------------------------------------------------------------------------------

QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_VISION_START, QWEN_VISION_END = 120, 121, 122, 123


def _qwen_text_config(num_layers: int, attn: str) -> dict:
    return dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)


def tiny_qwen2_vl(version: str = "2", seed: int = 0, num_layers: int = 4, attn: str = "sdpa",
                  dtype: torch.dtype = torch.float32):
    """A random-weight Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``): 2-layer tower with
    patch 4 and 2×2 merging (an ``h × w`` patch grid gives ``h·w/4`` visual tokens), and a
    4-layer language model with M-RoPE (sections 2, 3, 3 of a 16-wide head)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    common = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(common, hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=16,
                      fullatt_block_indexes=[1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = config_class(text_config=_qwen_text_config(num_layers, attn), vision_config=vision,
                          image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID,
                          vision_start_token_id=QWEN_VISION_START, vision_end_token_id=QWEN_VISION_END,
                          attn_implementation=attn)
    return build(model_class, config, seed, dtype=dtype, warm_up=tiny_qwen2_vl_inputs)


def tiny_qwen2_vl_inputs(model, batch: int = 1, grid: tuple[int, int] = (8, 8), frames: int = 0,
                         prefix: int = 5, suffix: int = 6, pad: tuple[int, ...] = (), seed: int = 0) -> dict:
    """Prompts ``[pad] prefix <vision_start> [visual tokens] <vision_end> suffix`` for a tiny Qwen2-VL.

    ``grid=(h, w)`` is the patch grid of each image (``h·w/4`` tokens); ``frames > 0`` feeds a video
    of that many frames instead (``frames/2 · h·w/4`` tokens, one span). ``pad[b]`` left-pads sample b.
    """
    gen = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    h, w = grid
    t = max(frames // vision.temporal_patch_size, 1) if frames else 1
    n = t * h * w // vision.spatial_merge_size**2
    token = QWEN_VIDEO_ID if frames else QWEN_IMAGE_ID
    def text(k):
        return torch.randint(3, 100, (k,), generator=gen)

    ids = left_padded(pad, batch, prefix, text, lambda: [torch.tensor([QWEN_VISION_START]), torch.full((n,), token),
                                                          torch.tensor([QWEN_VISION_END]), text(suffix)])
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch * t * h * w, patch, generator=gen).to(dtype)
    thw = torch.tensor([[t, h, w]] * batch)
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD_TOKEN_ID).long(),
                  mm_token_type_ids=torch.where(ids == token, 2 if frames else 1, 0).int())
    if frames:
        inputs.update(pixel_values_videos=pixels, video_grid_thw=thw)
    else:
        inputs.update(pixel_values=pixels, image_grid_thw=thw)
    return inputs


def tiny_llava_next(seed: int = 0, num_layers: int = 4, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A random-weight LLaVA-NeXT: 16-px base tiles of 4×4 patches, any-resolution grid pinpoints
    up to 32×32, an ``image_newline`` token after each row of the tiled feature map."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = tiny_llava_config(num_layers=num_layers, image_size=16, patch_size=4, attn=attn)
    config = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                             image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
                             image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], attn_implementation=attn)
    return build(LlavaNextForConditionalGeneration, config, seed, dtype=dtype, warm_up=tiny_llava_next_inputs)


def tiny_llava_next_inputs(model, batch: int = 1, image_size: tuple[int, int] = (32, 24), prefix: int = 5,
                           suffix: int = 7, pad: tuple[int, ...] = (), seed: int = 0) -> dict:
    """Prompts ``[pad] prefix [image tokens] suffix``; every image has ``image_size`` (h, w) pixels,
    so its token count (tiles + newlines) is what the model's own feature code yields for it."""
    gen = torch.Generator().manual_seed(seed)
    tiles = anyres_tiles(model.config, image_size)
    side = model.config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch, tiles, 3, side, side, generator=gen).to(dtype)
    sizes = torch.tensor([list(image_size)] * batch)
    with torch.no_grad():
        n = model.model.get_image_features(pixels[:1], sizes[:1]).pooler_output[0].shape[0]
    def text(k):
        return torch.randint(1, 100, (k,), generator=gen)

    ids = left_padded(pad, batch, prefix, text, lambda: [torch.full((n,), IMAGE_TOKEN_ID), text(suffix)])
    return dict(input_ids=ids, attention_mask=(ids != PAD_TOKEN_ID).long(), pixel_values=pixels, image_sizes=sizes)

