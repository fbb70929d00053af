"""The M-RoPE families (Qwen2-VL, Qwen2.5-VL, GLM-4V): 3-row position ids, images of any size, video."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from libra_fx.families.base import FamilyAdapter, FamilyFixture, _pixels
from libra_fx.runtime.compat import kv_cache, tower_outside_graph


_QWEN_MARKERS = ("vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class MRopeAdapter(FamilyAdapter):
    """3-row (M-RoPE) position ids, computed before the compiled forward."""

    def install_shims(self, model) -> None:
        super().install_shims(model)
        tower_outside_graph(model)  # transformers 5.17: as 5.18+ generate() runs the tower

    def prepare_forward(self, model, kwargs: dict) -> dict:
        """Qwen2-VL works out its 3-D (M-RoPE) position ids inside ``forward`` with data-dependent
        loops, whose graph breaks cut the visual tokens off from the decoder. ``generate`` passes
        them in; for a plain ``model(...)`` prefill they are computed here the same way, by the
        model's own ``compute_3d_position_ids``, before the compiled forward."""
        compute = model.model.compute_3d_position_ids
        cache = kv_cache(kwargs)
        if (kwargs.get("position_ids") is not None or kwargs.get("input_ids") is None
                or cache is not None and cache.get_seq_length() > 0
                or kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None):
            return kwargs
        known = dict(kwargs, inputs_embeds=None, cache=cache, past_key_values=cache)
        names = [n for n in inspect.signature(compute).parameters if n != "self"]
        return dict(kwargs, position_ids=compute(**{n: known.get(n) for n in names}))


@dataclass(frozen=True)
class MRopeFixture(FamilyFixture):
    """Vision inputs are flattened patches with their ``[t, h, w]`` grids; each image or video sits
    between start and end markers, and ``mm_token_type_ids`` marks its placeholders."""

    grid: tuple[int, int] = (8, 8)
    markers: dict = field(default_factory=lambda: dict.fromkeys(("image", "video"), _QWEN_MARKERS))

    def vision_inputs(self, model, batch, gen, token="image"):
        vision = model.config.vision_config
        t = self.frames // vision.temporal_patch_size if token == "video" else 1
        patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        prefix = "pixel_values" if token == "image" else "pixel_values_videos"
        return {prefix: _pixels(model, (batch * t * self.grid[0] * self.grid[1], patch), gen),
                f"{token}_grid_thw": torch.tensor([[t, *self.grid]] * batch)}

    def wrap_placeholders(self, config, placeholders):
        token = "video" if placeholders[0] == config.video_token_id else "image"
        start, end = (getattr(config, key) for key in self.markers[token])
        return [start, *placeholders, end]

    def complete_inputs(self, config, inputs):
        ids = inputs["input_ids"]
        types = torch.where(ids == config.image_token_id, 1, torch.where(ids == config.video_token_id, 2, 0))
        return dict(inputs, mm_token_type_ids=types.int())


_HINT = ("Qwen2-VL's forward computes its 3-D positions with graph breaks: use libra_fx.compile(model, ...) "
         "(it computes them before the graph) or generate()")
_SPANS = "one span per image, one per video (all its frames)"
_MROPE = dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
_COMMON = dict(span_notes=_SPANS, position_rows=(3, 4), graph_break_hint=_HINT, modalities=("image", "video"))

QWEN2_VL = MRopeAdapter(
    "Qwen2-VL", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"), ("modeling_qwen2_vl",), **_COMMON)
QWEN2_5_VL = MRopeAdapter(
    "Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"), ("modeling_qwen2_5_vl",), **_COMMON)
GLM4V = MRopeAdapter(
    "GLM-4V", ("Glm4vForConditionalGeneration", "Glm4vModel"), ("modeling_glm4v",),
    **dict(_COMMON, modalities=("image",), span_notes="one span per image"))

QWEN2_VL_FIXTURE = MRopeFixture(
    QWEN2_VL, ("qwen2_vl",),
    tiny=dict(text_config=_MROPE, vision_config=dict(hidden_size=64, patch_size=4, mlp_ratio=2)))
QWEN2_5_VL_FIXTURE = MRopeFixture(
    QWEN2_5_VL, ("qwen2_5_vl",),
    tiny=dict(text_config=_MROPE, vision_config=dict(out_hidden_size=64, patch_size=4, window_size=16,
                                                     fullatt_block_indexes=[1])))
GLM4V_FIXTURE = MRopeFixture(
    GLM4V, ("glm4v",), markers={t: (f"{t}_start_token_id", f"{t}_end_token_id") for t in ("image", "video")},
    tiny=dict(text_config=dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                "rope_theta": 10000.0}),
              vision_config=dict(patch_size=4)))
