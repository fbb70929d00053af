"""The TorchDynamo backend: run the passes on each captured graph, then hand it to Inductor.

::

    model.forward = torch.compile(model.forward, backend=libra_fx.backend(ratio=0.5))
    model.forward = torch.compile(model.forward, backend="libra")          # the defaults
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.fx as fx
from torch._logging import trace_structured

from libra_fx import fx_utils
from libra_fx.config import CompressionConfig
from libra_fx.inspect import diff
from libra_fx.passes import NothingToCompress, PassResult, RewriteContext, UnsupportedGraph, run_pipeline
from libra_fx.passes.insert_prumerge import SIDE_OUTPUTS

COMPILERS = ("inductor", "eager")


class LibraFallbackWarning(UserWarning):
    """A graph was compiled uncompressed because the passes could not rewrite it."""


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
    ``compiler="eager"`` runs the rewritten FX graph without Inductor (for debugging).
    """

    def __init__(self, ratio=0.5, layers=(7, 15, 23), method="libra", tau=0.7, eta="mean",
                 strict=False, *, compiler="inductor"):
        self.config = CompressionConfig(ratio=ratio, layers=layers, method=method, tau=tau, eta=eta)
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        self.strict = strict
        self.compiler = compiler
        warn_on_compiled_generate()
        self.records: list[CompileRecord] = []
        # samples with different visual-token counts in one batch: their decode steps need the
        # per-layer empty-slot counts that only ``libra_fx.compile``'s forward passes in
        self.ragged_batches = False
        self.skip_reason: str | None = None  # set by libra_fx.compile for an unsupported model class
        self.side_outputs = None  # extra outputs of the last compressed run (vision-side methods: source, valid)
        self.__name__ = "libra"

    @property
    def last(self) -> CompileRecord | None:
        return self.records[-1] if self.records else None

    def __repr__(self) -> str:
        c = self.config
        return (f"libra_fx.backend(ratio={c.ratio}, layers={c.layers}, method={c.method!r}, "
                f"tau={c.tau}, eta={c.eta!r}, strict={self.strict})")

    def __call__(self, gm: fx.GraphModule, example_inputs):
        record = self.rewrite(gm)
        self.records = self.records[-31:] + [record]
        compiled = self._compile(record.after if record.compressed else gm, example_inputs)
        extra = record.after.meta.get(SIDE_OUTPUTS, 0) if record.compressed else 0
        return self._keep_side_outputs(compiled, extra) if extra else compiled

    def _keep_side_outputs(self, compiled, extra: int):
        """Run ``compiled``, store its last ``extra`` outputs in ``self.side_outputs`` (read by
        ``libra_fx.vision_layout``) and hand Dynamo only the outputs it traced."""
        boxed = getattr(compiled, "_boxed_call", False)

        def run(*args):
            out = compiled(*args)
            self.side_outputs = tuple(out[-extra:])
            return type(out)(out[:-extra]) if isinstance(out, tuple) else out[:-extra]

        if boxed:
            run._boxed_call = True
        return run

    def rewrite(self, gm: fx.GraphModule) -> CompileRecord:
        """Run the pass pipeline on a copy of ``gm``; ``gm`` itself is left as it was."""
        if not self.config.active:
            return CompileRecord(False, "ratio=0 or layers=(): nothing to do")
        if self.skip_reason is not None:
            return CompileRecord(False, self.skip_reason, before=gm)
        ctx = RewriteContext(fx_utils.clone(gm), self.config, ragged_batches=self.ragged_batches)
        try:
            passes = run_pipeline(ctx)
        except NothingToCompress as e:
            return CompileRecord(False, str(e), before=gm)
        except UnsupportedGraph as e:
            message = f"libra_fx: compiling this graph uncompressed: {e}"
            if self.strict:
                raise UnsupportedGraph(message) from e
            warnings.warn(message, LibraFallbackWarning, stacklevel=2)
            return CompileRecord(False, str(e), before=gm)
        record = CompileRecord(True, "", passes, before=gm, after=ctx.gm)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "libra_fx_graph_diff", "encoding": "string"},
            payload_fn=lambda: diff(record).text(),
        )
        return record

    def _compile(self, gm: fx.GraphModule, example_inputs):
        if self.compiler == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(fx_utils.clone(gm), example_inputs)  # Inductor mutates what it is given


def backend(ratio=0.5, layers=(7, 15, 23), method="libra", tau=0.7, eta="mean", strict=False, *,
            compiler="inductor") -> LibraBackend:
    """Build a backend for ``torch.compile``; arguments are validated here (``ValueError``)."""
    return LibraBackend(ratio, layers, method, tau, eta, strict, compiler=compiler)


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
