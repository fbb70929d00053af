import os
import sys
import tempfile

# pytest-xdist runs two workers (pyproject's addopts): one thread each, and each its own Inductor cache
# (concurrent compiles sharing one cache directory can fail with an ImportError). Set, not defaulted: the
# controller's own imports already set TORCHINDUCTOR_CACHE_DIR to torch's default, which the workers inherit.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "torchinductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{base}_{worker}"

import pytest  # noqa: E402
import torch._inductor.config  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the oracle and helpers live beside the tests

from harness import compile_and_run  # noqa: E402

# Inductor's CPU kernels without SIMD: gcc builds them in about two thirds of the time. The graphs
# libra-fx hands Inductor, and Inductor's lowering of them, are the same; the ``vectorized_inductor``
# fixture gives a test the default kernels (TORCHINDUCTOR_VEC_ISA_OK in the environment overrides both).
if "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
    torch._inductor.config.cpp.vec_isa_ok = False


@pytest.fixture
def vectorized_inductor():
    """Inductor's default CPU kernels (vectorized where the machine allows), for this test."""
    with torch._inductor.config.patch({"cpp.vec_isa_ok": None}):
        yield


@pytest.fixture
def run_backend():
    return compile_and_run


def pytest_collection_modifyitems(items):
    """Tests marked ``first`` (a minute or more on 2 cores) start first: xdist then spreads the rest, and
    neither worker is left running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)
