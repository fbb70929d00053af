import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the oracle and helpers live beside the tests

from harness import compile_and_run  # noqa: E402


@pytest.fixture
def run_backend():
    return compile_and_run
