"""The settings of `precompute`, `train` and `sample`, and of their parts (objectives, samplers, speed levers).

Each field states its default once, with its command-line option in ``metadata`` (options.py turns the fields
into options). These dataclasses live here, away from the modules that use them, because those import torch and
the engine: the parser must build without them. A check that needs a heavy module imports it when it runs.
The model source, resize and dataset settings stay in models.py, images.py and dataset.py, which are light too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import defaults
from .defaults import DEFAULT_NEGATIVE_PROMPT
from .errors import EditTunerError, check_seed
from .families import (DEFAULT_MODEL_VERSION, FAMILIES, PRESETS, VERSIONS, Family, ModelSpec, Preset, check_version,
                       model_spec)
from .images import ResizeConfig
from .models import ModelSource
from .options import float_list, name_list, seed_int
from .tracking import REPORT_TO

def version_for(model: ModelSource, version: str) -> Preset:
    """The preset of ``version``, refused unless ``model`` is of its family (the CLI makes them agree)."""
    preset = check_version(version)
    if model.family != preset.family:
        raise EditTunerError(f"--model_version {version} is a {preset.family} model, but the model source is for "
                             f"{model.family}")
    return preset


ATTENTION = ("auto", "sdpa", "flash", "efficient", "cudnn", "math")
BASE_QUANTIZATION = ("none", "int8", "fp8")
OBJECTIVE_NAMES = ("flow", "lbm")   # objectives.OBJECTIVES registers one objective under each
OPTIMIZERS = ("adamw", "prodigy_sf")
BRIDGE_TIMESTEPS = ("uniform", "logit_normal", "discrete")
SUB_STREAM_TARGETS = ("target", "ref_gt")   # what the LBM sub stream bridges the white image to
BRIDGE_T_MAX = 1.0 - 1e-3  # keep (1 - t) away from 0, where the target's noise term sqrt(t/(1-t)) blows up
SAMPLERS = ("flow", "bridge")
DEFAULT_STEPS = {"flow": 30, "bridge": 1}
DEFAULT_GUIDANCE = 4.0
DEFAULT_VALIDATION_STEPS = 250  # when phase 1 made a validation cache and --validation_steps is not given

# Option groups of the nested configs.
MODEL_GROUP = "model"
RESIZE_GROUP = "resize (part of the cache's identity: use the same values in both phases)"

# Options two configs share, stated once.
DATA_ROOT_OPTION = {"help": ("folder every dataset path must lie inside (symlinks followed); then relative paths may "
                             "use '..' within it (default: $EDITTUNER_DATA_ROOT; without one, paths may not leave the "
                             "JSON's folder)")}
MASKED_WEIGHT_OPTION = {"flag": "--masked_loss_weight", "help": "loss weight inside the mask (default 1)"}
UNMASKED_WEIGHT_OPTION = {"flag": "--unmasked_loss_weight", "help": "loss weight outside the mask (default 1)"}


@dataclass
class PerformanceConfig:
    """The speed and memory levers of the DiT (performance.py applies them)."""

    attention: str = field(default="auto", metadata={"choices": ATTENTION, "help": (
        "attention kernel: auto (default: the engine's, FlashAttention-3 if installed, else PyTorch SDPA's own pick), "
        "sdpa, or one SDPA kernel: flash, efficient, cudnn, math")})
    compile: bool = field(default=False, metadata={"help": (
        "torch.compile the transformer blocks (default off; the first steps pay the compile time)")})
    base_quantization: str = field(default="none", metadata={"choices": BASE_QUANTIZATION, "help": (
        "frozen base weights of the blocks in int8 or fp8 (GPU, sm89+) via torchao; the LoRA trains in the compute "
        "dtype on top (default none)")})
    offload_blocks: bool = field(default=False, metadata={"help": (
        "keep the frozen block weights in host memory and copy each block to the GPU as it runs (small cards; needs "
        "gradient checkpointing; default off)")})

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise EditTunerError(f"--attention {self.attention}: choose one of {', '.join(ATTENTION)}")
        if self.base_quantization not in BASE_QUANTIZATION:
            raise EditTunerError(f"--base_quantization {self.base_quantization}: choose one of "
                                 f"{', '.join(BASE_QUANTIZATION)}")

    def describe(self) -> str:
        parts = [f"attention {self.attention}"]
        if self.compile:
            parts.append("compiled blocks")
        if self.base_quantization != "none":
            parts.append(f"{self.base_quantization} base")
        if self.offload_blocks:
            parts.append("block offload")
        return ", ".join(parts)


@dataclass(frozen=True)
class FlowMatchConfig:
    min_timestep_boundary: float = 0.0
    max_timestep_boundary: float = 1.0
    # Mask weighting: per-latent-pixel weight masked_weight inside the edit mask, unmasked_weight outside,
    # normalised by the mean weight so the loss scale does not depend on the mask's area. 1/1 = plain MSE.
    masked_weight: float = field(default=1.0, metadata=MASKED_WEIGHT_OPTION)
    unmasked_weight: float = field(default=1.0, metadata=UNMASKED_WEIGHT_OPTION)

    def __post_init__(self):
        if not 0.0 <= self.min_timestep_boundary < self.max_timestep_boundary <= 1.0:
            raise EditTunerError("--min_timestep_boundary / --max_timestep_boundary: need 0 <= min < max <= 1")
        if self.masked_weight < 0 or self.unmasked_weight < 0 or self.masked_weight + self.unmasked_weight == 0:
            raise EditTunerError("--masked_loss_weight / --unmasked_loss_weight: must be >= 0 and not both 0")

    @property
    def uses_mask(self) -> bool:
        return self.masked_weight != self.unmasked_weight


@dataclass(frozen=True)
class BridgeConfig:
    """Latent Bridge Matching (objectives.py has the bridge and its notation)."""

    sigma: float = field(default=0.01, metadata={"flag": "--bridge_sigma", "help": "bridge noise sigma (default 0.01)"})
    sub_stream_probability: float = field(default=0.1, metadata={"help": (
        "probability that a sample starts from the white image instead of the reference (default 0.1)")})
    sub_stream_target: str = field(default="target", metadata={"choices": SUB_STREAM_TARGETS, "help": (
        "where the sub stream bridges the white image to: the target (default), or the row's ref_gt image (a "
        "rendering of the reference to reproduce from white; rows without one use the target, counted in "
        "summary.json)")})
    timestep_sampling: str = field(default="discrete", metadata={
        "flag": "--bridge_timesteps", "choices": BRIDGE_TIMESTEPS,
        "help": "bridge-time sampling (default discrete: the paper's 4 equally spaced times)"})
    discrete_timesteps: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75), metadata={
        "type": float_list, "help": "bridge times t (0 = source) for discrete sampling"})
    discrete_probabilities: tuple[float, ...] = field(default=(0.25, 0.25, 0.25, 0.25), metadata={
        "type": float_list, "help": "their probabilities"})
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    main_stream_references: bool = field(default=True, metadata={"help": (
        "give the DiT the reference tokens in the main stream (default on; off halves the sequence)")})
    normalize_velocity: bool = field(default=False, metadata={
        "help": "variance-normalised velocity loss (default off)"})
    masked_weight: float = field(default=1.0, metadata=MASKED_WEIGHT_OPTION)
    unmasked_weight: float = field(default=1.0, metadata=UNMASKED_WEIGHT_OPTION)

    def __post_init__(self):
        if not 0 <= self.sigma <= 1:
            raise EditTunerError(f"--bridge_sigma {self.sigma}: must be in [0, 1]")
        if not 0 <= self.sub_stream_probability <= 1:
            raise EditTunerError(f"--sub_stream_probability {self.sub_stream_probability}: must be in [0, 1]")
        if self.sub_stream_target not in SUB_STREAM_TARGETS:
            raise EditTunerError(f"--sub_stream_target {self.sub_stream_target}: choose "
                                 f"{' or '.join(SUB_STREAM_TARGETS)}")
        if self.timestep_sampling not in BRIDGE_TIMESTEPS:
            raise EditTunerError(f"--bridge_timesteps {self.timestep_sampling}: choose uniform, logit_normal or discrete")
        if (len(self.discrete_timesteps) != len(self.discrete_probabilities) or not self.discrete_timesteps
                or any(not 0 <= t <= BRIDGE_T_MAX for t in self.discrete_timesteps)
                or any(p < 0 for p in self.discrete_probabilities) or sum(self.discrete_probabilities) <= 0):
            raise EditTunerError("--discrete_timesteps / --discrete_probabilities: same length, times in [0, 0.999], "
                                 "non-negative probabilities")
        if self.logit_normal_std <= 0:
            raise EditTunerError(f"--logit_normal_std {self.logit_normal_std}: must be positive")
        FlowMatchConfig(masked_weight=self.masked_weight, unmasked_weight=self.unmasked_weight)

    @property
    def weighting(self) -> FlowMatchConfig:
        return FlowMatchConfig(masked_weight=self.masked_weight, unmasked_weight=self.unmasked_weight)


PRODIGY_FLAGS = {"d0": "--prodigy_d0", "d_coef": "--prodigy_d_coef", "betas": "--prodigy_betas",
                 "steps": "--prodigy_steps", "bias_correction": "--prodigy_bias_correction",
                 "factored": "--prodigy_factored"}


@dataclass(frozen=True)
class ProdigyConfig:
    """ProdigyPlusScheduleFree's settings people tune (--optimizer prodigy_sf); the defaults are the package's.
    Weight decay is the run's --weight_decay (both optimizers). The package's split_groups is not offered: it acts
    per parameter group, and edittuner trains one (the DiT's LoRA), where the package turns it off itself."""

    d0: float = field(default=1e-6, metadata={"flag": PRODIGY_FLAGS["d0"], "help": (
        "Prodigy's initial step-size estimate (default 1e-6; 1e-5 to 1e-4 if d never grows)")})
    d_coef: float = field(default=1.0, metadata={"flag": PRODIGY_FLAGS["d_coef"], "help": (
        "multiplies Prodigy's estimate of d: the package's preferred tuning knob, e.g. 0.5 or 2 (default 1)")})
    betas: tuple[float, ...] = field(default=(0.9, 0.99), metadata={"flag": PRODIGY_FLAGS["betas"], "type": float_list,
                                                                     "help": "beta1,beta2 (default 0.9,0.99)"})
    steps: int = field(default=0, metadata={"flag": PRODIGY_FLAGS["steps"], "help": (
        "freeze d after this many optimizer steps and free Prodigy's extra state (default 0: never)")})
    bias_correction: bool = field(default=False, metadata={"flag": PRODIGY_FLAGS["bias_correction"], "help": (
        "RAdam-style bias correction with automatic warm-up; slows d's growth (default off)")})
    factored: bool = field(default=True, metadata={"flag": PRODIGY_FLAGS["factored"], "help": (
        "Adafactor-style factored second moment of each LoRA matrix, less memory (default on). Under DeepSpeed ZeRO "
        "the optimizer holds flat partitions, not matrices, and the second moment is per element (as off)")})

    def __post_init__(self):
        checks = [(self.d0 > 0 and math.isfinite(self.d0), f"--prodigy_d0 {self.d0}: must be a positive number"),
                  (self.d_coef > 0 and math.isfinite(self.d_coef),
                   f"--prodigy_d_coef {self.d_coef}: must be a positive number"),
                  (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                   f"--prodigy_betas {','.join(map(str, self.betas))}: give two numbers in [0, 1), e.g. 0.9,0.99"),
                  (self.steps >= 0, f"--prodigy_steps {self.steps}: must be >= 0 (0: d adapts for the whole run)")]
        for ok, message in checks:
            if not ok:
                raise EditTunerError(message)

    def changed_flags(self) -> list[str]:
        """The flags set away from their defaults (refused with another optimizer)."""
        default = ProdigyConfig()
        return [PRODIGY_FLAGS[f.name] for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]

    def optimizer_kwargs(self) -> dict:
        """ProdigyPlusScheduleFree's keyword arguments."""
        return {"d0": self.d0, "d_coef": self.d_coef, "betas": tuple(self.betas), "prodigy_steps": self.steps,
                "use_bias_correction": self.bias_correction, "factored": self.factored}


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample, independent of what: shared by `sample`, the app and validation previews."""

    sampler: str = field(default="flow", metadata={"choices": SAMPLERS, "help": (
        "flow: the engine's flow matching from noise with CFG; bridge: Latent Bridge Matching")})
    steps: int | None = field(default=None, metadata={
        "help": f"sampling steps (default: flow {DEFAULT_STEPS['flow']}, bridge {DEFAULT_STEPS['bridge']})"})
    guidance: float = field(default=DEFAULT_GUIDANCE, metadata={
        "help": f"flow: true CFG scale; 1 disables it (default {DEFAULT_GUIDANCE:g})"})
    negative_prompt: str = field(default=DEFAULT_NEGATIVE_PROMPT, metadata={
        "help": f"flow: the CFG negative prompt (default {DEFAULT_NEGATIVE_PROMPT!r})"})
    seed: int = field(default=0, metadata={"type": seed_int})
    stream: str = field(default="main", metadata={"choices": ("main", "sub"), "help": (
        "bridge: start from the first reference (main) or from a white image (sub)")})
    bridge_sigma: float = field(default=0.0, metadata={"help": "bridge: stochastic term of the steps (default 0)"})
    main_stream_references: bool = True
    keep_unmasked_pixels: bool = field(default=True, metadata={
        "help": "with --mask: paste the source's pixels back outside the mask (default on)"})

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise EditTunerError(f"--sampler {self.sampler}: choose flow or bridge")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.sampler])
        if not 1 <= self.steps <= 1000:
            raise EditTunerError(f"--steps {self.steps}: must be between 1 and 1000")
        if not 0 <= self.guidance <= 50:
            raise EditTunerError(f"--guidance {self.guidance}: must be between 0 and 50 (1 disables CFG)")
        if self.stream not in ("main", "sub"):
            raise EditTunerError(f"--stream {self.stream}: choose main or sub")
        if not 0 <= self.bridge_sigma <= 1:
            raise EditTunerError(f"--bridge_sigma {self.bridge_sigma}: must be in [0, 1]")

    @property
    def uses_cfg(self) -> bool:
        return self.sampler == "flow" and self.guidance != 1.0


OUTPUT_FORMATS = {"": "PNG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF"}


def output_format(output: Path) -> str:
    """The Pillow format an output file name asks for, or a clear error (checked before anything is loaded)."""
    fmt = OUTPUT_FORMATS.get(Path(output).suffix.lower())
    if fmt is None:
        raise EditTunerError(f"--output {output}: {Path(output).suffix} is not an image type sample writes; end the "
                             "name in .png, .jpg or .webp")
    return fmt


@dataclass(frozen=True)
class SampleConfig:
    """One edit (``references`` + ``prompt`` -> ``output``) or a batch (``dataset_json`` -> ``output_dir``)."""

    output: Path | None = field(default=None, metadata={"help": "image file to write (.png, .jpg, .webp)"})
    references: tuple[Path, ...] = field(default=(), metadata={
        "flag": "--image", "action": "append", "cli_default": None,
        "help": "reference image; repeat for up to 3 (the first is edited)"})
    prompt: str = field(default="", metadata={"help": "the edit instruction"})
    mask: Path | None = field(default=None, metadata={
        "help": "optional mask over the first image: white = regenerate, the rest is kept"})
    dataset_json: Path | None = field(default=None, metadata={
        "help": "batch mode: one edit per row, written to --output_dir/<id>.png"})
    output_dir: Path | None = field(default=None, metadata={"help": "batch mode output folder"})
    use_dataset_masks: bool = field(default=False, metadata={
        "action": "store_true", "help": "batch mode: use each row's back_mask as --mask"})
    data_root: Path | None = field(default=None, metadata=DATA_ROOT_OPTION)
    model: ModelSource = field(default_factory=ModelSource, metadata={"group": MODEL_GROUP})
    model_version: str | None = field(default=None, metadata={"choices": VERSIONS, "help": (
        "prompt template, references taken and zero_cond_t (default: the version the --lora was trained for, from "
        f"its metadata, else {DEFAULT_MODEL_VERSION}); a warning where it overrides the LoRA's")})
    zero_cond_t: bool | None = field(default=None, metadata={"help": (
        "on/off (default: as the --lora was trained, from its metadata, else the version's preset); a warning where "
        "it overrides the LoRA's")})
    lora: Path | None = field(default=None, metadata={"help": "LoRA file (e.g. train/<run>/lora.safetensors)"})
    lora_strength: float = 1.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig, metadata={"group": RESIZE_GROUP})
    base_quantization: str = field(default="none", metadata={"choices": BASE_QUANTIZATION, "help": (
        "the DiT's blocks in int8 or fp8 (GPU, sm89+), about half the memory of bf16 (default none)")})

    def __post_init__(self):
        if self.dataset_json is None:
            most = max(preset.max_references for preset in PRESETS.values())
            if not 1 <= len(self.references) <= most:
                raise EditTunerError(f"--image: give 1 to {most} reference images (the first is the one being "
                                     "edited), or --dataset_json for a batch")
            if not self.prompt.strip():
                raise EditTunerError("--prompt: empty; write the edit instruction")
            if self.output is None:
                raise EditTunerError("--output: name the image file to write")
            output_format(self.output)
        elif self.output_dir is None:
            raise EditTunerError("--dataset_json needs --output_dir (one image per row is written there)")
        if self.model_version is not None:
            check_version(self.model_version)
        if not math.isfinite(self.lora_strength):
            raise EditTunerError(f"--lora_strength {self.lora_strength}: must be a finite number (1 = as trained)")


@dataclass(frozen=True)
class PrecomputeConfig:
    cache_dir: Path
    model: ModelSource = field(metadata={"group": MODEL_GROUP})
    resize: ResizeConfig = field(metadata={"group": RESIZE_GROUP})
    dataset_json: Path | None = field(default=None, metadata={"help": (
        "dataset JSON, or DiffSynth-Studio metadata (.csv, .jsonl, .json with image, prompt, edit_image); "
        "this or --datasets")})
    dataset_base_path: Path | None = field(default=None, metadata={"help": (
        "folder the dataset's relative paths start from (DiffSynth's --dataset_base_path; default: the file's "
        "folder)")})
    datasets: Path | None = field(default=None, metadata={"help": (
        "datasets file (YAML or JSON) listing several sources (dataset JSONs, DiffSynth metadata, raw folders), "
        "each with repeats or weight, max_pixels, reference_size; one cache per source under <cache_dir>/sources")})
    model_version: str = field(default=DEFAULT_MODEL_VERSION, metadata={"choices": VERSIONS, "help": (
        "sets the prompt template and the references a row may have; recorded in the manifest")})
    dtype: str = field(default="auto", metadata={"flag": "--cache_dtype", "choices": ("auto", "float32", "bfloat16"),
                                                 "help": "auto: bfloat16 on GPU, float32 on CPU"})
    overwrite: bool = field(default=False, metadata={"action": "store_true",
                                                     "help": "re-encode a cache made with other settings"})
    validation_json: Path | None = field(default=None, metadata={"help": (
        "validation pairs (e.g. the generator's <dataset>_val.json), encoded into <cache_dir>/validation for phase "
        "2's previews")})
    negative_prompts: bool = field(default=False, metadata={"help": (
        "also encode each sample's CFG negative prompt with its references, which phase 2's --cfg_dropout trains on "
        "(default off: it costs a second text-encoder pass per sample and about doubles the prompt storage; turning "
        "it on re-encodes samples cached without it)")})
    negative_prompt: str | None = field(default=None, metadata={"cli": False})  # the validation cache's: CFG previews
    data_root: Path | None = field(default=None, metadata=DATA_ROOT_OPTION)

    def __post_init__(self):
        version_for(self.model, self.model_version)
        if self.negative_prompts and self.negative_prompt is None:
            # The negative `sample` and the previews use for CFG, so dropout trains the unconditional they query.
            object.__setattr__(self, "negative_prompt", DEFAULT_NEGATIVE_PROMPT)
        if (self.dataset_json is None) == (self.datasets is None):
            raise EditTunerError("--dataset_json / --datasets: give one of them (one dataset file, or a datasets "
                                 "file listing several sources)")
        if self.datasets is not None and self.dataset_base_path is not None:
            raise EditTunerError("--dataset_base_path: with --datasets, give each source its own \"base_path\"")

    @property
    def preset(self) -> Preset:
        return PRESETS[self.model_version]

    @property
    def family(self) -> Family:
        return FAMILIES[self.preset.family]

    @property
    def prompt_template(self) -> str:
        return self.preset.prompt_template


@dataclass
class TrainConfig:
    cache_dir: Path
    output_dir: Path = field(metadata={
        "help": "run directory (config.json, metrics.jsonl, checkpoints/, lora.safetensors)"})
    model: ModelSource = field(default_factory=ModelSource, metadata={"group": MODEL_GROUP})
    model_version: str = field(default=DEFAULT_MODEL_VERSION, metadata={
        "choices": VERSIONS, "help": "preset: LoRA targets, zero_cond_t, accumulation"})
    resize: ResizeConfig = field(default_factory=ResizeConfig, metadata={"group": RESIZE_GROUP})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (default 1000)"})
    learning_rate: float | None = field(default=None, metadata={
        "help": "constant after warm-up (default: adamw 1e-4, prodigy_sf 1.0)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (default 0; adamw only)"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled weight decay, both optimizers (default 0.01)"})
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "gradient clipping; 0 disables (default: adamw 1.0; refused with prodigy_sf)"})
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS, "help": (
        "adamw (default) or ProdigyPlusScheduleFree (lr 1.0, constant, no clipping)")})
    prodigy: ProdigyConfig = field(default_factory=ProdigyConfig, metadata={
        "group": "ProdigyPlusScheduleFree (--optimizer prodigy_sf; refused with adamw)"})
    rank: int = field(default=32, metadata={"help": "LoRA rank (default 32)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: rank)"})
    gradient_accumulation: int | None = field(default=None, metadata={
        "help": "default from the preset (2509: 1, 2511: 16)"})
    batch_size: int = field(default=1, metadata={"help": (
        "samples per micro-step (default 1), drawn from one bucket (--bucket_batches); samples of equal latent shapes "
        "share one DiT forward, the loss is the mean over the micro-step's samples (not under DeepSpeed)")})
    bucket_batches: bool = field(default=True, metadata={"help": (
        "on (default): with --batch_size B > 1 every micro-batch is B samples of one bucket (latent shapes), so "
        "each is one full forward; off: B consecutive samples of the data order, split into same-shape groups")})
    zero_cond_t: bool | None = field(default=None, metadata={
        "help": "on/off; default from the preset (2511 on, 2509 off)"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={
        "type": name_list, "help": "comma-separated module suffixes (default from the preset)"})
    seed: int = field(default=0, metadata={"type": seed_int})
    init_lora: Path | None = field(default=None, metadata={"help": (
        "start from this LoRA file (ours, comfyui or diffusers layout; e.g. LBM from an SFT run's lora.safetensors): "
        "its model version, rank and targets must be the run's; the optimizer starts fresh; --resume wins over it")})
    cfg_dropout: float = field(default=0.0, metadata={"help": (
        "probability that a training sample uses the negative prompt's embedding instead of its prompt (CFG "
        "dropout; e.g. 0.1; default 0); needs a cache made with `precompute --negative_prompts on`")})
    save_every: int = field(default=defaults.SAVE_EVERY, metadata={
        "help": f"checkpoint every N steps (default {defaults.SAVE_EVERY})"})
    keep_last: int | None = field(default=None, metadata={"help": "keep only the newest K checkpoints"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "on/off (default on)"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), no, bf16"})
    objective: str = field(default="flow", metadata={
        "choices": OBJECTIVE_NAMES, "help": "flow matching (default) or Latent Bridge Matching"})
    flow: FlowMatchConfig = field(default_factory=FlowMatchConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig, metadata={
        "group": "Latent Bridge Matching (--objective lbm)"})
    resume: str | None = field(default=None, metadata={"help": (
        "'latest' or a checkpoint directory; the new lr, warm-up, weight decay, clipping and step count apply from "
        "the next step, a change to anything else is refused")})
    overwrite: bool = field(default=False, metadata={"action": "store_true", "help": (
        "a fresh run may replace an earlier run in --output_dir (its checkpoints, LoRA, metrics); without it such a "
        "folder is refused")})
    eval_samples: int = field(default=8, metadata={"help": "cache samples in the fixed-noise eval loss (default 8)"})
    eval_every: int = field(default=0, metadata={
        "help": "log the eval loss every N steps (0: start and end only)"})
    deepspeed_config: Path | None = field(default=None, metadata={"help": (
        "DeepSpeed JSON (e.g. accelerate_configs/zero3.json): train under ZeRO, driven directly (launch with "
        "torchrun or accelerate launch --config_file accelerate_configs/zero3.yaml)")})
    report_to: str = field(default="auto", metadata={"choices": REPORT_TO, "help": (
        "auto (default): wandb when WANDB_API_KEY or WANDB_MODE is set, else none; project from WANDB_PROJECT "
        "(default qwen-image), run name from WANDB_NAME")})
    validation_steps: int | None = field(default=None, metadata={"help": (
        f"write a preview grid every N steps (default {DEFAULT_VALIDATION_STEPS} when phase 1 encoded "
        "--validation_json; 0: off)")})
    validation_samples: int = field(default=4, metadata={"help": "validation pairs per preview (default 4)"})
    validation_inference_steps: int | None = field(default=None, metadata={
        "help": "sampling steps of the previews (default: flow 20 with CFG, lbm 1 bridge step)"})
    validation_guidance: float = field(default=4.0, metadata={"help": "CFG scale of flow previews (default 4)"})
    validation_at_start: bool = field(default=True, metadata={"help": (
        "on/off: a fresh run also previews before its first step (validation/step-000000.png), the baseline of the "
        "edit metrics' _start values in summary.json (default on)")})
    ema_decay: float = field(default=0.0, metadata={"help": (
        "keep an exponential moving average of the LoRA with this decay, e.g. 0.999 (diffusers' EMAModel "
        "rule and warm-up), saved as lora_ema.safetensors and used for the previews; 0: off (default); refused "
        "with prodigy_sf, whose averaged weights already are an average")})
    ema_every: int = field(default=1, metadata={"help": "update the EMA every N optimizer steps (default 1)"})
    ema_on_cpu: bool = field(default=False, metadata={"help": (
        "on/off: keep the EMA in host memory instead of on the training device (default off)")})
    performance: PerformanceConfig = field(default_factory=PerformanceConfig, metadata={
        "group": "speed and memory (BENCHMARKS.md: when to use each)"})

    def __post_init__(self):
        preset = version_for(self.model, self.model_version)
        self.lora_targets = tuple(self.lora_targets or preset.lora_targets)
        self.zero_cond_t = model_spec(self.model_version, self.zero_cond_t).zero_cond_t
        self.gradient_accumulation = self.gradient_accumulation or preset.gradient_accumulation
        self.alpha = float(self.alpha if self.alpha is not None else self.rank)
        if self.optimizer not in OPTIMIZERS:
            raise EditTunerError(f"--optimizer {self.optimizer}: choose adamw or prodigy_sf")
        if self.objective not in OBJECTIVE_NAMES:
            raise EditTunerError(f"--objective {self.objective}: choose {' or '.join(OBJECTIVE_NAMES)}")
        schedule_free = self.optimizer == "prodigy_sf"
        if schedule_free and self.max_grad_norm:
            raise EditTunerError(f"--max_grad_norm {self.max_grad_norm}: gradient clipping is refused with "
                                 "--optimizer prodigy_sf (it breaks Prodigy's step-size estimate); drop the flag")
        if not schedule_free and self.prodigy.changed_flags():
            raise EditTunerError(f"{', '.join(self.prodigy.changed_flags())}: Prodigy's settings, but --optimizer is "
                                 f"{self.optimizer}; drop them or use --optimizer prodigy_sf")
        if schedule_free and self.warmup_steps:
            raise EditTunerError("--warmup_steps: prodigy_sf runs at a constant lr (schedule-free); drop the flag")
        if schedule_free and self.ema_decay:
            raise EditTunerError(f"--ema_decay {self.ema_decay}: refused with --optimizer prodigy_sf, whose averaged "
                                 "(eval-mode) weights already are the averaged model, and what previews, checkpoints "
                                 "and lora.safetensors use; drop --ema_decay, or train with --optimizer adamw")
        if self.learning_rate is None:
            self.learning_rate = 1.0 if schedule_free else 1e-4
        if self.max_grad_norm is None:
            self.max_grad_norm = 0.0 if schedule_free else 1.0
        checks = [(self.max_steps >= 1, f"--max_steps {self.max_steps}: must be at least 1"),
                  (self.learning_rate > 0 and math.isfinite(self.learning_rate),
                   f"--learning_rate {self.learning_rate}: must be a positive number"),
                  (self.warmup_steps >= 0, f"--warmup_steps {self.warmup_steps}: must be >= 0"),
                  (0 <= self.cfg_dropout <= 1, f"--cfg_dropout {self.cfg_dropout}: must be in [0, 1] (e.g. 0.1)"),
                  (1 <= self.rank <= 1024, f"--rank {self.rank}: must be between 1 and 1024"),
                  (self.alpha > 0, f"--alpha {self.alpha}: must be positive"),
                  (self.gradient_accumulation >= 1, f"--gradient_accumulation {self.gradient_accumulation}: must be >= 1"),
                  (self.batch_size >= 1, f"--batch_size {self.batch_size}: must be >= 1"),
                  (self.save_every >= 1, f"--save_every {self.save_every}: must be >= 1"),
                  (self.max_grad_norm >= 0, f"--max_grad_norm {self.max_grad_norm}: must be >= 0 (0 disables clipping)"),
                  (self.mixed_precision in ("auto", "no", "bf16"),
                   f"--mixed_precision {self.mixed_precision}: choose auto, no or bf16"),
                  (self.eval_samples >= 0, f"--eval_samples {self.eval_samples}: must be >= 0"),
                  (self.eval_every >= 0, f"--eval_every {self.eval_every}: must be >= 0 (0: only at start and end)"),
                  (self.keep_last is None or self.keep_last >= 1, f"--keep_last {self.keep_last}: must be >= 1"),
                  (self.report_to in REPORT_TO, f"--report_to {self.report_to}: choose wandb, none or auto"),
                  (self.validation_steps is None or self.validation_steps >= 0,
                   f"--validation_steps {self.validation_steps}: must be >= 0 (0 disables previews)"),
                  (self.validation_samples >= 1, f"--validation_samples {self.validation_samples}: must be >= 1"),
                  (0 <= self.ema_decay < 1, f"--ema_decay {self.ema_decay}: must be in [0, 1) (0: no EMA; e.g. 0.999)"),
                  (self.ema_every >= 1, f"--ema_every {self.ema_every}: must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise EditTunerError(message)
        check_seed(self.seed)
        if self.init_lora is not None and self.resume is None and not Path(self.init_lora).is_file():
            raise EditTunerError(f"--init_lora {self.init_lora}: no such file; name a LoRA file (e.g. "
                                 "train/<run>/lora.safetensors)")   # here, not at load: the launchers' check is light
        try:  # checked now, not when the first preview is due (the objective picks the sampler then)
            SamplerConfig(steps=self.validation_inference_steps, guidance=self.validation_guidance)
        except EditTunerError as exc:
            raise EditTunerError(f"--validation_inference_steps / --validation_guidance: {exc}") from None

    @property
    def spec(self) -> ModelSpec:
        """The version trained, with this run's switches (what objectives and previews ask the family with)."""
        return model_spec(self.model_version, self.zero_cond_t)

    def to_json(self) -> dict:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str))


