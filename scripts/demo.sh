#!/usr/bin/env bash
# The main job on the embedded default (a tiny random Qwen2-VL): compile both parts, prove them, verify them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/qvlc compile configs/tiny_llm.yaml --force
.venv/bin/qvlc compile configs/tiny_visual.yaml --force
.venv/bin/qvlc verify build/tiny_llm
.venv/bin/qvlc verify build/tiny_visual
