#!/usr/bin/env bash
# The main job on the embedded defaults (tiny random Qwen2-VL, and its Qwen2.5-VL and Qwen3-VL twins): compile both parts of
# each, prove them, verify them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for name in tiny tiny_qwen2_5_vl tiny_qwen3_vl; do
  .venv/bin/qvlc compile "configs/${name}_llm.yaml" --force
  .venv/bin/qvlc compile "configs/${name}_visual.yaml" --force
  .venv/bin/qvlc verify "build/${name}_llm"
  .venv/bin/qvlc verify "build/${name}_visual"
done