@dataclass(frozen=True)
class EvaluateConfig:
    """`edittuner evaluate`: the edit metrics (metrics.py) of a folder of predictions against a dataset's targets."""

    predictions: Path = field(metadata={"help": (
        "folder of edited images, one per dataset row, matched by file stem == sample id (<id>.png, as "
        "`edittuner sample --dataset_json` writes them); other image files are listed and ignored")})
    dataset_json: Path = field(metadata={"help": "the rows' targets (\"image\") and edit masks (\"back_mask\")"})
    out: Path | None = field(default=None, metadata={"help": (
        "JSON report to write (default <predictions>/edit_metrics.json); the Markdown table goes beside it (.md)")})
    data_root: Path | None = field(default=None, metadata=DATA_ROOT_OPTION)

    def __post_init__(self):
        if self.out is not None and Path(self.out).suffix.lower() != ".json":
            raise EditTunerError(f"--out {self.out}: name a .json file (the Markdown table is written beside it as .md)")


@dataclass(frozen=True)
class Card:
    """A GPU the plan knows: memory and dense BF16 tensor-core peak (FP32 accumulate, no 2:4 sparsity: datasheets
    print the sparse figure, twice these), and whether it runs fp8 weights (compute capability 8.9+)."""

    memory_gb: float
    bf16_tflops: float
    fp8: bool
    source: str


