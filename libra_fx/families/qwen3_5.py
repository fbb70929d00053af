"""Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's inputs (no DeepStack) and a hybrid decoder, Gated DeltaNet
(linear attention) layers beside full-attention ones.

A Gated DeltaNet layer pads the sequence with zeros up to a multiple of 64 and scans it chunk by chunk,
a loop Dynamo unrolls for the prompt's chunk count. After a stage the compressed sequence is padded to
the prompt's padded length instead (``chunk_scans``): the loop keeps its count, and a chunk of zeros
leaves the scan's outputs and its final state as they were (a zero key adds nothing to the state, a
zero decay keeps it). Its short convolution, as LFM2-VL's, convolves the compressed sequence and caches
its last tokens. Stage layers must be full-attention layers (``layer_types``; every fourth in
transformers' default configs: 3, 7, 11, …).
"""

from __future__ import annotations

from libra_fx.families.qwen2_vl import MRopeFixture
from libra_fx.families.qwen3_vl import _QWEN3, Qwen3Adapter

_TINY = dict(text_config=dict(
    layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0,
                     "partial_rotary_factor": 1.0}),
    vision_config=dict(patch_size=4))
_SPANS = ("one span per image; Gated DeltaNet layers (not stage layers) scan the compressed sequence in the "
          "prompt's chunk count, the extra chunks padding; videos uncompressed (a timestamp before each frame)")
_QWEN3_5 = dict(_QWEN3, span_notes=_SPANS, symbolic_length=True, chunk_scans=True,
                graph_break_hint=_QWEN3["graph_break_hint"].replace("Qwen3-VL", "Qwen3.5"))

QWEN3_5 = Qwen3Adapter("Qwen3.5", ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model"), ("modeling_qwen3_5",),
                       **_QWEN3_5)
QWEN3_5_MOE = Qwen3Adapter("Qwen3.5-MoE", ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel"),
                           ("modeling_qwen3_5_moe",), **_QWEN3_5)

# a 16 × 16 grid: 64 visual tokens, so the tiny prompt spans two chunks of 64 and its compressed one fewer
QWEN3_5_FIXTURE = MRopeFixture(QWEN3_5, ("qwen3_5",), tiny=_TINY, grid=(16, 16))
QWEN3_5_MOE_FIXTURE = MRopeFixture(QWEN3_5_MOE, ("qwen3_5_moe",), tiny=_TINY, grid=(16, 16))
