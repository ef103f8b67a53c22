#!/usr/bin/env bash
# Latent Bridge Matching LoRA on Qwen-Image-Edit (2511 by default; PRESET=2509 for 2509): phase 1 (the same
# cache format as SFT: an SFT cache is valid here), then phase 2 with the bridge objective and
# ProdigyPlusScheduleFree. Variables: see README.md. Extra arguments go to `edittuner train`.
PRESET="${PRESET:-2511}" OBJECTIVE=lbm OPTIMIZER="${OPTIMIZER:-prodigy_sf}" LAUNCHER=Qwen-Image-Edit-LBM \
  exec "$(dirname "$0")/scripts/launch.sh" "$@"
