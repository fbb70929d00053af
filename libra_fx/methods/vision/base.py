"""The interface of a vision-side method (contract §6): what it asks of the graph, and its maths.

A vision-side method compresses once, where the image features enter the language model. Per image
of ``N`` patches it turns the features into ``C`` *slots* (``C`` = :meth:`VisionMethod.capacity`, static,
``≤ N``): its kept (possibly merged) tokens, then padding. The graph holds every image in its ``C``
slots, so one graph serves every image; an *adaptive* method (a data-dependent count) leaves padding
slots, which the ``mask_padding_slots`` pass hides from every decoder attention::

    signal   VisionInputs(features [S, N, D], query/key [S, H, (1+)N, d] or None)
    slots    → VisionSlots(features [S, C, D], ranks [S, C], kept [S, C], valid [S, C])
    labels   → [S, N] each patch's slot (kept-token maps; PRUNED for a patch in no slot)

A new method is one file (a :class:`VisionMethod` subclass) and one entry in the registry
(``libra_fx.methods.registry``), or :func:`libra_fx.methods.register_vision_method` at run time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from libra_fx.runtime import compat

POSITIONS = ("original", "repacked")
FEATURE_SITES = ("projector_input", "projector_output")
ATTENTION_LAYERS = ("last", "feature")


@dataclass(frozen=True)
class Signal:
    """What the graph must hand a vision-side method.

    ``features``: where it reads (and writes) the image features: ``"projector_input"`` (the tower's
    features as the projector takes them, ``[S, N, Dv]``; merged tokens are then projected) or
    ``"projector_output"`` (the projected features, ``[S, N, D]``: selection on the decoder's inputs).
    ``attention``: ``None`` (features only), or which tower attention layer's query and keys it reads
    (``[S, H, T, d]``, heads split, as the layer's kernel takes them; ``T = N``, or ``1 + N`` with a
    [CLS] first): ``"last"``, the tower's last encoder layer (PruMerge); ``"feature"``, the last layer
    the projector's features come from (``vision_feature_layer``: VisionZip).
    ``cls_token``: it needs a [CLS] token before each image's patches (the family adapter's
    ``VisionTower.cls_token``), in the attention or as ``cls_feature``.
    ``cls_feature``: it also reads the [CLS] token's own feature ``[S, Dv]`` beside the projector's input
    (which drops it): e.g. VisionZip keeps it among its dominant tokens.
    """

    features: str = "projector_input"
    attention: str | None = None
    cls_token: bool = False
    cls_feature: bool = False

    def __post_init__(self):
        if self.features not in FEATURE_SITES:
            raise ValueError(f"features must be one of {', '.join(map(repr, FEATURE_SITES))}, got {self.features!r}")
        if self.attention is not None and self.attention not in ATTENTION_LAYERS:
            raise ValueError(f"attention must be None or one of {', '.join(map(repr, ATTENTION_LAYERS))}, "
                             f"got {self.attention!r}")
        if self.cls_feature and not (self.cls_token and self.features == "projector_input"):
            raise ValueError("cls_feature=True needs cls_token=True and features='projector_input'")
        if self.cls_token and self.attention is None and not self.cls_feature:
            raise ValueError("cls_token=True needs attention or cls_feature: where the [CLS] token is read")

    @property
    def kind(self) -> str:
        """``"tower_attention"`` or ``"features"`` (only)."""
        return "features" if self.attention is None else "tower_attention"


@dataclass(frozen=True)
class VisionOptions:
    """The layout options of every vision-side method: ``order`` of its tokens in the slots (one of the
    class's ``ORDERS``; ``"spatial"``: ascending patch rank) and ``positions``, the splice's:
    ``"original"`` (each kept token keeps its patch's position id, text keeps its own) or ``"repacked"``
    (the compressed sequence is numbered afresh, padding slots skipped). A method with more options, or
    more orders, subclasses it."""

    ORDERS: ClassVar[tuple[str, ...]] = ("spatial",)

    order: str = "spatial"
    positions: str = "original"

    def __post_init__(self):
        for name, valid in (("order", self.ORDERS), ("positions", POSITIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {getattr(self, name)!r}")


class VisionInputs(NamedTuple):
    """What the graph hands the method (its :class:`Signal`): ``features [S, N, D]`` of ``S`` images; with
    ``attention`` the layer's ``query``/``key`` ``[S, H, T, d]``; with ``cls_feature`` the [CLS] token's
    feature ``cls [S, D]`` (each ``None`` otherwise)."""

    features: torch.Tensor
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    cls: torch.Tensor | None = None

    @property
    def has_cls(self) -> bool:
        """Whether the attention's first token is a [CLS] (``T = 1 + N``), read from the static shapes."""
        return self.query is not None and self.query.shape[2] == self.features.shape[1] + 1


class VisionSlots(NamedTuple):
    """A method's slots, each ``[S, C, …]``: ``features`` (float32 or the features' dtype; zeros on
    padding); ``ranks``: each slot's patch (the position id it takes under ``positions="original"``),
    ``N − 1`` for a slot of no patch (a merged extra token, padding); ``kept``: the slot holds a kept
    patch (its rank is meaningful); ``valid``: ``False`` on padding only (always ``True`` unless adaptive)."""

    features: torch.Tensor
    ranks: torch.Tensor
    kept: torch.Tensor
    valid: torch.Tensor


class VisionMethod(ABC):
    """A vision-side method. Subclasses set the class attributes and implement :meth:`capacity` and
    :meth:`slots`; :meth:`labels` has a default (kept patches only). Instances are what the registry holds."""

    side: ClassVar[str] = "vision"
    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[type] = VisionOptions  # a frozen dataclass, VisionOptions or a subclass
    signal: ClassVar[Signal] = Signal()
    adaptive: ClassVar[bool] = False  # a data-dependent count per image, padding slots masked in the decoder
    typical_kept: ClassVar[float | None] = None  # adaptive methods: the kept fraction the FLOPs report assumes

    @abstractmethod
    def capacity(self, n: int, ratio: float) -> int:
        """Static slots per image of ``n`` patches (``1 ≤ C ≤ n``): the most any image can need."""

    @abstractmethod
    def slots(self, inputs: VisionInputs, ratio: float, slots: int, options) -> VisionSlots:
        """The selection and merge of ``S`` images at once, into ``slots`` slots per image (plain tensor
        maths, traced into the graph: static shapes, no host sync)."""

    def labels(self, inputs: VisionInputs, out: VisionSlots, options) -> torch.Tensor:
        """For kept-token maps: each patch's slot (a merged patch: the slot it joined), ``PRUNED`` when
        in none, ``[S, N]``. Default: each kept patch its own slot, the others ``PRUNED``."""
        return kept_labels(out.ranks, out.kept, inputs.features.shape[1])

    def __repr__(self) -> str:
        return f"<vision method {self.name!r}>"


# ------------------------------------------------------------------------------------------------
# Helpers for the common shapes of selection
# ------------------------------------------------------------------------------------------------


def kept_layout(keep: torch.Tensor, slots: int, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ranks, kept)`` ``[S, slots]`` of the patches ``keep`` (``[S, N]`` bool), in ascending ``key``
    (default: patch rank; stable); ``ranks`` is ``N − 1`` after them. Raises (at run time) if an image
    keeps more than ``slots``."""
    s_img, n = keep.shape
    patches = torch.arange(n, device=keep.device).expand(s_img, n)
    key = patches if key is None else key
    order = torch.sort(torch.where(keep, key, key.max() + 1 + patches), dim=-1, stable=True).indices[:, :slots]
    count = keep.sum(-1, keepdim=True)
    compat.assert_async((count <= slots).all(), f"libra_fx: an image kept more patches than its {slots} slots")
    kept = torch.arange(slots, device=keep.device) < count
    return torch.where(kept, order, n - 1), kept


def gather_patches(features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``features[s, ranks[s, c]]``: ``[S, N, D]`` and ``[S, C]`` → ``[S, C, D]``."""
    return features.gather(1, ranks[..., None].expand(*ranks.shape, features.shape[-1]))


def pruned_slots(features: torch.Tensor, keep: torch.Tensor, slots: int,
                 key: torch.Tensor | None = None) -> VisionSlots:
    """The slots of a pure selection: the patches ``keep`` (``[S, N]`` bool) unchanged, in ascending
    ``key`` (default: patch rank), then padding (zeros)."""
    ranks, kept = kept_layout(keep, slots, key)
    return VisionSlots(torch.where(kept[..., None], gather_patches(features, ranks), 0), ranks, kept, kept)


def kept_labels(ranks: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """Each kept patch's slot, ``PRUNED`` for every other patch: ``[S, N]``."""
    from libra_fx.methods.compressors import PRUNED

    s_img, c = ranks.shape
    own = torch.arange(c, device=ranks.device).expand(s_img, c)
    slot_of = torch.full((s_img, n + 1), PRUNED, device=ranks.device)
    return slot_of.scatter(1, torch.where(kept, ranks, n), own)[:, :n]  # other slots write the spare column
