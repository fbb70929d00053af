"""The method registry (contract §6): every decoder-side method is a selector plus a compressor, every
vision-side method a :class:`~libra_fx.methods.vision.VisionMethod`, each with typed options.

::

    libra_fx.method("libra", tau=0.6)        # MethodSpec(name='libra', options=IGMOptions(tau=0.6, eta='mean'))
    libra_fx.method("turbo", lam=0.5)        # MethodSpec(name='turbo', options=TurboOptions(lam=0.5))
    libra_fx.backend(method=libra_fx.method("turbo", lam=0.5))
    libra_fx.method("prumerge", order="attention", positions="repacked")   # the reference's layout

A new decoder-side method is a selector, a compressor and one entry in :data:`METHODS`. A new
vision-side method (``side="vision"``: it compresses once, where the image features enter the language
model) is one module of :mod:`libra_fx.methods.vision` and one entry in :data:`VISION_BUILTINS`, or
:func:`register_vision_method` at run time (:func:`unregister_vision_method` removes it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, ClassVar, Mapping, Union

from libra_fx.methods import compressors, selectors
from libra_fx.methods.vision import VisionMethod, VisionOptions
from libra_fx.methods.vision.prumerge import PruMerge, PruMergeFixed, PruMergePlus


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass(frozen=True)
class IGMOptions:
    """IGM (contract §4): ``tau`` the cosine threshold of the positive set, ``eta`` the softmax
    temperature, ``"mean"`` (the span's mean importance) or a positive number."""

    tau: float = 0.7
    eta: float | str = "mean"

    def __post_init__(self):
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or math.isnan(self.tau):
            raise ValueError(f"tau must be a number, got {self.tau!r}")
        _check_eta(self.eta)


@dataclass(frozen=True)
class TemperatureOptions:
    """IGM ablations with a fixed positive set: only the temperature ``eta`` is free."""

    eta: float | str = "mean"

    def __post_init__(self):
        _check_eta(self.eta)


@dataclass(frozen=True)
class TurboOptions:
    """Turbo: ``lam`` weighs redundancy against importance in ``α/mean(α) − λ·max cos``."""

    lam: float = 1.0

    def __post_init__(self):
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")


def _check_eta(eta) -> None:
    if eta != "mean" and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0):
        raise ValueError(f"eta must be 'mean' or a positive number, got {eta!r}")


@dataclass(frozen=True)
class Method:
    """A decoder-side method: a stage after decoder layers (vision-side methods are :class:`VisionMethod`)."""

    side: ClassVar[str] = "decoder"
    adaptive: ClassVar[bool] = False  # the vision side's notion; a decoder stage's count is static

    name: str
    summary: str
    options: type = NoOptions
    selector: Callable | None = None  # (alpha [S,N], hidden [S,N,D], nt, options) -> target ranks [S, Nt]
    compressor: Callable | None = None  # (hidden, alpha, targets, options) -> [S, Nt (+1), D]
    labels: Callable | None = None  # (hidden, targets, options) -> [S, N] each token's group (or a label < 0)
    compensation: bool = False  # whether each stage appends a compensation token per span


AnyMethod = Union[Method, VisionMethod]


@dataclass(frozen=True)
class MethodSpec:
    """A method and its options, as the backend and the graph nodes carry them."""

    name: str
    options: object

    @property
    def method(self) -> AnyMethod:
        return get_method(self.name)

    def items(self) -> tuple[tuple[str, object], ...]:
        """The options as ``((name, value), …)``: plain constants a graph node can hold."""
        return tuple((f.name, getattr(self.options, f.name)) for f in dataclasses.fields(self.options))


def _by_alpha(select):
    return lambda alpha, hidden, nt, options: select(alpha, nt)


def _igm(**fixed):
    def compress(hidden, alpha, targets, options):
        return compressors.igm(hidden, alpha, targets, **{**dataclasses.asdict(options), **fixed})

    return compress


def _igm_labels(tau: float | None = None, merge_positives: bool = True):
    def labels(hidden, targets, options):
        return compressors.igm_labels(hidden, targets, options.tau if tau is None else tau, merge_positives)

    return labels


def _average(hidden, alpha, targets, options):
    return compressors.average(hidden, alpha, targets)


def _groups(hidden, targets, options):
    return compressors.assign_groups(hidden, targets)[0]


_PTI = _by_alpha(selectors.pti)
_TOP_ALPHA = _by_alpha(selectors.top_alpha)

