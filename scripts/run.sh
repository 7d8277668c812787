#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job: `blip2 demo` (pass --quick, --out DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/blip2 demo "$@"
