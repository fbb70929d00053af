"""The family adapter: everything libra-fx must know about one model family, in one place.

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
- ``mask``: the decoder's mask semantics; the passes support ``"causal"`` (with padding) only;
- ``vision_methods``: whether its tower has the [CLS] token the vision-side methods need;
  ``projector``: the name of the module that maps the tower's features to the decoder's width
  (the vision-side methods merge at its input);
- ``prepare_forward(model, kwargs)``: anything computed before the compiled forward;
- ``install_shims(model)``: per-instance shims (default: the feature-count message below);
- ``graph_break_hint``: what to tell a user whose graph break cut the visual tokens off the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    classes: tuple[str, ...]
    modeling: tuple[str, ...] = ()
    span_notes: str = "one span per image"
    position_rows: tuple[int, ...] = ()
    mask: str = "causal"
    vision_methods: bool = False
    projector: str = "multi_modal_projector"
    graph_break_hint: str = ""

    def prepare_forward(self, model, kwargs: dict) -> dict:
        """The keyword arguments of one ``forward`` call, completed before the compiled forward runs."""
        return kwargs

    def install_shims(self, model) -> None:
        skip_feature_count_message(model)


class _FeatureCount:
    """Stands in for the visual features in ``get_placeholder_mask``: the same ``numel()`` (so
    the count is still checked), and a constant ``shape`` for the error message."""

    shape = (-1, 1)

    def __init__(self, features):
        self.features = features

    def numel(self):
        return self.features.numel()


def skip_feature_count_message(model) -> None:
    """Let images of a new size share the compiled graph (one recompile, then a symbolic size).

    ``get_placeholder_mask(input_ids, inputs_embeds, image_features, …)`` checks the feature
    count with an error message that formats ``image_features.shape[0]``; formatting a symbolic
    size makes Dynamo specialise it, so every image size would recompile. On this model instance
    the features are handed over as :class:`_FeatureCount`: the same check, a constant message.
    """
    base = getattr(model, "model", None)
    method = getattr(base, "get_placeholder_mask", None)
    if method is None or getattr(method, "libra_fx", False):
        return

    def get_placeholder_mask(input_ids, inputs_embeds, *features, **named):
        features = [None if f is None else _FeatureCount(f) for f in features]
        named = {k: None if f is None else _FeatureCount(f) for k, f in named.items()}
        return method(input_ids, inputs_embeds, *features, **named)

    get_placeholder_mask.libra_fx = True
    base.get_placeholder_mask = get_placeholder_mask
