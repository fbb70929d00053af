"""``libra_fx.compile``: the one call that makes ``model(...)`` and ``model.generate(...)`` compress.

::

    model = libra_fx.compile(model, ratio=0.5, layers=(7, 15, 23))
    out = model.generate(**inputs, max_new_tokens=64)

It checks the settings against the model, switches the language model to the ``libra|…``
attention (:mod:`libra_fx.sequence.attention`), and replaces ``model.forward`` by a compiled forward
using :func:`libra_fx.backend`; ``generate`` calls ``self.forward``, so prefill and decode both go
through the backend. Prefill is rewritten; decode steps hold no visual tokens and are compiled as
they are, each layer attending to its own (full or compressed) KV cache. What a decode step needs
from its prefill lives in the model's :class:`~libra_fx.state.ModelState` (``model.libra_backend.state``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

import torch
from transformers import DynamicCache

from libra_fx import families
from libra_fx.config import CompressionConfig
from libra_fx.dynamo_backend import LibraBackend
from libra_fx.hf_compat import kv_cache, prompt_tokens
from libra_fx.methods import is_vision_method
from libra_fx.sequence.attention import PREFIX, use_libra_attention
from libra_fx.state import ModelState


# transformers' @deprecate_kwarg wrapper is one code object shared by every decorated forward, so
# Dynamo's default limit of 8 compiled versions per code object is soon reached by one model's prefill,
# decode and batch-size graphs: past it the frame would run eagerly, uncompressed.
RECOMPILE_LIMIT = 64


def num_decoder_layers(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return config.num_hidden_layers


def check_layers(model, family, config: CompressionConfig) -> None:
    """``ValueError`` for a stage layer beyond the decoder, or one the family cannot compress after."""
    config.check_layers(num_decoder_layers(model))
    if config.active:
        family.check_stage_layers(model.config, config.layers)


def compile(model, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None, strict=False, *,
            compiler="inductor", fullgraph=False):  # noqa: A001  (mirrors torch.compile)
    """Compile ``model.forward`` with the libra backend in place; returns ``model``.

    Raises ``ValueError`` at once for a wrong setting, including a layer index beyond the
    model's decoder. A model of no family in :mod:`libra_fx.families` is compiled uncompressed,
    with a ``LibraFallbackWarning`` naming it (``strict=True``: ``UnsupportedGraph``).
    The backend is ``model.libra_backend`` (its ``records`` say what happened).
    Prompts of new lengths recompile once, then share a graph with a symbolic length
    (Dynamo's automatic dynamic shapes); decode steps share one graph from the first (the cache's
    growing length is marked dynamic): two prefill graphs and one decode graph in all.
    ``fullgraph=False`` (the default) lets the vision code of LLaVA-NeXT and Qwen2-VL break the
    graph; the graph that holds the visual tokens and the decoder is compressed. Only the default
    dynamic KV cache is supported (``ValueError`` for a static one).

    Called again on a model it compiled, it applies the new settings to the graphs already captured
    (rewritten again on the next call, no new trace): a ratio sweep on one model compiles once.
    """
    if isinstance(getattr(model.forward, "libra_fx_backend", None), LibraBackend):
        return _reconfigure(model, CompressionConfig.build(ratio, layers, method, tau, eta), strict,
                            compiler, fullgraph)
    family, refused = families.check_model(model, strict)
    be = LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler,
                      state=ModelState(family, refused, serves_decode=True, strict=strict))
    model.libra_backend = be
    if family is None:
        model.forward = _mark(torch.compile(model.forward, backend=be, fullgraph=fullgraph), be, fullgraph)
        return model
    check_layers(model, family, be.config)
    be.state.attention = use_libra_attention(model).removeprefix(PREFIX)
    family.install_shims(model)
    eager_forward = model.forward
    compiled = torch.compile(with_own_code(eager_forward), backend=be, fullgraph=fullgraph)
    vision_side = is_vision_method(be.config.method)

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        check_cache(kv_cache(kwargs))
        if vision_side:
            kwargs = without_return_dict(kwargs)
        kwargs = be.state.before_call(family.prepare_forward(model, kwargs), family.refused_inputs(model, kwargs))
        if be.state.uncompressed_reason(args, kwargs) is not None:
            return eager_forward(*args, **kwargs)
        static_batch(args, kwargs)
        growing_lengths_dynamic(kwargs)
        try:
            with torch._dynamo.config.patch(capture_scalar_outputs=True,  # no break at feature-count checks
                                            recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)), \
                    symbolic_length(args, kwargs) if family.symbolic_length else contextlib.nullcontext():
                out = compiled(*args, **kwargs)
        except RuntimeError as error:
            if "Runtime assertion failed" in str(error):
                explain_failed_check(family, model, eager_forward, args, kwargs, error)
            raise
        be.state.after_call(args, kwargs, out)
        return out

    if vision_side:  # keep the vision tower inside the compiled forward under generate()
        forward.__signature__ = signature_for_generate(model.forward)
    model.forward = _mark(forward, be, fullgraph)
    model.generate = _knowing_the_prompt(model.generate, be.state)
    return model


def with_own_code(method):
    """``method`` (bound) as a new function object on a copy of its code object.

    Dynamo keeps compiled code, and counts recompiles against ``recompile_limit``, per code object. The
    outermost code of a transformers forward is one wrapper shared by every model (and by every
    ``torch.compile`` of a plain model): a copy gives this model its own entries, so a sweep of many
    compiled models, or a plain compiled baseline in the same process, cannot push it to eager."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(functools.update_wrapper(copy, fn), method.__self__)


