"""Issue 4 acceptance: Qwen2-VL, Qwen2.5-VL (M-RoPE), the Qwen2-VL video input and LLaVA-NeXT
through the backend equal the independent oracle (tests/oracle.py) — prefill logits and greedy
``generate()`` — and Qwen2-VL images of new sizes recompile at most once.

Which call compresses: LLaVA-NeXT's ``forward`` (its vision code has graph breaks, so
``fullgraph=False``); Qwen2-VL's ``generate()`` (its prefill graph holds the image mask; the 3-D
position ids are computed outside the graph) and its plain ``forward`` through ``libra_fx.compile``
(which computes them the same way). A plain Qwen2-VL ``forward`` under a bare ``torch.compile``
must compress or warn that it did not (``test_qwen_plain_forward_compresses_or_warns``).
The cases cover every level of method (libra, fastv) × batch (B=1, B=2, left-padded B=2) ×
attention (sdpa, eager) × stages (one, two) for each family, without the full product (time).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from families import QWEN, build, make_inputs, qwen_two_images, ragged_llava_next
from oracle import oracle_generate, oracle_logits

import libra_fx

B1 = dict(batch=1)
B2 = dict(batch=2)
B2_PADDED = dict(batch=2, pad=(0, 2))
ONE, TWO = (1,), (0, 2)
# Prompt lengths: Qwen image 29 (B1 and B2) / 31 (padded), Qwen video 45 / 47, LLaVA-NeXT 84 / 86.
# In every case below no length, before or after a stage, equals a model dimension (16, 32, 64, 128):
# with static shapes such a length is ambiguous and the backend refuses the rewrite (docs/api.md). E.g.
# the padded video with libra after layer 1 would compress 47 -> 32: not used.


def compiled(model, compiler="eager", **cfg):
    """``libra_fx.compile`` after a Dynamo reset (every tiny model shares ``forward``'s code object)."""
    torch._dynamo.reset()
    return libra_fx.compile(model, compiler=compiler, fullgraph=False, **cfg)


def generate(model, inputs, n):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, -n:], torch.stack(out.logits, 1).float()


def backend_prefill_logits(family, model, inputs, compiler="eager", **cfg):
    """(last-position logits of the compressed prefill [B, V], the backend's records).

    LLaVA-NeXT: ``torch.compile(model.forward, backend=libra_fx.backend(...))``. Qwen2-VL: the
    prefill of ``generate`` through ``libra_fx.compile`` (``max_new_tokens=1``)."""
    if family in QWEN:
        model = compiled(model, compiler, **cfg)
        _, logits = generate(model, inputs, 1)
        return logits[:, 0], model.libra_backend.records
    torch._dynamo.reset()
    be = libra_fx.backend(compiler=compiler, **cfg)
    with torch.no_grad():
        out = torch.compile(model.forward, backend=be, fullgraph=False)(**inputs)
    return out.logits[:, -1].float(), be.records


def assert_compressed(records):
    assert any(r.compressed for r in records), "nothing compressed: " + "; ".join(r.reason for r in records)


def assert_matches(got, want, tol):
    assert got.shape == want.shape and torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err <= tol, f"max |backend - oracle| = {err:.3g} > {tol}"


# ---------------------------------------------------------------- prefill logits == oracle (eager)

# (method, batch, attn, layers). The prefill of every generate() case below is checked to 1e-5 too,
# so for the Qwen families these add the B=2 batch without padding.
PREFILL = {
    "qwen2_vl": [("libra", B2, "eager", TWO)],
    "qwen2_5_vl": [("fastv", B2, "eager", ONE)],
    "qwen2_vl_video": [("fastv", B2, "sdpa", TWO)],
    "llava_next": [("libra", B2_PADDED, "sdpa", TWO), ("fastv", B2, "eager", ONE)],  # B1: see GENERATE
}


def case_id(family, method, batch, attn, layers):
    pad = "pad" if batch.get("pad") else ""
    return f"{family}-{method}-B{batch['batch']}{pad}-{attn}-{len(layers)}stage"


PREFILL_CASES = [pytest.param(f, *case, id=case_id(f, *case)) for f, cases in PREFILL.items() for case in cases]


@pytest.mark.parametrize("family, method, batch, attn, layers", PREFILL_CASES)
def test_prefill_matches_oracle(family, method, batch, attn, layers):
    model = build(family, attn=attn)
    inputs = make_inputs(family, model, seed=3, **batch)
    cfg = dict(method=method, ratio=0.5, layers=layers)
    want, _ = oracle_logits(model, **inputs, **cfg)
    got, records = backend_prefill_logits(family, model, inputs, **cfg)
    assert_compressed(records)
    assert_matches(got, want, 1e-5)


# ---------------------------------------------------------------- Inductor


