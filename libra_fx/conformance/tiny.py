"""The one factory of tiny random-weight models: the tests', ``libra-fx families``' and the benchmarks'.
No hub access.

- :func:`build` is the one place a tiny model's weights are drawn: ``model_class(config)`` right after
  ``torch.manual_seed(seed)``, in eval mode, cast to ``dtype``, its fixture's fix-ups applied
  (:meth:`FamilyFixture.adapt_tiny`), and run once eagerly when asked (transformers installs its
  output-capturing hooks on the first eager call; without them the first ``fullgraph`` trace of a
  never-run model fails on a lock in ``output_capturing.py``). The hand-written LLaVA, Qwen2-VL and
  LLaVA-NeXT configs of :mod:`libra_fx.testing` are built by it too.
- :func:`tiny_config` makes a tiny config of any transformers LVLM class, shrunk from its config class's
  defaults: ``tiny_config("llava_onevision")`` instantiates the default config, then sets every size it
  recognises to a small value — 4 text layers of width 64, 2 vision layers of width 32 — and moves every
  special token id into a 128-token vocabulary (text ids ``3..99``, placeholders ``100…``). A family's
  fixture may add ``tiny`` overrides (nested dicts) where the generic sizes do not fit, or a stand-in
  sub-config (a callable that returns its dict).
- :func:`tiny_model` builds an adapted family's tiny model from its fixture's recipe (what ``libra-fx
  families`` verifies); ``FIXTURES`` holds every family's :class:`~libra_fx.families.base.FamilyFixture`,
  and :func:`fixture_for` finds an adapter's.
"""

from __future__ import annotations

import contextlib

import torch
import transformers
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from libra_fx.families.base import FamilyAdapter, FamilyFixture
from libra_fx.families.gemma import GEMMA3_FIXTURE, PALIGEMMA_FIXTURE
from libra_fx.families.lfm2_vl import LFM2_VL_FIXTURE
from libra_fx.families.llama4 import LLAMA4_FIXTURE
from libra_fx.families.llava import (LLAVA_FIXTURE, LLAVA_NEXT_FIXTURE, LLAVA_NEXT_VIDEO_FIXTURE,
                                     LLAVA_ONEVISION_FIXTURE, VIDEO_LLAVA_FIXTURE, VIPLLAVA_FIXTURE)
from libra_fx.families.markers import IDEFICS3_FIXTURE, MISTRAL3_FIXTURE, SMOLVLM_FIXTURE
from libra_fx.families.plain import (AYA_VISION_FIXTURE, COHERE2_VISION_FIXTURE, DEEPSEEK_VL_FIXTURE, FAST_VLM_FIXTURE,
                                     INTERNVL_FIXTURE, JANUS_FIXTURE, PERCEPTION_LM_FIXTURE)
from libra_fx.families.qwen2_vl import GLM4V_FIXTURE, QWEN2_5_VL_FIXTURE, QWEN2_VL_FIXTURE
from libra_fx.families.qwen3_5 import QWEN3_5_FIXTURE, QWEN3_5_MOE_FIXTURE
from libra_fx.families.qwen3_vl import QWEN3_VL_FIXTURE, QWEN3_VL_MOE_FIXTURE
from libra_fx.runtime import compat

FIXTURES: tuple[FamilyFixture, ...] = (
    LLAVA_FIXTURE, LLAVA_NEXT_FIXTURE, QWEN2_VL_FIXTURE, QWEN2_5_VL_FIXTURE, LLAVA_ONEVISION_FIXTURE,
    LLAVA_NEXT_VIDEO_FIXTURE, VIDEO_LLAVA_FIXTURE, VIPLLAVA_FIXTURE, INTERNVL_FIXTURE, AYA_VISION_FIXTURE,
    DEEPSEEK_VL_FIXTURE, JANUS_FIXTURE, FAST_VLM_FIXTURE, COHERE2_VISION_FIXTURE, GLM4V_FIXTURE, PERCEPTION_LM_FIXTURE,
    GEMMA3_FIXTURE, PALIGEMMA_FIXTURE, QWEN3_VL_FIXTURE, QWEN3_VL_MOE_FIXTURE, LFM2_VL_FIXTURE, LLAMA4_FIXTURE,
    MISTRAL3_FIXTURE, IDEFICS3_FIXTURE, SMOLVLM_FIXTURE, QWEN3_5_FIXTURE, QWEN3_5_MOE_FIXTURE)

