"""``benchmarks/gpu_check.sh`` in its CPU dry mode, so that the GPU check cannot rot while no GPU is lent:
the same steps on tiny shapes (``compiler="eager"``), and the table it writes."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_its_table(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--repeats", "1"], cwd=ROOT,
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    text = (tmp_path / "gpu_check.md").read_text()
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| sdpa |")}
    assert list(rows) == ["uncompressed", "libra R=0.5 (0, 1, 2)", "fastv K=3 (R=0.5 after layer 2)"], text
    assert rows["uncompressed"].endswith("| no | yes |") and rows["fastv K=3 (R=0.5 after layer 2)"].endswith("| yes | yes |")
    assert rows["libra R=0.5 (0, 1, 2)"].endswith("| yes | yes |")
    assert "| flash_attention_2 | all settings | skipped: flash_attn not importable |" in text
    assert "Real flash-attn test (`tests/test_flash.py`): exit 0: 1 skipped" in text  # no CUDA, no flash-attn here
