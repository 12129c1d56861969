#!/usr/bin/env bash
# Create .venv and install qvlc with its pinned stack (idempotent). torch is installed first and pinned:
# torch==2.13.0 is the CPU build; an unpinned torch would pull several GB of CUDA wheels.
# pip's and setuptools' own output goes to .venv/setup.log, shown only when a step fails, so the commands that
# follow (scripts/demo.sh) print qvlc's output and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
log=.venv/setup.log
: > "$log"
step() {
  if ! "$@" >> "$log" 2>&1; then
    cat "$log" >&2
    echo "setup failed: $*" >&2
    exit 1
  fi
}
step .venv/bin/python -m pip install --quiet --upgrade pip
step .venv/bin/python -m pip install --quiet "torch==2.13.0"
# tvm: the optional second runtime of the proof (validate.runtimes); serve: `qvlc serve`. Both are tested in CI.
step .venv/bin/python -m pip install --quiet -e ".[test,tvm,serve]"
