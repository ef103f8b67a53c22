#!/usr/bin/env bash
# Shared body of the launchers (Qwen-Image-Edit-*.sh, LongCat-Image-Edit.sh): phase 1 (precompute), then phase 2.
# Every knob is an environment variable (README.md, "Launcher variables"). This script only maps them to flags;
# `edittuner check` refuses a bad one before phase 1, naming the variable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PRESET="${PRESET:?set PRESET to a --model_version (edittuner train --help lists them)}"
NAME="${LAUNCHER:-Qwen-Image-Edit-${PRESET}}"
OBJECTIVE="${OBJECTIVE:-flow}"
OPTIMIZER="${OPTIMIZER:-adamw}"
if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi

# to ARRAY VAR:flag ...: append --flag "$VAR" for each set VAR; EDITTUNER_VARIABLES lets edittuner's errors name VAR.
PHASE1=(); PHASE2=(); VARIABLES=""
to() { local -n args=$1; local v var; shift
  for v; do var="${v%%:*}"; [ -z "${!var:-}" ] || { args+=("--${v#*:}" "${!var}"); VARIABLES+="$var=--${v#*:} "; }; done; }
SHARED=(PRESET:model_version CACHE_DIR:cache_dir MAX_PIXELS:max_pixels MULTIPLE:multiple BUCKETS:buckets
        REFERENCE_SIZE:reference_size)   # the same in both phases
DATASETS="${DATASETS:-}"   # a datasets file (several sources) replaces DATASET_JSON

MODEL_DIR="${MODEL_DIR:-}"
if [ -z "$MODEL_DIR" ]; then
  echo "${NAME}: no MODEL_DIR set - running on the built-in tiny model with the demo dataset (set MODEL_DIR=/path/to/${NAME} for real weights)"
  DEMO_DATASET="${DEMO_DATASET:-data/demo/dataset.json}"   # a launcher may pick other demo rows (one reference)
  [ -n "$DATASETS" ] || DATASET_JSON="${DATASET_JSON:-$DEMO_DATASET}"
  [ -n "$DATASETS" ] || [ -f "$DATASET_JSON" ] || [ "$DATASET_JSON" != "$DEMO_DATASET" ] \
    || "$PYTHON" -m edittuner demo-data --out data/demo
  # Tiny-model defaults: small images and a high learning rate so the demo learns its edit in about a minute on
  # a 2-core CPU (README: "What the demo shows").
  STEPS="${STEPS:-200}"; RANK="${RANK:-8}"; GRAD_ACCUM="${GRAD_ACCUM:-2}"
  if [ "$OPTIMIZER" = prodigy_sf ]; then LR="${LR:-1.0}"; else LR="${LR:-5e-3}"; fi
  MAX_PIXELS="${MAX_PIXELS:-9216}"; SAVE_EVERY="${SAVE_EVERY:-100}"
  VALIDATION_STEPS="${VALIDATION_STEPS:-100}"; VALIDATION_INFERENCE_STEPS="${VALIDATION_INFERENCE_STEPS:-8}"
else
  echo "${NAME}: model directory $MODEL_DIR"
  SHARED+=(MODEL_DIR:model_dir TRANSFORMER_DIR:transformer_dir TEXT_ENCODER_DIR:text_encoder_dir VAE_DIR:vae_dir
           PROCESSOR_DIR:processor_dir)
  [ -n "$DATASETS" ] || DATASET_JSON="${DATASET_JSON:?set DATASET_JSON to your dataset JSON (make one with generate_dataset_json_mp.py) or DiffSynth metadata file, or DATASETS to a datasets file}"
  STEPS="${STEPS:-1000}"; RANK="${RANK:-32}"; GRAD_ACCUM="${GRAD_ACCUM:-}"
  if [ "$OPTIMIZER" = prodigy_sf ]; then LR="${LR:-1.0}"; else LR="${LR:-1e-4}"; fi
  MAX_PIXELS="${MAX_PIXELS:-1048576}"; SAVE_EVERY="${SAVE_EVERY:-}"   # unset: edittuner's default
  VALIDATION_STEPS="${VALIDATION_STEPS:-250}"; VALIDATION_INFERENCE_STEPS="${VALIDATION_INFERENCE_STEPS:-}"
