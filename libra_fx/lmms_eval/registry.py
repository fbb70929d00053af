"""The payloads of the ``lmms_eval.models`` entry points (``pyproject.toml``): one ``ModelManifest`` per
model id, with the simple class and, where lmms-eval has one, the chat class (lmms-eval's loader
prefers the chat class; ``--force_simple`` picks the other)."""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

LLAVA_HF = ModelManifest("libra_llava_hf", simple_class_path="libra_fx.lmms_eval.llava_hf.LibraLlavaHf",
                         chat_class_path="libra_fx.lmms_eval.llava_hf.LibraLlavaHfChat")
QWEN2_VL = ModelManifest("libra_qwen2_vl", simple_class_path="libra_fx.lmms_eval.qwen2_vl.LibraQwen2VL")
QWEN2_5_VL = ModelManifest("libra_qwen2_5_vl", simple_class_path="libra_fx.lmms_eval.qwen2_5_vl.LibraQwen2_5VL",
                           chat_class_path="libra_fx.lmms_eval.qwen2_5_vl.LibraQwen2_5VLChat")
