"""The compression methods of SPEC §6: each is a selector plus a compressor.

:data:`METHODS` holds the decoder-side methods (a stage after a decoder layer).
:data:`VISION_METHODS` holds the vision-side ones (PruMerge, PruMerge+ and a fixed-ratio variant),
which compress once where the image features enter the language model (:mod:`libra_fx.prumerge`);
``get_method`` accepts both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from libra_fx import compressors, selectors


@dataclass(frozen=True)
class Method:
    name: str
    selector: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (alpha, hidden, nt) -> targets
    compressor: Callable[..., torch.Tensor]  # (hidden, alpha, targets, tau=, eta=) -> tokens
    compensation: bool  # whether each stage appends a compensation token per span
    summary: str
    labels: Callable[..., torch.Tensor]  # (hidden, targets, tau) -> each token's target, or a compressors label


def _by_alpha(select):
    return lambda alpha, hidden, nt: select(alpha, nt)


def _ignoring_tau_eta(compress):
    return lambda hidden, alpha, targets, tau, eta: compress(hidden, alpha, targets)


def _groups(hidden, targets, tau):
    return compressors.assign_groups(hidden, targets)[0]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("libra", _by_alpha(selectors.pti), compressors.igm, True,
               "PTI targets + importance-informed grouped merging + compensation token", compressors.igm_labels),
        Method("fastv", _by_alpha(selectors.top_alpha), _ignoring_tau_eta(compressors.prune), False,
               "top-Nt by importance, the rest pruned",
               lambda hidden, targets, tau: compressors.prune_labels(hidden, targets)),
        Method("turbo", selectors.turbo, _ignoring_tau_eta(compressors.average), False,
               "top-Nt by informativity (importance − redundancy), average merge", _groups),
        Method("merge", _by_alpha(selectors.top_alpha), _ignoring_tau_eta(compressors.average), False,
               "ablation: top-Nt by importance, average merge", _groups),
        Method("pti", _by_alpha(selectors.pti), _ignoring_tau_eta(compressors.average), False,
               "ablation: PTI targets, average merge", _groups),
        Method("igm_pos", _by_alpha(selectors.pti),
               lambda hidden, alpha, targets, tau, eta: compressors.igm(
                   hidden, alpha, targets, float("-inf"), eta, compensation=False), False,
               "ablation: PTI + IGM with every non-target positive, no compensation token",
               lambda hidden, targets, tau: compressors.igm_labels(hidden, targets, float("-inf"))),
        Method("igm_neg", _by_alpha(selectors.pti),
               functools.partial(compressors.igm, merge_positives=False), True,
               "ablation: PTI + IGM with every non-target negative (one compensation token)",
               functools.partial(compressors.igm_labels, merge_positives=False)),
    )
}


@dataclass(frozen=True)
class VisionMethod:
    """A method that compresses once, at the vision tower's output (before decoder layer 0)."""

    name: str
    adaptive: bool  # the kept count depends on the image (held in padded slots)
    summary: str
    compensation: bool = False  # no compensation token (read by the decoder-side passes, which have no stage here)


VISION_METHODS: dict[str, VisionMethod] = {
    m.name: m
    for m in (
        VisionMethod("prumerge", True, "PruMerge: [CLS]-attention IQR outliers, each merged with its 32 nearest patches"),
        VisionMethod("prumerge_plus", True,
                     "PruMerge+: IQR outliers + spatially uniform samples (about 25 %), merged alike"),
        VisionMethod("prumerge_fixed", False,
                     "PruMerge with a fixed budget: the Nt most [CLS]-attended patches, merged alike"),
    )
}


def get_method(name: str) -> Method | VisionMethod:
    if name in METHODS:
        return METHODS[name]
    if name in VISION_METHODS:
        return VISION_METHODS[name]
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join([*METHODS, *VISION_METHODS])}")


def is_vision_method(name: str) -> bool:
    """Whether ``name`` compresses at the vision tower's output instead of after decoder layers."""
    return name in VISION_METHODS


def visual_token_counts(n_visual: int, ratio: float, num_stages: int, method: str = "libra",
                        compensation: bool = True) -> list[int]:
    """Visual tokens per span after each stage, compensation tokens included unless ``compensation=False``.

    ``visual_token_counts(576, 0.5, 3)`` → ``[289, 146, 75]`` (288+1, 144+2, 72+3).
    """
    if is_vision_method(method):
        raise ValueError(f"{method} compresses once, before the decoder: see libra_fx.prumerge.kept_tokens")
    comp = int(get_method(method).compensation and compensation)
    counts, n = [], n_visual
    for stage in range(1, num_stages + 1):
        n = selectors.num_targets(n, ratio)
        counts.append(n + comp * stage)
    return counts
