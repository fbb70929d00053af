"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's inputs, an interleaved M-RoPE, and DeepStack.

*Interleaved M-RoPE.* The rotary embedding interleaves the three position rows' frequencies
(``t h w t h w …``) into one ``[B, T, d]`` table before layer 0; the layers read that table, which the
passes gather by source like any RoPE table, and ``prepare_forward`` computes the ``[3, B, T]``
position ids before the graph as for Qwen2-VL.

*DeepStack.* The vision tower also returns the features of some of its inner layers; the decoder adds
the ``j``-th to the hidden states at the visual positions right after decoder layer ``j``, for the first
``len(deepstack_visual_indexes)`` layers. A stage before the last of them is refused (``ValueError``
naming the first layer allowed, contract §1): its later injections would need the same merge weights
(:meth:`DeepStackAdapter.check_stage_layers`). ``transformers`` adds them with a boolean index
(``hidden[mask] + features``), a data-dependent shape that breaks the graph between decoder layers;
the shim :func:`add_deepstack_features` adds the same values without one.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch

from libra_fx.families.qwen2_vl import _COMMON, _HINT, MRopeAdapter, MRopeFixture
from libra_fx.runtime.compat import DEEPSTACK


def add_deepstack_features(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                           visual_embeds: torch.Tensor) -> torch.Tensor:
    """``Qwen3VLTextModel._deepstack_process`` without a data-dependent shape: the ``i``-th visual
    position (in row-major order) gets ``visual_embeds[i]`` added, every other position is left as it
    is (the same values, bit for bit)."""
    mask = visual_pos_masks.to(hidden_states.device)
    rank = (mask.reshape(-1).cumsum(0) - 1).clamp_min(0)  # each position's index among the visual ones
    added = visual_embeds.to(hidden_states.device, hidden_states.dtype)[rank].reshape(hidden_states.shape)
    return torch.where(mask[..., None], hidden_states + added, hidden_states)


@dataclass(frozen=True)
class Qwen3Adapter(MRopeAdapter):
    """Qwen2-VL's inputs and an interleaved M-RoPE; videos are refused (a timestamp before each frame)."""

    def refused_inputs(self, model, kwargs: dict) -> str | None:
        if kwargs.get("pixel_values_videos") is not None:
            return (f"{self.name} videos are not compressed yet: a timestamp (text) sits before each frame, and "
                    "the frames are not yet gathered into the one span of their video (contract §1)")
        return None


@dataclass(frozen=True)
class DeepStackAdapter(Qwen3Adapter):
    """Qwen3-VL's DeepStack layers: stages after them only, the injections added without a data-dependent shape."""

    def check_stage_layers(self, config, layers: tuple[int, ...]) -> None:
        super().check_stage_layers(config, layers)
        injected = len(config.vision_config.deepstack_visual_indexes)
        early = [layer for layer in layers if layer < injected]
        if early:
            raise ValueError(
                f"layer {early[0]}: {self.name} adds DeepStack visual features to the hidden states after decoder "
                f"layers {', '.join(map(str, range(injected)))}, which a stage before them would have to merge "
                f"alike; the first layer allowed is {injected} (got layers={layers})")

    def install_shims(self, model) -> None:
        super().install_shims(model)
        text = model.model.language_model
        setattr(text, DEEPSTACK, types.MethodType(add_deepstack_features, text))

    @contextlib.contextmanager
    def without_shims(self, model):
        text = model.model.language_model
        shim = vars(text).pop(DEEPSTACK, None)
        try:
            with super().without_shims(model):
                yield model
        finally:
            if shim is not None:
                setattr(text, DEEPSTACK, shim)


_SPANS = ("one span per image; the first stage layer follows the DeepStack layers (at least "
          "len(deepstack_visual_indexes)); videos uncompressed (a timestamp before each frame)")
_TINY = dict(text_config=dict(rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                               "rope_theta": 10000.0}),
             vision_config=dict(deepstack_visual_indexes=[0], patch_size=4))  # one DeepStack layer: stages ≥ 1
_QWEN3 = dict(_COMMON, span_notes=_SPANS, modalities=("image",), graph_break_hint=_HINT.replace("Qwen2-VL", "Qwen3-VL"))

QWEN3_VL = DeepStackAdapter("Qwen3-VL", ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"), ("modeling_qwen3_vl",),
                            **_QWEN3)
QWEN3_VL_MOE = DeepStackAdapter("Qwen3-VL-MoE", ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel"),
                                ("modeling_qwen3_vl_moe",), symbolic_length=True, **_QWEN3)

QWEN3_VL_FIXTURE = MRopeFixture(QWEN3_VL, ("qwen3_vl",), tiny=_TINY)
QWEN3_VL_MOE_FIXTURE = MRopeFixture(QWEN3_VL_MOE, ("qwen3_vl_moe",), tiny=_TINY)
