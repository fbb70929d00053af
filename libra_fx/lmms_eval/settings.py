"""The compression settings of a ``libra_*`` lmms-eval model, taken out of its ``--model_args``.

lmms-eval parses ``--model_args pretrained=...,ratio=0.5,layers=7-15-23,method=turbo,lam=0.5`` into
keyword arguments (numbers already converted); :meth:`EvalSettings.pop_from` takes libra-fx's out and
leaves the rest to the lmms-eval class:

======================  =============================================================================
``ratio``               fraction of each stage's visual tokens removed (default 0.5); ``0``: the model
                        runs as transformers made it, not compiled (the baseline row)
``layers``              stage layers joined by ``-``: ``7-15-23`` (default), ``4``, or ``none``
``method``              a libra-fx method (default ``libra``)
method options          ``tau``, ``eta`` (``libra``), ``lam`` (``turbo``), ``order``, ``positions``
                        (vision-side methods): checked against the method (``ValueError``)
``compiler``            ``inductor`` (default) or ``eager`` (the rewritten graph without Inductor)
``strict``              ``true``: a graph libra-fx cannot compress is an error, not a warning
======================  =============================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import libra_fx
from libra_fx.config import CompressionConfig
from libra_fx.dynamo_backend import COMPILERS
from libra_fx.methods import METHODS, is_vision_method

OPTION_NAMES = tuple(sorted({f.name for m in METHODS.values() for f in dataclasses.fields(m.options)}))


def parse_layers(value) -> tuple[int, ...]:
    """``7-15-23`` → ``(7, 15, 23)``; an int (lmms-eval converts ``layers=4``) → ``(4,)``; ``none`` → ``()``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"layers must be layer indices joined by '-' (e.g. layers=7-15-23), got {value!r}")
    if isinstance(value, int):
        return (value,)
    if value.strip().lower() in ("", "none"):
        return ()
    parts = value.split("-")
    if not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"layers must be layer indices joined by '-' (e.g. layers=7-15-23), got {value!r}")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class EvalSettings:
    config: CompressionConfig
    compiler: str = "inductor"
    strict: bool = False

    @classmethod
    def pop_from(cls, kwargs: dict) -> EvalSettings:
        """Take libra-fx's settings out of ``kwargs`` (validated: ``ValueError``)."""
        options = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        spec = libra_fx.method(kwargs.pop("method", "libra"), **options)
        config = CompressionConfig(ratio=kwargs.pop("ratio", 0.5), layers=parse_layers(kwargs.pop("layers", "7-15-23")),
                                   spec=spec)
        compiler, strict = kwargs.pop("compiler", "inductor"), kwargs.pop("strict", False)
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be true or false, got {strict!r}")
        return cls(config, compiler, strict)

    def apply(self, model):
        """``model`` compiled with these settings (``libra_fx.compile``), or as it is when nothing compresses."""
        if not self.config.active:
            return model
        return libra_fx.compile(model, self.config.ratio, self.config.layers, self.config.spec, strict=self.strict,
                                compiler=self.compiler)

    @property
    def stages(self) -> int:
        """Compression stages per prefill: one per layer, one for a vision-side method, none when inactive."""
        if not self.config.active:
            return 0
        return 1 if is_vision_method(self.config.method) else len(self.config.layers)

    def counted_layers(self, num_layers: int) -> tuple[int, ...]:
        """Where visual tokens are counted: layer 0 and the first layer after each stage."""
        return (0,) + tuple(i + 1 for i in self.config.layers if i + 1 < num_layers)

    def metrics(self) -> dict[str, float]:
        """The numeric settings, for lmms-eval's results (the method's name is in ``config.model_args``)."""
        return {"libra_ratio": float(self.config.ratio) if self.config.active else 0.0,
                "libra_stages": float(self.stages)}

    def describe(self) -> str:
        return self.config.describe() if self.config.active else "uncompressed"