# One case per kind of language model (an Inductor compile costs about a minute on 2 cores; LLaVA-NeXT's
# language model is LLaVA's Llama, already checked under Inductor in test_equivalence.py).
@pytest.mark.parametrize("family, method, batch, attn, layers", [
    pytest.param("qwen2_vl", "libra", B2_PADDED, "sdpa", TWO, id="qwen2_vl-libra-B2pad-sdpa-2stage"),
])
def test_inductor_prefill_matches_oracle(family, method, batch, attn, layers):
    model = build(family, attn=attn)
    inputs = make_inputs(family, model, seed=5, **batch)
    cfg = dict(method=method, ratio=0.5, layers=layers)
    want, _ = oracle_logits(model, **inputs, **cfg)
    got, records = backend_prefill_logits(family, model, inputs, compiler="inductor", **cfg)
    assert_compressed(records)
    assert_matches(got, want, 1e-4)


# ---------------------------------------------------------------- generate() == oracle_generate

# Two new tokens: prefill + one decode step. Qwen2-VL's padded case takes three, so that a second
# decode step runs the recompiled (dynamic-length) decode graph with M-RoPE positions.
GENERATE = {  # family -> {case: (method, attn, layers)}; B1 and left-padded B2 for each family
    "qwen2_vl": {"B1": ("fastv", "eager", ONE), "B2-left-padded": ("libra", "sdpa", TWO)},
    "qwen2_5_vl": {"B1": ("libra", "eager", TWO), "B2-left-padded": ("fastv", "sdpa", ONE)},
    "qwen2_vl_video": {"B1": ("libra", "sdpa", ONE), "B2-left-padded": ("fastv", "eager", TWO)},
    "llava_next": {"B1": ("fastv", "sdpa", TWO), "B2-left-padded": ("libra", "eager", TWO)},
}
GENERATE_CASES = [pytest.param(f, case, *cfg, id=case_id(f, cfg[0], B1 if case == "B1" else B2_PADDED, *cfg[1:]))
                  for f, cases in GENERATE.items() for case, cfg in cases.items()]


@pytest.mark.parametrize("family, case, method, attn, layers", GENERATE_CASES)
def test_generate_matches_oracle(family, case, method, attn, layers):
    cfg = dict(method=method, ratio=0.5, layers=layers)
    n = 3 if (family, case) == ("qwen2_vl", "B2-left-padded") else 2
    model = build(family, attn=attn)
    inputs = make_inputs(family, model, seed=1, **(B1 if case == "B1" else B2_PADDED))
    want_tokens, want_logits = oracle_generate(model, **inputs, max_new_tokens=n, **cfg)
    model = compiled(model, **cfg)
    tokens, logits = generate(model, inputs, n)
    assert_compressed(model.libra_backend.records)
    assert_matches(logits[:, 0], want_logits[0], 1e-5)  # the prefill
    assert torch.equal(tokens, want_tokens)
    assert_matches(logits, torch.stack(want_logits, 1), 1e-4)


# ---------------------------------------------------------------- Qwen2-VL: image sizes


def test_qwen_two_image_sizes_in_a_row_compile_at_most_once_more():
    """A new image size recompiles the prefill once (each of its graphs at most once: a Qwen2-VL
    forward has graph breaks around the vision tower), and a third size reuses those graphs."""
    cfg = dict(method="libra", ratio=0.5, layers=ONE)
    model = build("qwen2_vl")
    sizes = [make_inputs("qwen2_vl", model, grid=g, seed=i)  # 16, 24, 32 visual tokens
             for i, g in enumerate([(8, 8), (8, 12), (8, 16)])]
    wants = [oracle_logits(model, **x, **cfg)[0] for x in sizes]
    model = compiled(model, **cfg)
    new_records = []
    for inputs, want in zip(sizes, wants):
        before = list(model.libra_backend.records)  # (the backend keeps the newest 32, in a new list)
        _, logits = generate(model, inputs, 1)  # prefill only: every record is a prefill graph
        new = model.libra_backend.records[len(before):]
        new_records.append(new)
        assert not new or any(r.compressed for r in new), \
            "a prefill ran uncompressed: " + "; ".join(r.reason for r in new)
        assert_matches(logits[:, 0], want, 1e-5)
    first, second, third = (len(n) for n in new_records)
    assert first >= 1
    assert second <= first, f"the second image size compiled {second} graphs, the first {first}"
    assert third == 0, f"a third image size compiled {third} more graphs"


def test_qwen_two_images_of_different_sizes_match_oracle():
    cfg = dict(method="libra", ratio=0.5, layers=TWO)
    model = build("qwen2_vl")
    # two spans of 16 and 8 visual tokens; 43 tokens -> 33 -> 29 (42 would compress to 32, see above)
    inputs = qwen_two_images(model, grids=((8, 8), (4, 8)), middle=4)
    want_tokens, want_logits = oracle_generate(model, **inputs, max_new_tokens=3, **cfg)
    model = compiled(model, **cfg)
    tokens, logits = generate(model, inputs, 3)
    assert_compressed(model.libra_backend.records)
    assert_matches(logits[:, 0], want_logits[0], 1e-5)
    assert torch.equal(tokens, want_tokens)
    assert_matches(logits, torch.stack(want_logits, 1), 1e-4)


