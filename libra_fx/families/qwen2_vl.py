"""Qwen2-VL and Qwen2.5-VL: M-RoPE (3-row position ids), images of any size, video."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from libra_fx.families.base import FamilyAdapter
from libra_fx.hf_compat import kv_cache


@dataclass(frozen=True)
class Qwen2VLAdapter(FamilyAdapter):
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


_HINT = ("Qwen2-VL's forward computes its 3-D positions with graph breaks: use libra_fx.compile(model, ...) "
         "(it computes them before the graph) or generate()")
_SPANS = "one span per image, one per video (all its frames)"

QWEN2_VL = Qwen2VLAdapter("Qwen2-VL", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"), ("modeling_qwen2_vl",),
                          span_notes=_SPANS, position_rows=(3, 4), graph_break_hint=_HINT)
QWEN2_5_VL = Qwen2VLAdapter("Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
                            ("modeling_qwen2_5_vl",), span_notes=_SPANS, position_rows=(3, 4), graph_break_hint=_HINT)