fi
# Validation pairs: the generator's held-out split beside the dataset JSON if there, or the VALIDATION_JSON named.
if [ -n "$DATASETS" ]; then DATASET_JSON=""; DATA_FILE="$DATASETS"; VALIDATION_JSON="${VALIDATION_JSON:-}"
else
  DATA_FILE="$DATASET_JSON"
  VALIDATION_JSON="${VALIDATION_JSON-${DATASET_JSON%.json}_val.json}"
  [ -f "$VALIDATION_JSON" ] || [ "$VALIDATION_JSON" != "${DATASET_JSON%.json}_val.json" ] || VALIDATION_JSON=""
fi
DATA_BASE="$(basename "$DATA_FILE")"
DATA_NAME="$(basename "$(dirname "$DATA_FILE")")-${DATA_BASE%.*}"
CACHE_DIR="${CACHE_DIR:-data/cache/$DATA_NAME}"
# A run folder per launcher and dataset (the demo: one per launcher); a folder holding another run is refused
# by the check below unless RESUME=latest continues it or OVERWRITE=on replaces it.
if [ -z "$MODEL_DIR" ]; then OUTPUT_DIR="${OUTPUT_DIR:-train/${NAME}_lora}"; else OUTPUT_DIR="${OUTPUT_DIR:-train/${NAME}_${DATA_NAME}_lora}"; fi
RESUME="${RESUME:-}"
# The tiny demo replaces its own earlier run when OUTPUT_DIR is the default (announced); real runs never do unless asked.
if [ -z "$MODEL_DIR" ] && [ "$OUTPUT_DIR" = "train/${NAME}_lora" ]; then OVERWRITE="${OVERWRITE:-on}"; else OVERWRITE="${OVERWRITE:-off}"; fi
NUM_PROCESSES="${NUM_PROCESSES:-1}"; SEED="${SEED:-0}"; BATCH_SIZE="${BATCH_SIZE:-1}"
# Several machines: run the launcher on each with the same variables but MACHINE_RANK; NUM_PROCESSES counts all.
NUM_MACHINES="${NUM_MACHINES:-1}"; MACHINE_RANK="${MACHINE_RANK:-0}"
MACHINES=(--num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK")
[ -z "${MAIN_PROCESS_IP:-}" ] || MACHINES+=(--main_process_ip "$MAIN_PROCESS_IP")
[ -z "${MAIN_PROCESS_PORT:-}" ] || MACHINES+=(--main_process_port "$MAIN_PROCESS_PORT")
export WANDB_PROJECT="${WANDB_PROJECT:-qwen-image}"
export WANDB_NAME="${WANDB_NAME:-$(basename "$OUTPUT_DIR")}"
# Speed and memory levers (BENCHMARKS.md says when to use each).
ATTENTION="${ATTENTION:-auto}"; COMPILE="${COMPILE:-off}"
BASE_QUANTIZATION="${BASE_QUANTIZATION:-none}"; OFFLOAD_BLOCKS="${OFFLOAD_BLOCKS:-off}"
if [ -z "${ACCELERATE_CONFIG:-}" ]; then
  # Several GPUs: DeepSpeed ZeRO-3 (zero3_offload for small cards), prodigy_sf included (one d over the ranks'
  # partitions); several CPU processes: DDP over gloo. A quantized base, block offload and compiled blocks stay on
  # DDP: ZeRO does not combine with them.
  if [ "$NUM_PROCESSES" = 1 ]; then ACCELERATE_CONFIG=accelerate_configs/single.yaml
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
       && [ "$BASE_QUANTIZATION" = none ] && [ "$OFFLOAD_BLOCKS" = off ] && [ "$COMPILE" = off ]; then
    ACCELERATE_CONFIG=accelerate_configs/zero3.yaml
  else ACCELERATE_CONFIG=accelerate_configs/ddp.yaml; fi
fi

# CFG dropout trains on each sample's negative prompt: phase 1 encodes them when CFG_DROPOUT is above 0.
if [[ ! "${CFG_DROPOUT:-0}" =~ ^0*\.?0*$ ]]; then NEGATIVE_PROMPTS="${NEGATIVE_PROMPTS:-on}"; fi
to PHASE1 "${SHARED[@]}" DATASET_JSON:dataset_json DATASET_BASE_PATH:dataset_base_path DATASETS:datasets \
  VALIDATION_JSON:validation_json NEGATIVE_PROMPTS:negative_prompts
to PHASE2 "${SHARED[@]}" OUTPUT_DIR:output_dir STEPS:max_steps LR:learning_rate RANK:rank SEED:seed \
  GRAD_ACCUM:gradient_accumulation SAVE_EVERY:save_every BATCH_SIZE:batch_size BUCKET_BATCHES:bucket_batches \
  RESUME:resume OBJECTIVE:objective \
  OPTIMIZER:optimizer ATTENTION:attention COMPILE:compile BASE_QUANTIZATION:base_quantization \
  OFFLOAD_BLOCKS:offload_blocks LORA_TARGETS:lora_targets INIT_LORA:init_lora CFG_DROPOUT:cfg_dropout \
  EMA_DECAY:ema_decay WEIGHT_DECAY:weight_decay
# Prodigy's settings (edittuner refuses them with OPTIMIZER=adamw); unset: the package's defaults.
to PHASE2 PRODIGY_D0:prodigy_d0 PRODIGY_D_COEF:prodigy_d_coef PRODIGY_BETAS:prodigy_betas PRODIGY_STEPS:prodigy_steps \
  PRODIGY_BIAS_CORRECTION:prodigy_bias_correction PRODIGY_FACTORED:prodigy_factored
case "$OVERWRITE" in   # a switch, not a value: no flag of edittuner can check it
  on) PHASE2+=(--overwrite);; off) ;; *) echo "${NAME}.sh: error: OVERWRITE=$OVERWRITE must be on or off" >&2; exit 2;;
