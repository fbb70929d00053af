"""``libra_llava_hf``: lmms-eval's ``llava_hf`` (simple and chat) with compression (:mod:`.compression`)."""

from __future__ import annotations

from lmms_eval.models.chat.llava_hf import LlavaHf as ChatLlavaHf
from lmms_eval.models.simple.llava_hf import LlavaHf

from libra_fx.lmms_eval.compression import LibraCompression


class LibraLlavaHf(LibraCompression, LlavaHf):
    """``llava_hf`` with compression. On CPU (``device=cpu``) the model stays on the CPU in every process
    (llava_hf would put process ``i`` of a data-parallel run on ``cuda:i``)."""

    def __init__(self, device: str = "cuda", device_map: str = "", **kwargs):
        if not device_map and str(device).startswith("cpu"):
            device_map = "cpu"
        super().__init__(device=device, device_map=device_map, **kwargs)


class LibraLlavaHfChat(LibraLlavaHf, ChatLlavaHf):
    """The chat ``llava_hf`` (messages through the processor's chat template) with compression."""
