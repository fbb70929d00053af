"""Snapshots of the canonical printout of a rewritten stage (update: EXPECTTEST_ACCEPT=1 pytest …)."""

from __future__ import annotations

import expecttest

from harness import compile_and_run
from libra_fx.reports.printing import format_stage
from libra_fx.testing import tiny_llava, tiny_llava_inputs


def rewritten_stage(method: str, attn: str = "sdpa") -> str:
    model = tiny_llava(num_layers=3, attn=attn)
    _, be = compile_and_run(model, tiny_llava_inputs(model), method=method, ratio=0.5, layers=(1,),
                            compiler="eager")
    assert be.last.compressed, be.last
    return format_stage(be.last.after, 1)


class TestStageSnapshots(expecttest.TestCase):
    def test_libra_sdpa(self):
        self.assertExpectedInline(rewritten_stage("libra"), """\
in0: float32[1, 4, 48, 16]
in1: float32[1, 2, 48, 16]
in2: float32[1, 2, 48, 16]
in3: bool[1, 48, 1]
in4: float32[1, 48, 64]
in5: float32[1, 31, 64]
in6: float32[1, 31, 32]
in7: float32[1, 31, 32]
in8: float32[1, 1, 48, 16]
in9: float32[1, 4, 31, 16]
in10: float32[1, 1, 48, 16]
in11: float32[1, 4, 31, 16]
in12: float32[1, 2, 31, 16]
in13: float32[1, 2, 31, 16]
in14: float32[1, 4, 31, 16]
in15: float32[1, 31, 4, 16]
in16: float32[1, 31, 64]
v0 = scaled_dot_product_attention(in0, in1, in2, attn_mask=None, dropout_p=0.0, scale=0.25, is_causal=True, enable_gqa=True)  # float32[1, 4, 48, 16]
v1 = last_row_importance(in0, in1, None, 0.25)  # float32[1, 48]
v2 = visual_span_mask(in3)  # bool[1, 48]
v3 = compress_visual_tokens(in4, v1, v2, span_lens=((36,),), carried=0, method='libra', ratio=0.5, options=(('tau', 0.7), ('eta', 'mean')))  # (float32[1, 31, 64], uint8[1, 31], int64[1, 31])
v4 = getitem(v3, 0)  # float32[1, 31, 64]
v5 = getitem(v3, 1)  # uint8[1, 31]
v6 = getitem(v3, 2)  # int64[1, 31]
v7 = sym_size(v4, 1)  # int
v8 = .to(v4, torch.float32)  # float32[1, 31, 64]
v9 = .view(in5, (1, v7, -1, 16))  # float32[1, 31, 4, 16]
v10 = .view(in6, (1, v7, -1, 16))  # float32[1, 31, 2, 16]
v11 = .view(in7, (1, v7, -1, 16))  # float32[1, 31, 2, 16]
v12 = gather_tokens(in8, v6, 2, 0)  # float32[1, 1, 31, 16]
v13 = mul(in9, v12)  # float32[1, 4, 31, 16]
v14 = gather_tokens(in10, v6, 2, 0)  # float32[1, 1, 31, 16]
v15 = mul(in11, v14)  # float32[1, 4, 31, 16]
v16 = mul(in12, v12)  # float32[1, 2, 31, 16]
v17 = mul(in13, v14)  # float32[1, 2, 31, 16]
v18 = .reshape(in14, 1, -1, v7, 16)  # float32[1, 4, 31, 16]
v19 = .reshape(in15, 1, v7, -1)  # float32[1, 31, 64]
v20 = add(v4, in16)  # float32[1, 31, 64]""")

    def test_fastv_sdpa(self):
        self.assertExpectedInline(rewritten_stage("fastv"), """\
in0: float32[1, 4, 48, 16]
in1: float32[1, 2, 48, 16]
in2: float32[1, 2, 48, 16]
in3: bool[1, 48, 1]
in4: float32[1, 48, 64]
in5: float32[1, 30, 64]
in6: float32[1, 30, 32]
in7: float32[1, 30, 32]
in8: float32[1, 1, 48, 16]
in9: float32[1, 4, 30, 16]
in10: float32[1, 1, 48, 16]
in11: float32[1, 4, 30, 16]
in12: float32[1, 2, 30, 16]
in13: float32[1, 2, 30, 16]
in14: float32[1, 4, 30, 16]
in15: float32[1, 30, 4, 16]
in16: float32[1, 30, 64]
v0 = scaled_dot_product_attention(in0, in1, in2, attn_mask=None, dropout_p=0.0, scale=0.25, is_causal=True, enable_gqa=True)  # float32[1, 4, 48, 16]
v1 = last_row_importance(in0, in1, None, 0.25)  # float32[1, 48]
v2 = visual_span_mask(in3)  # bool[1, 48]
v3 = compress_visual_tokens(in4, v1, v2, span_lens=((36,),), carried=0, method='fastv', ratio=0.5, options=())  # (float32[1, 30, 64], uint8[1, 30], int64[1, 30])
v4 = getitem(v3, 0)  # float32[1, 30, 64]
v5 = getitem(v3, 1)  # uint8[1, 30]
v6 = getitem(v3, 2)  # int64[1, 30]
v7 = sym_size(v4, 1)  # int
v8 = .to(v4, torch.float32)  # float32[1, 30, 64]
v9 = .view(in5, (1, v7, -1, 16))  # float32[1, 30, 4, 16]
v10 = .view(in6, (1, v7, -1, 16))  # float32[1, 30, 2, 16]
v11 = .view(in7, (1, v7, -1, 16))  # float32[1, 30, 2, 16]
v12 = gather_tokens(in8, v6, 2, 0)  # float32[1, 1, 30, 16]
v13 = mul(in9, v12)  # float32[1, 4, 30, 16]
v14 = gather_tokens(in10, v6, 2, 0)  # float32[1, 1, 30, 16]
v15 = mul(in11, v14)  # float32[1, 4, 30, 16]
v16 = mul(in12, v12)  # float32[1, 2, 30, 16]
v17 = mul(in13, v14)  # float32[1, 2, 30, 16]
v18 = .reshape(in14, 1, -1, v7, 16)  # float32[1, 4, 30, 16]
v19 = .reshape(in15, 1, v7, -1)  # float32[1, 30, 64]
v20 = add(v4, in16)  # float32[1, 30, 64]""")

    def test_libra_eager_attention(self):
        self.assertExpectedInline(rewritten_stage("libra", attn="eager"), """\
in0: float32[1, 4, 48, 48]
in1: float32[1, 4, 48, 16]
in2: float32[1, 4, 48, 16]
in3: float32[1, 1, 48, 48]
in4: bool[1, 48, 1]
in5: float32[1, 48, 64]
in6: float32[1, 31, 64]
in7: float32[1, 31, 32]
in8: float32[1, 31, 32]
in9: float32[1, 1, 48, 16]
in10: float32[1, 4, 31, 16]
in11: float32[1, 1, 48, 16]
in12: float32[1, 4, 31, 16]
in13: float32[1, 2, 31, 16]
in14: float32[1, 2, 31, 16]
in15: float32[1, 2, 1, 31, 16]
in16: float32[1, 2, 1, 31, 16]
in17: float32[1, 4, 31, 31]
in18: float32[1, 31, 4, 16]
in19: float32[1, 31, 64]
v0 = softmax(in0, dim=-1, dtype=torch.float32)  # float32[1, 4, 48, 48]
v1 = last_row_importance(in1, in2, in3, 0.25)  # float32[1, 48]
v2 = visual_span_mask(in4)  # bool[1, 48]
v3 = compress_visual_tokens(in5, v1, v2, span_lens=((36,),), carried=0, method='libra', ratio=0.5, options=(('tau', 0.7), ('eta', 'mean')))  # (float32[1, 31, 64], uint8[1, 31], int64[1, 31])
v4 = getitem(v3, 0)  # float32[1, 31, 64]
v5 = getitem(v3, 1)  # uint8[1, 31]
v6 = getitem(v3, 2)  # int64[1, 31]
v7 = sym_size(v4, 1)  # int
v8 = .to(v4, torch.float32)  # float32[1, 31, 64]
v9 = .view(in6, (1, v7, -1, 16))  # float32[1, 31, 4, 16]
v10 = .view(in7, (1, v7, -1, 16))  # float32[1, 31, 2, 16]
v11 = .view(in8, (1, v7, -1, 16))  # float32[1, 31, 2, 16]
v12 = gather_tokens(in9, v6, 2, 0)  # float32[1, 1, 31, 16]
v13 = mul(in10, v12)  # float32[1, 4, 31, 16]
v14 = gather_tokens(in11, v6, 2, 0)  # float32[1, 1, 31, 16]
v15 = mul(in12, v14)  # float32[1, 4, 31, 16]
v16 = mul(in13, v12)  # float32[1, 2, 31, 16]
v17 = mul(in14, v14)  # float32[1, 2, 31, 16]
v18 = .expand(in15, 1, 2, 2, v7, 16)  # float32[1, 2, 2, 31, 16]
v19 = .reshape(v18, 1, 4, v7, 16)  # float32[1, 4, 31, 16]
v20 = .expand(in16, 1, 2, 2, v7, 16)  # float32[1, 2, 2, 31, 16]
v21 = .reshape(v20, 1, 4, v7, 16)  # float32[1, 4, 31, 16]
v22 = gather_mask(in3, v6)  # float32[1, 1, 31, 31]
v23 = add(in17, v22)  # float32[1, 4, 31, 31]
v24 = .reshape(in18, 1, v7, -1)  # float32[1, 31, 64]
v25 = add(v4, in19)  # float32[1, 31, 64]""")
