#!/usr/bin/env bash
# Shared body of the Qwen-Image-Edit-*.sh launchers: phase 1 (precompute), then phase 2 (train).
# Every knob is an environment variable; see README.md ("Launcher variables").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PRESET="${PRESET:?set PRESET to a --model_version (edittuner train --help lists them)}"
NAME="${LAUNCHER:-Qwen-Image-Edit-${PRESET}}"
OBJECTIVE="${OBJECTIVE:-flow}"
OPTIMIZER="${OPTIMIZER:-adamw}"

fail() { echo "${NAME}.sh: error: $*" >&2; exit 2; }
is_int() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "${3:-1}" ] || fail "$1=$2 must be an integer >= ${3:-1}"; }
is_num() { [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || fail "$1=$2 must be a positive number"; }

if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi

MODEL_DIR="${MODEL_DIR:-}"
if [ -z "$MODEL_DIR" ]; then
  echo "${NAME}: no MODEL_DIR set - running on the built-in tiny model with the demo dataset (set MODEL_DIR=/path/to/${NAME} for real weights)"
  MODEL_ARGS=(--model_dir tiny)
  DEMO_DATASET="${DEMO_DATASET:-data/demo/dataset.json}"   # a launcher may pick other demo rows (one reference)
  DATASET_JSON="${DATASET_JSON:-$DEMO_DATASET}"
  # Tiny-model defaults: small images and a high learning rate so the demo learns in a minute on a CPU.
  STEPS="${STEPS:-60}"; RANK="${RANK:-8}"; GRAD_ACCUM="${GRAD_ACCUM:-2}"
  if [ "$OPTIMIZER" = prodigy_sf ]; then LR="${LR:-1.0}"; else LR="${LR:-5e-3}"; fi
  MAX_PIXELS="${MAX_PIXELS:-9216}"; SAVE_EVERY="${SAVE_EVERY:-30}"
  VALIDATION_STEPS="${VALIDATION_STEPS:-30}"; VALIDATION_INFERENCE_STEPS="${VALIDATION_INFERENCE_STEPS:-8}"
else
  [ -d "$MODEL_DIR" ] || fail "MODEL_DIR=$MODEL_DIR is not a directory"
  echo "${NAME}: model directory $MODEL_DIR"
  MODEL_ARGS=(--model_dir "$MODEL_DIR")
  for c in TRANSFORMER TEXT_ENCODER VAE PROCESSOR; do
    v="${c}_DIR"; lower="$(echo "$c" | tr 'A-Z' 'a-z')"
    if [ -n "${!v:-}" ]; then [ -d "${!v}" ] || fail "$v=${!v} is not a directory"; MODEL_ARGS+=("--${lower}_dir" "${!v}"); fi
  done
  DATASET_JSON="${DATASET_JSON:?set DATASET_JSON to your dataset JSON (make one with generate_dataset_json_mp.py)}"
  STEPS="${STEPS:-1000}"; RANK="${RANK:-32}"; GRAD_ACCUM="${GRAD_ACCUM:-}"
  if [ "$OPTIMIZER" = prodigy_sf ]; then LR="${LR:-1.0}"; else LR="${LR:-1e-4}"; fi
  MAX_PIXELS="${MAX_PIXELS:-1048576}"; SAVE_EVERY="${SAVE_EVERY:-}"   # unset: edittuner's default
  VALIDATION_STEPS="${VALIDATION_STEPS:-250}"; VALIDATION_INFERENCE_STEPS="${VALIDATION_INFERENCE_STEPS:-}"
fi
# Validation pairs: the generator's held-out split beside the dataset JSON, unless VALIDATION_JSON names others.
VALIDATION_JSON="${VALIDATION_JSON-${DATASET_JSON%.json}_val.json}"
DATA_NAME="$(basename "$(dirname "$DATASET_JSON")")-$(basename "$DATASET_JSON" .json)"
CACHE_DIR="${CACHE_DIR:-data/cache/$DATA_NAME}"
# A run folder per launcher and dataset (the demo: one per launcher); a folder holding another run is refused
# by phase 2's check below unless RESUME=latest continues it or OVERWRITE=on replaces it.
if [ -z "$MODEL_DIR" ]; then OUTPUT_DIR="${OUTPUT_DIR:-train/${NAME}_lora}"; else OUTPUT_DIR="${OUTPUT_DIR:-train/${NAME}_${DATA_NAME}_lora}"; fi
RESUME="${RESUME:-}"
# The tiny demo replaces its own earlier run when OUTPUT_DIR is the default (announced); real runs never do unless asked.
if [ -z "$MODEL_DIR" ] && [ "$OUTPUT_DIR" = "train/${NAME}_lora" ]; then OVERWRITE="${OVERWRITE:-on}"; else OVERWRITE="${OVERWRITE:-off}"; fi
NUM_PROCESSES="${NUM_PROCESSES:-1}"
SEED="${SEED:-0}"
export WANDB_PROJECT="${WANDB_PROJECT:-qwen-image}"
export WANDB_NAME="${WANDB_NAME:-$(basename "$OUTPUT_DIR")}"
# Speed and memory levers (BENCHMARKS.md says when to use each).
ATTENTION="${ATTENTION:-auto}"; COMPILE="${COMPILE:-off}"
BASE_QUANTIZATION="${BASE_QUANTIZATION:-none}"; OFFLOAD_BLOCKS="${OFFLOAD_BLOCKS:-off}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; else HAS_GPU=0; fi
if [ -z "${ACCELERATE_CONFIG:-}" ]; then
  # Several GPUs: DeepSpeed ZeRO-3 (zero3_offload for small cards); several CPU processes: DDP over gloo.
  # prodigy_sf stays on DDP (ZeRO shards would split its d), and so do a quantized base, block offload and
  # compiled blocks, which ZeRO does not combine with.
  if [ "$NUM_PROCESSES" = 1 ]; then ACCELERATE_CONFIG=accelerate_configs/single.yaml
  elif [ "$OPTIMIZER" != prodigy_sf ] && [ "$HAS_GPU" = 1 ] && [ "$BASE_QUANTIZATION" = none ] \
       && [ "$OFFLOAD_BLOCKS" = off ] && [ "$COMPILE" = off ]; then
    ACCELERATE_CONFIG=accelerate_configs/zero3.yaml
  else ACCELERATE_CONFIG=accelerate_configs/ddp.yaml; fi
fi

# Validate everything before any work starts.
is_int STEPS "$STEPS"; is_num LR "$LR"; is_int RANK "$RANK"; is_int NUM_PROCESSES "$NUM_PROCESSES"
is_int SEED "$SEED" 0; is_int MAX_PIXELS "$MAX_PIXELS"; [ -z "$SAVE_EVERY" ] || is_int SAVE_EVERY "$SAVE_EVERY"
[ -z "$GRAD_ACCUM" ] || is_int GRAD_ACCUM "$GRAD_ACCUM"
BATCH_SIZE="${BATCH_SIZE:-1}"; is_int BATCH_SIZE "$BATCH_SIZE"
case "$ACCELERATE_CONFIG" in *zero*) [ "$BATCH_SIZE" = 1 ] || fail "BATCH_SIZE=$BATCH_SIZE: not under DeepSpeed ZeRO ($ACCELERATE_CONFIG); set ACCELERATE_CONFIG=accelerate_configs/ddp.yaml or BATCH_SIZE=1";; esac
case "$OBJECTIVE" in flow|lbm) ;; *) fail "OBJECTIVE=$OBJECTIVE must be flow or lbm";; esac
case "$OPTIMIZER" in adamw|prodigy_sf) ;; *) fail "OPTIMIZER=$OPTIMIZER must be adamw or prodigy_sf";; esac
case "$ATTENTION" in auto|sdpa|flash|efficient|cudnn|math) ;; *) fail "ATTENTION=$ATTENTION must be auto, sdpa, flash, efficient, cudnn or math";; esac
case "$BASE_QUANTIZATION" in none|int8|fp8) ;; *) fail "BASE_QUANTIZATION=$BASE_QUANTIZATION must be none, int8 or fp8";; esac
for v in COMPILE OFFLOAD_BLOCKS OVERWRITE; do case "${!v}" in on|off) ;; *) fail "$v=${!v} must be on or off";; esac; done
if [ "$HAS_GPU" = 0 ]; then  # the same refusals as `edittuner train`, before phase 1 spends any time
  [ "$BASE_QUANTIZATION" != fp8 ] || fail "BASE_QUANTIZATION=fp8 needs a CUDA GPU (Ada/Hopper) and none was found; use int8 or none"
  [ "$OFFLOAD_BLOCKS" = off ] || fail "OFFLOAD_BLOCKS=on moves block weights from host memory to a GPU and none was found; use OFFLOAD_BLOCKS=off"
  case "$ATTENTION" in efficient|cudnn) fail "ATTENTION=$ATTENTION is a CUDA kernel and no GPU was found; use auto, flash or math";; esac
