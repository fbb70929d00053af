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


def test_cls_importance_is_one_full_width_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)  # 3 heads of 4: width C = 12
    a = pm.cls_importance(q, k)
    for s in range(2):
        q_cls = torch.cat([q[s, h, 0] for h in range(3)])
        keys = [torch.cat([k[s, h, j] for h in range(3)]) for j in range(5)]
        row = torch.softmax(torch.tensor([float(q_cls @ key) / 12**0.5 for key in keys]), 0)
        torch.testing.assert_close(a[s], row[1:], atol=1e-6, rtol=0)
    assert (a.sum(-1) < 1).all()  # the [CLS] key's share is left out, not renormalised


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
def test_prumerge_plus_samples_follow_the_reference(a):
    n = a.shape[1]
    iqr = pm.iqr_outliers(a)
    sampled = pm.uniform_samples(iqr)
    k = int(iqr.sum())
    step = int(1 / (k / n))  # the reference's float reading
    want = [x for x in (range(0, n - 1, step // 3) if step // 3 else []) if not iqr[0, x]]
    assert sampled[0].nonzero().flatten().tolist() == want
    assert int((iqr | sampled).sum()) + 1 <= pm.plus_capacity(n) or int((iqr | sampled).sum()) == n


@pytest.mark.parametrize("n, k, stride", [(576, 32, 6), (576, 10, 19), (576, 100, 1), (144, 20, 2), (2, 1, 0)])
def test_uniform_stride_hand_cases(n, k, stride):
    assert pm.uniform_stride(n, k) == stride  # ⌊⌊n/k⌋/3⌋


def test_capacities():
    assert pm.plus_capacity(576) == 576 and pm.plus_capacity(144) == 144  # s = 1 is reachable: up to every patch
    assert pm.plus_capacity(2) == 2 and pm.plus_capacity(1) == 1
    assert get_method("prumerge").capacity(576, 0.0) == 145  # 144 IQR patches + the extra token
    assert get_method("prumerge_fixed").capacity(8, 0.0) == 8  # every patch kept: no extra token


def test_fixed_variant_top_ratio_in_order_lower_rank_on_ties():
    a = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.3]])
    assert pm.top_fraction(a, 0.6)[0].nonzero().flatten().tolist() == [1, 3]  # Nt = round(5·0.4) = 2
    assert get_method("prumerge_fixed").capacity(5, 0.6) == 3  # and the extra token
    assert get_method("prumerge_fixed").select(a, 0.6).tolist() == pm.top_fraction(a, 0.6).tolist()


def test_kept_slots_orders_extra_token_and_padding():
    kept = torch.tensor([[False, True, False, True, False], [True, True, True, True, True]])
    sampled = torch.tensor([[True, False, False, False, False], [False] * 5])
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.1, 0.1, 0.2, 0.1]])
    ranks, is_kept, valid = pm.kept_slots(kept, sampled, a, 5, "spatial")
    assert ranks.tolist() == [[0, 1, 3, 4, 4], [0, 1, 2, 3, 4]]
    assert is_kept.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert valid.tolist() == [[True] * 4 + [False], [True] * 5]  # extra token after the kept; none when all kept
    ranks, _, _ = pm.kept_slots(kept, sampled, a, 5, "attention")
    assert ranks.tolist() == [[3, 1, 0, 4, 4], [0, 3, 1, 2, 4]]  # by descending a (lower rank on ties), samples after
    with pytest.raises(ValueError, match="order must be one of 'spatial', 'attention'"):
        pm.kept_slots(kept, sampled, a, 5, "random")


# ------------------------------------------------------------------------------------------
# Merging
# ------------------------------------------------------------------------------------------


def test_knn_merge_and_extra_token_hand_case():
    # 4 patches; k = 1: patch 0's nearest (cosine) is patch 1 (same direction)
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    feats = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    a = torch.tensor([[0.1, 0.3, 0.2, 0.4]])
    merged = pm.knn_merge(feats, keys, a, torch.tensor([[0, 2]]), k=1)
    # slot 0: 1 + 0.3·2 = 1.6; slot 2: nearest to [0, 1] is [2, 0.1] (cos 0.05) → 3 + 0.3·2 = 3.6
    torch.testing.assert_close(merged, torch.tensor([[[1.6], [3.6]]]))
    kept = torch.tensor([[True, False, True, False]])
    torch.testing.assert_close(pm.extra_token(feats, a, kept), torch.tensor([[0.3 * 2 + 0.4 * 4]]))
    ranks, is_kept, valid = pm.kept_slots(kept, torch.zeros_like(kept), a, 4)
    slots = pm.merged_slots(feats, keys, a, kept, ranks, is_kept, valid, k=1)
    torch.testing.assert_close(slots, torch.tensor([[[1.6], [3.6], [2.2], [0.0]]]))  # kept, extra, padding


