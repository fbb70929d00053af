"""Unit tests of the pure token maths (contract §3, §4, §6) and of the sequence plumbing in ``libra_fx.sequence``.

Part 1 pins the maths to SPEC with tiny hand-computed cases: every expected number below is
written out by hand (derivation in the comments), never recomputed with ``libra_fx``.
Part 2 holds Hypothesis property tests over random small spans. Part 3 checks bad input.

Project decisions used here: ``Nt = clamp(floor(N·(1−R) + 0.5), 1, N)`` (round half up), ties in an
argmax go to the first index, top-k ties go to the lower rank.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import libra_fx

from libra_fx.methods.compressors import assign_groups, average, igm, prune
from libra_fx.methods.grouped import group_softmax_sum
from libra_fx.sequence.gather import gather_mask, gather_tokens
from libra_fx.sequence.splice import COMPENSATION, TEXT, VISUAL, compress_visual_tokens
from libra_fx.methods import DECODER_METHODS, METHODS, get_method
from libra_fx.methods.selectors import cosine_matrix, num_targets, one_hot_targets, pti, top_alpha, top_k, turbo
from harness import causal_rule_gather_mask

ATOL = 1e-5
PROPS = settings(max_examples=50, deadline=None)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, t(expected) if not torch.is_tensor(expected) else expected,
                               atol=atol, rtol=0.0)


# =============================================================================================
# 1. Hand-computed cases
# =============================================================================================

# ---- num_targets (contract §3, round half up, clamp to [1, N]) ----------------------------------

@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        (9, 0.5, 5),       # 4.5 -> half up -> 5 (banker's rounding would give 4)
        (6, 0.25, 5),      # 4.5 -> 5
        (5, 0.5, 3),       # 2.5 -> 3
        (3, 0.5, 2),       # 1.5 -> 2
        (289, 0.5, 145),   # 144.5 -> 145
        (576, 0.5, 288),   # exact
        (576, 0.75, 144),  # exact
        (10, 0.0, 10),     # R = 0 keeps every token (upper clamp = N)
        (1, 0.0, 1),
        (4, 0.875, 1),     # 0.5 -> 1
        (8, 0.9375, 1),    # 0.5 -> 1
        (4, 0.9, 1),       # 0.4 -> 0 -> clamped up to 1
        (1, 0.9, 1),       # 0.1 -> 0 -> clamped up to 1
        (5, 0.99, 1),      # 0.05 -> 0 -> 1
        (7, 0.2, 6),       # 5.6 -> 6
        (7, 0.3, 5),       # 4.9 -> 5
        (10, 0.7, 3),      # 3.0 -> 3
    ],
)
def test_num_targets(n, ratio, expected):
    assert num_targets(n, ratio) == expected


@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        (15, 0.9, 2),    # 1.5  -> 2 (code: 1)
        (45, 0.3, 32),   # 31.5 -> 32 (code: 31)
        (30, 0.55, 14),  # 13.5 -> 14 (code: 13)
        (45, 0.9, 5),    # 4.5  -> 5 (code: 4)
    ],
)
def test_num_targets_half_up_with_decimal_ratios(n, ratio, expected):
    assert num_targets(n, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 0.5, 0.55, 0.75, 0.9, 0.99])
def test_num_targets_of_a_symbolic_length_equals_the_int_result(ratio):
    """An image of any size (a SymInt ``N``, as the compiled graph has it) gets the count of the int rule;
    for ``R ≤ 0.5`` the expression has no clamp (a nested ``Max`` slows sympy in every later stage)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, guard_int

    env = ShapeEnv()
    for n in range(2, 65):  # 0 and 1 are specialized, as Dynamo specializes them
        symbolic = env.create_symintnode(env.create_symbol(n, ConstantSource(f"n{n}")), hint=n)
        kept = num_targets(symbolic, ratio)
        assert isinstance(kept, torch.SymInt) and guard_int(kept) == num_targets(n, ratio), n
        assert ("Max" in str(kept)) == (ratio > 0.5), kept


# ---- PTI (contract §3) ---------------------------------------------------------------------------

# Interval i covers floor(i·N/Nt) .. floor((i+1)·N/Nt) − 1, written out by hand.
PTI_INTERVALS = {
    (10, 3): [(0, 2), (3, 5), (6, 9)],            # 0, 3.33, 6.67, 10 -> 0, 3, 6, 10
    (7, 4): [(0, 0), (1, 2), (3, 4), (5, 6)],     # 0, 1.75, 3.5, 5.25, 7 -> 0, 1, 3, 5, 7
    (5, 2): [(0, 1), (2, 4)],                     # 0, 2.5, 5 -> 0, 2, 5
    (6, 6): [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)],
    (4, 1): [(0, 3)],
    (9, 5): [(0, 0), (1, 2), (3, 4), (5, 6), (7, 8)],  # 0, 1.8, 3.6, 5.4, 7.2, 9
}


@pytest.mark.parametrize("n, nt", sorted(PTI_INTERVALS))
def test_pti_intervals_one_hot(n, nt):
    """A single 1 at rank p among zeros: p's interval picks p, every other interval (all ties at 0)
    picks its first rank. Run all N one-hot rows as one batch of N spans."""
    intervals = PTI_INTERVALS[(n, nt)]
    alpha = torch.eye(n)  # span p has its 1 at rank p
    expected = [[p if lo <= p <= hi else lo for lo, hi in intervals] for p in range(n)]
    assert pti(alpha, nt).tolist() == expected


def test_pti_n10_nt3_values():
    alpha = t([[0.10, 0.30, 0.20, 0.05, 0.05, 0.06, 0.01, 0.02, 0.03, 0.18]])
    #          [-- interval 0 --] [-- interval 1 --] [------ interval 2 ------]
    assert pti(alpha, 3).tolist() == [[1, 5, 9]]


