"""The method registry (contract §6): every method is a selector plus a compressor, with typed options.

::

    libra_fx.method("libra", tau=0.6)        # MethodSpec(name='libra', options=IGMOptions(tau=0.6, eta='mean'))
    libra_fx.method("turbo", lam=0.5)        # MethodSpec(name='turbo', options=TurboOptions(lam=0.5))
    libra_fx.backend(method=libra_fx.method("turbo", lam=0.5))
    libra_fx.method("prumerge", order="attention", positions="repacked")   # the reference's layout

A new decoder-side method is a selector, a compressor and one entry in :data:`METHODS`. The
vision-side methods (``side="vision"``) compress once, where the image features enter the language
model (:mod:`libra_fx.methods.prumerge`); they have a ``select`` and a static ``capacity`` instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from libra_fx.methods import compressors, prumerge, selectors


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


POSITIONS = ("original", "repacked")


@dataclass(frozen=True)
class PruMergeOptions:
    """The vision-side methods' layout (contract §6): ``order`` of the kept tokens, ``"spatial"`` (patch
    order) or ``"attention"`` (the reference's: descending [CLS] attention, PruMerge+'s samples after);
    ``positions``: ``"original"`` (each kept token keeps its patch's position id, text keeps its own) or
    ``"repacked"`` (the compressed sequence is numbered afresh, as LLaVA numbers its input)."""

    order: str = "spatial"
    positions: str = "original"

    def __post_init__(self):
        for name, valid in (("order", prumerge.ORDERS), ("positions", POSITIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {getattr(self, name)!r}")


def _check_eta(eta) -> None:
    if eta != "mean" and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0):
        raise ValueError(f"eta must be 'mean' or a positive number, got {eta!r}")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: type = NoOptions
    side: str = "decoder"  # "decoder": a stage after decoder layers; "vision": once, before layer 0
    # decoder side
    selector: Callable | None = None  # (alpha [S,N], hidden [S,N,D], nt, options) -> target ranks [S, Nt]
    compressor: Callable | None = None  # (hidden, alpha, targets, options) -> [S, Nt (+1), D]
    labels: Callable | None = None  # (hidden, targets, options) -> [S, N] each token's group (or a label < 0)
    compensation: bool = False  # whether each stage appends a compensation token per span
    # vision side
    select: Callable | None = None  # (a [S, N], ratio) -> kept [S, N] bool, ranked by a in "attention" order
    samples: Callable = prumerge.no_samples  # kept -> the patches kept besides them (PruMerge+), [S, N] bool
    capacity: Callable | None = None  # (n, ratio) -> static slots per image (extra token included)
    adaptive: bool = False  # the kept count depends on the image (held in padded slots)
    typical_kept: float | None = None  # adaptive methods: the kept fraction the FLOPs report assumes


@dataclass(frozen=True)
class MethodSpec:
    """A method and its options, as the backend and the graph nodes carry them."""

    name: str
    options: object

    @property
    def method(self) -> Method:
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

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
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
    Method("prumerge", "PruMerge: [CLS]-attention IQR outliers, each plus its 32 nearest patches by attention, "
           "+ one extra token", PruMergeOptions, side="vision", select=lambda a, ratio: prumerge.iqr_outliers(a),
           capacity=lambda n, ratio: prumerge.with_extra(n, prumerge.iqr_capacity(n)), adaptive=True,
           typical_kept=32 / 576),
    Method("prumerge_plus", "PruMerge+: IQR outliers + uniform samples (stride from the IQR share), merged alike",
           PruMergeOptions, side="vision", select=lambda a, ratio: prumerge.iqr_outliers(a),
           samples=prumerge.uniform_samples, capacity=lambda n, ratio: prumerge.plus_capacity(n), adaptive=True,
           typical_kept=0.25),
    Method("prumerge_fixed", "PruMerge with a fixed budget: the Nt most [CLS]-attended patches, merged alike",
           PruMergeOptions, side="vision", select=prumerge.top_fraction,
           capacity=lambda n, ratio: prumerge.with_extra(n, selectors.num_targets(n, ratio))),
)})
DECODER_METHODS = tuple(name for name, m in METHODS.items() if m.side == "decoder")
VISION_METHODS = tuple(name for name, m in METHODS.items() if m.side == "vision")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


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


def visual_token_counts(n_visual: int, ratio: float, num_stages: int, method: str = "libra",
                        compensation: bool = True) -> list[int]:
    """Visual tokens per span after each stage, compensation tokens included unless ``compensation=False``.

    ``visual_token_counts(576, 0.5, 3)`` → ``[289, 146, 75]`` (288+1, 144+2, 72+3).
    """
    if is_vision_method(method):
        raise ValueError(f"{method} compresses once, before the decoder: see libra_fx.reports.flops.kept_tokens")
    comp = int(get_method(method).compensation and compensation)
    counts, n = [], n_visual
    for stage in range(1, num_stages + 1):
        n = selectors.num_targets(n, ratio)
        counts.append(n + comp * stage)
    return counts