fi
LBM_ARGS=()
if [ "$OBJECTIVE" = lbm ]; then
  BRIDGE_SIGMA="${BRIDGE_SIGMA:-0.01}"; SUB_STREAM_PROB="${SUB_STREAM_PROB:-0.1}"
  BRIDGE_TIMESTEPS="${BRIDGE_TIMESTEPS:-discrete}"; MAIN_STREAM_REFS="${MAIN_STREAM_REFS:-on}"
  NORMALIZE_VELOCITY="${NORMALIZE_VELOCITY:-off}"
  is_num BRIDGE_SIGMA "$BRIDGE_SIGMA"; is_num SUB_STREAM_PROB "$SUB_STREAM_PROB"
  case "$BRIDGE_TIMESTEPS" in uniform|logit_normal|discrete) ;; *) fail "BRIDGE_TIMESTEPS=$BRIDGE_TIMESTEPS must be uniform, logit_normal or discrete";; esac
  for v in MAIN_STREAM_REFS NORMALIZE_VELOCITY; do
    case "${!v}" in on|off) ;; *) fail "$v=${!v} must be on or off";; esac
  done
  LBM_ARGS=(--bridge_sigma "$BRIDGE_SIGMA" --sub_stream_probability "$SUB_STREAM_PROB"
    --bridge_timesteps "$BRIDGE_TIMESTEPS" --main_stream_references "$MAIN_STREAM_REFS"
    --normalize_velocity "$NORMALIZE_VELOCITY")
