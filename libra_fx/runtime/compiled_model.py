"""The runtime of one model compiled by :func:`libra_fx.compile`: one :class:`CompiledModel` per model.

It owns the model's compression settings (through its backend), its compiled forward, the layouts of
its compressed KV caches, and its own attention registration. ``model.forward`` becomes
:meth:`CompiledModel.forward`, a call in named steps, each with one job::

    call = begin(args, kwargs)        cache check, return_dict, family preparation, decode completion
    fallback_reason(call)             run uncompressed? (decided here, before any graph runs; warned)
    out = run_compiled(call)          dynamic shapes, Dynamo's settings, the model's own errors
    finish(call, out)                 keep the returned cache's layout; warn if nothing was compressed

What one call needs travels in its :class:`Call`; what lives between calls (layouts, the prompt of the
``generate()`` in progress, whether the "ran uncompressed" warning was given) is this object's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from libra_fx.config import CompressionConfig
from libra_fx.errors import LibraFallbackWarning, UnsupportedGraph
from libra_fx.runtime.compat import (compile_settings, dynamic_values, is_failed_runtime_assertion, kv_cache,
                                     prompt_tokens, returned_cache, with_own_code)
from libra_fx.runtime.dynamic_shapes import growing_lengths_dynamic, static_batch, symbolic_length
from libra_fx.runtime.layouts import DecodeLayouts
from libra_fx.sequence.attention import use_libra_attention

# transformers' @deprecate_kwarg wrapper is one code object shared by every decorated forward, so
# Dynamo's default limit of 8 compiled versions per code object is soon reached by one model's prefill,
# decode and batch-size graphs: past it the frame would run eagerly, uncompressed.
RECOMPILE_LIMIT = 64


@dataclass
class Call:
    """One forward call: its inputs (completed by :meth:`CompiledModel.begin`) and what its graphs did."""

    args: tuple
    kwargs: dict
    prefill: bool  # it started on an empty cache (it fills the cache it is given)
    refused: str | None = None  # why the family does not compress these inputs
    graphs_run: list[bool] = field(default_factory=list)  # its compiled graphs: whether each was compressed
    side_outputs: dict = field(default_factory=dict)  # of its compressed graph

    def graph_ran(self, compressed: bool, side_outputs: dict) -> None:
        """Called by the backend after each compiled graph of this call."""
        self.graphs_run.append(compressed)
        self.side_outputs.update(side_outputs)


class CompiledModel:
    """The compressed forward of ``model`` with ``backend`` (a :class:`~libra_fx.LibraBackend`) in place.

    ``family``: the model's adapter (``None``: an unknown family, compiled uncompressed, ``refused`` says
    why). ``fullgraph``: as for ``torch.compile``."""

    def __init__(self, model, backend, family, refused: str | None, fullgraph: bool):
        self.model, self.backend, self.family, self.refused, self.fullgraph = model, backend, family, refused, fullgraph
        self.layouts = DecodeLayouts()
        self.generate_prompt: int | None = None  # the prompt length of the generate() in progress
        self.warned_uncompressed = False
        self.vision_side = backend.config.spec.method.side == "vision"
        if family is None:
            self.attention, self.eager_forward = None, model.forward
            self.compiled = torch.compile(model.forward, backend=backend, fullgraph=fullgraph)
            return
        self.attention = use_libra_attention(model)  # the language model's own implementation: "sdpa", "eager", …
        family.install_shims(model)
        self.eager_forward = model.forward
        self.compiled = torch.compile(with_own_code(self.eager_forward), backend=backend, fullgraph=fullgraph)

    @property
    def config(self) -> CompressionConfig:
        return self.backend.config

    @property
    def strict(self) -> bool:
        return self.backend.strict

    # --- installing ------------------------------------------------------------------------------------
    def install(self) -> None:
        """Replace ``model.forward`` (and ``generate``, to know each prompt) by this object's."""
        model = self.model
        if self.family is None:
            forward = self.compiled
        else:
            forward = functools.wraps(self.eager_forward)(functools.partial(CompiledModel.forward, self))
            if self.vision_side:  # keep the vision tower inside the compiled forward under generate()
                forward.__signature__ = signature_for_generate(self.eager_forward)
            model.generate = self._knowing_the_prompt(model.generate)
        forward.libra_fx = self
        model.forward, model.libra_backend = forward, self.backend

    def reconfigure(self, config: CompressionConfig, strict: bool, compiler: str, fullgraph: bool) -> None:
        """New settings for the graphs already captured (rewritten on the next call, no new trace)."""
        if fullgraph != self.fullgraph:
            raise ValueError(f"libra_fx.compile: this model was compiled with fullgraph={self.fullgraph}; call it "
                             "again with the same fullgraph, or compile a fresh model")
        if (config.spec.method.side == "vision") != self.vision_side:
            raise ValueError(f"libra_fx.compile: this model was compiled for {self.config.method!r}; switching between "
                             "decoder-side and vision-side methods changes the forward itself: compile a fresh model")
        if self.family is not None:
            check_layers(self.model, self.family, config)
        self.backend.reconfigure(config, strict, compiler)

    # --- the forward, in steps -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        call = self.begin(args, kwargs)
        if self.fallback_reason(call) is not None:
            return self.eager_forward(*call.args, **call.kwargs)
        out = self.run_compiled(call)
        self.finish(call, out)
        return out

    def begin(self, args: tuple, kwargs: dict) -> Call:
        """The call's inputs, checked and completed: the cache must be dynamic; the family prepares them;
        a step on a compressed cache gets what its layout needs."""
        cache = kv_cache(kwargs)
        check_cache(cache)
        if self.vision_side:
            kwargs = without_return_dict(kwargs)
        refused = self.family.refused_inputs(self.model, kwargs)
        kwargs = self.family.prepare_forward(self.model, kwargs)
        prefill = cache is None or cache.get_seq_length() == 0
        return Call(args, self.layouts.complete(cache, kwargs), prefill, refused)

    def fallback_reason(self, call: Call) -> str | None:
        """Why this prefill must run the uncompressed model (``None``: it need not); warns (``strict``: raises).

        - the family refuses these inputs (``FamilyAdapter.refused_inputs``);
        - assisted generation runs the prompt and the draft's candidates in one forward: the importance
          query would be a candidate, not the prompt's last token (contract §2);
        - a sample that is all padding has only fully masked rows: SDPA gives them zeros, before and
          after compression alike, but eager attention averages every value, which compression changes.
        """
        if not call.prefill:
            return None
        why = call.refused or self._prefill_not_compressible(call)
        if why is not None:
            self._fall_back(f"libra_fx: {why}")
        return why

    def run_compiled(self, call: Call):
        """The compiled forward, with this call's dynamic shapes and Dynamo's settings; a check that
        failed inside the graph is raised as the model's own error."""
        args, kwargs = call.args, call.kwargs
        static_batch(args, kwargs)
        growing_lengths_dynamic(kwargs)
        length = symbolic_length(args, kwargs, self.family.token_inputs) if self.family.symbolic_length else None
        try:
            with compile_settings(RECOMPILE_LIMIT), dynamic_values(length), self.backend.serving(call):
                return self.compiled(*args, **kwargs)
        except RuntimeError as error:
            if is_failed_runtime_assertion(error):
                self._explain_failed_check(call, error)
            raise

    def finish(self, call: Call, out) -> None:
        """Keep the layout of the cache a compressed prefill returned; warn once when a prefill with
        images ran no compressed graph."""
        self._check_compressed(call)
        cache = returned_cache(out)
        if cache is not None and any(call.graphs_run):
            self.layouts.keep(cache, call.side_outputs, call.args, call.kwargs)

    # --- helpers of the steps --------------------------------------------------------------------------
    def _prefill_not_compressible(self, call: Call) -> str | None:
        tokens, mask = prompt_tokens(call.args, call.kwargs), call.kwargs.get("attention_mask")
        if (kv_cache(call.kwargs) is not None and self.generate_prompt is not None
                and tokens.shape[1] > self.generate_prompt):
            return (f"this generate() runs its prompt together with {tokens.shape[1] - self.generate_prompt} candidate "
                    "token(s) in one forward (assisted generation), so the importance query would be a candidate, not "
                    "the prompt's last token; the prompt is not compressed")
        if self.attention != "sdpa" and mask is not None and mask.dim() == 2 and not mask.any(-1).all():
            empty = (~mask.bool().any(-1)).nonzero().flatten().tolist()
            return (f"sample(s) {empty} of this batch are all padding (an all-zero attention_mask); {self.attention} "
                    "attention averages the values of a fully masked row, which compression would change, so the "
                    "batch runs uncompressed")
        return None

    def _check_compressed(self, call: Call) -> None:
        """Warn (once per model) when a prefill with images ran, but no compressed graph did: Dynamo
        skipped the frame or hit its recompile limit, or no graph with visual tokens reached the decoder."""
        if (not call.prefill or any(call.graphs_run) or self.warned_uncompressed
                or not self.family.has_visual_inputs(call.kwargs)):
            return
        if not call.graphs_run:
            why = ("Dynamo ran the forward without calling the libra backend: it skips this frame, or the forward hit "
                   "torch._dynamo.config.recompile_limit (raise it, or compile once and call libra_fx.compile "
                   "again on the same model to change settings)")
        else:
            why = ("no compiled graph with visual tokens reached the decoder (each graph was left as it is: see "
                   "model.libra_backend.records)")
        self.warned_uncompressed = True
        self._fall_back(f"libra_fx: this forward had images but ran uncompressed: {why}")

    def _fall_back(self, message: str) -> None:
        if self.strict:
            raise UnsupportedGraph(message)
        warnings.warn(message, LibraFallbackWarning, stacklevel=5)

    def _explain_failed_check(self, call: Call, error: RuntimeError) -> None:
        """A check inside the compiled graph failed with Dynamo's bare "Runtime assertion failed" (so do
        transformers' feature-count checks, under ``capture_scalar_outputs``): run the forward eagerly,
        without the family's shims, and raise the model's own error if it has one (``ValueError``)."""
        try:
            with torch.no_grad(), self.family.without_shims(self.model):
                self.eager_forward(*call.args, **call.kwargs)
        except ValueError as eager:
            raise ValueError(f"libra_fx: {eager}") from error

    def _knowing_the_prompt(self, generate):
        """``generate`` that tells this object its prompt's length, by which a prefill that also carries
        candidate tokens is told apart (:meth:`fallback_reason`)."""
        @functools.wraps(generate)
        def wrapper(*args, **kwargs):
            prompt = kwargs.get("inputs")  # generate()'s own name for it, else as forward takes it
            prompt = prompt if prompt is not None else prompt_tokens(args, kwargs)
            with self._generating(None if prompt is None else prompt.shape[1]):
                return generate(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def _generating(self, prompt_len: int | None):
        saved, self.generate_prompt = self.generate_prompt, prompt_len
        try:
            yield
        finally:
            self.generate_prompt = saved


def num_decoder_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def check_layers(model, family, config: CompressionConfig) -> None:
    """``ValueError`` for a stage layer beyond the decoder, or one the family cannot compress after."""
    config.check_layers(num_decoder_layers(model))
    if config.active:
        family.check_stage_layers(model.config, config.layers)


def check_cache(cache) -> None:
    """Only a dynamic cache can hold layers of different lengths (full before a stage, shorter after)."""
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"libra_fx: the KV cache {type(cache).__name__} keeps every layer at one length, written by "
            "position, and cannot hold a compressed sequence; use the default dynamic cache (do not pass "
            "cache_implementation='static' or a StaticCache to generate)"
        )


def signature_for_generate(forward) -> inspect.Signature:
    """``forward``'s signature without ``mm_encoder_outputs``.

    transformers ≥ 5.18 ``generate()`` runs the vision tower *before* the first forward (and passes
    ``mm_encoder_outputs``) when forward accepts that argument; the vision-side methods need the
    tower inside the compiled graph, so ``libra_fx.compile`` hides it and ``pixel_values`` reach forward.
    """
    sig = inspect.signature(forward)
    return sig.replace(parameters=[p for name, p in sig.parameters.items() if name != "mm_encoder_outputs"])


def without_return_dict(kwargs: dict) -> dict:
    """generate() passes ``return_dict=True``, the default; with it Dynamo (torch 2.13) cannot trace
    transformers' output-capturing wrapper of ``get_image_features`` ("mapping proxy affected by
    dictionary mutation"), and the vision-side methods need the vision tower traced."""
    return {k: v for k, v in kwargs.items() if not (k == "return_dict" and v is True)}
