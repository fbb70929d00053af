"""The one home of every private or process-wide torch / transformers API libra-fx uses.

Nothing else in libra-fx imports an underscored torch or transformers name, or changes anything
process-wide; each entry below names what it wraps and the versions it was checked on. Checked on:
torch 2.11 and 2.13; transformers 5.17 and 5.25, unless an entry says otherwise. When a release
breaks one, this file is the one to change.

Process-wide changes happen only inside a call to libra-fx:

- :func:`register_attention`: a ``libra|…`` name in transformers' attention registries (one name
  per wrapped function, so two models never share a function they do not both use);
- :func:`warn_on_compiled_generate`: ``OptimizedModule.__getattr__``, once, when a backend is built;
- Dynamo settings, only for the duration of a compiled call (:func:`compile_settings`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch._logging import trace_structured
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

# --------------------------------------------------------------------------------------------------
# transformers: names that differ between versions
# --------------------------------------------------------------------------------------------------


def kv_cache(kwargs: dict):
    """The KV cache handed to a forward, under either name (``None`` when there is none).
    transformers 5.24 renamed the argument ``past_key_values`` → ``cache``."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def returned_cache(output):
    """The KV cache a forward returned, under either name (the output field was renamed with it)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def prompt_tokens(args: tuple, kwargs: dict):
    """The forward's ``[B, T, …]`` token input: ``input_ids`` (by name or first positional), else
    ``inputs_embeds`` (``None`` when there is neither)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if ids is not None else kwargs.get("inputs_embeds")


TRANSFORMERS = Version(transformers.__version__).release[:2]  # (major, minor)


def takes_encoder_outputs(model) -> bool:
    """Whether ``model.forward`` takes the vision tower's outputs computed before it (``mm_encoder_outputs``,
    transformers ≥ 5.18: ``generate()`` then runs the tower before the first forward). In 5.17 there is no such
    argument (forward's ``**kwargs`` swallow it unused): the tower runs inside forward, with graph breaks around it."""
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def skips_causal_mask_when_compiled() -> bool:
    """Whether transformers leaves out the SDPA mask of an unpadded prompt under ``torch.compile`` (no
    ``attn_mask``, ``is_causal=True``): transformers ≥ 5.18. 5.17 builds the ``[B, 1, T, T]`` mask whenever
    Dynamo traces (``masking_utils._ignore_causal_mask_sdpa``)."""
    return TRANSFORMERS >= (5, 18)


def reshapes_sdpa_output() -> bool:
    """Whether transformers' SDPA attention ends in ``attn_output.reshape(B, -1, q_len, head_dim)`` (5.23+, the
    undo of its ``pack_gqa``); before 5.23 the output goes straight to the transpose."""
    return TRANSFORMERS >= (5, 23)


def unpads_image_features_by_data(model_type: str) -> bool:
    """Whether the family's ``get_image_features`` cuts each image's features with data-dependent sizes
    (a per-image loop over ``pixel_attention_mask`` sums and ``spatial_shapes``), so that each image of a
    batch has sizes of its own unbacked symbols: LFM2-VL before transformers 5.24."""
    return model_type == "lfm2_vl" and TRANSFORMERS < (5, 24)


def tower_outside_graph(model) -> None:
    """Run ``model.model``'s ``get_image_features`` / ``get_video_features`` outside Dynamo where ``forward``
    takes no ``mm_encoder_outputs`` (transformers 5.17), as 5.18+ ``generate()`` runs them before the first
    forward. Traced, their ``torch.split(…, sizes.tolist())`` pieces cross the tower's graph breaks into the
    decoder's graph with a size symbol each (under Inductor), which the ragged-batch layout then mixes
    (``Min(s1 …, s38 …)``) and torch 2.13's Inductor cannot bound (``Exponent must be non-negative``)."""
    if takes_encoder_outputs(model):
        return
    inner = model.model
    for name in ("get_image_features", "get_video_features"):
        if hasattr(inner, name) and name not in vars(inner):
            setattr(inner, name, torch.compiler.disable(getattr(inner, name), recursive=True))


def past_window(cache, new_tokens: int) -> int | None:
    """The window of a sliding-window layer of ``cache`` that this step's last query position reaches
    or passes (``None`` when there is none). Such a layer keeps its last ``window − 1`` entries by
    count, and after compression its entries are no longer its last positions."""
    layers = getattr(cache, "layers", ())
    last = cache.get_seq_length() + new_tokens - 1
    windows = [w for w in (getattr(layer, "sliding_window", None) for layer in layers) if w and last >= w]
    return min(windows) if windows else None


