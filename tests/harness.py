"""Helpers shared by the test modules (imported by name: ``from harness import …``; a
``from conftest import …`` would be ambiguous with ``tests/passes/conftest.py``)."""

from __future__ import annotations

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
