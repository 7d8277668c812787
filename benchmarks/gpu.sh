#!/usr/bin/env bash
# The GPU mode in one command, from a source checkout with no install step:
#   bash benchmarks/gpu.sh [OUT_DIR] [extra bench.py options]
# writes OUT_DIR/gpu.json (rows and environment), OUT_DIR/gpu.log and OUT_DIR/profile.txt (one
# profiled call of ours per row).
set -uo pipefail
mkdir -p "${1:-gpu-results}"
out=$(cd "${1:-gpu-results}" && pwd)
shift || true
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 benchmarks/bench.py --device cuda --out "$out/gpu.json" --profile "$out/profile.txt" "$@" 2>&1 |
    tee "$out/gpu.log"
