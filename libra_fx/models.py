"""The model classes libra-fx supports: tested against the oracle (README, *Supported models*).

``libra_fx.compile`` checks a model against them first; any other class (or a subclass of none
of them) runs compiled but uncompressed, with a :class:`~libra_fx.LibraFallbackWarning` naming
it (``strict=True``: :class:`~libra_fx.UnsupportedGraph`). The bare backend decides per graph.
"""

from __future__ import annotations

import warnings

from libra_fx.dynamo_backend import LibraFallbackWarning
from libra_fx.passes import UnsupportedGraph

SUPPORTED = {
    "LlavaForConditionalGeneration": "LLaVA-1.5",
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT",
    "Qwen2VLForConditionalGeneration": "Qwen2-VL (images and video)",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL (images and video)",
}


def unsupported_reason(model) -> str | None:
    """Why ``model`` is not compressed (``None`` when its class, or a base class, is supported)."""
    if any(cls.__name__ in SUPPORTED for cls in type(model).__mro__):
        return None
    return (f"{type(model).__name__} is not a supported architecture (supported: {', '.join(SUPPORTED)}); "
            "it runs compiled but uncompressed")


def check_architecture(model, strict: bool) -> str | None:
    """Warn (or raise under ``strict``) for an unsupported model; returns the reason, if any."""
    reason = unsupported_reason(model)
    if reason is not None:
        if strict:
            raise UnsupportedGraph(f"libra_fx: {reason}")
        warnings.warn(f"libra_fx: {reason}", LibraFallbackWarning, stacklevel=3)
    return reason
