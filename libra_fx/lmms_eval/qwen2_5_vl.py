"""``libra_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` (simple and chat) with compression (:mod:`.compression`)."""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as ChatQwen2_5_VL
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

from libra_fx.lmms_eval.compression import LibraCompression


class LibraQwen2_5VL(LibraCompression, Qwen2_5_VL):
    """``qwen2_5_vl`` with compression."""


class LibraQwen2_5VLChat(LibraQwen2_5VL, ChatQwen2_5_VL):
    """The chat ``qwen2_5_vl`` with compression."""
