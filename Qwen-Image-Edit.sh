#!/usr/bin/env bash
# Qwen-Image-Edit (the original, August 2025: --model_version 2508, one reference per row) LoRA: phase 1 + phase 2.
# Variables: see README.md. Extra arguments go to `edittuner train`. The tiny demo uses the demo's one-reference rows.
PRESET=2508 LAUNCHER=Qwen-Image-Edit DEMO_DATASET=data/demo/dataset_single_ref.json \
  exec "$(dirname "$0")/scripts/launch.sh" "$@"