def test_pti_n7_nt4_values():
    alpha = t([[0.01, 0.20, 0.10, 0.30, 0.31, 0.05, 0.03]])
    #          [0]   [1 .. 2]    [3 .. 4]    [5 .. 6]
    assert pti(alpha, 4).tolist() == [[0, 1, 4, 5]]


def test_pti_ties_inside_an_interval_go_to_the_first_rank():
    alpha = t([
        [0.2, 0.5, 0.5, 0.3, 0.3, 0.1, 0.4, 0.4, 0.4, 0.4],
        [0.3, 0.3, 0.3, 0.1, 0.2, 0.2, 0.1, 0.0, 0.1, 0.0],
    ])
    # N=10, Nt=3: intervals [0..2], [3..5], [6..9]
    assert pti(alpha, 3).tolist() == [[1, 3, 6], [0, 4, 6]]


def test_pti_batched_spans_are_independent():
    alpha = t([[0.4, 0.1, 0.2, 0.3], [0.1, 0.4, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    # N=4, Nt=2: intervals [0..1], [2..3]
    assert pti(alpha, 2).tolist() == [[0, 3], [1, 2], [0, 3]]


# ---- top-k selectors (contract §6) ---------------------------------------------------------------

def test_top_alpha_output_is_ascending():
    alpha = t([[0.1, 0.5, 0.9, 0.2, 0.7]])
    assert top_alpha(alpha, 3).tolist() == [[1, 2, 4]]  # 0.9@2, 0.7@4, 0.5@1 -> sorted by rank


def test_top_alpha_ties_go_to_the_lower_rank():
    alpha = t([[0.1, 0.3, 0.3, 0.2, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert top_alpha(alpha, 2).tolist() == [[1, 2], [0, 1]]
    assert top_alpha(alpha, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert top_alpha(alpha, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]
    assert top_alpha(alpha, 5).tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_top_k_ties_with_negative_scores():
    score = t([[-1.0, -0.5, -0.5, -2.0, -0.5]])
    assert top_k(score, 2).tolist() == [[1, 2]]


def test_turbo_informativity_by_hand():
    # H = (1,0), (1,0), (0,1); α = (0.2, 0.3, 0.5), mean(α) = 1/3 -> α/mean = (0.6, 0.9, 1.5)
    # r = max_{k≠j} cos = (1, 1, 0) -> I = (-0.4, -0.1, 1.5)
    hidden = t([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    alpha = t([[0.2, 0.3, 0.5]])
    assert turbo(alpha, hidden, 1).tolist() == [[2]]
    assert turbo(alpha, hidden, 2).tolist() == [[1, 2]]
    # λ = 0 -> plain top-α
    assert turbo(alpha, hidden, 2, lam=0.0).tolist() == [[1, 2]]
    # with a strong α the redundancy can lose:
    alpha2 = t([[0.7, 0.1, 0.2]])  # α/mean = (2.1, 0.3, 0.6); I = (1.1, -0.7, 0.6)
    assert turbo(alpha2, hidden, 2).tolist() == [[0, 2]]
    assert turbo(alpha2, hidden, 1, lam=2.0).tolist() == [[2]]  # I = (0.1, -1.7, 0.6)


def test_turbo_single_token_span():
    assert turbo(t([[1.0]]), t([[[3.0, 4.0]]]), 1).tolist() == [[0]]


# ---- cosine / one-hot ------------------------------------------------------------------------

def test_cosine_matrix_by_hand():
    a = t([[[3.0, 4.0], [0.0, 0.0]]])
    b = t([[[4.0, 3.0], [1.0, 0.0], [-3.0, -4.0]]])
    # (3,4)·(4,3) = 24, norms 5·5 -> 0.96; (3,4)·(1,0) = 3 / 5 -> 0.6; opposite -> -1
    # the zero vector: 0 / max(0, 1e-8) = 0
    close(cosine_matrix(a, b), [[[0.96, 0.6, -1.0], [0.0, 0.0, 0.0]]])


def test_one_hot_targets():
    assert one_hot_targets(torch.tensor([[0, 2], [1, 3]]), 4).tolist() == [
        [True, False, True, False],
        [False, True, False, True],
    ]


# ---- the hand-made IGM example ---------------------------------------------------------------
#
# One span, N = 6, D = 2, Nt = 2 (PTI intervals [0..2], [3..5]):
#   rank  H        α     note
#   0     (1, 1)   0.1   cos to T0 = cos to T1 = 1/√2 ≈ 0.7071 (tie -> group 0), > τ=0.7: positive
#   1     (1, 0)   0.3   target 0 (max α of [0.1, 0.3, 0.2])
#   2     (-1, 0)  0.2   cos (-1, 0) -> group 1, s = 0: negative
#   3     (3, 4)   0.1   cos (0.6, 0.8) -> group 1, s = 0.8: positive
#   4     (0, 2)   0.2   target 1 (max α of [0.1, 0.2, 0.1])
#   5     (0, -1)  0.1   cos (0, -1) -> group 0, s = 0: negative
# η = mean(α) = 1/6, so α/η = (0.6, 1.8, 1.2, 0.6, 1.2, 0.6).
#   group 0, P = {0, 1}: softmax(0.6, 1.8) = (1/(1+e^1.2), ·) = (0.2314752, 0.7685248)
#       m0 = 0.2314752·(1,1) + 0.7685248·(1,0) = (1, 0.2314752)
#   group 1, P = {3, 4}: softmax(0.6, 1.2) = (1/(1+e^0.6), ·) = (0.3543437, 0.6456563)
#       m1 = 0.3543437·(3,4) + 0.6456563·(0,2) = (1.0630311, 2.7086874)
#   Q = {2, 5}: softmax(1.2, 0.6) = (0.6456563, 0.3543437)
#       c = 0.6456563·(-1,0) + 0.3543437·(0,-1) = (-0.6456563, -0.3543437)

H6 = [[[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [0.0, -1.0]]]
A6 = [[0.1, 0.3, 0.2, 0.1, 0.2, 0.1]]


def test_hand_example_targets_and_groups():
    hidden, alpha = t(H6), t(A6)
    targets = pti(alpha, num_targets(6, 0.6))  # 6·0.4 = 2.4 -> 2
    assert targets.tolist() == [[1, 4]]
    group, best = assign_groups(hidden, targets)
    assert group.tolist() == [[0, 0, 1, 1, 1, 0]]
    close(best, [[1 / math.sqrt(2), 1.0, 0.0, 0.8, 1.0, 0.0]])


def test_hand_example_igm():
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]))
    close(out, [[[1.0, 0.2314752], [1.0630311, 2.7086874], [-0.6456563, -0.3543437]]])


def test_hand_example_igm_defaults_are_tau_07_eta_mean():
    hidden, alpha, targets = t(H6), t(A6), torch.tensor([[1, 4]])
    close(igm(hidden, alpha, targets), igm(hidden, alpha, targets, tau=0.7, eta="mean"))
    close(igm(hidden, alpha, targets, eta=1 / 6), igm(hidden, alpha, targets, eta="mean"))


def test_hand_example_igm_eta_as_float():
    # η = 0.5 -> α/η = (0.2, 0.6, 0.4, 0.2, 0.4, 0.2)
    #   group 0 {0,1}: softmax(0.2, 0.6) = (0.4013123, 0.5986877) -> m0 = (1, 0.4013123)
    #   group 1 {3,4}: softmax(0.2, 0.4) = (0.4501660, 0.5498340) -> m1 = (1.3504980, 2.9003320)
    #   Q {2,5}:       softmax(0.4, 0.2) = (0.5498340, 0.4501660) -> c = (-0.5498340, -0.4501660)
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]), eta=0.5)
    close(out, [[[1.0, 0.4013123], [1.3504980, 2.9003320], [-0.5498340, -0.4501660]]])


def test_hand_example_igm_tau():
    # τ = 0.75: rank 0 (s ≈ 0.7071) turns negative.
    #   group 0 P = {1}: m0 = (1, 0)
    #   group 1 P = {3,4}: unchanged, (1.0630311, 2.7086874)
    #   Q = {0, 2, 5}, α/η = (0.6, 1.2, 0.6): weights (0.2616350, 0.4767300, 0.2616350)
    #   c = 0.2616350·(1,1) + 0.4767300·(-1,0) + 0.2616350·(0,-1) = (-0.2150950, 0)
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]), tau=0.75)
    close(out, [[[1.0, 0.0], [1.0630311, 2.7086874], [-0.2150950, 0.0]]])


def test_hand_example_igm_strict_threshold():
    # Just above s(3) = 8 / (5·2) = 0.8, rank 3 turns negative too (τ = 0.8 + 1e-6 stays clear
    # of the float32 rounding of 0.8 itself).
    #   group 0 P = {1}: (1, 0); group 1 P = {4}: (0, 2)
    #   Q = {0, 2, 3, 5}: α/η = (0.6, 1.2, 0.6, 0.6) -> weights
    #       (0.2073777, 0.3778668, 0.2073777, 0.2073777)
    #   c = 0.2073777·(1,1) + 0.3778668·(-1,0) + 0.2073777·(3,4) + 0.2073777·(0,-1)
    #     = (0.4516440, 0.8295109)
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]), tau=0.8 + 1e-6)
    close(out, [[[1.0, 0.0], [0.0, 2.0], [0.4516440, 0.8295109]]])
    # s(2) = s(5) = 0 exactly (orthogonal / opposite vectors): with τ = 0, s > τ is false, so
    # they stay negative and the result is the τ = 0.7 one.
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]), tau=0.0)
    close(out, [[[1.0, 0.2314752], [1.0630311, 2.7086874], [-0.6456563, -0.3543437]]])


