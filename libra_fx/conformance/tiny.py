"""Tiny random-weight configs for any transformers LVLM class, shrunk from its config class's defaults.

No hub access: ``tiny_config("llava_onevision")`` instantiates the default config, then sets every
size it recognises to a small value — 4 text layers of width 64, 2 vision layers of width 32 — and
moves every special token id into a 128-token vocabulary (text ids ``3..99``, placeholders ``100…``).
A family adapter may add ``tiny`` overrides (nested dicts) where the generic sizes do not fit, or a
stand-in sub-config (a callable that returns its dict).
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from libra_fx.testing import PAD_TOKEN_ID as PAD  # the pad id the example prompts share with libra_fx.testing

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
                out[key] = PAD
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
    getattr(config, "text_config", config)._attn_implementation = attn  # the tower keeps its default
    return config
