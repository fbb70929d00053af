#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): LLaVA-1.5-7B-shaped prefill (SDPA, and flash_attention_2 when
# flash_attn imports), peak memory, and the real flash-attn test; writes $OUT/gpu_check.md in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (OUT defaults to ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry      # CPU, tiny shapes: what tests/test_gpu_check.py runs
#
# It installs nothing (no pip): this checkout goes on PYTHONPATH and the machine's own torch,
# transformers and flash-attn are used.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/gpu_check_out}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec python benchmarks/gpu_check.py --out "$out" "$@"