def test_hand_example_igm_without_positive_merging_keeps_targets():
    # merge_positives=False (ablation igm_neg): m_i = H[t_i]; every non-target is in Q,
    # which is the same as the τ = 0.8+ case above.
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]), merge_positives=False)
    close(out, [[[1.0, 0.0], [0.0, 2.0], [0.4516440, 0.8295109]]])


def test_hand_example_igm_all_positive_no_compensation():
    # τ = −∞, compensation=False (ablation igm_pos): output length Nt, every token in its group.
    #   group 0 {0,1,5}: α/η = (0.6, 1.8, 0.6) -> m0 = (0.8120342, 0.0)
    #   group 1 {2,3,4}: α/η = (1.2, 0.6, 1.2) -> m1 = (0.2536221, 1.6459618)
    out = igm(t(H6), t(A6), torch.tensor([[1, 4]]), tau=float("-inf"), compensation=False)
    assert out.shape == (1, 2, 2)
    close(out, [[[0.8120342, 0.0], [0.2536221, 1.6459618]]])


def test_hand_example_average():
    # groups {0,1,5} and {2,3,4}: plain means
    #   m0 = ((1+1+0)/3, (1+0-1)/3) = (2/3, 0);  m1 = ((-1+3+0)/3, (0+4+2)/3) = (2/3, 2)
    out = average(t(H6), t(A6), torch.tensor([[1, 4]]))
    close(out, [[[2 / 3, 0.0], [2 / 3, 2.0]]])


def test_hand_example_prune():
    out = prune(t(H6), t(A6), torch.tensor([[1, 4]]))
    close(out, [[[1.0, 0.0], [0.0, 2.0]]])


