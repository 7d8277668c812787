#!/usr/bin/env bash
# The GPU mode in one command, from a source checkout with no install step:
#   bash benchmarks/gpu.sh [OUT_DIR] [extra bench.py options]
# writes OUT_DIR/gpu.json (every row: captioning at batch 1, 32 and 256, with FlanT5-XL's dimensions,
# `blip2 caption` end to end on JPEGs, beams, training steps, ITM; with the environment), OUT_DIR/gpu.log
# and OUT_DIR/profile.txt (one profiled call of ours per row), then the stage-1 and stage-2 training
# rows again with bf16 weights over fp32 master copies (train.precision: bfloat16-master) into
# OUT_DIR/gpu-master.json and .log. About 5-6 minutes on one H100/H200 (estimated; see the README).
set -uo pipefail
mkdir -p "${1:-gpu-results}"
out=$(cd "${1:-gpu-results}" && pwd)
shift || true
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
rows=caption,caption256,beam,stage2,qformer,e2e,t5,itm,stage1
python3 benchmarks/bench.py --device cuda --rows "$rows" --out "$out/gpu.json" --profile "$out/profile.txt" "$@" 2>&1 |
    tee "$out/gpu.log"
python3 benchmarks/bench.py --device cuda --rows stage1,stage2 --precision master --out "$out/gpu-master.json" \
    --profile "$out/profile.txt" "$@" 2>&1 | tee "$out/gpu-master.log"
