"""Nothing process-wide changes without a call to libra-fx, and a report leaves other compiled models alone.

- importing libra-fx (every module a user may import) leaves transformers' attention registries,
  ``OptimizedModule`` and Dynamo's settings as they were;
- ``token_map`` compiles its own copy of the forward's code: a model the user compiled before keeps its
  compiled graph (it once called ``torch._dynamo.reset()``, and the user's model compiled again).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from libra_fx.reports.token_map import token_map
from libra_fx.testing import tiny_llava, tiny_llava_inputs

IMPORTS = ("libra_fx", "libra_fx.cli", "libra_fx.reports.token_map", "libra_fx.reports.flops", "libra_fx.conformance",
           "libra_fx.conformance.check", "libra_fx.testing", "libra_fx.shapes_task", "libra_fx.lmms_eval.settings")


def test_importing_libra_fx_changes_nothing_process_wide():
    script = textwrap.dedent(f"""
        import importlib, torch, torch._dynamo
        from torch._dynamo.eval_frame import OptimizedModule
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        def snapshot():
            return (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping),
                    OptimizedModule.__dict__.get("__getattr__"), torch._dynamo.config.get_config_copy(),
                    torch.compiler.config.get_config_copy())

        before = snapshot()
        for name in {IMPORTS!r}:
            importlib.import_module(name)
        after = snapshot()
        for what, b, a in zip(("attention", "masks", "OptimizedModule.__getattr__", "dynamo", "compiler"), before, after):
            assert a == b, what
        print("unchanged")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "unchanged", run.stderr[-2000:]


def test_token_map_leaves_another_compiled_model_alone():
    users_model = tiny_llava()
    inputs = tiny_llava_inputs(users_model)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    forward = torch.compile(users_model.forward, backend=counting)
    with torch.no_grad():
        want = forward(**inputs).logits
        graphs = len(compiles)
        other = tiny_llava(seed=1)
        token_map(other, tiny_llava_inputs(other), method="fastv", ratio=0.5, layers=(1,))
        got = forward(**inputs).logits
    assert len(compiles) == graphs, "the user's compiled forward was compiled again after token_map"
    assert torch.equal(got, want)
