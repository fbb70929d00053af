"""``libra_qwen2_vl``: lmms-eval's ``qwen2_vl`` with compression (:mod:`.compression`)."""

from __future__ import annotations

from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

from libra_fx.lmms_eval.compression import LibraCompression


class LibraQwen2VL(LibraCompression, Qwen2_VL):
    """``qwen2_vl`` with compression."""
