"""The family adapter: everything libra-fx must know about one model family at run time, in one place;
and the family's fixture: how its tiny test model and example prompts are made.

The passes ask the adapter and never name a family. :class:`FamilyAdapter` itself is the generic
adapter, for the plain LLaVA-like shape: a vision tower whose features are ``masked_scatter``-ed
into the token embeddings at placeholder tokens, then a causal decoder with 1-D position ids. A new
family subclasses it (or instantiates it) and provides:

- ``classes``: the class names it covers — the user-facing ``…ForConditionalGeneration`` *and* the
  inner ``…Model`` that Dynamo records in ``nn_module_stack`` — and ``modeling``, its transformers
  modeling modules (how a bare backend recognises the family in a graph, also after a graph break);
- spans: the generic rule is one ``masked_scatter`` per modality, fed by per-image pieces (a ``cat``
  of ``[N_i, D]``, or one ``[n, N, D]``); each image or video is one span (contract §1). ``span_notes``
  says what the family's spans hold;
- ``position_rows``: the leading rows of multi-axis position ids and RoPE tables (``()``: 1-D);
- ``vision_tower``: what the vision-side methods need to know of its tower (:class:`VisionTower`;
  ``None``: the vision-side methods are not verified on the family);
- ``check_stage_layers(config, layers)``: ``ValueError`` for a stage layer the family cannot compress
  after; the generic rule: a stage layer must hold softmax attention (hybrid decoders' ``layer_types``);
- ``symbolic_length``: whether its decoder derives sizes from the sequence length (MoE routing rows,
  convolution or chunk padding): ``libra_fx.compile`` then keeps the length symbolic from the first call;
  ``chunk_scans``: whether it pads the sequence up to a multiple of a chunk for a scan that padding
  chunks do not change (Gated DeltaNet): after a stage the scan keeps the padded length, and with it
  the chunk count its loop was unrolled for;
- ``token_inputs``: the names of the forward's per-token inputs (``[B, T, …]``: ids, embeddings, the 2-D
  mask, position ids, token types), whose length is the prompt's;
- ``modalities``: what it compresses (``"image"``, ``"video"``); ``refused_inputs(model, kwargs)``: why
  a call's inputs are not compressed (it runs uncompressed, with a warning; the generic rule: a video of
  a family without ``"video"``); ``bare_backend``: why the family needs ``libra_fx.compile`` (a bare
  backend refuses it);
- ``has_visual_inputs(kwargs)``: whether a call passes images or videos (pixels, or encoder outputs);
  ``placeholder_ids(config)``: the ids of its image and video placeholder tokens;
- ``prepare_forward(model, kwargs)``: anything computed before the compiled forward;
- ``install_shims(model)``: per-instance shims (default: the feature-count message below);
- ``graph_break_hint``: what to tell a user whose graph break cut the visual tokens off the decoder.

Its :class:`FamilyFixture` is defined in the same family file, next to the adapter, under the adapter's
name with ``_FIXTURE`` (``LLAVA_FIXTURE`` next to ``LLAVA``); a fixture names its adapter
(``fixture.adapter``), the adapter knows nothing of it, and the runtime never reads one.
:mod:`libra_fx.conformance.tiny` collects them (``FIXTURES``; ``fixture_for(adapter)``) and is the one
factory of tiny models (the tests', ``libra-fx families``' and the benchmarks'). A fixture holds:

- the tiny recipe: ``model_types`` (the keys of transformers' auto mappings; the first is built),
  ``tiny`` (overrides of the generic tiny config), ``stand_in`` (what a tiny model replaces, e.g. a
  timm tower) and ``adapt_tiny(model)`` (fix-ups of the tiny model, e.g. degenerate random weights);
- how an example prompt is made (:mod:`libra_fx.conformance.inputs`): ``vision_inputs`` (``frames`` of
  a video, ``tiles`` of an image), ``wrap_placeholders`` and ``complete_inputs``.

A family whose example inputs differ subclasses :class:`FamilyFixture` in its own file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


SOFTMAX_ATTENTION = frozenset({"full_attention", "sliding_attention", "chunked_attention"})  # transformers' layer_types
TOKEN_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")
PLACEHOLDER_ATTRIBUTES = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")  # of a config
VISUAL_INPUTS = ("pixel_values", "mm_encoder_outputs")  # prefixes of the forward's vision inputs


@dataclass(frozen=True)
class VisionTower:
    """A family's vision tower, as the vision-side methods see it.

    ``cls_token``: a [CLS] token precedes each image's patches in the tower's attention (PruMerge's query);
    ``projector``: the name of the module that maps the tower's features to the decoder's width (the
    vision-side methods merge at its input)."""

    cls_token: bool = True
    projector: str = "multi_modal_projector"


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    classes: tuple[str, ...]
    modeling: tuple[str, ...] = ()
    span_notes: str = "one span per image"
    position_rows: tuple[int, ...] = ()
    vision_tower: VisionTower | None = None
    graph_break_hint: str = ""
    modalities: tuple[str, ...] = ("image",)
    symbolic_length: bool = False
    chunk_scans: bool = False
    bare_backend: str = ""  # why a bare torch.compile with libra_fx.backend cannot compress the family ("": it can)
    token_inputs: tuple[str, ...] = TOKEN_INPUTS

    def check_stage_layers(self, config, layers: tuple[int, ...]) -> None:
        """``ValueError`` for a stage layer that holds no softmax attention (contract §9): the importance
        row is a row of its attention. Hybrid decoders name each layer's kind in ``layer_types``."""
        kinds = getattr(config.get_text_config(), "layer_types", None) or ()
        attention = [i for i, kind in enumerate(kinds) if kind in SOFTMAX_ATTENTION]
        wrong = [layer for layer in layers if layer < len(kinds) and layer not in attention]
        if wrong:
            raise ValueError(
                f"layer {wrong[0]} of {self.name} is a {kinds[wrong[0]]!r} layer, without the softmax attention "
                f"that scores the visual tokens; stage layers must be attention layers: {attention} (got layers={layers})")

    def refused_inputs(self, model, kwargs: dict) -> str | None:
        """Why this call's inputs are not compressed (``None``: they are): a modality not in ``modalities``.
        ``libra_fx.compile`` asks before each call, and runs a refused one uncompressed, with a warning."""
        if "video" not in self.modalities and kwargs.get("pixel_values_videos") is not None:
            return (f"{self.name} videos are not compressed yet: their frames reach the graph as separate feature "
                    "pieces, and the contract makes one span of a whole video (§1)")
        return None

    def has_visual_inputs(self, kwargs: dict) -> bool:
        """Whether a call's keyword arguments pass images or videos: a ``pixel_values…`` argument or the
        tower's outputs (``mm_encoder_outputs``) that is not ``None``."""
        return any(v is not None for k, v in kwargs.items() if k.startswith(VISUAL_INPUTS))

    def placeholder_ids(self, config) -> set[int]:
        """The token ids of the image and video placeholders: the config's ``image_token_id``,
        ``video_token_id``, ``image_token_index`` and ``video_token_index`` that are set (any of them)."""
        ids = (getattr(config, name, None) for name in PLACEHOLDER_ATTRIBUTES)
        return {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}

    def prepare_forward(self, model, kwargs: dict) -> dict:
        """The keyword arguments of one ``forward`` call, completed before the compiled forward runs."""
        return kwargs

    def install_shims(self, model) -> None:
        skip_feature_count_message(model)

    @contextlib.contextmanager
    def without_shims(self, model):
        """The model as transformers made it, for as long as the block runs (its own error messages)."""
        base = placeholder_owner(model)
        shim = vars(base).pop("get_placeholder_mask", None)
        try:
            yield model
        finally:
            if shim is not None:
                base.get_placeholder_mask = shim


@dataclass(frozen=True)
class FamilyFixture:
    """How the tiny random-weight model of ``adapter``'s family and its example prompts are made (tests,
    ``libra-fx families``, benchmarks; never a user's model): see the module docstring."""

    adapter: FamilyAdapter
    model_types: tuple[str, ...]
    tiny: dict = field(default_factory=dict)
    stand_in: str = ""
    frames: int = 4
    tiles: int = 0

    def adapt_tiny(self, model) -> None:
        """What the tiny random model of this family needs besides its config (``stand_in`` says what;
        e.g. weights its random init leaves degenerate); never applied to a user's model."""

    def vision_inputs(self, model, batch: int, gen: torch.Generator, token: str = "image") -> dict:
        """Random vision inputs of ``batch`` samples, one image (``token="image"``; ``[B, 3, H, W]``, or
        ``[B, tiles, 3, H, W]``) or one video of ``frames`` frames each, at the tower's own image size."""
        size = model.config.vision_config.image_size
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        count = self.tiles if token == "image" else self.frames
        shape = (batch, *((count,) if count else ()), 3, *hw)
        return {"pixel_values" if token == "image" else "pixel_values_videos": _pixels(model, shape, gen)}

    def wrap_placeholders(self, config, placeholders: list[int]) -> list[int]:
        """The token ids of one image in a prompt (markers around its placeholders, if any)."""
        return placeholders

    def complete_inputs(self, config, inputs: dict) -> dict:
        """Inputs the model needs besides ids, mask and pixels (e.g. token types)."""
        return inputs


def placeholder_owner(model):
    """The module whose ``get_placeholder_mask`` the forward calls: the inner ``…Model``, or the model itself
    (Llama4 has no inner one)."""
    inner = getattr(model, "model", None)
    return inner if hasattr(inner, "get_placeholder_mask") else model


def _pixels(model, shape, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(next(model.parameters()).dtype)


class _FeatureCount:
    """Stands in for the visual features in ``get_placeholder_mask``: the same ``numel()`` (so the
    count is still checked), a constant shape for the error message (``shape``, ``size()``), the
    same stand-in from every view or cast (a view keeps ``numel``), and the features' own value of
    any other attribute."""

    shape = torch.Size((-1, 1))
    _VIEWS = frozenset({"flatten", "view", "reshape", "permute", "transpose", "contiguous", "to", "float",
                        "squeeze", "unsqueeze", "type"})

    def __init__(self, features):
        self.features = features

    def numel(self):
        return self.features.numel()

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def __getattr__(self, name):
        if name in self._VIEWS:
            return lambda *args, **kwargs: self
        return getattr(self.features, name)


def skip_feature_count_message(model) -> None:
    """Let images of a new size share the compiled graph (one recompile, then a symbolic size).

    ``get_placeholder_mask(input_ids, inputs_embeds, image_features, …)`` checks the feature
    count with an error message that formats ``image_features.shape[0]``; formatting a symbolic
    size makes Dynamo specialise it, so every image size would recompile. On this model instance
    the features are handed over as :class:`_FeatureCount`: the same check, a constant message.
    """
    base = placeholder_owner(model)
    method = getattr(base, "get_placeholder_mask", None)
    if method is None or getattr(method, "libra_fx", False):
        return

    def get_placeholder_mask(input_ids, inputs_embeds, *features, **named):
        features = [None if f is None else _FeatureCount(f) for f in features]
        named = {k: None if f is None else _FeatureCount(f) for k, f in named.items()}
        return method(input_ids, inputs_embeds, *features, **named)

    get_placeholder_mask.libra_fx = True
    base.get_placeholder_mask = get_placeholder_mask