def _knowing_the_prompt(generate, state: ModelState):
    """``generate`` that tells the model's state its prompt (see :meth:`ModelState.generating`)."""
    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        with state.generating(prompt if prompt is not None else kwargs.get("inputs_embeds")):
            return generate(*args, **kwargs)

    return wrapper


def _mark(forward, be: LibraBackend, fullgraph: bool):
    forward.libra_fx_backend, forward.libra_fx_fullgraph = be, fullgraph
    return forward


def _reconfigure(model, config: CompressionConfig, strict: bool, compiler: str, fullgraph: bool):
    be, was = model.forward.libra_fx_backend, model.forward.libra_fx_fullgraph
    if fullgraph != was:
        raise ValueError(f"libra_fx.compile: this model was compiled with fullgraph={was}; call it again with "
                         "the same fullgraph, or compile a fresh model")
    if is_vision_method(config.method) != is_vision_method(be.config.method):
        raise ValueError(f"libra_fx.compile: this model was compiled for {be.config.method!r}; switching between "
                         "decoder-side and vision-side methods changes the forward itself: compile a fresh model")
    if be.state.family is not None:
        check_layers(model, be.state.family, config)
    be.reconfigure(config, strict, compiler)
    be.state.strict = strict
    return model


def static_batch(args: tuple, kwargs: dict) -> None:
    """Keep the batch size out of Dynamo's automatic dynamic shapes: after a B=1 call, a B=2 call
    would otherwise make every per-sample count (images, features) symbolic, and the passes could
    no longer tell how the features split into images. Each batch size gets its own graph."""
    ids = prompt_tokens(args, kwargs)
    if ids is None:
        return
    for value in (*args[:1], *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == ids.shape[0]:
            torch._dynamo.mark_static(value, 0)


def growing_lengths_dynamic(kwargs: dict) -> None:
    """Mark a decode step's growing lengths dynamic at once (the KV cache's, the 2-D attention mask's):
    with Dynamo's automatic dynamic shapes the second step would compile the step's graph again."""
    cache = kv_cache(kwargs)
    if cache is None or not cache.get_seq_length():
        return
    for layer in getattr(cache, "layers", ()):
        for kv in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(kv, torch.Tensor) and kv.dim() == 4:
                torch._dynamo.maybe_mark_dynamic(kv, 2)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        torch._dynamo.maybe_mark_dynamic(mask, 1)


TOKEN_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")


@contextlib.contextmanager
def symbolic_length(args: tuple, kwargs: dict):
    """Keep the prompt length symbolic from the first call on, for as long as the block runs (the
    families whose decoders derive sizes from it: ``FamilyAdapter.symbolic_length``).

    The per-token inputs' length dimension (``input_ids``' dim 1, ``position_ids``' last, …) is marked
    dynamic, and so is every tensor dimension and int of that value that Dynamo meets while the block
    runs (``torch.compiler.config.dynamic_values``): after a graph break (a vision tower's), the
    embeddings reach the decoder's graph as a new input, which would otherwise be static. Every size
    the graph derives from the length (``E·T`` routing rows, ``T + k − 1`` convolution lengths, chunk
    padding) is then an expression of one symbol, which the passes rewrite for the shorter sequence,
    and no other dimension of the same value (``head_dim``) can be taken for it. Dynamo may still
    specialise the length (no error): such a graph is rewritten as a static one. Other families compile
    their first prompt with static shapes: symbolic shapes cost the passes' shape check about ten times
    as much, and their graphs turn symbolic at the second prompt length anyway.
    """
    ids = prompt_tokens(args, kwargs)
    if ids is None or ids.dim() < 2 or ids.shape[1] < 2:  # nothing to compress in a decode step
        yield
        return
    named = dict(kwargs, input_ids=ids)
    for name in TOKEN_INPUTS:
        value = named.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or name == "attention_mask" and value.dim() != 2:
            continue  # (a 4-D mask of the caller's own is left as it is)
        dim = 1 if name == "inputs_embeds" else value.dim() - 1
        if value.shape[dim] == ids.shape[1]:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    with torch.compiler.config.patch(dynamic_values=str(ids.shape[1])):
        yield


def explain_failed_check(family, model, forward, args: tuple, kwargs: dict, error: RuntimeError) -> None:
    """A check inside the compiled graph failed with Dynamo's bare "Runtime assertion failed" (so do
    transformers' feature-count checks, under ``capture_scalar_outputs``): run the forward eagerly,
    without the family's shims, and raise the model's own error if it has one (``ValueError``)."""
    try:
        with torch.no_grad(), family.without_shims(model):
            forward(*args, **kwargs)
    except ValueError as eager:
        raise ValueError(f"libra_fx: {eager}") from error


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

    transformers ≥ 5.2x ``generate()`` runs the vision tower *before* the first forward (and passes
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
