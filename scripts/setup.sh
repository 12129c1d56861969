#!/usr/bin/env bash
# Create .venv and install qvlc with its pinned stack (idempotent). torch is installed first and pinned:
# torch==2.13.0 is the CPU build; an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# tvm: the optional second runtime of the proof (validate.runtimes); serve: `qvlc serve`. Both are tested in CI.
.venv/bin/python -m pip install --quiet -e ".[test,tvm,serve]"
