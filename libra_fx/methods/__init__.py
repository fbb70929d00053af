"""Pure token maths and the method registry.

- :mod:`~libra_fx.methods.importance`: the importance row α (contract §2);
- :mod:`~libra_fx.methods.selectors`: which tokens become targets (§3, §6);
- :mod:`~libra_fx.methods.compressors`: what happens to the rest (§4, §6);
- :mod:`~libra_fx.methods.vision`: the vision-side method interface (:class:`VisionMethod`), one module per method;
- :mod:`~libra_fx.methods.prumerge`: PruMerge's maths (§6);
- :mod:`~libra_fx.methods.registry`: every method with its typed options.
"""

from libra_fx.methods.registry import (
    DECODER_METHODS,
    METHODS,
    VISION_METHODS,
    Method,
    MethodSpec,
    get_method,
    get_vision_method,
    is_vision_method,
    method,
    register_vision_method,
    unregister_vision_method,
    visual_token_counts,
)
from libra_fx.methods.vision import Signal, VisionInputs, VisionMethod, VisionOptions, VisionSlots

__all__ = ["DECODER_METHODS", "METHODS", "VISION_METHODS", "Method", "MethodSpec", "Signal", "VisionInputs",
           "VisionMethod", "VisionOptions", "VisionSlots", "get_method", "get_vision_method", "is_vision_method",
           "method", "register_vision_method", "unregister_vision_method", "visual_token_counts"]
