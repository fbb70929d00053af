"""Helpers shared by the test modules (imported by name: ``from harness import …``; a
``from conftest import …`` would be ambiguous with ``tests/passes/conftest.py``)."""

from __future__ import annotations

import pytest
import torch

import libra_fx


def compile_and_run(model, inputs, dynamic=False, fullgraph=True, **backend_kwargs):
    """Compile ``model.forward`` with a fresh libra backend, run it once: ``(logits, backend)``.

    Dynamo's cache is reset first: every tiny model shares ``forward``'s code object, and past
    the recompile limit Dynamo would silently fall back to eager.
    """
    torch._dynamo.reset()
    be = libra_fx.backend(**backend_kwargs)
    if dynamic:
        for v in inputs.values():
            if v.dim() == 2:
                torch._dynamo.mark_dynamic(v, 1)
    compiled = torch.compile(model.forward, backend=be, fullgraph=fullgraph)
    with torch.no_grad():
        return compiled(**inputs).logits, be


def assert_runs_uncompressed_with_a_warning(model, inputs, match: str, **settings) -> None:
    """``libra_fx.compile(model, compiler="eager", **settings)`` on ``inputs`` warns (``match``: a regex) and
    gives the plain model's logits bit for bit."""
    with torch.no_grad():
        want = model(**inputs).logits
    torch._dynamo.reset()
    compiled = libra_fx.compile(model, compiler="eager", **settings)
    with pytest.warns(libra_fx.LibraFallbackWarning, match=match), torch.no_grad():
        got = compiled(**inputs).logits
    assert torch.equal(got, want)


class ReusedTrace:
    """One Dynamo trace of ``model.forward``, rewritten afresh by each backend it is called with.

    The method × ratio × schedule products run the passes (and the eager FX graph) on the same
    captured graph instead of tracing the model again for every case: inputs of the same shapes hit
    Dynamo's cache, whose compiled function hands the graph to the current backend's rewrite. A
    ``torch._dynamo.reset()`` elsewhere only costs one more trace.
    """

    def __init__(self, model, fullgraph: bool = True):
        torch._dynamo.reset()  # as compile_and_run: a code object left past the recompile limit would run eagerly
        self.graph = self.example_inputs = self.backend = self.run = None

        def capture(gm, example_inputs):
            self.graph, self.example_inputs = gm, example_inputs
            self.run = self.backend(gm, example_inputs)
            return lambda *args: self.run(*args)

        self.forward = torch.compile(model.forward, backend=capture, fullgraph=fullgraph)

    def __call__(self, inputs: dict, **backend_kwargs):
        """``(logits, backend)`` of ``inputs`` through ``libra_fx.backend(**backend_kwargs)``."""
        self.backend = libra_fx.backend(**backend_kwargs)
        if self.graph is not None:
            self.run = self.backend(self.graph, self.example_inputs)
        with torch.no_grad():
            return self.forward(**inputs).logits, self.backend


def causal_rule_gather_mask(mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The mask rule before issue #16, kept to test against: rows and columns gathered by source, then
    intersected with a causal mask *in the compressed order* (empty slots hidden, each seeing itself).
    For causal masks with padding it equals :func:`libra_fx.sequence.gather.gather_mask`; it breaks
    bidirectional image blocks (Gemma3) and prefix-LM masks (PaliGemma)."""
    b = torch.arange(source.shape[0])[:, None, None]
    index = source.clamp_min(0)
    both = mask.expand(source.shape[0], *mask.shape[1:])[b, :, index[:, :, None], index[:, None, :]].movedim(-1, 1)
    t = source.shape[1]
    empty = (source < 0)[:, None, None, :]
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & ~empty
    alone = torch.eye(t, dtype=torch.bool) & empty.transpose(-1, -2)
    if mask.dtype == torch.bool:
        return both & allowed | alone
    return both.masked_fill(~allowed, torch.finfo(mask.dtype).min).masked_fill(alone, 0)
