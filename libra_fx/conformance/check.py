"""Verify one family on tiny models: the compiled model against the hook oracle, and the identity check.

``verify(family)`` builds a tiny random-weight model of the family (:mod:`~libra_fx.conformance.tiny`)
and example prompts (:mod:`~libra_fx.conformance.inputs`), then, for each modality:

- **oracle:** ``libra_fx.compile`` prefill logits against :class:`~libra_fx.conformance.oracle.HookOracle`
  for ``libra`` and ``fastv``, one and two stages, B=1 and a left-padded B=2 (``≤ 1e-5`` eager;
  ``≤ 1e-4`` for the one Inductor case);
- **generate:** greedy tokens identical to ``model.generate`` under the oracle, at B=1 and B=2;
- **identity:** ``fastv`` at a ratio that removes no token equals the plain model bit for bit, in a
  forward and in ``generate`` (against the same model under a plain ``torch.compile``, whose decode
  graphs differ from eager transformers by ~1e-7 on their own).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
import transformers

import libra_fx
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.oracle import HookOracle
from libra_fx.conformance.tiny import tiny_config

EAGER_TOL, INDUCTOR_TOL = 1e-5, 1e-4
NO_TOKEN_REMOVED = dict(method="fastv", ratio=0.001, layers=(1,))  # round(N·0.999) = N for every span here
CASES = [(method, layers, batch) for method in ("libra", "fastv") for layers in ((1,), (1, 2)) for batch in (1, 2)]
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


def tiny_model(family, seed: int = 0, attn: str = "sdpa"):
    """A random-weight tiny model of ``family`` in eval mode, EOS disabled (random weights never stop)."""
    config = tiny_config(family.model_types[0], family.tiny, attn)
    torch.manual_seed(seed)
    model = getattr(transformers, family.classes[0])(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def verify(family, modalities=None, inductor: bool = True, seed: int = 0) -> Verification:
    """Run every check of the module docstring on ``family``; nothing raises, failures are recorded."""
    result, start = Verification(family), time.perf_counter()
    for token in modalities or family.modalities:
        session = _Session(family, token, seed)
        for name, check in session.checks(inductor):
            try:
                passed, detail = check()
            except Exception as error:  # a crash is a failed check, named
                passed, detail = False, f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            result.checks.append(Check(f"{token} {name}", passed, detail))
    result.seconds = time.perf_counter() - start
    return result


class _Session:
    """One compiled tiny model, reconfigured from case to case (a Dynamo trace per input shape, not per
    case: a model per case would also run into Dynamo's recompile limit), and a second model of the
    same weights that the oracle hooks and the plain runs use."""

    def __init__(self, family, token: str, seed: int):
        torch._dynamo.reset()
        self.family, self.seed = family, seed
        self.reference = tiny_model(family, seed)
        self.inputs = {b: example_inputs(self.reference, family, b, pad=(0, 3) if b == 2 else (), seed=seed,
                                         token=token) for b in (1, 2)}
        self.model = tiny_model(family, seed)

    def run(self, compiler: str = "eager", **settings):
        """The compiled model under ``settings``, any fallback an error; its records start afresh."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
            model = libra_fx.compile(self.model, compiler=compiler, **settings)
        model.libra_backend.records = []
        return model

    def checks(self, inductor: bool):
        for method, layers, batch in CASES:
            yield f"oracle {method} layers={layers} B={batch}", self._oracle(method, layers, batch)
        if inductor:
            yield "oracle libra layers=(1, 2) B=2 inductor", self._oracle("libra", (1, 2), 2, "inductor", INDUCTOR_TOL)
        yield "generate libra layers=(1, 2) B=2", self._generate("libra", (1, 2), 2)
        yield "generate fastv layers=(1,) B=1", self._generate("fastv", (1,), 1)
        yield "identity", self._identity

    def _oracle(self, method, layers, batch, compiler="eager", tol=EAGER_TOL):
        def check():
            x = self.inputs[batch]
            with torch.no_grad(), HookOracle(self.reference, method, 0.5, layers) as oracle:
                want = self.reference(**x).logits
                valid = oracle.valid()
            model = self.run(compiler, method=method, ratio=0.5, layers=layers)
            got = _forward(model, x)
            if got.shape != want.shape:
                return False, f"shapes {tuple(got.shape)} vs oracle {tuple(want.shape)}"
            error = (got - want)[valid].abs().max().item()  # padding rows are noise in either
            return error <= tol and _compressed(model), f"max |Δ| {error:.1e}" + _unless_compressed(model)
        return check

    def _generate(self, method, layers, batch):
        def check():
            x = self.inputs[batch]
            with torch.no_grad(), HookOracle(self.reference, method, 0.5, layers):
                want = _generate(self.reference, x)[0]
            model = self.run(method=method, ratio=0.5, layers=layers)
            got = _generate(model, x)[0]
            new = slice(x["input_ids"].shape[1], None)
            detail = f"tokens {got[:, new].tolist()} vs oracle {want[:, new].tolist()}"
            return torch.equal(got, want) and _compressed(model), detail + _unless_compressed(model)
        return check

    def _identity(self):
        x = self.inputs[2]
        with torch.no_grad():
            want = self.reference(**x).logits
        plain = tiny_model(self.family, self.seed)
        plain.forward = torch.compile(plain.forward, backend="eager")
        want_tokens, want_logits = _generate(plain, x)
        model = self.run(**NO_TOKEN_REMOVED)
        got = _forward(model, x)
        tokens, logits = _generate(model, x)
        same = got.shape == want.shape and torch.equal(got, want) and torch.equal(tokens, want_tokens) \
            and torch.equal(logits, want_logits)
        return same and _compressed(model), ("bit for bit" if same else "differs") + _unless_compressed(model)


def _forward(model, inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        return model(**inputs).logits


def _generate(model, inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _compressed(model) -> bool:
    return any(r.compressed for r in model.libra_backend.records)


def _unless_compressed(model) -> str:
    return "" if _compressed(model) else "; not compressed: " + "; ".join(r.reason for r in model.libra_backend.records)
