"""The shapes LLaVA's processor, and its pictures as 8-bit images.

A ``LlavaProcessor`` made of a word-level tokenizer over the task's vocabulary (``<bos>``, ``<pad>``
and ``<image>`` special) and a CLIP image processor that only rescales and normalises: an image from
:func:`picture` comes back as the pixel values :func:`~libra_fx.shapes_task.data.render` made, up to
8-bit rounding. It ships beside the checkpoint, so ``AutoProcessor.from_pretrained(checkpoint_path())``
and the tools built on it (lmms-eval's ``llava_hf``) run the model like any Hugging Face LLaVA::

    processor = AutoProcessor.from_pretrained(st.checkpoint_path())
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "how-many - red any ?"}]}])
    inputs = processor(images=[picture(data["pixel_values"][0])], text=text, return_tensors="pt")
    # inputs["input_ids"]: <bos> <image>×144 how-many - red any ?   (the task's 150-token prompt)

Rebuilt with ``shapes_processor().save_pretrained(folder)`` (``benchmarks/train_shapes_lvlm.py``
saves it with every checkpoint).
"""

from __future__ import annotations

import torch

from libra_fx.shapes_task.data import PATCH_SIZE, PIXEL_MEAN, PIXEL_STD, VOCAB

# the prompt is <bos>, then the user turn: an image (the processor expands <image> to 144 placeholders)
# and the five question words; a plain-string turn is taken as it is ("<image>\n" + words, as llava_hf sends it)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def shapes_processor():
    """A ``LlavaProcessor`` for the shapes LLaVA (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token=None))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # the task has no end-of-sequence token (answers are one token): <pad> stands in for generate()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<bos>", pad_token="<pad>",
                                        eos_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left", chat_template=CHAT_TEMPLATE)
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=[PIXEL_MEAN] * 3, image_std=[PIXEL_STD] * 3,
                                do_convert_rgb=True)
    # 144 placeholders per picture: the tower's 145 outputs (with [CLS]) minus [CLS] ("default" strategy)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def picture(pixel_values: torch.Tensor):
    """The RGB ``PIL.Image`` of one picture's pixel values ``[3, H, W]`` (normalised as the model reads
    them): back to ``[0, 1]``, clamped, rounded to 8 bits."""
    from PIL import Image

    rgb = (pixel_values.detach().float().cpu() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB")

