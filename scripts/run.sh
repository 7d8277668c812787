#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py "$@"
