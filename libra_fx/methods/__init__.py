"""Pure token maths and the method registry.

- :mod:`~libra_fx.methods.importance`: the importance row α (contract §2);
- :mod:`~libra_fx.methods.selectors`: which tokens become targets (§3, §6);
- :mod:`~libra_fx.methods.compressors`: what happens to the rest (§4, §6);
- :mod:`~libra_fx.methods.prumerge`: the vision-side methods' maths (§6);
- :mod:`~libra_fx.methods.registry`: every method as a selector + compressor, with typed options.
"""

from libra_fx.methods.registry import (
    DECODER_METHODS,
    METHODS,
    VISION_METHODS,
    Method,
    MethodSpec,
    get_method,
    is_vision_method,
    method,
    visual_token_counts,
)

__all__ = ["DECODER_METHODS", "METHODS", "VISION_METHODS", "Method", "MethodSpec", "get_method",
           "is_vision_method", "method", "visual_token_counts"]