# --------------------------------------------------------------------------------------------------
# transformers: attention implementations
# --------------------------------------------------------------------------------------------------


def attn_implementation(config) -> str:
    """``config._attn_implementation``: the attention a (sub-)config's modules call."""
    return config._attn_implementation


@contextlib.contextmanager
def attention_switched(config, name: str):
    """``config``'s attention set to ``name`` for as long as the block runs (the hook oracle's eager runs).
    Sets the private field, as transformers' own ``set_attn_implementation`` does after its checks."""
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield config
    finally:
        config._attn_implementation = saved


def set_attn_implementation(config, name: str) -> None:
    """Set ``config``'s attention before a model is built from it (tiny test models)."""
    config._attn_implementation = name


def attention_function(module: torch.nn.Module, name: str):
    """The function ``module`` (a decoder attention module) calls for the implementation ``name``: for
    ``"eager"``, its modeling file's own ``eager_attention_forward`` (Gemma's soft-caps, Llama's does
    not); otherwise what transformers' registry holds (the modeling file's own registry, which may
    override a name locally, else the global one)."""
    import sys

    modeling = sys.modules[type(module).__module__]
    if name == "eager":
        fn = getattr(modeling, "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
        return fn
    registry = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    return registry[name] if registry is not None else AttentionInterface._global_mapping[name]


def register_attention(name: str, fn, mask_like: str) -> None:
    """Register ``fn`` as the attention ``name``, with the mask builder of ``mask_like``.
    transformers' registries are process-wide (``GeneralInterface._global_mapping``)."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[mask_like])


def is_registered_attention(name: str) -> bool:
    return name in AttentionInterface._global_mapping


def is_shared_attention(name: str, fn) -> bool:
    """Whether ``fn`` is what transformers' global registry holds under ``name``: the one function every
    model of that implementation calls (``"eager"`` is never there: each modeling file has its own)."""
    return AttentionInterface._global_mapping.get(name) is fn


# --------------------------------------------------------------------------------------------------
# transformers: family internals a family adapter shims per model instance
# --------------------------------------------------------------------------------------------------

DEEPSTACK = "_deepstack_process"  # Qwen3-VL's text model: adds DeepStack features after early layers (5.17–5.25)


# --------------------------------------------------------------------------------------------------
# Dynamo
# --------------------------------------------------------------------------------------------------


def optimized_module_type() -> type:
    """``torch.compile(module)``'s wrapper class."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def compiled_original(model):
    """The module inside ``torch.compile(module)``'s wrapper (``None`` for any other object)."""
    return getattr(model, "_orig_mod", None) if isinstance(model, optimized_module_type()) else None


def mark_static(tensor: torch.Tensor, dim: int) -> None:
    torch._dynamo.mark_static(tensor, dim)


def maybe_mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def compile_settings(recompile_limit: int):
    """Dynamo's settings for one compiled call, restored after it: ``capture_scalar_outputs`` (a
    data-dependent count, as in transformers' feature-count checks, stays in the graph instead of
    breaking it) and at least ``recompile_limit`` compiled versions per code object."""
    return torch._dynamo.config.patch(capture_scalar_outputs=True,
                                      recompile_limit=max(torch._dynamo.config.recompile_limit, recompile_limit))


def dynamic_values(value: str | None):
    """Every int and tensor dimension equal to ``value`` is traced symbolic while the block runs
    (``torch.compiler.config.dynamic_values``; nothing when ``None``)."""
    if value is None:
        return contextlib.nullcontext()
    return torch.compiler.config.patch(dynamic_values=value)


def is_failed_runtime_assertion(error: BaseException) -> bool:
    """Whether ``error`` is a check inside a compiled graph that failed (Dynamo's bare message; a
    ``RuntimeError`` whose text is the only mark, torch 2.11–2.13)."""
    return isinstance(error, RuntimeError) and "Runtime assertion failed" in str(error)


def reset_dynamo() -> None:
    """Forget every compiled graph of the process (``torch._dynamo.reset``): only for libra-fx's own
    command-line tools and benchmarks, never inside a library call."""
    torch._dynamo.reset()


def dynamo_counters() -> dict:
    """Dynamo's global counters (``torch._dynamo.utils.counters``): graphs, breaks, recompiles."""
    return torch._dynamo.utils.counters


def quiet_dynamo_logs() -> None:
    """Dynamo's log at ERROR (the conformance command's output)."""
    import logging

    torch._logging.set_logs(dynamo=logging.ERROR)


def with_own_code(method):
    """``method`` (bound) as a new function object on a copy of its code object.

    Dynamo keeps compiled code, and counts recompiles against ``recompile_limit``, per code object. The
    outermost code of a transformers forward is one wrapper shared by every model (and by every
    ``torch.compile`` of a plain model): a copy gives this model its own entries, so a sweep of many
    compiled models, or a plain compiled baseline in the same process, cannot push it to eager."""
    fn = getattr(method, "__func__", method)
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy = functools.update_wrapper(copy, fn)
    return types.MethodType(copy, method.__self__) if hasattr(method, "__self__") else copy


def wrapped_backends(callback):
    """Dynamo's callback and the backends inside its convert-frame wrappers (``_torchdynamo_orig_backend``,
    ``compiler_fn``), outermost first."""
    fn = callback
    for _ in range(8):
        if fn is None:
            return
        yield fn
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)