def test_qwen_plain_forward_compresses_or_warns():
    """``model(**inputs)`` computes the 3-D positions inside ``forward`` (graph breaks): either its
    graphs compress and match the oracle, or libra_fx warns and the result is the uncompressed model's."""
    cfg = dict(method="libra", ratio=0.5, layers=ONE)
    model = build("qwen2_vl")
    inputs = make_inputs("qwen2_vl", model, batch=2, pad=(0, 2))
    torch._dynamo.reset()
    be = libra_fx.backend(compiler="eager", **cfg)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = torch.compile(model.forward, backend=be, fullgraph=False)(**inputs).logits[:, -1].float()
    if any(r.compressed for r in be.records):
        assert_matches(got, oracle_logits(model, **inputs, **cfg)[0], 1e-5)
    else:
        assert any(issubclass(w.category, libra_fx.LibraFallbackWarning) for w in caught), \
            "forward() ran uncompressed without a LibraFallbackWarning"
        assert_matches(got, oracle_logits(model, **inputs, ratio=0.0)[0], 1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_plain_forward_through_libra_fx_compile_matches_oracle(family):
    """``libra_fx.compile`` computes the 3-D positions before the compiled forward, as ``generate``
    does, so a plain ``model(**inputs)`` compresses and equals the oracle (Qwen2.5-VL's
    ``compute_3d_position_ids`` takes other arguments than Qwen2-VL's: the adapter passes each its own)."""
    cfg = dict(method="fastv", ratio=0.5, layers=ONE)
    model = build(family)
    inputs = make_inputs(family, model, batch=2, pad=(0, 2))
    want, _ = oracle_logits(model, **inputs, **cfg)
    model = compiled(model, **cfg)
    with torch.no_grad():
        got = model(**inputs).logits[:, -1].float()
    assert_compressed(model.libra_backend.records)
    assert_matches(got, want, 1e-5)


@pytest.mark.parametrize("method", ["libra"])  # fastv: the next test
def test_llava_next_ragged_batch_generates_as_each_sample_alone(method):
    """Images of different sizes in one batch (72 and 36 visual tokens): each sample is compressed by
    its own counts; the shorter one gets empty slots (contract §1), and its tokens and logits are those of
    the oracle run on that sample alone."""
    cfg = dict(method=method, ratio=0.5, layers=TWO)
    model = build("llava_next")
    batch, alone = ragged_llava_next(model)
    wants = [oracle_generate(model, **x, max_new_tokens=3, **cfg) for x in alone]
    model = compiled(model, **cfg)
    tokens, logits = generate(model, batch, 3)
    assert_compressed(model.libra_backend.records)
    for b, (want_tokens, want_logits) in enumerate(wants):
        assert torch.equal(tokens[b:b + 1], want_tokens)
        assert_matches(logits[b:b + 1], torch.stack(want_logits, 1), 1e-4)


def test_llava_next_ragged_batch_outside_generate_decodes_as_each_sample_alone():
    """Issue 14, case 4: ``model(**batch, use_cache=True)`` and then manual steps (one token, then a
    3-token step) on the empty-slot cache, after each sample ran alone first (a graph compiled for a
    uniform batch must not serve the ragged one). Against the oracle of each sample alone."""
    cfg = dict(method="fastv", ratio=0.5, layers=TWO)
    model = build("llava_next")
    batch, alone = ragged_llava_next(model)
    wants = [oracle_generate(model, **x, max_new_tokens=5, **cfg) for x in alone]
    model = compiled(model, **cfg)
    tokens = torch.cat([w[0] for w in wants])
    with torch.no_grad():
        for x in alone:
            model(**x)
        out = model(**batch, use_cache=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
        width = batch["attention_mask"].shape[1]
        step = model(input_ids=tokens[:, :1], attention_mask=mask[:, :width + 1], past_key_values=out.past_key_values)
        three = model(input_ids=tokens[:, 1:4], attention_mask=mask[:, :width + 4], past_key_values=out.past_key_values)
    got = torch.cat([out.logits[:, -1:], step.logits, three.logits], 1)
    for b, pad in enumerate((batch["attention_mask"] == 0).sum(1).tolist()):
        assert pad == 0 or b == 1  # the second sample is the shorter, padded one
        assert_matches(got[b:b + 1], torch.stack(wants[b][1][:5], 1), 1e-4)


def test_llava_next_ragged_batch_with_beams_is_compressed_as_each_sample_alone():
    """Issue 14, case 8: beam search repeats a ragged batch's samples; it is compressed (no fallback) and
    each sample's beams equal those of the hook oracle on that sample alone."""
    from libra_fx.conformance.oracle import HookOracle

    cfg = dict(method="libra", ratio=0.5, layers=ONE)
    plain = build("llava_next")
    batch, alone = ragged_llava_next(plain)
    model = compiled(build("llava_next"), **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", libra_fx.LibraFallbackWarning)
        tokens, logits = generate_beams(model, batch)
    for b, x in enumerate(alone):
        with HookOracle(plain, **cfg):
            want_tokens, _ = generate_beams(plain, x)
        assert torch.equal(tokens[b:b + 1], want_tokens)


def generate_beams(model, inputs, n=3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, num_beams=2, do_sample=False, return_dict_in_generate=True)
    return out.sequences[:, -n:], out.sequences_scores
