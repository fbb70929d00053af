"""``libra_fx.compile``: the one call that makes ``model(...)`` and ``model.generate(...)`` compress.

::

    model = libra_fx.compile(model, ratio=0.5, layers=(7, 15, 23))
    out = model.generate(**inputs, max_new_tokens=64)

It parses the settings once, checks them against the model, and hands the model to its runtime
object, :class:`~libra_fx.runtime.compiled_model.CompiledModel` (``model.forward.libra_fx``), which
switches the language model to its ``libra|…`` attention and replaces ``model.forward`` by a compiled
forward using :func:`libra_fx.backend` (``model.libra_backend``); ``generate`` calls ``self.forward``,
so prefill and decode both go through the backend.
"""

from __future__ import annotations

from libra_fx import families
from libra_fx.config import CompressionConfig
from libra_fx.dynamo_backend import LibraBackend
from libra_fx.runtime.compiled_model import CompiledModel, check_layers


def compile(model, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None, strict=False, *,
            compiler="inductor", fullgraph=False, config: CompressionConfig | None = None):  # noqa: A001
    """Compile ``model.forward`` with the libra backend in place; returns ``model``.

    Raises ``ValueError`` at once for a wrong setting, including a layer index beyond the
    model's decoder. ``config``: a :class:`~libra_fx.CompressionConfig` instead of ``ratio``, ``layers``,
    ``method``, ``tau`` and ``eta``. A model of no family in :mod:`libra_fx.families` is compiled
    uncompressed, with a ``LibraFallbackWarning`` naming it (``strict=True``: ``UnsupportedGraph``).
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
    config = CompressionConfig.resolve(config, ratio, layers, method, tau, eta)
    runtime = getattr(model.forward, "libra_fx", None)
    if isinstance(runtime, CompiledModel):
        runtime.reconfigure(config, strict, compiler, fullgraph)
        return model
    family, refused = families.check_model(model, strict)
    if family is not None:
        check_layers(model, family, config)
    backend = LibraBackend(strict=strict, compiler=compiler, config=config, family=family, refused=refused,
                           serves_decode=True)
    CompiledModel(model, backend, family, refused, fullgraph).install()
    return model
