"""Tiny random-weight LLaVA models and inputs, built from configs (no hub access).

Used by the tests, the examples and the benchmarks::

    model = tiny_llava(num_layers=4, attn="sdpa")
    inputs = tiny_llava_inputs(model, batch=2)
    logits = model(**inputs).logits
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 100
PAD_TOKEN_ID = 0


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
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).eval().to(dtype)
    with torch.no_grad():
        model(**tiny_llava_inputs(model))
    return model


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
    pad = tuple(pad) + (0,) * (batch - len(pad))
    width = max(pad)

    def text(n):
        ids = torch.randint(1, vocab, (n,), generator=gen)
        return torch.where(ids == IMAGE_TOKEN_ID, ids + 1, ids)

    def image_and_text(i):
        return [torch.full((n_img,), IMAGE_TOKEN_ID), text(suffix if i == images - 1 else 3)]

    rows = [
        torch.cat([torch.full((p,), PAD_TOKEN_ID), text(prefix + width - p)]
                  + [part for i in range(images) for part in image_and_text(i)])
        for p in pad
    ]
    ids = torch.stack(rows)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if padded:
        inputs["attention_mask"] = (torch.arange(ids.shape[1]) >= torch.tensor(pad)[:, None]).long()
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
