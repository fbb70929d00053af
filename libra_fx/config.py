"""User-facing compression settings, validated once when the backend is built."""

from __future__ import annotations

from dataclasses import dataclass

from libra_fx.methods.registry import MethodSpec, is_vision_method, method as method_spec
from libra_fx.methods.selectors import per_stage


@dataclass(frozen=True)
class CompressionConfig:
    """``ratio``: fraction of each stage's visual tokens removed, ``0 ≤ ratio < 1``; or one ratio per stage
    layer, a tuple as long as ``layers``, each in ``(0, 1)`` (``ratio=(0.5, 0.25)`` with ``layers=(7, 15)``).
    ``layers``: 0-indexed decoder layers after which a stage compresses (ascending, distinct).
    ``spec``: the method and its options (:func:`libra_fx.method`).

    Vision-side methods (``prumerge``, ``prumerge_plus``, ``prumerge_fixed``) compress once, before
    decoder layer 0: ``layers`` is ignored (stored as ``()``), and only ``prumerge_fixed`` reads
    ``ratio`` (the fraction of patches removed, like the decoder-side methods).
    """

    ratio: float | tuple[float, ...] = 0.5
    layers: tuple[int, ...] = (7, 15, 23)
    spec: MethodSpec = method_spec("libra")

    def __post_init__(self):
        per_stage = isinstance(self.ratio, (tuple, list))
        if per_stage:
            ratios = tuple(self.ratio)
            if not ratios or not all(_is_number(r) and 0 < r < 1 for r in ratios):
                raise ValueError(f"a per-stage ratio must be a tuple of numbers in (0, 1), one per stage layer, got "
                                 f"{self.ratio!r} (leave a layer out rather than give it 0)")
            object.__setattr__(self, "ratio", ratios)
        elif not _is_number(self.ratio) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be a number in [0, 1), or a tuple of them, one per stage layer; got "
                             f"{self.ratio!r}")
        if isinstance(self.layers, (int, str)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers
        ):
            raise ValueError(f"layers must be a tuple of layer indices, got {self.layers!r}")
        layers = tuple(self.layers)
        if any(i < 0 for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be distinct, non-negative and ascending, got {layers!r}")
        object.__setattr__(self, "layers", () if is_vision_method(self.spec.name) else layers)
        if per_stage and is_vision_method(self.spec.name):
            raise ValueError(f"{self.spec.name} compresses once, before the decoder: give one ratio, not {self.ratio!r}")
        if per_stage and len(self.ratio) != len(layers):
            raise ValueError(f"ratio={self.ratio!r} gives {len(self.ratio)} stage(s) but layers={layers!r} has "
                             f"{len(layers)}: give one ratio per stage layer")

    @classmethod
    def build(cls, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None) -> CompressionConfig:
        """From the backend's keyword arguments: ``method`` a name or a :class:`MethodSpec`;
        ``tau``/``eta``, when given, are options of a named method (``ValueError`` if it takes none)."""
        given = {k: v for k, v in (("tau", tau), ("eta", eta)) if v is not None}
        if isinstance(method, MethodSpec):
            if given:
                raise ValueError(f"give tau/eta inside libra_fx.method({method.name!r}, ...), not beside it")
            spec = method
        elif isinstance(method, str):
            spec = method_spec(method, **given)
        else:
            raise ValueError(f"method must be a name or libra_fx.method(...), got {method!r}")
        return cls(ratio=ratio, layers=layers, spec=spec)

    @classmethod
    def resolve(cls, config: CompressionConfig | None, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None,
                eta=None) -> CompressionConfig:
        """``config`` when given (``ValueError`` if a setting is also given beside it), else :meth:`build`
        from the others: the arguments of :func:`libra_fx.compile` and :func:`libra_fx.backend`, parsed once."""
        if config is None:
            return cls.build(ratio, layers, method, tau, eta)
        if not isinstance(config, CompressionConfig):
            raise ValueError(f"config must be a libra_fx.CompressionConfig, got {config!r}")
        given = [name for name, value, default in (("ratio", ratio, 0.5), ("layers", layers, (7, 15, 23)),
                                                    ("method", method, "libra"), ("tau", tau, None), ("eta", eta, None))
                 if value != default]
        if given:
            raise ValueError(f"give either config= or {', '.join(given)}, not both")
        return config

    @property
    def method(self) -> str:
        return self.spec.name

    def stage_ratio(self, stage: int) -> float:
        """The ratio of the ``stage``-th stage (0-based, in ``layers`` order)."""
        return per_stage(self.ratio, len(self.layers))[stage]

    @property
    def active(self) -> bool:
        """``False`` when no stage runs (``ratio == 0`` or ``layers == ()``): the graph is left untouched."""
        m = self.spec.method
        if m.side == "vision":
            return m.adaptive or self.ratio > 0
        return bool(self.layers) and self.stage_ratio(0) > 0

    def check_layers(self, num_layers: int) -> None:
        """``ValueError`` for a stage layer the model does not have (nothing to check when inactive)."""
        bad = [i for i in self.layers if i >= num_layers] if self.active else []
        if bad:
            raise ValueError(
                f"layer index {bad[0]} is out of range: the model has {num_layers} decoder layers "
                f"(valid indices 0..{num_layers - 1}); got layers={self.layers}"
            )

    def describe(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.spec.items())
        return f"ratio={self.ratio}, layers={self.layers}, method={self.method!r}" + (f", {options}" if options else "")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
