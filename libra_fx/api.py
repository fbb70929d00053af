"""``libra_fx.compile``: the one call that makes ``model(...)`` and ``model.generate(...)`` compress.

::

    model = libra_fx.compile(model, ratio=0.5, layers=(7, 15, 23))
    out = model.generate(**inputs, max_new_tokens=64)

It checks the settings against the model, switches the language model to the ``libra|…``
attention (see :mod:`libra_fx.attention`), and replaces ``model.forward`` by a compiled forward
using :func:`libra_fx.backend`; ``generate`` calls ``self.forward``, so prefill and decode both go
through the backend. Prefill is rewritten; decode steps hold no visual tokens and are compiled as
they are, each layer attending to its own (full or compressed) KV cache.
"""

from __future__ import annotations

import warnings

import torch

from libra_fx.attention import use_libra_attention
from libra_fx.dynamo_backend import LibraBackend, libra_backend


def num_decoder_layers(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return config.num_hidden_layers


def compile(model, ratio=0.5, layers=(7, 15, 23), method="libra", tau=0.7, eta="mean", strict=False, *,
            compiler="inductor", fullgraph=False):  # noqa: A001  (mirrors torch.compile)
    """Compile ``model.forward`` with the libra backend in place; returns ``model``.

    Raises ``ValueError`` at once for a wrong setting, including a layer index beyond the
    model's decoder. The backend is ``model.libra_backend`` (its ``records`` say what happened).
    Prompts of new lengths recompile once, then share a graph with a symbolic length
    (Dynamo's automatic dynamic shapes).
    """
    be = LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler)
    be.config.check_layers(num_decoder_layers(model))
    use_libra_attention(model)
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=be, fullgraph=fullgraph)
    model.libra_backend = be
    return model


def _uses_libra(optimized) -> bool:
    fn = getattr(getattr(optimized, "dynamo_ctx", None), "callback", None)
    for _ in range(8):  # unwrap Dynamo's convert-frame wrappers
        if isinstance(fn, LibraBackend) or fn is libra_backend:
            return True
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
        if fn is None:
            return False
    return False


def warn_on_compiled_generate() -> None:
    """Warn when ``generate`` is taken from ``torch.compile(model, backend=<libra>)``.

    ``OptimizedModule.generate`` is the original model's method, which calls the *uncompiled*
    forward: the backend never runs and nothing is compressed.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if getattr(OptimizedModule, "_libra_fx_warns", False):
        return
    original = OptimizedModule.__getattr__

    def __getattr__(self, name):
        if name == "generate" and _uses_libra(self):
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
