"""The TorchDynamo backend: run the passes on each captured graph, then hand it to Inductor.

::

    model.forward = torch.compile(model.forward, backend=libra_fx.backend(ratio=0.5))
    model.forward = torch.compile(model.forward, backend="libra")          # the defaults
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._logging import trace_structured

from libra_fx.config import CompressionConfig
from libra_fx.errors import LibraFallbackWarning, NothingToCompress, UnsupportedGraph
from libra_fx.passes import fx_utils, run_pipeline
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.return_side_outputs import SIDE_OUTPUTS
from libra_fx.reports.diff import diff
from libra_fx.state import ModelState

COMPILERS = ("inductor", "eager")


@dataclass
class CompileRecord:
    """What happened to one captured graph."""

    compressed: bool
    reason: str
    passes: list[PassResult] = field(default_factory=list)
    before: fx.GraphModule | None = None  # the graph as Dynamo captured it
    after: fx.GraphModule | None = None  # the graph handed to the compiler

    def __str__(self) -> str:
        head = "compressed" if self.compressed else f"uncompressed: {self.reason}"
        return "\n".join([head] + [str(p) for p in self.passes])


class LibraBackend:
    """A ``torch.compile`` backend that compresses visual tokens inside the captured graph.

    ``records`` holds a :class:`CompileRecord` per captured graph, newest last (a forward with
    graph breaks has several; the most recent 32 are kept); ``last`` is the newest.
    ``compiler="eager"`` runs the rewritten FX graph without Inductor (for debugging);
    ``record=True`` (eager only) also returns each stage's targets and token labels, in
    ``state.side_outputs`` (kept-token maps). ``state`` is the model's :class:`~libra_fx.state.ModelState`
    (``libra_fx.compile`` passes one; a bare backend owns one that serves no decode step).
    """

    def __init__(self, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None,
                 strict=False, *, compiler="inductor", record=False, state: ModelState | None = None):
        self.config = CompressionConfig.build(ratio, layers, method, tau, eta)
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        if record and compiler != "eager":
            raise ValueError("record=True needs compiler='eager' (the records are Python lists of tensors)")
        self.strict, self.compiler, self.record = strict, compiler, record
        self.state = state or ModelState()
        warn_on_compiled_generate()
        self.records: list[CompileRecord] = []
        self.generation = 0  # bumped by reconfigure(): compiled graphs older than it are rebuilt
        self.__name__ = "libra"

    @property
    def last(self) -> CompileRecord | None:
        return self.records[-1] if self.records else None

    def __repr__(self) -> str:
        return f"libra_fx.backend({self.config.describe()}, strict={self.strict})"

    def __call__(self, gm: fx.GraphModule, example_inputs):
        return _Compiled(self, gm, example_inputs)

    def reconfigure(self, config: CompressionConfig, strict: bool, compiler: str) -> None:
        """New settings for every graph this backend compiled: each is rewritten and compiled again on
        its next call, from the graph Dynamo captured (no new trace, so sweeps do not recompile)."""
        if compiler != self.compiler:
            raise ValueError(f"libra_fx: these graphs were compiled with compiler={self.compiler!r}; a new compiler "
                             "needs a fresh model (or torch._dynamo.reset() and a new torch.compile)")
        self.config, self.strict = config, strict
        self.generation += 1

    def rewrite(self, gm: fx.GraphModule) -> CompileRecord:
        """Run the pass pipeline on a copy of ``gm``; ``gm`` itself is left as it was."""
        if not self.config.active:
            return CompileRecord(False, "ratio=0 or layers=(): nothing to do")
        if self.state.refused is not None:
            return CompileRecord(False, self.state.refused, before=gm)
        ctx = RewriteContext(fx_utils.clone(gm), self.config, family=self.state.family,
                             serves_decode=self.state.serves_decode, record=self.record)
        try:
            passes = run_pipeline(ctx)
        except NothingToCompress as e:
            return CompileRecord(False, str(e), before=gm)
        except UnsupportedGraph as e:
            return self._fall_back(str(e), gm)
        record = CompileRecord(True, "", passes, before=gm, after=ctx.gm)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "libra_fx_graph_diff", "encoding": "string"},
            payload_fn=lambda: diff(record).text(),
        )
        return record

    def _fall_back(self, reason: str, gm: fx.GraphModule) -> CompileRecord:
        """The graph stays as it is, with a warning (``strict``: ``UnsupportedGraph``)."""
        message = f"libra_fx: compiling this graph uncompressed: {reason}"
        if self.strict:
            raise UnsupportedGraph(message)
        warnings.warn(message, LibraFallbackWarning, stacklevel=3)
        return CompileRecord(False, reason, before=gm)

    def _compile(self, gm: fx.GraphModule, example_inputs):
        if self.compiler == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(fx_utils.clone(gm), example_inputs)  # Inductor mutates what it is given


class _Compiled:
    """What the backend returns to Dynamo for one captured graph: the rewritten, compiled graph, rebuilt
    from the captured one when the backend's settings change (:meth:`LibraBackend.reconfigure`).

    Side outputs the passes added (contract §8) go to ``backend.state.side_outputs``; Dynamo gets only
    the outputs it traced."""

    def __init__(self, backend: LibraBackend, gm: fx.GraphModule, example_inputs):
        self.backend, self.gm, self.example_inputs = backend, gm, example_inputs
        self.tracing = torch._guards.TracingContext.try_get()  # Dynamo's (fake mode, shape env) of this graph
        self._build()

    def _build(self) -> None:
        be = self.backend
        with torch._guards.tracing(self.tracing):
            record = be.rewrite(self.gm)
            be.records = be.records[-31:] + [record]
            self.fn = be._compile(record.after if record.compressed else self.gm, self.example_inputs)
        self._boxed_call = getattr(self.fn, "_boxed_call", False)  # Dynamo's calling convention (one compiler)
        self.side_outputs = record.after.meta.get(SIDE_OUTPUTS, ()) if record.compressed else ()
        self.compressed, self.generation = record.compressed, be.generation

    def __call__(self, *args):
        if self.generation != self.backend.generation:
            self._build()
        out = self.fn(*args)
        self.backend.state.graphs_run.append(self.compressed)
        extra = len(self.side_outputs)
        if not extra:
            return out
        self.backend.state.side_outputs = dict(zip(self.side_outputs, out[-extra:]))
        return type(out)(out[:-extra]) if isinstance(out, tuple) else out[:-extra]


def backend(ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None, strict=False, *,
            compiler="inductor", record=False) -> LibraBackend:
    """Build a backend for ``torch.compile``; arguments are validated here (``ValueError``).

    ``method``: a name, or :func:`libra_fx.method` with options (``libra_fx.method("turbo", lam=0.5)``);
    ``tau``/``eta`` are the options of ``libra`` (and ``eta`` of ``igm_pos``/``igm_neg``) given by name.
    """
    return LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler, record=record)


def libra_backend(gm: fx.GraphModule, example_inputs):
    """The named backend ``torch.compile(..., backend="libra")``: the defaults of :func:`backend`.

    Registered through the ``torch_dynamo_backends`` entry point in ``pyproject.toml``.
    """
    return LibraBackend()(gm, example_inputs)


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