# `edittuner plan --card`: the cards the time and fit tables name (README "Will it fit?").
CARDS: dict[str, Card] = {
    "4090": Card(24, 165.2, True, "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 165.2 dense "
                 "FP16/BF16 with FP32 accumulate (330.3 with FP16 accumulate)"),
    "L40S": Card(48, 362.05, True, "NVIDIA L40S datasheet: 733 BF16 with sparsity, 362.05 dense"),
    "A100": Card(80, 312.0, False, "NVIDIA A100 datasheet (80 GB SXM and PCIe): 312 BF16 dense (624 sparse)"),
    "H100": Card(80, 989.0, True, "NVIDIA H100 datasheet, SXM5: 1979 BF16 with sparsity, 989 dense"),
    "RTX6000-Blackwell": Card(96, 503.8, True, "NVIDIA RTX Blackwell architecture whitepaper, RTX PRO 6000 "
                              "Blackwell: 503.8 dense FP16/BF16 with FP32 accumulate (1007.6 sparse)"),
    "H200": Card(141, 989.0, True, "NVIDIA H200 datasheet, SXM: 1979 BF16 with sparsity, 989 dense"),
}
PLAN_MFU = 0.4   # the fraction of the bf16 peak the time estimate assumes (BENCHMARKS.md: measured MFU)