PAD_TOKEN_ID = 0  # the pad id of every tiny model's prompts (libra_fx.testing's too)
VOCAB, BOS, EOS, FIRST_SPECIAL = 128, 1, 2, 100
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, max_window_layers=4,
            moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, first_k_dense_replace=1, sliding_window=48)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, depth=2, num_attention_heads=2, num_heads=2,
              embed_dim=32, projection_dim=32, out_hidden_size=64, image_size=32, patch_size=8)
DERIVED = ("layer_types", "mlp_layer_types", "torch_dtype", "dtype", "_name_or_path", "architectures", "transformers_version")


def _special_ids(config: dict) -> dict:
    """Every ``*_token_id`` / ``*_token_index`` moved into the tiny vocabulary, distinct from text ids."""
    ids, out = {}, {}
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and key.endswith(("token_id", "token_index")):
            if key.startswith("pad"):
                out[key] = PAD_TOKEN_ID
            elif key.startswith("bos"):
                out[key] = BOS
            elif key.startswith("eos"):
                out[key] = EOS
            else:  # an id shared by two keys (image_token_id, image_token_index) stays shared
                out[key] = ids.setdefault(value, FIRST_SPECIAL + len(ids))
    return out


def _shrink(sub: dict, sizes: dict) -> dict:
    out = {k: v for k, v in sub.items() if k not in DERIVED}
    out.update({k: v for k, v in sizes.items() if k in out})
    return out


def _merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, nested dicts key by key; a callable override makes a
    whole replacement (a stand-in sub-config)."""
    out = dict(base)
    for key, value in overrides.items():
        if callable(value):
            out[key] = value()
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config(model_type: str, overrides: dict | None = None, attn: str = "sdpa") -> PretrainedConfig:
    """The default config of ``model_type`` with every recognised size shrunk (see the module docstring)."""
    config_class = CONFIG_MAPPING[model_type]
    full = config_class().to_dict()
    tiny = {k: v for k, v in full.items() if k not in DERIVED}
    for key, value in full.items():
        if isinstance(value, dict) and "model_type" in value:
            sizes = TEXT if key == "text_config" else VISION
            tiny[key] = _shrink(value, sizes)
            tiny[key].update(_special_ids(value))
    if "text_config" not in tiny:  # a single (text) config
        tiny = _shrink(tiny, TEXT)
    tiny.update(_special_ids(full))
    tiny = _merge(tiny, overrides or {})
    config = config_class(**tiny)
    compat.set_attn_implementation(getattr(config, "text_config", config), attn)  # the tower keeps its default
    return config


def fixture_for(family: FamilyAdapter | FamilyFixture) -> FamilyFixture:
    """The fixture of an adapter (a fixture: itself)."""
    if isinstance(family, FamilyFixture):
        return family
    for fixture in FIXTURES:
        if fixture.adapter is family:
            return fixture
    raise LookupError(f"{family.name} has no FamilyFixture in libra_fx.conformance.tiny.FIXTURES: define one next "
                      "to its adapter and add it there")


def build(model_class, config, seed: int = 0, *, dtype: torch.dtype | None = None, device=None,
          fixture: FamilyFixture | None = None, warm_up=None):
    """A random-weight ``model_class(config)``, its weights drawn right after ``torch.manual_seed(seed)``, in
    eval mode: the one place a tiny model is made (see the module docstring).

    ``dtype``: the weights, drawn in float32 on the CPU, are cast to it (``None``: left as drawn);
    ``device``: they are drawn there instead, in ``dtype`` (a model too large to draw on the CPU first:
    the GPU check's). ``fixture``: its ``adapt_tiny`` is applied. ``warm_up(model)``: the inputs of one
    eager forward, without gradients, run before the model is returned."""
    torch.manual_seed(seed)
    if device is None:
        model = model_class(config).eval()
    else:
        with torch.device(device), _default_dtype(dtype):
            model = model_class(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    if fixture is not None:
        fixture.adapt_tiny(model)
    if warm_up is not None:
        with torch.no_grad():
            model(**warm_up(model))
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype or saved)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def tiny_model(family: FamilyAdapter | FamilyFixture, seed: int = 0, attn: str = "sdpa"):
    """A random-weight tiny model of ``family`` (an adapter, or its fixture) from its fixture's recipe, in eval
    mode, EOS disabled (random weights never stop), prompts padded with ``PAD_TOKEN_ID``."""
    fixture = fixture_for(family)
    config = tiny_config(fixture.model_types[0], fixture.tiny, attn)
    model = build(getattr(transformers, fixture.adapter.classes[0]), config, seed, fixture=fixture)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model
