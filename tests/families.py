"""The tiny model families of issue 4, for the oracle sanity tests and the acceptance tests.

``qwen2_vl`` / ``qwen2_5_vl``: one image of an 8×8 patch grid (16 visual tokens, M-RoPE);
``qwen2_vl_video``: a Qwen2-VL video, 4 frames of 8×8 patches (32 visual tokens, one span);
``llava_next``: a LLaVA-NeXT image of 32×24 pixels (72 visual tokens: tiles + image_newline rows).
"""

from __future__ import annotations

import torch

from libra_fx.conformance import tiny
from libra_fx.testing import (
    PAD_TOKEN_ID,
    QWEN_IMAGE_ID,
    QWEN_VISION_END,
    QWEN_VISION_START,
    tiny_llava_next,
    tiny_llava_next_inputs,
    tiny_qwen2_vl,
    tiny_qwen2_vl_inputs,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_next", "qwen2_vl_video")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen2_vl_video")


def build(family: str, attn: str = "sdpa", seed: int = 0):
    """A fresh random-weight tiny model of ``family`` (:mod:`libra_fx.testing`'s hand-written configs, built by
    the one factory, :func:`libra_fx.conformance.tiny.build`), EOS disabled for generation."""
    if family in ("qwen2_vl", "qwen2_vl_video"):
        model = tiny_qwen2_vl("2", attn=attn, seed=seed)
    elif family == "qwen2_5_vl":
        model = tiny_qwen2_vl("2.5", attn=attn, seed=seed)
    elif family == "llava_next":
        model = tiny_llava_next(attn=attn, seed=seed)
    else:
        raise ValueError(family)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def make_inputs(family: str, model, batch: int = 1, pad: tuple[int, ...] = (), seed: int = 0, **kw) -> dict:
    if family == "qwen2_vl_video":
        return tiny_qwen2_vl_inputs(model, batch=batch, grid=kw.get("grid", (8, 8)), frames=4, pad=pad, seed=seed)
    if family in QWEN:
        return tiny_qwen2_vl_inputs(model, batch=batch, grid=kw.get("grid", (8, 8)), pad=pad, seed=seed)
    return tiny_llava_next_inputs(model, batch=batch, pad=pad, seed=seed)


def qwen_two_images(model, grids=((8, 8), (4, 8)), prefix=5, middle=3, suffix=6, seed=0) -> dict:
    """One Qwen2-VL prompt (B=1) holding two images of different patch grids (two spans):
    ``prefix <vs> [image 1] <ve> middle <vs> [image 2] <ve> suffix``."""
    gen = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    merge = vision.spatial_merge_size ** 2

    def text(n):
        return torch.randint(3, 100, (n,), generator=gen)

    parts = [text(prefix)]
    for i, (h, w) in enumerate(grids):
        parts += [torch.tensor([QWEN_VISION_START]), torch.full((h * w // merge,), QWEN_IMAGE_ID),
                  torch.tensor([QWEN_VISION_END]), text(suffix if i == len(grids) - 1 else middle)]
    ids = torch.cat(parts)[None]
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(sum(h * w for h, w in grids), patch, generator=gen).to(dtype)
    assert not bool((ids == PAD_TOKEN_ID).any())
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == QWEN_IMAGE_ID).int(), pixel_values=pixels,
                image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]))


def sample(inputs: dict, b: int, pad: int = 0) -> dict:
    """Sample ``b`` of a batch built by :func:`make_inputs`, alone and without its ``pad`` tokens."""
    out = {}
    for key, v in inputs.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[key] = v[b:b + 1, pad:]
        elif key in ("pixel_values", "pixel_values_videos") and "image_sizes" not in inputs:
            n = v.shape[0] // inputs["input_ids"].shape[0]  # Qwen: patch rows, same count per sample
            out[key] = v[b * n:(b + 1) * n]
        else:  # grids, LLaVA-NeXT pixel_values [B, tiles, ...] / image_sizes
            out[key] = v[b:b + 1]
    return out


def ragged_llava_next(model, sizes=((32, 24), (16, 16)), seed=0) -> tuple[dict, list[dict]]:
    """A LLaVA-NeXT batch whose images differ in size, hence in visual-token count (72 and 36 for
    the default sizes), left-padded to one length and with pixel tiles zero-padded to one count,
    as the processor batches them; and each sample alone, unpadded."""
    alone = [tiny_llava_next_inputs(model, image_size=s, seed=seed + i) for i, s in enumerate(sizes)]
    width = max(x["input_ids"].shape[1] for x in alone)
    tiles = max(x["pixel_values"].shape[1] for x in alone)
    ids = torch.cat([torch.nn.functional.pad(x["input_ids"], (width - x["input_ids"].shape[1], 0),
                                             value=PAD_TOKEN_ID) for x in alone])
    pixels = torch.cat([torch.nn.functional.pad(x["pixel_values"], (0, 0, 0, 0, 0, 0, 0, tiles - x["pixel_values"].shape[1]))
                        for x in alone])
    batch = dict(input_ids=ids, attention_mask=(ids != PAD_TOKEN_ID).long(), pixel_values=pixels,
                 image_sizes=torch.cat([x["image_sizes"] for x in alone]))
    return batch, alone


def tiny_gemma3(seed: int = 0):
    """A random-weight Gemma3 (SigLIP tower, 4 visual tokens per image, sliding-window layers), for the
    tests of a family without an adapter (its adapter taken out: tests/test_families.py)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         sliding_window=16, pad_token_id=PAD_TOKEN_ID),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=100, boi_token_index=101, eoi_token_index=102,
        attn_implementation="sdpa")
    model = tiny.build(Gemma3ForConditionalGeneration, config, seed)
    ids = torch.randint(1, 99, (1, 16), generator=torch.Generator().manual_seed(seed))
    ids[0, 5:9] = 100
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == 100).long())
    return model, inputs
