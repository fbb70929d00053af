"""Unit and property tests of the PruMerge token maths (``libra_fx.methods.prumerge``) and of the vision-side
sequence plumbing (``libra_fx.sequence.vision``). Expected values are hand-computed or come from
NumPy / plain loops, never from the functions under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libra_fx.methods import get_method
from libra_fx.methods import prumerge as pm
from libra_fx.sequence.vision import mask_padding_slots, vision_compress

PROPS = settings(max_examples=40, deadline=None)


def importance_rows(max_n=40):
    """Rows of positive values with many ties (small integer levels), as [1, N] float32."""
    return st.lists(st.integers(1, 6), min_size=1, max_size=max_n).map(
        lambda xs: torch.tensor([xs], dtype=torch.float32) / 7)


# ------------------------------------------------------------------------------------------
# Importance
# ------------------------------------------------------------------------------------------


def test_cls_importance_is_the_layers_own_cls_row_over_patches():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    a = pm.cls_importance(q, k, 0.5)
    for s in range(2):
        rows = [torch.softmax(torch.tensor([float(q[s, h, 0] @ k[s, h, j]) * 0.5 for j in range(5)]), 0)
                for h in range(3)]
        torch.testing.assert_close(a[s], torch.stack(rows).mean(0)[1:], atol=1e-6, rtol=0)
    assert (a.sum(-1) < 1).all()  # the [CLS] key's share is left out, not renormalised
    torch.testing.assert_close(pm.cls_importance(q, k), pm.cls_importance(q, k, 4**-0.5))


def test_patch_keys_concatenate_heads_and_drop_cls():
    k = torch.arange(2 * 2 * 4 * 3, dtype=torch.float32).reshape(2, 2, 4, 3)
    keys = pm.patch_keys(k)
    assert keys.shape == (2, 3, 6)
    torch.testing.assert_close(keys[1, 0], torch.cat([k[1, 0, 1], k[1, 1, 1]]))


# ------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------


def test_iqr_hand_cases():
    # ten 1s and a 5: Q1 = Q3 = 1, bound 1 → only the 5
    a = torch.tensor([[1.0] * 10 + [5.0]])
    assert pm.iqr_outliers(a)[0].nonzero().flatten().tolist() == [10]
    # 1..8: Q1 = 2.75, Q3 = 6.25 (linear), bound 11.5 → none → the most attended one (8 at rank 7)
    a = torch.arange(1.0, 9.0)[None]
    assert pm.iqr_outliers(a)[0].nonzero().flatten().tolist() == [7]
    # all equal: no outlier → the first most attended
    assert pm.iqr_outliers(torch.ones(1, 6))[0].nonzero().flatten().tolist() == [0]


@PROPS
@given(importance_rows())
def test_iqr_matches_numpy_and_stays_within_capacity(a):
    values = a[0].numpy().astype(np.float32)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    want = [j for j, x in enumerate(values) if x > q3 + 1.5 * (q3 - q1)] or [int(np.argmax(values))]
    got = pm.iqr_outliers(a)[0].nonzero().flatten().tolist()
    assert got == want
    n = a.shape[1]
    assert (a[0] > torch.quantile(a[0], 0.75)).sum() <= pm.iqr_capacity(n)
    assert len(got) <= pm.iqr_capacity(n)


@pytest.mark.parametrize("n, cap", [(1, 1), (2, 1), (5, 1), (36, 9), (64, 16), (144, 36), (576, 144)])
def test_iqr_capacity_values(n, cap):
    assert pm.iqr_capacity(n) == cap  # n − 1 − floor(0.75·(n − 1)), at least 1


@PROPS
@given(importance_rows(80))
def test_prumerge_plus_keeps_about_a_quarter_within_capacity(a):
    n = a.shape[1]
    iqr = pm.iqr_outliers(a)
    plus = pm.uniform_samples(iqr)
    assert (plus | iqr).eq(plus).all()  # a superset of the IQR patches
    k, m = int(iqr.sum()), pm.uniform_target(n)
    total = int(plus.sum())
    assert total <= pm.plus_capacity(n)
    if k >= m:
        assert total == k
    else:
        stride = -(-n // (m - k))
        samples = len(range(0, n, stride))  # ≤ m − k, and the largest such count a stride gives
        assert plus[0, ::stride].all() and samples <= m - k and max(k, samples) <= total <= m
        assert stride == 1 or len(range(0, n, stride - 1)) > m - k
    assert pm.uniform_target(576) == 144 and pm.uniform_target(36) == 9


def test_uniform_stride_hand_cases():
    assert pm.uniform_stride(576, 10) == 5  # ceil(576 / (144 − 10)): 116 samples ≤ 134
    assert pm.uniform_stride(576, 143) == 576  # one sample (rank 0)
    assert pm.uniform_stride(576, 144) == 0  # IQR alone reaches 25 %: no samples
    assert pm.plus_capacity(576) == 144 and pm.plus_capacity(36) == 9 and pm.plus_capacity(1) == 1


def test_fixed_variant_top_ratio_in_order_lower_rank_on_ties():
    a = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.3]])
    assert pm.top_fraction(a, 0.6)[0].nonzero().flatten().tolist() == [1, 3]  # Nt = round(5·0.4) = 2
    assert get_method("prumerge_fixed").capacity(5, 0.6) == 2
    assert get_method("prumerge_fixed").select(a, 0.6).tolist() == pm.top_fraction(a, 0.6).tolist()


def test_kept_slots_keep_order_and_pad():
    kept = torch.tensor([[False, True, False, True], [True, False, False, False]])
    ranks, valid = pm.kept_slots(kept, 3)
    assert ranks.tolist() == [[1, 3, 3], [0, 3, 3]] and valid.tolist() == [[True, True, False], [True, False, False]]


# ------------------------------------------------------------------------------------------
# Merging
# ------------------------------------------------------------------------------------------


def test_knn_merge_hand_case():
    # 4 patches on a line of keys; k = 1: patch 0's nearest (cosine) is patch 1 (same direction)
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    feats = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    a = torch.tensor([[0.1, 0.3, 0.2, 0.4]])
    merged = pm.knn_merge(feats, keys, a, torch.tensor([[0, 2]]), k=1)
    # slot 0: {0, 1}, weights 0.1/0.4, 0.3/0.4 → 0.25·1 + 0.75·2 = 1.75
    # slot 2: nearest to [0, 1] is [2, 0.1] (cos 0.05) → {2, 1}, weights 0.2/0.5, 0.3/0.5 → 0.4·3 + 0.6·2 = 2.4
    torch.testing.assert_close(merged, torch.tensor([[[1.75], [2.4]]]))


@PROPS
@given(st.integers(2, 12), st.integers(1, 5), st.integers(0, 10_000))
def test_knn_merge_properties(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, n, 3, generator=gen)
    a = torch.rand(1, n, generator=gen) + 0.01
    ranks = torch.arange(n)[None]
    same = pm.knn_merge(torch.ones(1, n, 2) * 7, keys, a, ranks, k)
    torch.testing.assert_close(same, torch.full((1, n, 2), 7.0))  # weights sum to 1
    nbrs = pm.neighbours(keys, ranks, k)
    assert nbrs.shape == (1, n, min(k, n - 1)) and not (nbrs == ranks[..., None]).any()  # itself excluded
    everything = pm.knn_merge(torch.randn(1, n, 2, generator=gen), keys, a, ranks, n)  # k ≥ N−1: all patches
    torch.testing.assert_close(everything[0, 0], everything[0, -1], atol=1e-5, rtol=0)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match=r"\[S, H, 1\+N, d\]"):
        pm.cls_importance(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="knn_merge needs"):
        pm.knn_merge(torch.randn(1, 4, 2), torch.randn(1, 5, 2), torch.rand(1, 4), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="at least one patch"):
        pm.iqr_capacity(0)


# ------------------------------------------------------------------------------------------
# Sequence plumbing
# ------------------------------------------------------------------------------------------


def test_vision_compress_splices_slots_in_order_with_their_positions():
    torch.manual_seed(0)
    b, t, n, d = 2, 9, 4, 3  # [text, text, img×4, text, text, text]
    span = torch.zeros(b, t, dtype=torch.bool)
    span[:, 2:6] = True
    hidden = torch.randn(b, t, d)
    q, k = torch.randn(b, 2, 1 + n, 2), torch.randn(b, 2, 1 + n, 2)
    out, span2, source, valid = vision_compress(hidden, span, q, k, None, span_len=n, spans_per_sample=1,
                                                method="prumerge", ratio=0.0, slots=2)
    assert out.shape == (b, t - n + 2, d)
    kept = pm.iqr_outliers(pm.cls_importance(q, k))
    for s in range(b):
        ranks = kept[s].nonzero().flatten().tolist()
        want_source = [0, 1] + [2 + r for r in ranks] + [5] * (2 - len(ranks)) + [6, 7, 8]
        assert source[s].tolist() == want_source
        assert valid[s].tolist() == [True] * (2 + len(ranks)) + [False] * (2 - len(ranks)) + [True] * 3
        assert span2[s].tolist() == [False, False] + [True] * len(ranks) + [False] * (5 - len(ranks))
        torch.testing.assert_close(out[s, [0, 1, 4, 5, 6]], hidden[s, [0, 1, 6, 7, 8]])
        assert (out[s, 2 + len(ranks):4] == 0).all()  # padding slots hold zeros


def test_padding_slots_are_masked_except_for_themselves():
    valid = torch.tensor([[True, False, True]])
    allowed = mask_padding_slots(None, valid)
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    additive = mask_padding_slots(torch.zeros(1, 1, 3, 3), valid)
    assert additive[0, 0, 2, 1] == torch.finfo(torch.float32).min and additive[0, 0, 1, 1] == 0
    assert mask_padding_slots(torch.ones(1, 1, 3, 3, dtype=torch.bool), valid)[0, 0, 0, 1].item() is False


def test_decode_steps_get_the_compressed_layout():
    """``libra_fx.compile``'s forward, on a step after a compressed prefill (T=6 → T'=4, slot 2 padding)."""
    from libra_fx.sequence.decode import compressed_prompt_kwargs

    cached = 5  # 4 prompt slots + 1 generated token

    keep = torch.tensor([[False, True, False, True], [True, True, True, True]])  # sample 0: a pad, a padding slot
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])  # 6 prompt columns + 2 generated
    out = compressed_prompt_kwargs(dict(input_ids=torch.zeros(2, 1, dtype=torch.long), attention_mask=mask), 6, keep, cached)
    assert out["attention_mask"].tolist() == [[0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[6], [7]]  # the original prompt's positions continue
    out = compressed_prompt_kwargs(dict(input_ids=torch.zeros(1, 1, dtype=torch.long)), 6, keep[1:], cached)
    assert out["attention_mask"].tolist() == [[1] * 6] and out["position_ids"].tolist() == [[7]]
    with pytest.raises(ValueError, match="does not continue"):
        compressed_prompt_kwargs(dict(input_ids=torch.zeros(2, 1, dtype=torch.long), attention_mask=mask[:, :7]), 6, keep,
                                 cached)
