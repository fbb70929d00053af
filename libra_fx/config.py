"""User-facing compression settings, validated once when the backend is built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from libra_fx.methods import get_method, is_vision_method


@dataclass(frozen=True)
class CompressionConfig:
    """``ratio``: fraction of each stage's visual tokens removed, ``0 ≤ ratio < 1``.
    ``layers``: 0-indexed decoder layers after which a stage compresses (ascending, distinct).
    ``method``: a name from :data:`libra_fx.METHODS`. ``tau``: cosine threshold of IGM.
    ``eta``: IGM softmax temperature, ``"mean"`` (mean importance of the span) or a positive float.

    Vision-side methods (``prumerge``, ``prumerge_plus``, ``prumerge_fixed``) compress once, before
    decoder layer 0: ``layers`` is ignored (stored as ``()``), and only ``prumerge_fixed`` reads
    ``ratio`` (the fraction of patches removed, like the decoder-side methods).
    """

    ratio: float = 0.5
    layers: tuple[int, ...] = (7, 15, 23)
    method: str = "libra"
    tau: float = 0.7
    eta: float | str = "mean"

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if isinstance(self.layers, (int, str)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers
        ):
            raise ValueError(f"layers must be a tuple of layer indices, got {self.layers!r}")
        layers = tuple(self.layers)
        if any(i < 0 for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be distinct, non-negative and ascending, got {layers!r}")
        object.__setattr__(self, "layers", layers)
        if is_vision_method(get_method(self.method).name):
            object.__setattr__(self, "layers", ())
        if not isinstance(self.tau, (int, float)) or math.isnan(self.tau):
            raise ValueError(f"tau must be a number, got {self.tau!r}")
        if self.eta != "mean" and (
            isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not self.eta > 0
        ):
            raise ValueError(f"eta must be 'mean' or a positive number, got {self.eta!r}")

    @property
    def active(self) -> bool:
        """``False`` when no stage runs (``ratio == 0`` or ``layers == ()``): the graph is left untouched."""
        if is_vision_method(self.method):
            return self.method != "prumerge_fixed" or self.ratio > 0
        return self.ratio > 0 and len(self.layers) > 0

    def check_layers(self, num_layers: int) -> None:
        """``ValueError`` for a stage layer the model does not have (nothing to check when inactive)."""
        bad = [i for i in self.layers if i >= num_layers] if self.active else []
        if bad:
            raise ValueError(
                f"layer index {bad[0]} is out of range: the model has {num_layers} decoder layers "
                f"(valid indices 0..{num_layers - 1}); got layers={self.layers}"
            )