def test_hand_example_batched_with_a_second_span():
    """Two spans in one batch: the second (a mirrored copy: x and y swapped) must not leak into
    the first, and must give the mirrored numbers."""
    h = t(H6)
    hidden = torch.cat([h, h.flip(-1)])
    alpha = t(A6 + A6)
    out = igm(hidden, alpha, torch.tensor([[1, 4], [1, 4]]))
    expected = [[1.0, 0.2314752], [1.0630311, 2.7086874], [-0.6456563, -0.3543437]]
    close(out, [expected, [row[::-1] for row in expected]])


def test_igm_empty_negative_set_compensates_over_non_targets():
    # N = 4, targets 1 and 3 (PTI of α = (0.1, 0.4, 0.2, 0.3), intervals [0,1], [2,3]).
    # H = (1,0), (2,0), (0,1), (0,3): each non-target has cos 1 with its target -> Q = ∅.
    # η = 0.25 -> α/η = (0.4, 1.6, 0.8, 1.2)
    #   m0 = softmax(0.4, 1.6)·[(1,0), (2,0)] = 0.2314752·1 + 0.7685248·2 = (1.7685248, 0)
    #   m1 = softmax(0.8, 1.2)·[(0,1), (0,3)] = (0, 0.4013123 + 3·0.5986877) = (0, 2.1973753)
    #   Q = ∅ -> c over the non-targets {0, 2}: softmax(0.4, 0.8) = (0.4013123, 0.5986877)
    #   c = (0.4013123, 0.5986877)
    hidden = t([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])
    alpha = t([[0.1, 0.4, 0.2, 0.3]])
    targets = pti(alpha, 2)
    assert targets.tolist() == [[1, 3]]
    out = igm(hidden, alpha, targets)
    close(out, [[[1.7685248, 0.0], [0.0, 2.1973753], [0.4013123, 0.5986877]]])


