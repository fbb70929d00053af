"""Verify one family on tiny models: the compiled model against the hook oracle, and the identity check.

``verify(family)`` builds a tiny random-weight model of the family from its fixture
(:func:`~libra_fx.conformance.tiny.tiny_model`) and example prompts (:mod:`~libra_fx.conformance.inputs`),
then, for each modality:

- **oracle:** ``libra_fx.compile`` prefill logits against :class:`~libra_fx.conformance.oracle.HookOracle`
  for ``libra`` and ``fastv``, one and two stages, on a left-padded B=2, and ``libra`` at B=1
  (``≤ 1e-5``, ``compiler="eager"``); with ``inductor=True`` also ``libra`` through Inductor
  (``≤ 1e-4``, the prefill logits of ``generate()``);
- **generate:** greedy tokens identical to ``model.generate`` under the oracle (``libra``, two
  stages, the left-padded B=2);
- **identity:** ``fastv`` at a ratio that removes no token equals the plain model bit for bit in a
  forward, and gives its greedy tokens in ``generate``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch
import transformers

import libra_fx
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.oracle import HookOracle
from libra_fx.conformance.tiny import build, tiny_config, tiny_model
from libra_fx.runtime import compat

EAGER_TOL, INDUCTOR_TOL = 1e-5, 1e-4
NO_TOKEN_REMOVED = dict(method="fastv", ratio=0.001, layers=(1,))  # round(N·0.999) = N for every span here
# the left-padded B=2 under each method × schedule, and B=1 once (each batch size is one more trace)
CASES = [(method, layers, 2) for method in ("libra", "fastv") for layers in ((1,), (1, 2))] + [("libra", (1, 2), 1)]
NEW_TOKENS = 4


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class Verification:
    family: object
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def verify(family, modalities=None, inductor: bool = True, seed: int = 0, cases=CASES,
           generate: bool = True) -> Verification:
    """Run every check of the module docstring on ``family``; nothing raises, failures are recorded.
    ``cases`` and ``generate=False`` make a lighter matrix (the test suite's, for its time budget)."""
    result, start = Verification(family), time.perf_counter()
    for token in modalities or family.modalities:
        session = _Session(family, token, seed)
        for name, check in session.checks(inductor, cases, generate):
            try:
                passed, detail = check()
            except Exception as error:  # a crash is a failed check, named
                passed, detail = False, error_summary(error, 300)
            result.checks.append(Check(f"{token} {name}", passed, detail))
    result.seconds = time.perf_counter() - start
    return result


class _Session:
    """One compiled tiny model, reconfigured from case to case (a Dynamo trace per input shape, not per
    case: a model per case would also run into Dynamo's recompile limit), and a second model of the
    same weights that the oracle hooks and the plain runs use."""

    def __init__(self, family, token: str, seed: int):
        compat.reset_dynamo()
        self.family, self.seed = family, seed
        self.reference = tiny_model(family, seed)
        text = self.reference.config.get_text_config()
        window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)

        def inputs(b, text_len=None):
            return example_inputs(self.reference, family, b, pad=(0, 3) if b == 2 else (), seed=seed, token=token,
                                  text_len=text_len)

        # prefill prompts longer than a sliding window or an attention chunk (contract §5); generate within it
        # (decode past the window on a compressed cache is refused)
        self.inputs = {b: inputs(b, window) for b in (1, 2)}
        self.short = {b: inputs(b) for b in (1, 2)} if window else self.inputs
        placeholder = getattr(self.reference.config, f"{token}_token_id")
        self.images = [int((self.inputs[1]["input_ids"][0] == placeholder).sum())]  # one image (or video) per sample
        self.models: dict[str, object] = {}

    def oracle(self, method, layers):
        """The hook oracle on the reference model: one span per sample's image, its markers between."""
        return HookOracle(self.reference, method, 0.5, layers, images=self.images)

    def run(self, compiler: str = "eager", **settings):
        """The compiled model under ``settings``, any fallback an error; its records start afresh.
        (Inductor gets a model of its own: a compiled model keeps its compiler.)"""
        if compiler not in self.models:
            self.models[compiler] = tiny_model(self.family, self.seed)
        with _fallback_is_an_error():
            model = libra_fx.compile(self.models[compiler], compiler=compiler, **settings)
        model.libra_backend.records = []
        return model

    def checks(self, inductor: bool, cases, generate: bool):
        for method, layers, batch in cases:
            yield f"oracle {method} layers={layers} B={batch}", self._oracle(method, layers, batch)
        if inductor:
            yield "oracle libra layers=(1, 2) B=2 inductor (generate's prefill)", self._inductor("libra", (1, 2), 2)
        if generate:
            yield "generate libra layers=(1, 2) B=2", self._generate("libra", (1, 2), 2)
        yield "identity", self._identity

    def _oracle(self, method, layers, batch):
        def check():
            x = self.inputs[batch]
            with torch.no_grad(), self.oracle(method, layers) as oracle:
                want = self.reference(**x).logits
                valid = oracle.valid()
            model = self.run(method=method, ratio=0.5, layers=layers)
            got = _forward(model, x)
            if got.shape != want.shape:
                return False, f"shapes {tuple(got.shape)} vs oracle {tuple(want.shape)}"
            error = (got - want)[valid].abs().max().item()  # padding rows are noise in either
            return error <= EAGER_TOL and _compressed(model), f"max |Δ| {error:.1e}" + _unless_compressed(model)
        return check

    def _inductor(self, method, layers, batch):
        """Through ``generate()``, which encodes the images before the forward: the compiled graph is the
        decoder's (some towers do not compile with Inductor even uncompressed: GLM-4V's data-dependent
        ``nonzero``)."""
        def check():
            x = self.short[batch]
            with self.oracle(method, layers):
                want = _first_logits(self.reference, x)
            got = _first_logits(self.run("inductor", method=method, ratio=0.5, layers=layers), x)
            model = self.models["inductor"]
            error = (got - want).abs().max().item()
            return error <= INDUCTOR_TOL and _compressed(model), f"max |Δ| {error:.1e}" + _unless_compressed(model)
        return check

    def _generate(self, method, layers, batch):
        def check():
            x = self.short[batch]
            with torch.no_grad(), self.oracle(method, layers):
                want = _generate(self.reference, x)
            model = self.run(method=method, ratio=0.5, layers=layers)
            got = _generate(model, x)
            new = slice(x["input_ids"].shape[1], None)
            detail = f"tokens {got[:, new].tolist()} vs oracle {want[:, new].tolist()}"
            return torch.equal(got, want) and _compressed(model), detail + _unless_compressed(model)
        return check

    def _identity(self):
        x, short = self.inputs[2], self.short[2]
        with torch.no_grad():
            want = self.reference(**x).logits
        want_tokens = _generate(self.reference, short)
        model = self.run(**NO_TOKEN_REMOVED)
        got = _forward(model, x)
        same = got.shape == want.shape and torch.equal(got, want)
        tokens = _generate(model, short)
        same_tokens = torch.equal(tokens, want_tokens)
        detail = ("forward bit for bit" if same else "forward differs") + ("; same tokens" if same_tokens else "; tokens differ")
        return same and same_tokens and _compressed(model), detail + _unless_compressed(model)


