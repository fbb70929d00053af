"""``flash_attention_2``: the importance row is computed beside flash-attn's kernel (contract §2).

transformers' flash integration calls ``flash_attn::_flash_attn_forward(q, k, v, dropout_p,
softmax_scale, causal, …)`` with ``[B, T, H, d]`` tensors and no mask (an unpadded batch).

* On CPU, flash-attn cannot be installed: a stand-in op of the same name and schema (SDPA inside),
  called the way that integration calls it, is registered as an attention implementation. The
  pass must find it and the result must equal the independent oracle.
* On a CUDA machine with flash-attn (``pip install -e ".[flash]"``), the real
  ``flash_attention_2`` runs; elsewhere that test is skipped with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_generate, oracle_logits
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import libra_fx
from libra_fx.testing import tiny_llava, tiny_llava_inputs

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
# no "flash" in the name: transformers ≥ 5.25 loads flash-attn's functions for any implementation whose name
# says "flash" (``is_flash_attention_requested``), and there is no flash-attn here
STAND_IN = "stand_in_fa2"
CFG = dict(method="libra", ratio=0.5, layers=(0, 2))

if not HAS_FLASH:  # the real op's name and schema, on CPU

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                            softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                            softcap: float, alibi_slopes: torch.Tensor | None, return_softmax: bool,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None  # bottom-right, as flash-attn
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), q.new_zeros(q.shape[:3]), q.new_empty(0), q.new_empty(2)

    @_flash_attn_forward.register_fake
    def _(q, k, v, *args):
        return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1]), q.new_empty(0), q.new_empty(2)

    def stand_in_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert attention_mask is None, "the stand-in, like flash-attn's plain kernel, takes no mask"
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, scaling, True, -1, -1, 0.0, None, False)
        return out[0], None

    AttentionInterface.register(STAND_IN, stand_in_flash)
    AttentionMaskInterface.register(STAND_IN, AttentionMaskInterface._global_mapping["flash_attention_2"])


def _model(attn, **kw):
    model = tiny_llava(**kw)
    model.set_attn_implementation({"text_config": attn})
    return model


def _with_sdpa(model, oracle, *args, **kwargs):
    """Run an oracle with the model's language model on SDPA (the oracle runs its layers, and its
    own 4-D masks need a kernel that takes a mask)."""
    attn = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "sdpa"})
    try:
        return oracle(model, *args, **kwargs)
    finally:
        model.set_attn_implementation({"text_config": attn})


def _prefill(model, inputs, **cfg):
    torch._dynamo.reset()
    be = libra_fx.backend(compiler="eager", **cfg)
    with torch.no_grad():
        logits = torch.compile(model.forward, backend=be, fullgraph=True)(**inputs).logits[:, -1].float()
    return logits, be


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed: the real kernel is tested below")
@pytest.mark.parametrize("batch", [1, 2])
def test_stand_in_flash_prefill_matches_oracle(batch):
    model = _model(STAND_IN)
    inputs = tiny_llava_inputs(model, batch=batch, seed=batch)
    logits, be = _prefill(model, inputs, **CFG)
    assert be.last.compressed, be.last
    assert any("flash attention" in line for p in be.last.passes if p.name == "insert_importance" for line in p.matched), be.last
    want, _ = _with_sdpa(model, oracle_logits, **inputs, **CFG)
    assert (logits - want).abs().max().item() <= 1e-5


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed: the real kernel is tested below")
def test_stand_in_flash_generate_matches_oracle():
    model = _model(STAND_IN)
    model.generation_config.eos_token_id = None
    inputs = tiny_llava_inputs(model, seed=3)
    want_tokens, want_logits = _with_sdpa(model, oracle_generate, **inputs, max_new_tokens=3, **CFG)
    torch._dynamo.reset()
    model = libra_fx.compile(model, compiler="eager", **CFG)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert model.libra_backend.records[0].compressed
    assert torch.equal(out.sequences[:, -3:], want_tokens)
    assert (torch.stack(out.logits, 1).float() - torch.stack(want_logits, 1)).abs().max().item() <= 1e-4


@pytest.mark.skipif(not (HAS_FLASH and torch.cuda.is_available()),
                    reason="flash_attention_2 needs a CUDA GPU and the flash-attn package (the [flash] extra)")
def test_real_flash_attention_2_prefill_matches_oracle():
    model = _model("flash_attention_2", dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in tiny_llava_inputs(model, batch=2).items()}
    logits, be = _prefill(model, inputs, **CFG)
    assert be.last.compressed, be.last
    assert any("flash attention" in line for p in be.last.passes if p.name == "insert_importance" for line in p.matched), be.last
    want, _ = _with_sdpa(model, oracle_logits, **inputs, **CFG)
    assert (logits - want.to(logits.device)).abs().max().item() <= 5e-2  # bf16 kernels vs the oracle
