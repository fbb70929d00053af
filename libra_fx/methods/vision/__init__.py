"""The vision-side methods: the interface (:mod:`~libra_fx.methods.vision.base`) and one module per method.

A new method is one module here (a :class:`VisionMethod` subclass) plus its entry in
``libra_fx.methods.registry.VISION_BUILTINS``.
"""

from libra_fx.methods.vision.base import (
    POSITIONS,
    Signal,
    VisionInputs,
    VisionMethod,
    VisionOptions,
    VisionSlots,
    gather_patches,
    kept_labels,
    kept_layout,
    pruned_slots,
)

__all__ = ["POSITIONS", "Signal", "VisionInputs", "VisionMethod", "VisionOptions", "VisionSlots", "gather_patches",
           "kept_labels", "kept_layout", "pruned_slots"]