@dataclass
class PlanConfig:
    """`edittuner plan`: what phase 2 and phase 1 of a real run will need per GPU, before renting one (plan.py)."""

    model_version: str = field(default=DEFAULT_MODEL_VERSION, metadata={"choices": VERSIONS, "help": (
        "the model (its released sizes, LoRA targets, zero_cond_t)")})
    resolution: int = field(default=1024, metadata={"help": (
        "side of a square target and of each reference in pixels (default 1024)")})
    references: int = field(default=1, metadata={"help": "reference images per sample (default 1)"})
    cache_dir: Path | None = field(default=None, metadata={"help": (
        "a phase-1 cache: plan for its largest sample (latent sizes, references and prompt length as cached) "
        "instead of --resolution / --references")})
    text_tokens: int | None = field(default=None, metadata={"help": (
        "prompt-embedding tokens (default: the family's estimate for a one-sentence instruction)")})
    rank: int = field(default=32, metadata={"help": "LoRA rank (default 32)"})
    lora_targets: tuple[str, ...] | None = field(default=None, metadata={
        "type": name_list, "help": "comma-separated module suffixes (default from the preset)"})
    batch_size: int = field(default=1, metadata={"help": "samples per micro-step (default 1)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "on/off (default on)"})
    mixed_precision: str = field(default="bf16", metadata={"choices": ("bf16", "no"), "help": (
        "bf16 (default: what a GPU run uses) or no (fp32, the CPU's)")})
    base_quantization: str = field(default="none", metadata={"choices": BASE_QUANTIZATION, "help": (
        "the levers of the breakdown: int8 / fp8 base (default none)")})
    offload_blocks: bool = field(default=False, metadata={"help": "block offload (default off)"})
    zero3: bool = field(default=False, metadata={"help": "DeepSpeed ZeRO-3 over --gpus (default off: DDP)"})
    gpus: int = field(default=1, metadata={"help": "GPUs phase 2 runs on (default 1)"})
    gpu_memory: float | None = field(default=None, metadata={"help": (
        "memory of one GPU in GB: list the lever sets that fit it (or --card)")})
    card: str | None = field(default=None, metadata={"choices": tuple(CARDS), "help": (
        "a named card: its memory and bf16 peak (README 'Will it fit?')")})
    mfu: float = field(default=PLAN_MFU, metadata={"help": (
        f"fraction of the card's dense bf16 peak the step time assumes (default {PLAN_MFU})")})
    brief: bool = field(default=False, metadata={"action": "store_true", "help": (
        "one line (what the launchers print before phase 2)")})

    def __post_init__(self):
        preset = check_version(self.model_version)
        self.lora_targets = tuple(self.lora_targets or preset.lora_targets)
        checks = [(64 <= self.resolution <= 8192 and self.resolution % 16 == 0,
                   f"--resolution {self.resolution}: must be a multiple of 16 between 64 and 8192"),
                  (self.references >= 0, f"--references {self.references}: must be >= 0"),
                  (1 <= self.rank <= 1024, f"--rank {self.rank}: must be between 1 and 1024"),
                  (self.batch_size >= 1, f"--batch_size {self.batch_size}: must be >= 1"),
                  (self.gpus >= 1, f"--gpus {self.gpus}: must be >= 1"),
                  (self.text_tokens is None or self.text_tokens >= 1, f"--text_tokens {self.text_tokens}: must be >= 1"),
                  (self.gpu_memory is None or 0 < self.gpu_memory <= 10_000,
                   f"--gpu_memory {self.gpu_memory}: GB of one GPU, e.g. 24, 48, 80"),
                  (0 < self.mfu <= 1, f"--mfu {self.mfu}: a fraction of the peak, e.g. 0.4"),
                  (self.card is None or self.card in CARDS, f"--card {self.card}: choose one of {', '.join(CARDS)}"),
                  (self.mixed_precision in ("bf16", "no"), f"--mixed_precision {self.mixed_precision}: choose bf16 or no"),
                  (self.base_quantization in BASE_QUANTIZATION,
                   f"--base_quantization {self.base_quantization}: choose one of {', '.join(BASE_QUANTIZATION)}"),
                  (not (self.card and self.gpu_memory), "--card and --gpu_memory: give one (a card names its memory)"),
                  (not (self.zero3 and self.gpus == 1), "--zero3 needs --gpus 2 or more (ZeRO-3 shards over GPUs)"),
                  (not (self.offload_blocks and not self.gradient_checkpointing),
                   "--offload_blocks needs --gradient_checkpointing on"),
                  (not (self.zero3 and (self.offload_blocks or self.base_quantization != "none")),
                   "--zero3 with --offload_blocks or --base_quantization: not combined (performance.py refuses it)"),
                  (not (self.offload_blocks and self.base_quantization != "none"),
                   "--offload_blocks with --base_quantization: not combined (performance.py refuses it); pick one")]
        for ok, message in checks:
            if not ok:
                raise EditTunerError(message)
        reason = FAMILIES[preset.family].reference_refusal(preset, self.references) if self.references else None
        if reason and self.cache_dir is None:
            raise EditTunerError(f"--references {self.references}: {reason}")
