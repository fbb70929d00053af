import os
import sys
import tempfile

# pytest-xdist runs two workers (pyproject's addopts): one thread each, and each its own Inductor
# cache (concurrent compiles sharing one cache directory can fail with an ImportError)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"libra_fx_inductor_{os.environ['PYTEST_XDIST_WORKER']}"))

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the oracle and helpers live beside the tests

from harness import compile_and_run  # noqa: E402


@pytest.fixture
def run_backend():
    return compile_and_run