# --------------------------------------------------------------------------------------------------
# The backend's side of Dynamo: tracing context, Inductor, the calling convention, structured logs
# --------------------------------------------------------------------------------------------------


def current_tracing_context():
    """Dynamo's tracing context of the graph being compiled (its fake mode and shape env)."""
    return torch._guards.TracingContext.try_get()


def tracing(context):
    """Make ``context`` current again (a graph rewritten and compiled after Dynamo handed it over)."""
    return torch._guards.tracing(context)


def tracing_context(fake_mode):
    """A new tracing context around ``fake_mode`` (a graph compiled outside Dynamo: benchmarks)."""
    return torch._guards.TracingContext(fake_mode)


def fake_mode_with_shape_env():
    """A fake-tensor mode with its own shape environment."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv())


def inductor(gm: fx.GraphModule, example_inputs):
    """Inductor's compiler (``compile_fx``); it mutates the graph it is given, so callers pass a copy."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def boxed_call(compiled_fn) -> bool:
    """Whether a compiled function takes its inputs as one list it may free (Inductor's ``_boxed_call``)."""
    return getattr(compiled_fn, "_boxed_call", False)


def log_artifact(name: str, payload_fn) -> None:
    """A string artifact in ``TORCH_TRACE`` structured logs (tlparse shows it)."""
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload_fn)


# --------------------------------------------------------------------------------------------------
# FX graphs and fake tensors
# --------------------------------------------------------------------------------------------------

SDPA_OPS = frozenset({torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention})
PAD_OPS = (F.pad, torch._C._nn.pad)


def empty_graph_like(gm: fx.GraphModule) -> fx.Graph:
    """A new graph with ``gm``'s code generator (Dynamo's pytree calling convention)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    return graph


def sympy_mod_types() -> tuple:
    """The modulo functions of torch's symbolic shapes (``Mod``, ``PythonMod``)."""
    from torch.utils._sympy.functions import Mod, PythonMod

    return Mod, PythonMod


def fake_tensor_type() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


@contextlib.contextmanager
def fake_propagation(mode):
    """Run ops on fake tensors as Dynamo does (python dispatcher on), without the fake-tensor cache."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import disable_fake_tensor_cache

    with mode, enable_python_dispatcher(), disable_fake_tensor_cache(mode):
        yield


def assert_async(condition: torch.Tensor, message: str) -> None:
    """A check that stays inside a compiled graph (no graph break, no host sync)."""
    torch._assert_async(condition, message)


# --------------------------------------------------------------------------------------------------
# A warning on a misuse libra-fx cannot otherwise see
# --------------------------------------------------------------------------------------------------


def warn_on_compiled_generate(uses_libra) -> None:
    """Warn when ``generate`` is taken from ``torch.compile(model, backend=<libra>)``: ``OptimizedModule``
    forwards it to the original model, whose ``generate`` calls the *uncompiled* forward, so nothing is
    compressed. Patches ``OptimizedModule.__getattr__`` once per process (the first backend built);
    the patched lookup is the original for every other name and every other backend."""
    OptimizedModule = optimized_module_type()
    if getattr(OptimizedModule, "_libra_fx_warns", False):
        return
    original = OptimizedModule.__getattr__

    def __getattr__(self, name):
        if name == "generate" and uses_libra(getattr(getattr(self, "dynamo_ctx", None), "callback", None)):
            warnings.warn(
                "libra_fx: generate() on torch.compile(model, backend=libra) runs the UNCOMPILED model, "
                "so no visual token is compressed. Use `model = libra_fx.compile(model, ...)` and call "
                "`model.generate(...)` instead.",
                UserWarning,
                stacklevel=2,
            )
        return original(self, name)

    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule._libra_fx_warns = True
