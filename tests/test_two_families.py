"""Two families in one process: each compiled model calls its own attention function.

transformers' attention registry is process-wide. Gemma2's eager attention soft-caps its scores, Llama's
does not: a PaliGemma with a Gemma2 decoder (PaliGemma 2's shape) and a LLaVA, both compiled under eager
attention and run interleaved, must each equal itself alone, bit for bit (once, the second model's
registration served the first model's layers, and its logits moved by about 1e-5 here, 6.6e-4 at
larger scores). Under SDPA (which transformers' Gemma2 does not offer: PaliGemma's Gemma decoder) both
models share one function.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import libra_fx
from libra_fx.conformance.inputs import example_inputs
from libra_fx.conformance.tiny import fixture_for, tiny_config
from libra_fx.families import PALIGEMMA
from libra_fx.runtime.compat import attn_implementation
from libra_fx.testing import tiny_llava, tiny_llava_inputs

NO_TOKEN_REMOVED = dict(method="fastv", ratio=0.001, layers=(1,))  # the identity setting
SOFT_CAPPED = dict(model_type="gemma2", attn_logit_softcapping=0.1, final_logit_softcapping=None)


def paligemma(attn: str):
    text = SOFT_CAPPED if attn == "eager" else {}
    config = tiny_config("paligemma", dict(fixture_for(PALIGEMMA).tiny, text_config=text), attn)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


def llava(attn: str):
    model = tiny_llava(attn=attn)
    model.generation_config.eos_token_id = None
    return model


def generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_soft_capping_family_beside_another_equals_itself_alone(attn):
    pali_inputs = [example_inputs(paligemma(attn), PALIGEMMA, b, pad=(0, 2)[:b], seed=b) for b in (1, 2)]
    other_inputs = tiny_llava_inputs(llava(attn))
    alone = [generate(libra_fx.compile(paligemma(attn), compiler="eager", **NO_TOKEN_REMOVED), i) for i in pali_inputs]

    pali = libra_fx.compile(paligemma(attn), compiler="eager", **NO_TOKEN_REMOVED)
    got = [generate(pali, pali_inputs[0])]  # compiled, and its attention registered, before the other's
    other = libra_fx.compile(llava(attn), compiler="eager", **NO_TOKEN_REMOVED)
    generate(other, other_inputs)
    got += [generate(pali, pali_inputs[1])]  # a new graph, traced after the other model's registration
    for (tokens, logits), (want_tokens, want_logits) in zip(got, alone):
        assert torch.equal(tokens, want_tokens)
        assert torch.equal(logits, want_logits)
    names = {attn_implementation(m.config.text_config) for m in (pali, other)}
    assert len(names) == (2 if attn == "eager" else 1), names  # one registered name per wrapped function
