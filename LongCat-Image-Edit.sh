#!/usr/bin/env bash
# LongCat-Image-Edit (--model_version longcat, one reference per row) LoRA: phase 1 + phase 2. Variables: see
# README.md. Extra arguments go to `edittuner train`. The tiny demo uses the demo's one-reference rows.
# On real weights the defaults are LongCat's seed guide: 768x768 on a 64-pixel grid, lr 5e-5 (AdamW), batch 1,
# previews with guidance 4.5 and 40 steps (gradient checkpointing is edittuner's default).
if [ -n "${MODEL_DIR:-}" ]; then
  export MAX_PIXELS="${MAX_PIXELS:-589824}" MULTIPLE="${MULTIPLE:-64}" BATCH_SIZE="${BATCH_SIZE:-1}" \
    VALIDATION_GUIDANCE="${VALIDATION_GUIDANCE:-4.5}" VALIDATION_INFERENCE_STEPS="${VALIDATION_INFERENCE_STEPS:-40}"
  [ "${OPTIMIZER:-adamw}" != adamw ] || export LR="${LR:-5e-5}"
fi
PRESET=longcat LAUNCHER=LongCat-Image-Edit DEMO_DATASET=data/demo/dataset_single_ref.json \
  exec "$(dirname "$0")/scripts/launch.sh" "$@"
