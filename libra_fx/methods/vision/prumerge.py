"""PruMerge, PruMerge+ and the fixed-budget variant as vision-side methods (contract §6); their maths is
:mod:`libra_fx.methods.prumerge`.

Signal: the [CLS] query and the keys of the tower's last attention layer; the features at the
projector's input. Slots: the kept patches (merged with their nearest patches) in ``order``, the extra
token (while a patch is pruned), then padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from libra_fx.methods import prumerge as pm
from libra_fx.methods.selectors import num_targets
from libra_fx.methods.vision.base import Signal, VisionInputs, VisionMethod, VisionOptions, VisionSlots


@dataclass(frozen=True)
class PruMergeOptions(VisionOptions):
    """``order``: ``"spatial"`` (patch order) or ``"attention"`` (the reference's: descending [CLS]
    attention, PruMerge+'s samples after); ``positions`` as every vision-side method's."""

    ORDERS: ClassVar[tuple[str, ...]] = pm.ORDERS


class PruMerge(VisionMethod):
    name = "prumerge"
    summary = "PruMerge: [CLS]-attention IQR outliers, each plus its 32 nearest patches by attention, + one extra token"
    options = PruMergeOptions
    signal = Signal(features="projector_input", attention="last", cls_token=True)
    adaptive = True
    typical_kept = 32 / 576
    neighbours: ClassVar[int] = pm.NEIGHBOURS

    def select(self, a: torch.Tensor, ratio: float) -> torch.Tensor:
        """The kept patches ``[S, N]`` bool, from the [CLS] attention ``a`` ``[S, N]``."""
        return pm.iqr_outliers(a)

    def samples(self, kept: torch.Tensor) -> torch.Tensor:
        """The patches kept besides ``kept`` (PruMerge+'s uniform samples), ``[S, N]`` bool."""
        return pm.no_samples(kept)

    def capacity(self, n: int, ratio: float) -> int:
        return pm.with_extra(n, pm.iqr_capacity(n))

    def slots(self, inputs: VisionInputs, ratio: float, slots: int, options: PruMergeOptions) -> VisionSlots:
        a, keys = pm.cls_importance(inputs.query, inputs.key), pm.patch_keys(inputs.key)
        kept = self.select(a, ratio)
        sampled = self.samples(kept)
        ranks, is_kept, valid = pm.kept_slots(kept, sampled, a, slots, options.order)
        merged = pm.merged_slots(inputs.features, keys, a, kept | sampled, ranks, is_kept, valid, self.neighbours)
        return VisionSlots(merged, ranks, is_kept, valid)

    def labels(self, inputs: VisionInputs, out: VisionSlots, options: PruMergeOptions) -> torch.Tensor:
        return pm.merge_labels(pm.patch_keys(inputs.key), out.ranks, out.kept, self.neighbours)


class PruMergePlus(PruMerge):
    name = "prumerge_plus"
    summary = "PruMerge+: IQR outliers + uniform samples (stride from the IQR share), merged alike"
    typical_kept = 0.25

    def samples(self, kept: torch.Tensor) -> torch.Tensor:
        return pm.uniform_samples(kept)

    def capacity(self, n: int, ratio: float) -> int:
        return pm.plus_capacity(n)


class PruMergeFixed(PruMerge):
    name = "prumerge_fixed"
    summary = "PruMerge with a fixed budget: the Nt most [CLS]-attended patches, merged alike"
    adaptive = False
    typical_kept = None

    def select(self, a: torch.Tensor, ratio: float) -> torch.Tensor:
        return pm.top_fraction(a, ratio)

    def capacity(self, n: int, ratio: float) -> int:
        return pm.with_extra(n, num_targets(n, ratio))
