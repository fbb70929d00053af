"""Cases where the backend must leave the model's computation exactly as it is."""

from __future__ import annotations

import pytest
import torch

from libra_fx import dynamo_backend
from libra_fx.config import CompressionConfig
from libra_fx.dynamo_backend import LibraBackend
from libra_fx.testing import tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.mark.parametrize("cfg", [dict(ratio=0.0), dict(layers=())], ids=["ratio=0", "layers=()"])
def test_inactive_backend_equals_plain_inductor(model, run_backend, cfg):
    inputs = tiny_llava_inputs(model, batch=2)
    logits, be = run_backend(model, inputs, **cfg)
    assert not be.last.compressed and be.last.before is None  # the graph was never inspected
    torch._dynamo.reset()
    with torch.no_grad():
        plain = torch.compile(model.forward, backend="inductor", fullgraph=True)(**inputs).logits
    assert torch.equal(logits, plain)


def test_text_only_prompt_is_uncompressed(model, run_backend, recwarn):
    inputs = tiny_llava_inputs(model, batch=2, with_image=False)
    logits, be = run_backend(model, inputs, ratio=0.5, layers=(1,), compiler="eager")
    assert not be.last.compressed
    assert "no visual tokens" in be.last.reason
    assert not [w for w in recwarn if "libra_fx" in str(w.message)]
    with torch.no_grad():
        want = model(**inputs).logits
    assert logits.shape == want.shape
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=1e-6)


def test_compression_after_the_last_layer_keeps_the_last_logits(model, run_backend):
    inputs = tiny_llava_inputs(model, batch=2)
    logits, be = run_backend(model, inputs, ratio=0.5, layers=(3,), compiler="eager")
    assert be.last.compressed
    with torch.no_grad():
        want = model(**inputs).logits[:, -1]
    torch.testing.assert_close(logits[:, -1], want, atol=1e-5, rtol=1e-5)


def test_named_backend_is_registered_with_the_defaults(monkeypatch):
    """``backend="libra"`` resolves (entry point) to a LibraBackend with the defaults, whose schedule
    (libra, ratio 0.5 after layers 7, 15, 23) runs on a 24-layer model. The rewritten graph is run
    without Inductor here (``compiler="eager"``); Inductor itself is covered by the oracle tests."""
    assert torch._dynamo.lookup_backend("libra") is dynamo_backend.libra_backend
    built = []
    monkeypatch.setattr(dynamo_backend, "LibraBackend",
                        lambda: built.append(LibraBackend(compiler="eager")) or built[-1])
    model = tiny_llava(num_layers=24, hidden_size=32, intermediate_size=64)
    inputs = tiny_llava_inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model.forward, backend="libra", fullgraph=True)(**inputs).logits
    assert built and built[0].config == CompressionConfig()
    # 36 → 18+1 → 9+2 → 5+3 visual tokens
    assert out.shape[1] == inputs["input_ids"].shape[1] - 36 + 8