fi
[ -f "$ACCELERATE_CONFIG" ] || fail "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file (see accelerate_configs/)"
if [ ! -f "$DATASET_JSON" ] && [ -z "$MODEL_DIR" ] && [ "$DATASET_JSON" = "$DEMO_DATASET" ]; then
  "$PYTHON" -m edittuner demo-data --out data/demo
fi
[ -f "$DATASET_JSON" ] || fail "DATASET_JSON=$DATASET_JSON: no such file"
is_int VALIDATION_STEPS "$VALIDATION_STEPS" 0
[ -z "$VALIDATION_INFERENCE_STEPS" ] || is_int VALIDATION_INFERENCE_STEPS "$VALIDATION_INFERENCE_STEPS"
VALIDATION_ARGS=(); PREVIEW_ARGS=(--validation_steps 0)
if [ -n "$VALIDATION_JSON" ] && [ -f "$VALIDATION_JSON" ]; then
  VALIDATION_ARGS=(--validation_json "$VALIDATION_JSON")
  PREVIEW_ARGS=(--validation_steps "$VALIDATION_STEPS")
  [ -z "$VALIDATION_INFERENCE_STEPS" ] || PREVIEW_ARGS+=(--validation_inference_steps "$VALIDATION_INFERENCE_STEPS")
elif [ -n "$VALIDATION_JSON" ] && [ "$VALIDATION_JSON" != "${DATASET_JSON%.json}_val.json" ]; then
  fail "VALIDATION_JSON=$VALIDATION_JSON: no such file"
fi

RESIZE_ARGS=(--max_pixels "$MAX_PIXELS")
# edittuner.launch is accelerate's launcher keeping the workers' exit status (2 for a clear error) and no traceback.
LAUNCH=("$PYTHON" -m edittuner.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES" -m edittuner)

TRAIN_ARGS=(--cache_dir "$CACHE_DIR" --output_dir "$OUTPUT_DIR" --model_version "$PRESET" --max_steps "$STEPS"
  --learning_rate "$LR" --rank "$RANK" --seed "$SEED"
  --objective "$OBJECTIVE" --optimizer "$OPTIMIZER" "${LBM_ARGS[@]}" "${PREVIEW_ARGS[@]}")
[ -z "$GRAD_ACCUM" ] || TRAIN_ARGS+=(--gradient_accumulation "$GRAD_ACCUM")
[ -z "$SAVE_EVERY" ] || TRAIN_ARGS+=(--save_every "$SAVE_EVERY")
[ "$BATCH_SIZE" = 1 ] || TRAIN_ARGS+=(--batch_size "$BATCH_SIZE")
[ -z "$RESUME" ] || TRAIN_ARGS+=(--resume "$RESUME")
[ "$OVERWRITE" = off ] || TRAIN_ARGS+=(--overwrite)
TRAIN_ARGS+=(--attention "$ATTENTION" --compile "$COMPILE" --base_quantization "$BASE_QUANTIZATION" --offload_blocks "$OFFLOAD_BLOCKS")
TRAIN_ARGS+=("${MODEL_ARGS[@]}" "${RESIZE_ARGS[@]}" "$@")
# Phase 2's own checks (every flag, the output folder, the model folder) before phase 1 spends any time.
"$PYTHON" -m edittuner train "${TRAIN_ARGS[@]}" --dry_run || exit $?

echo "== phase 1: encoding $DATASET_JSON into $CACHE_DIR"
"${LAUNCH[@]}" precompute --dataset_json "$DATASET_JSON" --cache_dir "$CACHE_DIR" --model_version "$PRESET" \
  "${MODEL_ARGS[@]}" "${RESIZE_ARGS[@]}" "${VALIDATION_ARGS[@]}"

echo "== phase 2: training the DiT LoRA ($OBJECTIVE, $OPTIMIZER) into $OUTPUT_DIR"
"${LAUNCH[@]}" train "${TRAIN_ARGS[@]}"
