#!/usr/bin/env bash
# The prepared device check (see benchmarks/gpu_check.py): bf16 throughput of the engine's passes on
# Pythia-410m/1b-shaped random models and GPU-vs-CPU score agreement on the demo's toy world.
#
#   benchmarks/gpu_check.sh                 # on a CUDA machine: < 8 min on one H200, writes benchmarks/results/gpu_check.json
#   benchmarks/gpu_check.sh --cpu-smoke     # tiny shapes on the CPU in seconds (tests/benchmarks/test_benchmarks.py runs this)
#
# Extra flags go to gpu_check.py (--out, --batch-size, --seq-len, --batches, --queries, --workdir).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# 470 s: the check's own limit, inside the 8 minutes it promises; partial results are kept in the JSON.
exec timeout 470 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