DECODER_BUILTINS: tuple[Method, ...] = (
    Method("libra", "PTI targets + importance-informed grouped merging + compensation token", IGMOptions,
           selector=_PTI, compressor=_igm(), labels=_igm_labels(), compensation=True),
    Method("fastv", "top-Nt by importance, the rest pruned", selector=_TOP_ALPHA,
           compressor=lambda hidden, alpha, targets, options: compressors.prune(hidden, alpha, targets),
           labels=lambda hidden, targets, options: compressors.prune_labels(hidden, targets)),
    Method("turbo", "top-Nt by informativity (importance − λ·redundancy), average merge", TurboOptions,
           selector=lambda alpha, hidden, nt, options: selectors.turbo(alpha, hidden, nt, options.lam),
           compressor=_average, labels=_groups),
    Method("merge", "ablation: top-Nt by importance, average merge", selector=_TOP_ALPHA, compressor=_average,
           labels=_groups),
    Method("pti", "ablation: PTI targets, average merge", selector=_PTI, compressor=_average, labels=_groups),
    Method("igm_pos", "ablation: PTI + IGM with every non-target positive, no compensation token",
           TemperatureOptions, selector=_PTI, compressor=_igm(tau=float("-inf"), compensation=False),
           labels=_igm_labels(tau=float("-inf"))),
    Method("igm_neg", "ablation: PTI + IGM with every non-target negative (one compensation token)",
           TemperatureOptions, selector=_PTI, compressor=_igm(merge_positives=False),
           labels=_igm_labels(float("inf"), merge_positives=False), compensation=True),
)
VISION_BUILTINS: tuple[VisionMethod, ...] = (PruMerge(), PruMergePlus(), PruMergeFixed())

_METHODS: dict[str, AnyMethod] = {m.name: m for m in (*DECODER_BUILTINS, *VISION_BUILTINS)}
METHODS: Mapping[str, AnyMethod] = MappingProxyType(_METHODS)  # a live read-only view: registered methods appear
_BUILTIN_NAMES = frozenset(_METHODS)


class MethodNames(Sequence):
    """The names of one side's methods in :data:`METHODS`, in registration order: a live, read-only
    sequence (a vision method registered later is in it), equal to the tuple of its names."""

    def __init__(self, side: str):
        self._side = side

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, m in _METHODS.items() if m.side == self._side)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other) -> bool:
        return self._names() == (tuple(other) if isinstance(other, (tuple, MethodNames)) else other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._names())


DECODER_METHODS = MethodNames("decoder")
VISION_METHODS = MethodNames("vision")


def get_method(name: str) -> AnyMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def get_vision_method(name: str) -> VisionMethod:
    """The vision-side method ``name`` (``ValueError`` for an unknown or decoder-side one)."""
    m = get_method(name)
    if not isinstance(m, VisionMethod):
        raise ValueError(f"{name} is a decoder-side method; vision-side methods: {', '.join(VISION_METHODS)}")
    return m


def register_vision_method(m: VisionMethod, *, replace: bool = False) -> VisionMethod:
    """Add a vision-side method (an instance of a :class:`VisionMethod` subclass) under ``m.name``, for
    ``libra_fx.method``/``compile``/``backend`` and :data:`VISION_METHODS`; ``replace=True`` replaces an
    earlier registration of that name (never a built-in). Returns ``m``."""
    if not isinstance(m, VisionMethod):
        raise TypeError(f"register_vision_method takes a VisionMethod instance, got {m!r}")
    name = getattr(m, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a vision method's name must be an identifier, got {name!r}")
    if name in _BUILTIN_NAMES or (name in _METHODS and not replace):
        raise ValueError(f"a method named {name!r} is already registered")
    options = m.options
    if not (isinstance(options, type) and issubclass(options, VisionOptions) and dataclasses.is_dataclass(options)):
        raise ValueError(f"{name}: options must be a dataclass subclass of VisionOptions, got {m.options!r}")
    if m.adaptive and not (isinstance(m.typical_kept, float) and 0 < m.typical_kept <= 1):
        raise ValueError(f"{name}: an adaptive method needs typical_kept in (0, 1] (the FLOPs report's kept share)")
    _METHODS[name] = m
    return m


def unregister_vision_method(name: str) -> None:
    """Remove a method added by :func:`register_vision_method` (``ValueError`` for a built-in or unknown one)."""
    if name in _BUILTIN_NAMES or not isinstance(_METHODS.get(name), VisionMethod):
        raise ValueError(f"{name!r} is not a registered vision method that can be removed")
    del _METHODS[name]


def method(name: str, **options) -> MethodSpec:
    """``name`` with its options, validated (``ValueError`` for an unknown method or option)."""
    m = get_method(name)
    known = {f.name for f in dataclasses.fields(m.options)}
    unknown = sorted(set(options) - known)
    if unknown:
        takes = f"takes {', '.join(sorted(known))}" if known else "takes no options"
        raise ValueError(f"method {name!r} {takes}; got {', '.join(unknown)}")
    return MethodSpec(name, m.options(**options))


def is_vision_method(name: str) -> bool:
    """Whether ``name`` compresses at the vision tower's output instead of after decoder layers."""
    return get_method(name).side == "vision"


def visual_token_counts(n_visual: int, ratio: float | tuple[float, ...], num_stages: int, method: str = "libra",
                        compensation: bool = True) -> list[int]:
    """Visual tokens per span after each stage, compensation tokens included unless ``compensation=False``;
    ``ratio``: one for every stage, or one per stage.

    ``visual_token_counts(576, 0.5, 3)`` → ``[289, 146, 75]`` (288+1, 144+2, 72+3).
    """
    if is_vision_method(method):
        raise ValueError(f"{method} compresses once, before the decoder: see libra_fx.reports.flops.kept_tokens")
    comp = int(get_method(method).compensation and compensation)
    counts, n = [], n_visual
    ratios = selectors.per_stage(ratio, num_stages)
    for stage in range(1, num_stages + 1):
        n = selectors.num_targets(n, ratios[stage - 1])
        counts.append(n + comp * stage)
    return counts
