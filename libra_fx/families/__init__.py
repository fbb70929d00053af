"""Model-family adapters: the only place that names a family (see :mod:`libra_fx.families.base`).

``libra_fx.compile`` looks a model's class up here (subclasses count); the bare backend
recognises the family of a graph from the module classes Dynamo recorded. A model of no listed
family runs uncompressed, with a :class:`~libra_fx.LibraFallbackWarning` naming it
(``strict=True``: :class:`~libra_fx.UnsupportedGraph`). Each family file also defines the family's
test fixture (:class:`~libra_fx.families.base.FamilyFixture`), which only :mod:`libra_fx.conformance.tiny` reads.
"""

from __future__ import annotations

import re
import warnings

import torch.fx as fx

from libra_fx.errors import LibraFallbackWarning, UnsupportedGraph
from libra_fx.families.base import FamilyAdapter
from libra_fx.families.gemma import GEMMA3, PALIGEMMA
from libra_fx.families.lfm2_vl import LFM2_VL
from libra_fx.families.llama4 import LLAMA4
from libra_fx.families.markers import IDEFICS3, MISTRAL3, SMOLVLM
from libra_fx.families.llava import LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO, LLAVA_ONEVISION, VIDEO_LLAVA, VIPLLAVA
from libra_fx.families.plain import (AYA_VISION, COHERE2_VISION, DEEPSEEK_VL, FAST_VLM, INTERNVL, JANUS,
                                     PERCEPTION_LM)
from libra_fx.families.qwen2_vl import GLM4V, QWEN2_5_VL, QWEN2_VL
from libra_fx.families.qwen3_5 import QWEN3_5, QWEN3_5_MOE
from libra_fx.families.qwen3_vl import QWEN3_VL, QWEN3_VL_MOE
from libra_fx.runtime.compat import compiled_original

FAMILIES: tuple[FamilyAdapter, ...] = (
    LLAVA, LLAVA_NEXT, QWEN2_VL, QWEN2_5_VL, LLAVA_ONEVISION, LLAVA_NEXT_VIDEO, VIDEO_LLAVA, VIPLLAVA, INTERNVL,
    AYA_VISION, DEEPSEEK_VL, JANUS, FAST_VLM, COHERE2_VISION, GLM4V, PERCEPTION_LM, GEMMA3, PALIGEMMA, QWEN3_VL,
    QWEN3_VL_MOE, LFM2_VL, LLAMA4, MISTRAL3, IDEFICS3, SMOLVLM, QWEN3_5, QWEN3_5_MOE)


_GENERIC = FamilyAdapter("a model of no family", ())


def supported_classes() -> list[str]:
    """The user-facing model classes of every family (their first class name)."""
    return [f.classes[0] for f in FAMILIES]


def _by_class_names(names) -> FamilyAdapter | None:
    for name in names:
        for family in FAMILIES:
            if name in family.classes:
                return family
    return None


def for_model(model) -> FamilyAdapter | None:
    """The adapter of ``model``'s class or of a base class (``None`` for an unknown family)."""
    return _by_class_names(cls.__name__ for cls in type(model).__mro__)


def placeholder_ids(model) -> set[int]:
    """The ids of ``model``'s image and video placeholder tokens, as its adapter reads them from its config
    (:meth:`FamilyAdapter.placeholder_ids`; a model of no family: the generic adapter's rule)."""
    return (for_model(model) or _GENERIC).placeholder_ids(model.config)


_MODELING_FILE = re.compile(r"transformers/models/\w+/modeling_(\w+)\.py")


def for_graph(gm: fx.GraphModule) -> tuple[FamilyAdapter | None, list[str]]:
    """The adapter of the model a Dynamo graph was traced from, and what identified it: the module
    classes Dynamo recorded (``nn_module_stack``, base classes included), else the transformers
    modeling file of each node's outermost frame — after a graph break a graph may hold only the
    language model (``LlamaModel``) while its frame is still ``modeling_llava_next.py``'s forward."""
    module_types, modeling = {}, []
    for node in gm.graph.nodes:
        module_types.update(dict.fromkeys(t for _, t in (node.meta.get("nn_module_stack") or {}).values()))
        frame = _MODELING_FILE.search(node.meta.get("stack_trace") or "")
        if frame and f"modeling_{frame[1]}" not in modeling:
            modeling.append(f"modeling_{frame[1]}")
    classes = []
    for module_type in module_types:  # each distinct class once, its base classes included
        names = [c.__name__ for c in module_type.__mro__] if isinstance(module_type, type) \
            else [module_type.rsplit(".", 1)[-1]]
        classes += [n for n in names if n not in classes]
    family = _by_class_names(classes) or next((f for f in FAMILIES for m in modeling if m in f.modeling), None)
    return family, modeling + [c for c in classes if not c.startswith(("Module", "object"))]


def check_model(model, strict: bool) -> tuple[FamilyAdapter | None, str | None]:
    """``(adapter, None)``, or for an unknown family ``(None, reason)`` after a warning (under
    ``strict``, an error)."""
    family, reason = for_model(model), None
    if family is None:
        inner = compiled_original(model)
        if inner is not None:
            reason = (f"the model is already wrapped by torch.compile ({type(inner).__name__} inside); "
                      "pass the original model to libra_fx.compile instead")
        else:
            reason = (f"{type(model).__name__} is not a supported architecture (supported: "
                      f"{', '.join(supported_classes())}); it runs compiled but uncompressed")
        if strict:
            raise UnsupportedGraph(f"libra_fx: {reason}")
        warnings.warn(f"libra_fx: {reason}", LibraFallbackWarning, stacklevel=3)
    return family, reason
