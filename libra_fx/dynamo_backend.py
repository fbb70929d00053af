"""The TorchDynamo backend: run the passes on each captured graph, then hand it to Inductor.

::

    model.forward = torch.compile(model.forward, backend=libra_fx.backend(ratio=0.5))
    model.forward = torch.compile(model.forward, backend="libra")          # the defaults
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field

import torch.fx as fx

from libra_fx.config import CompressionConfig
from libra_fx.errors import LibraFallbackWarning, NothingToCompress, UnsupportedGraph
from libra_fx.passes import fx_utils, run_pipeline
from libra_fx.passes.context import PassResult, RewriteContext
from libra_fx.passes.return_side_outputs import SIDE_OUTPUTS
from libra_fx.reports.diff import diff
from libra_fx.runtime import compat

log = logging.getLogger("libra_fx.backend")

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
    ``side_outputs`` (kept-token maps): the side outputs of the newest compressed graph run;
    ``graphs_run`` counts the compiled graphs run.
    ``family``/``refused``/``serves_decode``: what :func:`libra_fx.compile` knows of the model (its
    adapter, why it is not compressed at all, and that its forward serves decode steps); a bare
    backend finds the family in each graph.
    """

    def __init__(self, ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None,
                 strict=False, *, compiler="inductor", record=False, config: CompressionConfig | None = None,
                 family=None, refused: str | None = None, serves_decode: bool = False):
        self.config = CompressionConfig.resolve(config, ratio, layers, method, tau, eta)
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        if record and compiler != "eager":
            raise ValueError("record=True needs compiler='eager' (the records are Python lists of tensors)")
        self.strict, self.compiler, self.record = strict, compiler, record
        self.family, self.refused, self.serves_decode = family, refused, serves_decode
        compat.warn_on_compiled_generate(_is_libra)
        self.records: list[CompileRecord] = []
        self.side_outputs: dict[str, object] | None = None  # of the newest compressed graph run
        self.graphs_run = 0  # compiled graphs run so far (compressed or not)
        self.generation = 0  # bumped by reconfigure(): compiled graphs older than it are rebuilt
        self._call = None  # the CompiledModel call in progress (libra_fx.compile's forward), if any
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

    @contextlib.contextmanager
    def serving(self, call):
        """Report the graphs run while the block runs to ``call`` (``call.graph_ran(compressed, side_outputs)``)."""
        saved, self._call = self._call, call
        try:
            yield
        finally:
            self._call = saved

    def graph_ran(self, compressed: bool, side_outputs: dict) -> None:
        self.graphs_run += 1
        if side_outputs:
            self.side_outputs = side_outputs
        if self._call is not None:
            self._call.graph_ran(compressed, side_outputs)

    def rewrite(self, gm: fx.GraphModule) -> CompileRecord:
        """Run the pass pipeline on a copy of ``gm``; ``gm`` itself is left as it was."""
        if not self.config.active:
            return CompileRecord(False, "ratio=0 or layers=(): nothing to do")
        if self.refused is not None:
            return CompileRecord(False, self.refused, before=gm)
        ctx = RewriteContext(fx_utils.clone(gm), self.config, family=self.family,
                             serves_decode=self.serves_decode, record=self.record)
        try:
            passes = run_pipeline(ctx)
        except NothingToCompress as e:
            log.debug("graph left as it is: %s", e)
            return CompileRecord(False, str(e), before=gm)
        except UnsupportedGraph as e:
            log.debug("graph compiled uncompressed: %s", e)
            return self._fall_back(str(e), gm)
        record = CompileRecord(True, "", passes, before=gm, after=ctx.gm)
        log.debug("graph compressed: %s", self.config.describe())
        compat.log_artifact("libra_fx_graph_diff", lambda: diff(record).text())
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
        return compat.inductor(fx_utils.clone(gm), example_inputs)  # Inductor mutates what it is given


class _Compiled:
    """What the backend returns to Dynamo for one captured graph: the rewritten, compiled graph, rebuilt
    from the captured one when the backend's settings change (:meth:`LibraBackend.reconfigure`).

    Side outputs the passes added (contract §8) go to the backend (:meth:`LibraBackend.graph_ran`);
    Dynamo gets only the outputs it traced."""

    def __init__(self, backend: LibraBackend, gm: fx.GraphModule, example_inputs):
        self.backend, self.gm, self.example_inputs = backend, gm, example_inputs
        self.tracing = compat.current_tracing_context()  # Dynamo's (fake mode, shape env) of this graph
        self._build()

    def _build(self) -> None:
        be = self.backend
        with compat.tracing(self.tracing):
            record = be.rewrite(self.gm)
            be.records = be.records[-31:] + [record]
            self.fn = be._compile(record.after if record.compressed else self.gm, self.example_inputs)
        self._boxed_call = compat.boxed_call(self.fn)  # Dynamo's calling convention, as the compiler's
        self.side_outputs = record.after.meta.get(SIDE_OUTPUTS, ()) if record.compressed else ()
        self.compressed, self.generation = record.compressed, be.generation

    def __call__(self, *args):
        if self.generation != self.backend.generation:
            self._build()
        out = self.fn(*args)
        extra = len(self.side_outputs)
        self.backend.graph_ran(self.compressed, dict(zip(self.side_outputs, out[-extra:])) if extra else {})
        if not extra:
            return out
        return type(out)(out[:-extra]) if isinstance(out, tuple) else out[:-extra]


def backend(ratio=0.5, layers=(7, 15, 23), method="libra", tau=None, eta=None, strict=False, *,
            compiler="inductor", record=False, config: CompressionConfig | None = None) -> LibraBackend:
    """Build a backend for ``torch.compile``; arguments are validated here (``ValueError``).

    ``method``: a name, or :func:`libra_fx.method` with options (``libra_fx.method("turbo", lam=0.5)``);
    ``tau``/``eta`` are the options of ``libra`` (and ``eta`` of ``igm_pos``/``igm_neg``) given by name.
    ``config``: a :class:`~libra_fx.CompressionConfig` instead of ``ratio``, ``layers``, ``method``, ``tau``, ``eta``.
    """
    return LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler, record=record, config=config)


def libra_backend(gm: fx.GraphModule, example_inputs):
    """The named backend ``torch.compile(..., backend="libra")``: the defaults of :func:`backend`.

    Registered through the ``torch_dynamo_backends`` entry point in ``pyproject.toml``.
    """
    return LibraBackend()(gm, example_inputs)


def _is_libra(callback) -> bool:
    """Whether a Dynamo callback (``OptimizedModule.dynamo_ctx.callback``) wraps a libra backend."""
    return any(isinstance(fn, LibraBackend) or fn is libra_backend for fn in compat.wrapped_backends(callback))