@contextlib.contextmanager
def _fallback_is_an_error():
    """No gradients, and a ``LibraFallbackWarning`` raised: a check must not pass uncompressed."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        yield


def _forward(model, inputs):
    with _fallback_is_an_error():
        return model(**inputs).logits


def _first_logits(model, inputs) -> torch.Tensor:
    """The logits ``generate()`` draws its first token from (its prefill's last position)."""
    with _fallback_is_an_error():
        return model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                              return_dict_in_generate=True).logits[0]


def _generate(model, inputs):
    with _fallback_is_an_error():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def error_summary(error: Exception, limit: int) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of the message."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def _compressed(model) -> bool:
    return any(r.compressed for r in model.libra_backend.records)


def _unless_compressed(model) -> str:
    return "" if _compressed(model) else "; not compressed: " + "; ".join(r.reason for r in model.libra_backend.records)


MAX_REFUSAL_PARAMETERS = 50_000_000  # shrunk configs whose unshrunk parts stay larger are not built


def check_refusal(model_type: str, class_name: str) -> Check:
    """A class without an adapter, on a text-only prompt (every class takes one): ``libra_fx.compile``
    warns that it is not supported, and its output equals the same model under a plain
    ``torch.compile``, bit for bit (libra-fx adds nothing; Dynamo alone can differ from eager: PaliGemma)."""
    config = tiny_config(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in getattr(transformers, class_name)(config).parameters())
    if size > MAX_REFUSAL_PARAMETERS:
        return Check("refusal", True, f"not run: {size / 1e6:.0f} M parameters after shrinking")
    model = build(getattr(transformers, class_name), config, 0)
    ids = torch.randint(3, 100, (1, 12))
    compat.reset_dynamo()
    with torch.no_grad():
        want = torch.compile(model.forward, backend="eager")(input_ids=ids).logits
    compat.reset_dynamo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", libra_fx.LibraFallbackWarning)
        compiled = libra_fx.compile(model, compiler="eager", **NO_TOKEN_REMOVED)
        with torch.no_grad():
            got = compiled(input_ids=ids).logits
    named = any(f"{class_name} is not a supported architecture" in str(w.message) for w in caught)
    same = torch.equal(got, want)
    detail = ("warns" if named else "no warning") + ("; equals the plain compiled model" if same else "; output differs")
    return Check("refusal", named and same, detail)