def test_igm_every_token_a_target_compensates_over_the_whole_span():
    # N = Nt = 3: m_i = H[i]; no non-target -> c over all span tokens.
    # α = (0.5, 0.3, 0.2), η = 1/3 -> α/η = (1.5, 0.9, 0.6)
    #   softmax = (0.5114092, 0.2806673, 0.2079235)
    #   c = 0.5114092·(1,0) + 0.2806673·(0,2) + 0.2079235·(3,4) = (1.1351796, 1.3930285)
    hidden = t([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    alpha = t([[0.5, 0.3, 0.2]])
    targets = pti(alpha, num_targets(3, 0.0))
    assert targets.tolist() == [[0, 1, 2]]
    out = igm(hidden, alpha, targets)
    close(out, [[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.1351796, 1.3930285]]])


def test_average_ties_join_the_first_target():
    # (1,1) is equally similar to the targets (1,0) and (0,1): it joins target 0.
    hidden = t([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    targets = torch.tensor([[0, 2]])
    group, _ = assign_groups(hidden, targets)
    assert group.tolist() == [[0, 0, 1]]
    close(average(hidden, t([[0.3, 0.3, 0.4]]), targets), [[[1.0, 0.5], [0.0, 1.0]]])


def test_a_target_always_belongs_to_its_own_group():
    # Two identical targets: without the override target 1 would join group 0 (first on ties).
    hidden = t([[[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]]])
    group, _ = assign_groups(hidden, torch.tensor([[0, 2]]))
    assert group.tolist() == [[0, 0, 1]]


def test_group_softmax_sum_by_hand():
    # Two spans, G = 2, group 2 = no group. Span 0: group 0 = {0, 2}, logits (0, ln 3) -> weights
    # (1/4, 3/4); group 1 = {1}; token 3 in none. Span 1: group 0 = {3}, group 1 = {0, 1, 2}, equal logits.
    hidden = t([[[4.0, 0.0], [1.0, 1.0], [0.0, 8.0], [100.0, 100.0]],
                [[3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [5.0, -5.0]]])
    logits = t([[0.0, 7.0, math.log(3.0), 9.0], [2.0, 2.0, 2.0, -1.0]])
    group = torch.tensor([[0, 1, 0, 2], [1, 1, 1, 0]])
    close(group_softmax_sum(hidden, logits, group, 2), [[[1.0, 6.0], [1.0, 1.0]], [[5.0, -5.0], [2.0, 2.0]]])


def test_group_softmax_sum_gradients():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    group = torch.tensor([[0, 1, 0, 3, 2], [2, 2, 1, 0, 1]])  # 3: no group
    assert torch.autograd.gradcheck(lambda h, a: group_softmax_sum(h, a, group, 3), (hidden, logits))


# ---- layout: hand cases ----------------------------------------------------------------------

def _seq(t_len, d=2):
    # token p has hidden (p, 10 p + 1): every row distinct and recognisable
    return torch.stack([torch.arange(t_len, dtype=torch.float32),
                        10 * torch.arange(t_len, dtype=torch.float32) + 1], -1)[None, :, :d]


def test_compress_visual_tokens_fastv_by_hand():
    # T = 6: text 0, span 1..4 (N = 4), text 5. R = 0.5 -> Nt = 2.
    # span α = (0.1, 0.4, 0.2, 0.3) -> top-2 ranks 1, 3 -> input indices 2, 4.
    hidden = _seq(6)
    alpha = t([[0.0, 0.1, 0.4, 0.2, 0.3, 0.0]])
    span = torch.tensor([[False, True, True, True, True, False]])
    out, kinds, source = compress_visual_tokens(
        hidden, alpha, span, span_lens=((4,),), carried=0,
        method="fastv", ratio=0.5)
    assert source.tolist() == [[0, 2, 4, 5]]
    assert kinds.tolist() == [[TEXT, VISUAL, VISUAL, TEXT]]
    close(out, hidden[:, [0, 2, 4, 5]])


def test_compress_visual_tokens_libra_with_a_carried_compensation_token():
    # T = 7: text 0, span 1..4, one compensation token of an earlier stage at 5, text 6.
    # PTI (intervals [0,1], [2,3]) of span α (0.1, 0.4, 0.2, 0.3) -> ranks 1, 3 -> indices 2, 4.
    # Output (contract §4.7): text, m0, m1, the carried token, the new c, text.
    # The new c takes the position of the last carried compensation token (index 5).
    hidden = _seq(7)
    alpha = t([[0.0, 0.1, 0.4, 0.2, 0.3, 0.0, 0.0]])
    kinds = torch.tensor([[TEXT, VISUAL, VISUAL, VISUAL, VISUAL, COMPENSATION, TEXT]], dtype=torch.uint8)
    out, kinds, source = compress_visual_tokens(
        hidden, alpha, kinds, span_lens=((4,),), carried=1,
        method="libra", ratio=0.5)
    assert source.tolist() == [[0, 2, 4, 5, 5, 6]]
    assert kinds.tolist() == [[TEXT, VISUAL, VISUAL, COMPENSATION, COMPENSATION, TEXT]]
    close(out[:, [0, 3, 5]], hidden[:, [0, 5, 6]])
    expected_span = igm(hidden[:, 1:5], alpha[:, 1:5], torch.tensor([[1, 3]]))
    close(out[:, [1, 2, 4]], expected_span)


def test_compress_visual_tokens_two_spans_per_sample():
    # T = 8: span 0..2, text 3, span 4..6, text 7; N = 3, R = 0.5 -> Nt = 2 (1.5 -> 2).
    # fastv: span 1 α (0.5, 0.1, 0.4) -> ranks 0, 2; span 2 α (0.1, 0.3, 0.3) -> ranks 1, 2 (tie).
    hidden = _seq(8)
    alpha = t([[0.5, 0.1, 0.4, 0.0, 0.1, 0.3, 0.3, 0.0]])
    span = torch.tensor([[True, True, True, False, True, True, True, False]])
    out, kinds, source = compress_visual_tokens(
        hidden, alpha, span, span_lens=((3, 3),), carried=0,
        method="fastv", ratio=0.5)
    assert source.tolist() == [[0, 2, 3, 5, 6, 7]]
    assert kinds.tolist() == [[VISUAL, VISUAL, TEXT, VISUAL, VISUAL, TEXT]]
    close(out, hidden[:, [0, 2, 3, 5, 6, 7]])


def test_gather_tokens_by_hand():
    pos = torch.tensor([[10, 11, 12, 13, 14]])
    source = torch.tensor([[0, 2, 4], [1, 1, 3]])
    assert gather_tokens(pos, source, 1).tolist() == [[10, 12, 14], [11, 11, 13]]
    cos = torch.arange(10.0).reshape(1, 5, 2)  # [1, T, head_dim]
    assert gather_tokens(cos, torch.tensor([[4, 0]]), 1).tolist() == [[[8.0, 9.0], [0.0, 1.0]]]


def test_gather_mask_by_hand():
    # bool [1, 1, 4, 4] mask with column 0 padded out (False) on top of causality
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = causal.clone()
    mask[:, 0] = False
    source = torch.tensor([[0, 2, 3]])
    got = gather_mask(mask[None, None], source)
    assert got.dtype == torch.bool
    assert got.tolist() == [[[[False, False, False],
                               [False, True, False],
                               [False, True, True]]]]
    # additive float mask of zeros (everything sees everything): it stays so, but of the two tokens
    # with source 3 the earlier does not see the later (the only entry that gets finfo.min)
    fmask = torch.zeros(1, 1, 4, 4, dtype=torch.float16)
    got = gather_mask(fmask, torch.tensor([[1, 3, 3]]))
    lo = torch.finfo(torch.float16).min
    assert got.dtype == torch.float16
    assert got.tolist() == [[[[0.0, 0.0, 0.0], [0.0, 0.0, lo], [0.0, 0.0, 0.0]]]]


def test_gather_mask_keeps_a_bidirectional_image_block():
    # Gemma3: text 0, image 1..3 (each sees the whole image), text 4. A stage keeps targets 1 and 3 and
    # puts a compensation token after 3 (source 3 again): M'[q, k] = M[src q, src k], except that the
    # target at 3 does not see the compensation token after it
    m = torch.ones(5, 5, dtype=torch.bool).tril()
    m[1:4, 1:4] = True
    got = gather_mask(m[None, None], torch.tensor([[0, 1, 3, 3, 4]]))[0, 0].int().tolist()
    assert got == [[1, 0, 0, 0, 0],
                   [1, 1, 1, 1, 0],   # target 1 sees target 3 and the compensation token (bidirectional)
                   [1, 1, 1, 0, 0],   # target 3: not the compensation token after it (same source)
                   [1, 1, 1, 1, 0],   # the compensation token: 3's row
                   [1, 1, 1, 1, 1]]
    # the causal rule (before issue #16) cut the image block: target 1 no longer saw target 3
    assert causal_rule_gather_mask(m[None, None], torch.tensor([[0, 1, 3, 3, 4]]))[0, 0, 1].int().tolist() == \
        [1, 1, 0, 0, 0]


# =============================================================================================
# 2. Hypothesis properties
# =============================================================================================

def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _alpha(gen, s, n):
    return torch.softmax(2 * _randn(gen, s, n), dim=-1)


spans_shapes = st.tuples(
    st.integers(1, 3),                       # S spans
    st.integers(1, 12),                      # N tokens per span
    st.integers(1, 5),                       # D
    st.floats(0.0, 0.95),                    # ratio
    st.integers(0, 2**31 - 1),               # seed
)


@PROPS
@given(spans_shapes, st.sampled_from(sorted(DECODER_METHODS)))
def test_every_method_output_length(shape, name):
    s, n, d, ratio, seed = shape
    gen = torch.Generator().manual_seed(seed)
    alpha, hidden = _alpha(gen, s, n), _randn(gen, s, n, d)
    m = METHODS[name]
    nt = num_targets(n, ratio)
    targets = m.selector(alpha, hidden, nt, m.options())
    assert targets.shape == (s, nt)
    out = m.compressor(hidden, alpha, targets, m.options())
    assert out.shape == (s, nt + int(m.compensation), d)
    assert torch.isfinite(out).all()
    # spans of a batch are independent: the first span alone gives the same result
    alone = m.compressor(hidden[:1], alpha[:1], m.selector(alpha[:1], hidden[:1], nt, m.options()), m.options())
    close(out[:1], alone)


def _targets(kind, alpha, hidden, nt):
    return {"pti": lambda: pti(alpha, nt), "top": lambda: top_alpha(alpha, nt),
            "turbo": lambda: turbo(alpha, hidden, nt)}[kind]()


@PROPS
@given(spans_shapes, st.sampled_from(["pti", "top", "turbo"]), st.floats(-1.0, 1.0),
       st.one_of(st.just("mean"), st.floats(0.05, 2.0)))
def test_constant_hidden_merges_to_itself(shape, kind, tau, eta):
    """Every weight set sums to 1: merging N copies of v gives v (merged tokens and c)."""
    s, n, d, ratio, seed = shape
    gen = torch.Generator().manual_seed(seed)
    alpha = _alpha(gen, s, n)
    v = _randn(gen, s, 1, d) + 0.1  # a generic non-zero vector per span
    hidden = v.expand(s, n, d).contiguous()
    nt = num_targets(n, ratio)
    targets = _targets(kind, alpha, hidden, nt)
    for out in (
        igm(hidden, alpha, targets, tau=tau, eta=eta),
        igm(hidden, alpha, targets, tau=tau, eta=eta, merge_positives=False),
        igm(hidden, alpha, targets, tau=float("-inf"), eta=eta, compensation=False),
        average(hidden, alpha, targets),
    ):
        close(out, v.expand(s, out.shape[1], d), atol=1e-5)


@PROPS
@given(spans_shapes, st.floats(-1.0, 1.0), st.one_of(st.just("mean"), st.floats(0.05, 2.0)))
def test_merge_weights_sum_to_one(shape, tau, eta):
    """Append a constant coordinate 1 to random tokens: it must stay 1 after every merge."""
    s, n, d, ratio, seed = shape
    gen = torch.Generator().manual_seed(seed)
    alpha = _alpha(gen, s, n)
    hidden = torch.cat([_randn(gen, s, n, d), torch.ones(s, n, 1)], -1)
    targets = pti(alpha, num_targets(n, ratio))
    for out in (igm(hidden, alpha, targets, tau=tau, eta=eta), average(hidden, alpha, targets)):
        close(out[..., -1], torch.ones(out.shape[:-1]))
        # a convex combination stays inside the per-coordinate range of the span
        lo = hidden.amin(1, keepdim=True) - 1e-5
        hi = hidden.amax(1, keepdim=True) + 1e-5
        assert ((out >= lo) & (out <= hi)).all()


@PROPS
@given(spans_shapes, st.floats(-1.0, 1.0), st.one_of(st.just("mean"), st.floats(0.05, 2.0)))
def test_identity_when_every_token_is_a_target(shape, tau, eta):
    s, n, d, _, seed = shape
    gen = torch.Generator().manual_seed(seed)
    alpha, hidden = _alpha(gen, s, n), _randn(gen, s, n, d)
    targets = torch.arange(n).expand(s, n)
    assert pti(alpha, n).tolist() == targets.tolist()
    out = igm(hidden, alpha, targets, tau=tau, eta=eta)
    assert out.shape == (s, n + 1, d)
    close(out[:, :n], hidden)
    # c over all span tokens (contract §4.6): softmax(α/η) · H, written out here
    scale = alpha.mean(-1, keepdim=True) if eta == "mean" else eta
    w = torch.exp(alpha / scale)
    w = w / w.sum(-1, keepdim=True)
    close(out[:, n], (w[:, :, None] * hidden).sum(1))
    close(average(hidden, alpha, targets), hidden)
    close(prune(hidden, alpha, targets), hidden)
    close(igm(hidden, alpha, targets, tau=float("-inf"), eta=eta, compensation=False), hidden)


@PROPS
@given(spans_shapes)
def test_igm_without_positive_merging_keeps_the_targets(shape):
    s, n, d, ratio, seed = shape
    gen = torch.Generator().manual_seed(seed)
    alpha, hidden = _alpha(gen, s, n), _randn(gen, s, n, d)
    targets = pti(alpha, num_targets(n, ratio))
    out = igm(hidden, alpha, targets, merge_positives=False)
    close(out[:, :-1], prune(hidden, alpha, targets))


@PROPS
@given(spans_shapes, st.booleans())
def test_selectors_return_ascending_in_range_targets(shape, with_ties):
    s, n, d, ratio, seed = shape
    gen = torch.Generator().manual_seed(seed)
    alpha, hidden = _alpha(gen, s, n), _randn(gen, s, n, d)
    if with_ties:  # coarse values -> many ties
        alpha = torch.round(alpha * 4) / 4 + 0.01
    nt = num_targets(n, ratio)
    assert 1 <= nt <= n
    for kind in ("pti", "top", "turbo"):
        tg = _targets(kind, alpha, hidden, nt)
        assert tg.shape == (s, nt) and tg.dtype == torch.int64
        assert ((tg >= 0) & (tg < n)).all()
        assert (tg[:, 1:] > tg[:, :-1]).all()
    # PTI: exactly one target per interval, the first maximum of that interval
    tg = pti(alpha, nt)
    for i in range(nt):
        lo, hi = i * n // nt, (i + 1) * n // nt  # hi exclusive
        for b in range(s):
            seg = alpha[b, lo:hi].tolist()
            assert tg[b, i].item() == lo + seg.index(max(seg))
    # top-α: the chosen are the highest, ties to the lower rank
    tg = top_alpha(alpha, nt)
    for b in range(s):
        order = sorted(range(n), key=lambda j: (-alpha[b, j].item(), j))
        assert tg[b].tolist() == sorted(order[:nt])


@PROPS
@given(
    st.integers(1, 3),            # B
    st.integers(1, 8),            # N
    st.integers(0, 5),            # max text tokens before / after the span
    st.integers(0, 2),            # carried compensation tokens
    st.integers(1, 4),            # D
    st.floats(0.0, 0.95),         # ratio
    st.sampled_from(sorted(DECODER_METHODS)),
    st.integers(0, 2**31 - 1),    # seed
)
def test_compress_visual_tokens_properties(b, n, pad, carried, d, ratio, name, seed):
    gen = torch.Generator().manual_seed(seed)
    t_len = n + carried + pad + 1
    offsets = torch.randint(0, pad + 2, (b,), generator=gen).tolist()  # 0 .. pad+1: keeps `carried` after
    hidden = _randn(gen, b, t_len, d)
    alpha = torch.softmax(_randn(gen, b, t_len), -1)
    kinds = torch.zeros(b, t_len, dtype=torch.uint8)
    for i, off in enumerate(offsets):
        kinds[i, off:off + n] = VISUAL
        kinds[i, off + n:off + n + carried] = COMPENSATION
    m = METHODS[name]
    nt, c = num_targets(n, ratio), int(m.compensation)

    out, new_kinds, source = compress_visual_tokens(
        hidden, alpha, kinds, span_lens=((n,),), carried=carried,
        method=name, ratio=ratio)
    t_new = t_len - n + nt + c
    assert out.shape == (b, t_new, d)
    assert new_kinds.shape == source.shape == (b, t_new)
    assert (source[:, 1:] >= source[:, :-1]).all()

    for i, off in enumerate(offsets):
        end = off + n  # first index after the span (carried comp tokens, then text)
        # text before the span: unchanged, in order, at its own position
        close(out[i, :off], hidden[i, :off])
        assert source[i, :off].tolist() == list(range(off))
        # the merged targets: at their targets' positions, equal to the compressor's output
        sp_h, sp_a = hidden[i:i + 1, off:end], alpha[i:i + 1, off:end]
        targets = m.selector(sp_a, sp_h, nt, m.options())
        expected = m.compressor(sp_h, sp_a, targets, m.options())
        close(out[i, off:off + nt], expected[0, :nt])
        assert source[i, off:off + nt].tolist() == (off + targets[0]).tolist()
        assert (new_kinds[i] == VISUAL).tolist() == [off <= j < off + nt for j in range(t_new)]
        assert (new_kinds[i] == COMPENSATION).tolist() == [off + nt <= j < off + nt + carried + c for j in range(t_new)]
        # carried compensation tokens: unchanged, right after the merged targets
        k = off + nt
        close(out[i, k:k + carried], hidden[i, end:end + carried])
        assert source[i, k:k + carried].tolist() == list(range(end, end + carried))
        k += carried
        # the new compensation token: after the carried ones, at the last of their positions
        if c:
            close(out[i, k], expected[0, nt])
            assert source[i, k].item() == end - 1 + carried
            k += 1
        # text after: unchanged and in order
        close(out[i, k:], hidden[i, end + carried:])
        assert source[i, k:].tolist() == list(range(end + carried, t_len))


@PROPS
@given(
    st.integers(2, 8),                                   # N
    st.lists(st.integers(1, 8), max_size=4),              # text markers: before span token k (k = N: after it)
    st.integers(0, 2),                                   # carried compensation tokens
    st.floats(0.0, 0.95),                                # ratio
    st.sampled_from(sorted(DECODER_METHODS)),
    st.integers(0, 2**31 - 1),                           # seed
)
def test_text_markers_inside_a_span_keep_their_places(n, markers, carried, ratio, name, seed):
    """A span interleaved with text markers (Pixtral's row breaks, Idefics3's tile markers; contract §1)
    compresses exactly as the same span without them, and each marker keeps its place: after the
    outputs whose sources precede it, before the others."""
    gen = torch.Generator().manual_seed(seed)
    markers = sorted(min(k, n) for k in markers)
    plain = [TEXT] + [VISUAL] * n + [COMPENSATION] * carried + [TEXT]
    with_markers, position = [TEXT], [0]  # the interleaved sequence, and each token's index in ``plain``
    for k in range(n + 1):
        with_markers += [TEXT] * markers.count(k)
        position += [-1] * markers.count(k)
        if k < n:
            with_markers.append(VISUAL)
            position.append(1 + k)
    with_markers += [COMPENSATION] * carried + [TEXT]
    position += list(range(1 + n, len(plain)))
    position = torch.tensor(position)
    hidden, alpha = _randn(gen, 1, len(plain), 3), torch.softmax(_randn(gen, 1, len(plain)), -1)
    filler = _randn(gen, 1, len(with_markers), 3)
    hidden_m = torch.where((position >= 0)[None, :, None], hidden[:, position.clamp(min=0)], filler)
    alpha_m = torch.where(position >= 0, alpha[:, position.clamp(min=0)], 0.5)
    stage = dict(span_lens=((n,),), carried=carried, method=name, ratio=ratio)
    want, want_kinds, want_source = compress_visual_tokens(hidden, alpha, torch.tensor([plain], dtype=torch.uint8), **stage)
    got, got_kinds, got_source = compress_visual_tokens(hidden_m, alpha_m, torch.tensor([with_markers], dtype=torch.uint8),
                                                        **stage)
    is_marker = position[got_source[0]] < 0
    close(got[:, ~is_marker], want)
    assert got_kinds[:, ~is_marker].tolist() == want_kinds.tolist()
    assert position[got_source[0, ~is_marker]].tolist() == want_source[0].tolist()
    assert (got_source[0, 1:] >= got_source[0, :-1]).all()  # in order: each marker between the tokens around it
    close(got[:, is_marker], filler[:, got_source[0, is_marker]])


def _causal_padding_mask(pads: list[int], t: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, T, T]``: causal, the first ``pads[b]`` columns of sample ``b`` hidden (left padding)."""
    keys = torch.arange(t)[None] >= torch.tensor(pads)[:, None]
    allowed = (torch.ones(t, t, dtype=torch.bool).tril() & keys[:, None, :])[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@PROPS
@given(
    st.lists(st.integers(1, 8), min_size=1, max_size=3),  # span length per sample (unequal: empty slots)
    st.integers(0, 3),            # most left padding
    st.floats(0.0, 0.95),         # ratio
    st.sampled_from(sorted(DECODER_METHODS)),
    st.sampled_from([torch.bool, torch.float32, torch.float16]),
    st.integers(0, 2**31 - 1),    # seed
)
def test_gather_mask_equals_the_causal_rule_on_causal_masks(lengths, most_pad, ratio, name, dtype, seed):
    """Contract §5: for causal masks with padding, the rows and columns at the sources (ties: the earlier
    does not see the later) are the causal rule in the compressed order, over two stages of real sources;
    with neither padding nor empty slots, both are the causal mask that SDPA's ``is_causal`` and
    flash-attn rebuild in the compressed order."""
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths) + most_pad + 2
    pads = torch.randint(0, most_pad + 1, (b,), generator=gen).tolist()
    span = torch.zeros(b, t, dtype=torch.bool)
    for i, (pad, n) in enumerate(zip(pads, lengths)):
        span[i, pad + 1: pad + 1 + n] = True  # pads, one text token, the span, text
    hidden = _randn(gen, b, t, 4)
    new = old = _causal_padding_mask(pads, t, dtype)
    carried, counts = 0, lengths
    for _ in range(2):
        span_lens = ((counts[0],),) if len(set(counts)) == 1 else tuple((n,) for n in counts)
        alpha = torch.softmax(_randn(gen, *span.shape), -1)
        hidden, span, source = compress_visual_tokens(hidden, alpha, span, span_lens=span_lens, carried=carried,
                                                      method=name, ratio=ratio)
        new, old = gather_mask(new, source), causal_rule_gather_mask(old, source)
        assert torch.equal(new, old)
        carried, counts = carried + int(METHODS[name].compensation), [num_targets(n, ratio) for n in counts]
    if not any(pads) and len(set(lengths)) == 1:
        rebuilt = torch.ones(source.shape[1], source.shape[1], dtype=torch.bool).tril()
        assert torch.equal(new, rebuilt.expand_as(new) if dtype == torch.bool else _causal_padding_mask(
            [0] * b, source.shape[1], dtype))


# =============================================================================================
# 3. Bad input
# =============================================================================================

@pytest.mark.parametrize("name", ["nope", "", "LIBRA", "prumerge+"])
def test_get_method_unknown_name_lists_valid_methods(name):
    with pytest.raises(ValueError) as err:
        get_method(name)
    msg = str(err.value)
    assert repr(name) in msg
    for valid in ("libra", "fastv", "turbo", "merge", "pti", "igm_pos", "igm_neg"):
        assert valid in msg


def test_method_table_matches_spec():
    assert set(DECODER_METHODS) == {"libra", "fastv", "turbo", "merge", "pti", "igm_pos", "igm_neg"}
    assert {k for k in DECODER_METHODS if METHODS[k].compensation} == {"libra", "igm_neg"}
    for k, m in METHODS.items():
        assert get_method(k) is m and m.name == k


def test_compress_visual_tokens_unknown_method():
    hidden = _seq(4)
    span = torch.tensor([[False, True, True, False]])
    with pytest.raises(ValueError, match="valid methods"):
        compress_visual_tokens(hidden, torch.full((1, 4), 0.25), span, span_lens=((2,),),
                               carried=0, method="nope", ratio=0.5)


# =============================================================================================
# 4. Method options (the registry validates them; the graph node carries them to the maths)
# =============================================================================================

def test_method_options_are_typed_and_validated():
    assert libra_fx.method("libra", tau=0.6).options.tau == 0.6
    assert libra_fx.method("turbo", lam=0.5).items() == (("lam", 0.5),)
    with pytest.raises(ValueError, match="method 'fastv' takes no options; got tau"):
        libra_fx.method("fastv", tau=0.5)
    with pytest.raises(ValueError, match="method 'turbo' takes lam; got eta"):
        libra_fx.backend(method="turbo", eta=2.0)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        libra_fx.method("turbo", lam=float("nan"))


def test_turbo_lambda_reaches_the_selector_through_the_stage_node():
    """Tokens 0 and 1 are identical and the most important (α 0.12 against 0.095, mean 0.1). With λ = 0
    informativity is α / mean(α), so Turbo picks them, as ``merge`` (top-α) does; with λ = 1 their
    redundancy (cos 1) costs them their places: 1.2 − 1 < 0.95 − 0."""
    hidden = torch.eye(10)[None, [0, 0, 2, 3, 4, 5, 6, 7, 8, 9]]
    alpha = torch.tensor([[0.12, 0.12] + [0.095] * 8])
    span = torch.ones(1, 10, dtype=torch.bool)
    stage = dict(span_lens=((10,),), carried=0, ratio=0.5)
    turbo0 = compress_visual_tokens(hidden, alpha, span, method="turbo", options=(("lam", 0.0),), **stage)
    merge = compress_visual_tokens(hidden, alpha, span, method="merge", **stage)
    turbo1 = compress_visual_tokens(hidden, alpha, span, method="turbo", **stage)  # λ = 1, the default
    close(turbo0[0], merge[0])
    assert turbo0[2].tolist() == merge[2].tolist() == [[0, 1, 2, 3, 4]]
    assert turbo1[2].tolist() == [[2, 3, 4, 5, 6]]
