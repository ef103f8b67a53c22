#!/usr/bin/env bash
# Qwen-Image-Edit-2511 LoRA: phase 1 + phase 2. Variables: see README.md. Extra arguments go to `edittuner train`.
PRESET=2511 exec "$(dirname "$0")/scripts/launch.sh" "$@"