@PROPS
@given(st.integers(2, 12), st.integers(1, 5), st.integers(0, 10_000))
def test_knn_merge_properties(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, n, 3, generator=gen)
    a = torch.rand(1, n, generator=gen) + 0.01
    ranks = torch.arange(n)[None]
    same = pm.knn_merge(torch.ones(1, n, 2) * 7, keys, a, ranks, k)
    nbrs = pm.neighbours(keys, ranks, k)
    assert nbrs.shape == (1, n, min(k, n - 1)) and not (nbrs == ranks[..., None]).any()  # itself excluded
    want = 7 * (1 + a[0].gather(0, nbrs[0].flatten()).reshape(n, -1).sum(-1))  # weight 1 + the neighbours' a
    torch.testing.assert_close(same[0], want[:, None].expand(n, 2), atol=1e-5, rtol=0)


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


def test_vision_compress_splices_slots_with_their_positions():
    torch.manual_seed(0)
    b, t, n, d = 2, 9, 4, 3  # [text, text, img×4, text, text, text], 3 slots per image
    span = torch.zeros(b, t, dtype=torch.bool)
    span[:, 2:6] = True
    hidden = torch.randn(b, t, d)  # the projected slots sit in each span's first 3 rows
    ranks = torch.tensor([[3, 1, 3], [0, 3, 3]])  # sample 0: patches 3, 1, the extra token; 1: patch 0, extra, padding
    valid = torch.tensor([[True, True, True], [True, True, False]])
    outs = {pos: vision_compress(hidden, span, ranks, valid, span_len=n, spans_per_sample=1, slots=3, positions=pos)
            for pos in ("original", "repacked")}
    out, span2, source, ok, original = outs["original"]
    assert out.shape == (b, t - n + 3, d)
    assert source.tolist() == [[0, 1, 2, 3, 4, 6, 7, 8]] * 2  # masks: the slot's place in the span
    assert ok.tolist() == [[True] * 8, [True] * 4 + [False] + [True] * 3]
    assert span2.tolist() == [[False, False, True, True, True, False, False, False],
                              [False, False, True, True, False, False, False, False]]
    assert original.tolist() == [[0, 1, 5, 3, 5, 6, 7, 8], [0, 1, 2, 5, 5, 6, 7, 8]]  # the patch's own; extra: the last
    assert outs["repacked"][4].tolist() == [list(range(8)), [0, 1, 2, 3, 3, 4, 5, 6]]  # padding skipped
    for s in range(b):
        torch.testing.assert_close(out[s, [0, 1, 5, 6, 7]], hidden[s, [0, 1, 6, 7, 8]])
        torch.testing.assert_close(out[s, 2:5], torch.where(valid[s, :, None], hidden[s, 2:5], 0.0))  # padding: zeros


def test_padding_slots_are_masked_except_for_themselves():
    valid = torch.tensor([[True, False, True]])
    allowed = mask_padding_slots(None, valid)
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    additive = mask_padding_slots(torch.zeros(1, 1, 3, 3), valid)
    assert additive[0, 0, 2, 1] == torch.finfo(torch.float32).min and additive[0, 0, 1, 1] == 0
    assert mask_padding_slots(torch.ones(1, 1, 3, 3, dtype=torch.bool), valid)[0, 0, 0, 1].item() is False


def test_decode_steps_get_the_compressed_layout():
    """``libra_fx.compile``'s forward, on a step after a compressed prefill (T=6 → T'=4, slot 2 padding)."""
    from libra_fx.sequence.decode import compressed_prompt_kwargs, position_shift

    cached = 5  # 4 prompt slots + 1 generated token

    keep = torch.tensor([[False, True, False, True], [True, True, True, True]])  # sample 0: a pad, a padding slot
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])  # 6 prompt columns + 2 generated
    out = compressed_prompt_kwargs(dict(input_ids=torch.zeros(2, 1, dtype=torch.long), attention_mask=mask), 6, keep, cached)
    assert out["attention_mask"].tolist() == [[0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[6], [7]]  # the original prompt's positions continue
    out = compressed_prompt_kwargs(dict(input_ids=torch.zeros(1, 1, dtype=torch.long)), 6, keep[1:], cached)
    assert out["attention_mask"].tolist() == [[1] * 6] and out["position_ids"].tolist() == [[7]]
    # re-packed positions of that layout (the padding slot repeats its predecessor): 3 and 2 positions saved
    shift = position_shift(torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3]]), 6)
    out = compressed_prompt_kwargs(dict(input_ids=torch.zeros(2, 1, dtype=torch.long), attention_mask=mask), 6, keep,
                                   cached, shift)
    assert shift.tolist() == [-3, -2] and out["position_ids"].tolist() == [[3], [5]]  # 2 prompt tokens + 1 new; 4 + 1
    with pytest.raises(ValueError, match="does not continue"):
        compressed_prompt_kwargs(dict(input_ids=torch.zeros(2, 1, dtype=torch.long), attention_mask=mask[:, :7]), 6, keep,
                                 cached)