esac
if [ "$OBJECTIVE" = lbm ]; then
  BRIDGE_SIGMA="${BRIDGE_SIGMA:-0.01}"; SUB_STREAM_PROB="${SUB_STREAM_PROB:-0.1}"
  BRIDGE_TIMESTEPS="${BRIDGE_TIMESTEPS:-discrete}"; MAIN_STREAM_REFS="${MAIN_STREAM_REFS:-on}"
  NORMALIZE_VELOCITY="${NORMALIZE_VELOCITY:-off}"; SUB_STREAM_TARGET="${SUB_STREAM_TARGET:-target}"
  to PHASE2 BRIDGE_SIGMA:bridge_sigma SUB_STREAM_PROB:sub_stream_probability BRIDGE_TIMESTEPS:bridge_timesteps \
    MAIN_STREAM_REFS:main_stream_references NORMALIZE_VELOCITY:normalize_velocity SUB_STREAM_TARGET:sub_stream_target
fi
if [ -n "$VALIDATION_JSON" ]; then
  to PHASE2 VALIDATION_STEPS:validation_steps VALIDATION_INFERENCE_STEPS:validation_inference_steps \
    VALIDATION_GUIDANCE:validation_guidance
else
  PHASE2+=(--validation_steps 0)   # a cache from an earlier run may still hold validation pairs
fi
PHASE2+=("$@")

# Both phases' checks (every flag and file, the folders, the model folder, the levers on this machine) first.
export EDITTUNER_LAUNCHER="${NAME}.sh"
export EDITTUNER_VARIABLES="${VARIABLES}ACCELERATE_CONFIG=--accelerate_config NUM_PROCESSES=--num_processes \
NUM_MACHINES=--num_machines MACHINE_RANK=--machine_rank MAIN_PROCESS_IP=--main_process_ip \
MAIN_PROCESS_PORT=--main_process_port"
"$PYTHON" -m edittuner check --accelerate_config "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES" \
  "${MACHINES[@]}" "${PHASE1[@]}" -- "${PHASE2[@]}"

# edittuner.launch is accelerate's launcher keeping the workers' exit status (2 for a clear error) and no traceback.
LAUNCH=("$PYTHON" -m edittuner.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES"
        "${MACHINES[@]}" -m edittuner)
echo "== phase 1: encoding $DATA_FILE into $CACHE_DIR"
"${LAUNCH[@]}" precompute "${PHASE1[@]}"

# One plan line (README "Will it fit?"): phase 2's memory per GPU for the cached samples and these levers, before
# the model loads. Traced once per configuration and cached; the tiny model skips it (nothing to plan there).
if [ -n "$MODEL_DIR" ]; then
  PLAN=(--model_version "$PRESET" --cache_dir "$CACHE_DIR" --rank "$RANK" --batch_size "$BATCH_SIZE"
        --base_quantization "$BASE_QUANTIZATION" --offload_blocks "$OFFLOAD_BLOCKS" --gpus "$NUM_PROCESSES")
  case "$ACCELERATE_CONFIG" in *zero3*) PLAN+=(--zero3 on);; esac
  "$PYTHON" -m edittuner plan --brief "${PLAN[@]}" || echo "plan: not available (the run goes on)"
fi
echo "== phase 2: training the DiT LoRA ($OBJECTIVE, $OPTIMIZER) into $OUTPUT_DIR"
"${LAUNCH[@]}" train "${PHASE2[@]}"
