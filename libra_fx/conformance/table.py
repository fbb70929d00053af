"""``libra-fx families``: one row per image-text-to-text class of the installed transformers.

::

    libra-fx families                 # verify every adapted family, check every refusal (18 min on 2 cores)
    libra-fx families --markdown      # the table of docs/models.md
    libra-fx families --only glm4v    # one family, with each check

A row is **verified** (an adapter, and every check of :func:`~libra_fx.conformance.check.verify`
passed), **failed** (an adapter, a check failed: printed), **refused** (no adapter: the reason;
``libra_fx.compile`` runs the model uncompressed with a ``LibraFallbackWarning``; checked on a
text-only prompt: the output equals the plain model's), or **not built** (the tiny config could not
be built here: why).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from libra_fx import families
from libra_fx.conformance.check import Check, Verification, check_refusal, error_summary, verify as run_checks
from libra_fx.conformance.tiny import fixture_for, tiny_config
from libra_fx.families.catalog import ENCODER_DECODER, NO_ADAPTER, REASONS


@dataclass
class Row:
    model_type: str
    class_name: str
    status: str  # verified | failed | refused | not built | adapter (not run)
    note: str = ""


def _adapter(model_type: str):
    """The adapter whose fixture builds ``model_type`` (every adapter has a fixture: ``fixture_for`` raises)."""
    return next((f for f in families.FAMILIES if model_type in fixture_for(f).model_types), None)


def _build_error(model_type: str, class_name: str) -> str | None:
    """Why the tiny config of ``model_type`` does not build (on the meta device: no weights), or ``None``."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            getattr(transformers, class_name)(tiny_config(model_type))
    except Exception as error:  # any failure is the row's reason
        return error_summary(error, 160)
    return None


def _notes(family) -> str:
    stand_in = fixture_for(family).stand_in
    notes = [family.span_notes] + ([f"stand-in: {stand_in}"] if stand_in else [])
    modalities = " and ".join(family.modalities)
    return f"{modalities}; " + "; ".join(notes)


def rows(verify: bool = True, only: tuple[str, ...] = (), report=None) -> list[Row]:
    """The table. ``verify=False`` skips the checks (adapted rows read ``adapter (not run)``);
    ``report(row, verification)`` is called after each verified family."""
    out, verified = [], {}  # a family of several model types (Gemma3, ShieldGemma2) is verified once
    for model_type, class_name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        if only and model_type not in only:
            continue
        family = _adapter(model_type)
        if family is not None and family.classes[0] == class_name:
            row = Row(model_type, class_name, "adapter (not run)", _notes(family))
            if verify:
                result = verified[family.name] = verified.get(family.name) or run_checks(family)
                row.status = "verified" if result.passed else "failed"
                if not result.passed:
                    row.note = "; ".join(f"{c.name}: {c.detail}" for c in result.failures())
                if report:
                    report(row, result)
            out.append(row)
            continue
        error = _build_error(model_type, class_name)
        config_class = transformers.models.auto.configuration_auto.CONFIG_MAPPING[model_type]
        if getattr(config_class(), "is_encoder_decoder", False):
            row = Row(model_type, class_name, "refused", ENCODER_DECODER)
        elif error is not None and model_type not in REASONS:
            row = Row(model_type, class_name, "not built", f"tiny config: {error}")
        else:
            row = Row(model_type, class_name, "refused", REASONS.get(model_type, NO_ADAPTER))
        if verify and row.status == "refused" and error is None:
            _check_refusal(row, report)
        out.append(row)
    return out


def _check_refusal(row: Row, report) -> None:
    """A refused class must warn and equal the plain model (a failure turns the row into ``failed``)."""
    try:
        check = check_refusal(row.model_type, row.class_name)
    except Exception as error:  # the plain model itself fails on a text-only prompt: nothing to compare
        check = Check("refusal", True, f"not checked: the plain model raises {type(error).__name__} on a text prompt")
    if not check.passed:
        row.status, row.note = "failed", f"{row.note}; refusal: {check.detail}"
    if report:
        report(row, Verification(None, [check]))


def markdown(table: list[Row]) -> str:
    counts = {s: sum(r.status == s for r in table) for s in dict.fromkeys(r.status for r in table)}
    head = (f"transformers {transformers.__version__}: {len(table)} image-text-to-text classes; "
            + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".\n\n")
    lines = ["| model type | class | status | notes |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r.model_type}` | {r.class_name} | {r.status} | {r.note.replace('|', '/')} |" for r in table]
    return head + "\n".join(lines) + "\n"


def text(table: list[Row]) -> str:
    width = max(len(r.model_type) for r in table)
    return "\n".join(f"{r.model_type:<{width}}  {r.status:<10}  {r.note}" for r in table) + "\n"
