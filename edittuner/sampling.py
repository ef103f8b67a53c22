"""Editing with the base model and an optional LoRA: `edittuner sample`, the Gradio app and validation previews.

Two samplers share one conditioning path (prompt and references encoded exactly as phase 1 encodes them):

- ``flow``: the engine's flow-matching scheduler (``FlowMatchScheduler("Qwen-Image")`` with its resolution-
  dependent shift) from Gaussian noise, with true classifier-free guidance as the engine applies it:
  v = v_neg + guidance * (v_pos - v_neg), the negative prompt encoded with the same reference images.
- ``bridge``: the Latent Bridge Matching path in N steps (default 1) from the first reference's latents (main
  stream) or from a white image's latents (sub stream).

A mask (white = regenerate) keeps everything else: at every step the latents outside the mask are put back on
the path that ends at the source's latents (the engine's inpainting rule: its ``return_to_timestep`` velocity
for flow, the bridge interpolant for bridge), so the final latents there *are* the source's latents. Decoding
then gives the VAE's round trip of the source there; ``keep_unmasked_pixels`` pastes the source's own pixels
back outside the mask, and the result reports how far the round trip alone would have moved them.

A LoRA is applied next to the base weights by forward hooks (out += strength * B(A(x))) rather than fused:
swapping it or changing its strength never touches the base, and removing it restores the base exactly.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path, check_output_dir, check_output_file, safe_filename, write_json
from .configs import SampleConfig, SamplerConfig, output_format
from .errors import EditTunerError
from .families import DEFAULT_MODEL_VERSION, FAMILIES, PRESETS, ModelSpec, check_version, model_spec
from .images import MAX_ASPECT_RATIO, ResizeConfig, check_aspect_ratio, load_mask, load_rgb
from .lora import load_lora_and_metadata, load_lora_file
from .models import ModelSource
from .objectives import sample_bridge
from .performance import PerformanceConfig, check_levers, load_device, prepare_base


@dataclass
class EditResult:
    image: Image.Image
    latents: torch.Tensor
    seconds: float
    vae_roundoff_outside_mask: float | None = None  # mean |decode(encode(source)) - source| there, 8-bit levels


# ---- samplers on latents ---------------------------------------------------------------------------------------

# ---- LoRA next to the base weights -----------------------------------------------------------------------------

def check_lora_fits(dit: torch.nn.Module, state: dict[str, torch.Tensor], path) -> dict[str, tuple]:
    """{module name: (A, B)} for a LoRA as ``load_lora_file`` returns it (complete pairs; that reader already
    refuses files with no or half pairs), or a clear error if it was made for another model."""
    pairs = {key.rsplit(".lora_", 1)[0]: (state[key], state[key.replace(".lora_A.", ".lora_B.")])
             for key in state if ".lora_A." in key}
    modules = dict(dit.named_modules())
    unknown = sorted(m for m in pairs if not isinstance(modules.get(m), torch.nn.Linear))
    if unknown:
        raise EditTunerError(f"--lora {path}: {len(unknown)} layers do not exist in this base model "
                             f"(e.g. {unknown[:2]}); it was trained on another model")
    for name, (a, b) in pairs.items():
        weight = modules[name].weight
        if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0] or a.shape[0] != b.shape[1]:
            raise EditTunerError(f"--lora {path}: {name} has A {tuple(a.shape)} / B {tuple(b.shape)}, which does not "
                                 f"fit this base model's {tuple(weight.shape)}; it was trained on another model")
    return pairs


class LoraHooks:
    """One LoRA at a time on a DiT, as forward hooks: the base weights are never written."""

    def __init__(self, dit: torch.nn.Module):
        self.dit = dit
        self.handles: list = []
        self.path: Path | None = None
        self.strength = 0.0

    def set(self, path: str | Path | None, strength: float = 1.0,
            state: dict[str, torch.Tensor] | None = None) -> None:
        """Put the LoRA at ``path`` on (``state``: its ``load_lora_file`` result, when already read)."""
        self.remove()
        if path is None:
            return
        if not math.isfinite(strength):
            raise EditTunerError(f"--lora_strength {strength}: must be a finite number (1 = as trained)")
        weight = self.dit.proj_out.weight
        fitted = check_lora_fits(self.dit, state if state is not None else load_lora_file(path), path)
        for name, (a, b) in fitted.items():
            a, b = a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype)
            self.handles.append(self.dit.get_submodule(name).register_forward_hook(self._hook(a, b, strength)))
        self.path, self.strength = Path(path), strength

    @staticmethod
    def _hook(a: torch.Tensor, b: torch.Tensor, strength: float):
        def add_lora(module, args, output):
            return output + strength * torch.nn.functional.linear(torch.nn.functional.linear(args[0], a), b)
        return add_lora

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.path, self.strength = [], None, 0.0


# ---- which model version a LoRA was trained for -----------------------------------------------------------------

class ModelChoice(NamedTuple):
    """The version and zero_cond_t to sample with, and the warnings that choosing them gave."""

    version: str
    zero_cond_t: bool
    notes: tuple[str, ...] = ()

    @property
    def spec(self) -> ModelSpec:
        return model_spec(self.version, self.zero_cond_t)


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def lora_trained_with(metadata: dict[str, str], source, model_version: str | None = None,
                      zero_cond_t: bool | None = None) -> tuple[str | None, bool | None]:
    """(version, zero_cond_t) a LoRA's metadata records (our trainer writes base_model, the preset's name such as
    "Qwen-Image-Edit-2511", and zero_cond_t "true"/"false"); None where it records nothing. A value it records but we cannot read is an
    error unless the matching flag (``model_version`` / ``zero_cond_t``) decides instead."""
    versions = {preset.base_model: name for name, preset in PRESETS.items()}
    base_model, recorded_zct = metadata.get("base_model"), metadata.get("zero_cond_t")
    version = versions.get(base_model)
    known_family = any(str(base_model).startswith(f.base_model_prefix) for f in FAMILIES.values())
    if version is None and model_version is None and known_family:
        raise EditTunerError(f"--lora {source}: its metadata says base_model {base_model!r}, a version this edittuner "
                             f"does not know ({', '.join(sorted(versions))}); pass --model_version to sample it as "
                             "one of those")
    zct = {"true": True, "false": False}.get(str(recorded_zct).lower()) if recorded_zct is not None else None
    if recorded_zct is not None and zct is None and zero_cond_t is None:
        raise EditTunerError(f"--lora {source}: its metadata says zero_cond_t {recorded_zct!r}, neither true nor false; "
                             "pass --zero_cond_t on or off")
    return version, zct


def choose_model(metadata: dict[str, str] | None, source, model_version: str | None = None,
                 zero_cond_t: bool | None = None, default_version: str = DEFAULT_MODEL_VERSION) -> ModelChoice:
    """The version and zero_cond_t to sample a LoRA with: the flags where given (a warning where they disagree with
    the LoRA's metadata), else the metadata, else ``default_version`` and its preset. zero_cond_t comes from the
    metadata only when the version does too (a LoRA sampled as another version gets that version's preset)."""
    if model_version is not None:
        check_version(model_version)
    trained_version, trained_zct = lora_trained_with(metadata or {}, source, model_version, zero_cond_t)
    version = model_version or trained_version or default_version
    notes = []
    if trained_version not in (None, version):
        notes.append(f"--model_version {version} overrides the version {source} was trained for "
                     f"({PRESETS[trained_version].base_model})")
    if zero_cond_t is not None:
        chosen = zero_cond_t
        if trained_zct not in (None, chosen):
            notes.append(f"--zero_cond_t {_on_off(chosen)} overrides the setting {source} was trained with "
                         f"({_on_off(trained_zct)})")
    elif trained_zct is not None and trained_version in (None, version):
        chosen = trained_zct
    else:
        chosen = bool(PRESETS[version].zero_cond_t)
        if trained_zct not in (None, chosen):
            notes.append(f"zero_cond_t {_on_off(chosen)} as --model_version {version}'s preset, not as {source} was "
                         f"trained ({_on_off(trained_zct)}); pass --zero_cond_t to choose")
    return ModelChoice(version, chosen, tuple(notes))


# ---- the editor: base model loaded once ------------------------------------------------------------------------

def _prepare_mask(mask: Image.Image | None, size: tuple[int, int]) -> Image.Image | None:
    if mask is None:
        return None
    mask = mask.convert("L").resize(size, Image.Resampling.NEAREST)
    binary = mask.point(lambda v: 255 if v >= 128 else 0)
    if binary.getbbox() is None:
        raise EditTunerError("--mask: the mask is empty (all black); paint the region to edit white, or drop the mask")
    return binary


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class Editor:
    """The base model and encoders, loaded once; LoRAs come and go without reloading them.

    The model version (prompt template, references taken) and zero_cond_t follow the LoRA on it (``choose_model``):
    ``model_version`` / ``zero_cond_t`` override its metadata, and without a LoRA (or metadata) they apply, else the
    default version and its preset."""

    def __init__(self, model: ModelSource = ModelSource(), model_version: str | None = None,
                 resize: ResizeConfig = ResizeConfig(), device: str | None = None, dtype: torch.dtype | None = None,
                 base_quantization: str = "none", zero_cond_t: bool | None = None):
        self.family = model.model_family
        self.flags = (model_version, zero_cond_t, self.family.default_version)
        self.choice = choose_model(None, None, *self.flags)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.bfloat16 if self.device == "cuda" else torch.float32)
        # int8 / fp8 blocks: the 20B base in about half the memory, for trying a LoRA on a 24 GB card.
        levers = PerformanceConfig(base_quantization=base_quantization)
        check_levers(levers, torch.device(self.device), self.dtype)
        self._check_family(self.choice, None)
        model.check(self.family.components)
        self.resize = resize
        self.dit = model.load_dit(dtype=self.dtype, device=load_device(levers, torch.device(self.device)))
        prepare_base(self.family.blocks(self.dit), levers, torch.device(self.device))
        self.dit = self.dit.to(self.device).eval()
        self.encoders = model.load_encoders(dtype=self.dtype, device=self.device)
        self.encoder = self._sample_encoder()
        self.lora = LoraHooks(self.dit)

    @property
    def model_version(self) -> str:
        return self.choice.version

    @property
    def zero_cond_t(self) -> bool:
        return self.choice.zero_cond_t

    @property
    def preset(self):
        return PRESETS[self.choice.version]

    def _sample_encoder(self):
        encoder = self.family.sample_encoder(self.preset, self.resize.vl_pixels)
        encoder.attach(self.encoders, self.device, self.dtype)
        return encoder

    def _check_family(self, choice: ModelChoice, path) -> None:
        """A version of another family needs another base model: refuse it rather than run the wrong one."""
        preset = PRESETS[choice.version]
        if preset.family != self.family.name:
            what = f"--lora {path} was trained for" if path is not None else "--model_version asks for"
            raise EditTunerError(f"{what} {preset.base_model} (the {preset.family} family), but the base model "
                                 f"loaded is a {self.family.name} model; start with --model_version {choice.version} "
                                 f"and that model's --model_dir")

    def set_lora(self, path: str | Path | None, strength: float = 1.0, state: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> tuple[str, ...]:
        """Put the LoRA at ``path`` on (None: take it off) and follow the version and zero_cond_t it was trained
        with (``state`` / ``metadata``: the file's, when already read). Returns the warnings of ``choose_model``."""
        if path is None:
            self.lora.set(None)
            choice = choose_model(None, None, *self.flags)
        else:
            if state is None or metadata is None:
                state, metadata = load_lora_and_metadata(path)
            choice = choose_model(metadata, path, *self.flags)
            self._check_family(choice, path)
            self.lora.set(path, strength, state)
        self.choice = choice
        if self.encoder.prompt_template != self.preset.prompt_template:
            self.encoder = self._sample_encoder()
        return choice.notes

    def check_references(self, references: list[Image.Image]) -> list[Image.Image]:
        """The references sized for the model, refusing a shape the engine cannot take: more extreme than
        MAX_ASPECT_RATIO, or one the vision encoder's resize (to --vl_pixels) squeezes to nothing or past it."""
        refs = []
        for number, reference in enumerate(references, 1):
            check_aspect_ratio(*reference.size, f"reference {number}")
            # --reference_size target: the first reference is the image edited, so the output's size.
            ref = self.encoder.fit_reference(reference, self.resize, refs[0].size if refs else None)
            vl_size = self.encoder.vision_size(ref.width, ref.height)
            if min(vl_size) <= 0 or max(vl_size) / min(vl_size) > MAX_ASPECT_RATIO:
                raise EditTunerError(
                    f"reference {number}: {reference.width}x{reference.height}, sized {ref.width}x{ref.height} for "
                    f"the model, becomes {vl_size[0]}x{vl_size[1]} for the vision encoder at --vl_pixels "
                    f"{self.resize.vl_pixels}, which it cannot take (at most {MAX_ASPECT_RATIO}:1, no empty side); "
                    "crop it to a less extreme shape or raise --vl_pixels")
            refs.append(ref)
        return refs

    @torch.no_grad()
    def edit(self, references: list[Image.Image], prompt: str, sampler: SamplerConfig = SamplerConfig(),
             mask: Image.Image | None = None) -> EditResult:
        too_many = self.family.reference_refusal(self.preset, len(references))
        if too_many is not None:
            raise EditTunerError(too_many)
        if not prompt.strip():
            raise EditTunerError("the prompt is empty; write the edit instruction")
        start = time.perf_counter()
        refs = self.check_references(references)
        size = refs[0].size
        pixel_mask = _prepare_mask(mask, size)
        encoded = self.encoder.encode(prompt, None, refs, None)
        negative_prompt_emb = None
        if sampler.uses_cfg:
            negative_prompt_emb = self.encoder.encode_prompt(sampler.negative_prompt, refs)
        if sampler.sampler == "bridge" and sampler.stream == "sub":
            encoded["white"] = self.encoder.encode_image(Image.new("RGB", size, (255, 255, 255)))
        latents = self.sample_latents(encoded, sampler, negative_prompt_emb,
                                      mask=self.encoder.mask_to_latent_grid(pixel_mask, size) if pixel_mask else None)
        if not bool(torch.isfinite(latents).all()):
            lora = f"the LoRA {self.lora.path} at strength {self.lora.strength:g}" if self.lora.path else "no LoRA"
            raise EditTunerError(f"the edit came out as NaN or infinite values (with {lora}); nothing was written. "
                                 "A LoRA too strong or broken is the usual cause: lower the strength or try another "
                                 "LoRA or checkpoint")
        image = self.decode(latents)
        roundoff = None
        if pixel_mask is not None:
            source = _pixels(refs[0])
            outside = np.asarray(pixel_mask) == 0
            round_trip = _pixels(self.decode(encoded["ref.0"][None]))
            roundoff = float(np.abs(round_trip - source)[outside].mean())
            if sampler.keep_unmasked_pixels:
                image = Image.composite(image, refs[0], pixel_mask)
        return EditResult(image=image, latents=latents, seconds=time.perf_counter() - start,
                          vae_roundoff_outside_mask=roundoff)

    def sample_latents(self, encoded: dict[str, torch.Tensor], sampler: SamplerConfig,
                       negative_prompt_emb: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                       dit: torch.nn.Module | None = None) -> torch.Tensor:
        return sample_edit_latents(dit or self.dit, encoded, sampler, self.choice.spec, self.device, self.dtype,
                                   negative_prompt_emb, mask)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        return self.family.decode(self.encoders.vae, latents)


def validation_grid(rows: list[tuple[list[Image.Image], Image.Image, Image.Image, str]],
                    cell_height: int = 256) -> Image.Image:
    """One row per validation pair: references | output | target, with the prompt written above it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    band = 22
    scaled = []
    for refs, output, target, prompt in rows:
        cells = [im.resize((max(1, round(im.width * cell_height / im.height)), cell_height), Image.Resampling.LANCZOS)
                 for im in (*refs, output, target)]
        scaled.append((cells, prompt, len(refs)))
    width = max(sum(c.width for c in cells) + 4 * len(cells) for cells, _, _ in scaled)
    grid = Image.new("RGB", (width, len(rows) * (cell_height + band + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (cells, prompt, n_refs) in enumerate(scaled):
        top = r * (cell_height + band + 4)
        draw.text((4, top + 3), f"{prompt}   [references x{n_refs} | output | target]", fill=(0, 0, 0), font=font)
        x = 0
        for cell in cells:
            grid.paste(cell, (x, top + band))
            x += cell.width + 4
    return grid


@torch.no_grad()
def sample_edit_latents(dit: torch.nn.Module, encoded: dict[str, torch.Tensor], sampler: SamplerConfig,
                        model: ModelSpec, device, dtype, negative_prompt_emb: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None, denoiser=None) -> torch.Tensor:
    """Latents of the edit of one encoded sample (a phase-1 cache entry or a freshly encoded request).

    ``model``: the version with its switches as the LoRA was trained (the run's for previews, the LoRA's metadata
    for sampling). ``mask`` is the latent-grid mask (1, h, w), 1 = regenerate; ``negative_prompt_emb`` is needed
    for CFG. ``denoiser``: the DiT as the trainer wrapped it (DDP, DeepSpeed engine), so ZeRO-3 gathers its shards."""
    if not isinstance(model, ModelSpec):
        raise TypeError(f"sample_edit_latents: model must be a ModelSpec, not {model!r}")
    family = model.family
    known = encoded["ref.0"][None].to(device, dtype)
    conditioning = model.conditioning([encoded], device, dtype, latent_hw=tuple(known.shape[-2:]))
    keep = (mask[None].to(device, dtype), known) if mask is not None else None
    generator = torch.Generator().manual_seed(sampler.seed)
    denoiser = denoiser or family.denoiser(dit)
    if sampler.sampler == "bridge":
        if sampler.stream == "main":
            z_start = known
        else:
            z_start = encoded["white"][None].to(device, dtype) if "white" in encoded else None
            if z_start is None:
                raise EditTunerError("--stream sub needs the white image's latents")
        if sampler.stream == "main" and not sampler.main_stream_references:
            conditioning = family.without_references(conditioning)
        return sample_bridge(denoiser, z_start, conditioning, steps=sampler.steps, sigma=sampler.bridge_sigma,
                             generator=generator, keep=keep)
    negative_conditioning = None
    if sampler.uses_cfg:
        if negative_prompt_emb is None:
            raise EditTunerError("guidance != 1 needs the negative prompt's embeddings")
        negative_conditioning = model.conditioning([{**encoded, "prompt_emb": negative_prompt_emb}], device, dtype,
                                                   latent_hw=tuple(known.shape[-2:]))
    return family.sample_flow(denoiser, conditioning, negative_conditioning, tuple(known.shape), sampler.steps,
                       sampler.guidance, generator, keep=keep, device=device, dtype=dtype)


# ---- `edittuner sample` ----------------------------------------------------------------------------------------

SKIPPED_REPORT = "_skipped.json"   # in --output_dir: the dataset rows the last batch run could not edit


class RowsSkipped(EditTunerError):
    """A batch wrote the rows it could and refused the others: ``written`` as sample_images returns it, ``skipped``
    the refused rows ({row, id, reason}, also in ``<output_dir>/_skipped.json``)."""

    def __init__(self, message: str, written: list, skipped: list[dict]):
        super().__init__(message)
        self.written, self.skipped = written, skipped


def _save_image(image: Image.Image, output: Path) -> None:
    fmt = output_format(output)
    try:
        with atomic_path(output) as tmp:
            image.save(tmp, format=fmt)
    except OSError as exc:
        raise EditTunerError(f"{output}: writing failed ({exc.strerror or exc}); nothing was written there; free "
                             "some space or choose another folder") from None


def _read_inputs(paths, mask_path) -> tuple[list[Image.Image], Image.Image | None]:
    """Decode one edit's references (refusing extreme shapes, with the file named) and its optional mask."""
    references = []
    for path in paths:
        image = load_rgb(path)
        check_aspect_ratio(*image.size, str(path))
        references.append(image)
    return references, load_mask(mask_path) if mask_path else None


def sample_images(cfg: SampleConfig, progress: bool = True) -> list[tuple[Path, EditResult]]:
    """Run `edittuner sample`: one edit, or one per dataset row (written as ``<id>.png``, the id made safe).

    The version and zero_cond_t come from the LoRA's metadata unless a flag overrides them (``choose_model``; each
    disagreement is a warning on stderr). Everything that can be checked without the model is checked before it
    loads: the outputs can be written, the LoRA reads, the single edit's images decode and their number fits the
    version. A batch decodes each row just before its edit; a row that cannot be edited (too many references for
    the version included) is skipped, the others are written, and then RowsSkipped names the skipped rows."""
    from .dataset import load_dataset

    rows = load_dataset(cfg.dataset_json, root=cfg.data_root) if cfg.dataset_json is not None else None
    if rows is None:
        check_output_file(cfg.output, "--output")
    else:
        check_output_dir(cfg.output_dir, "--output_dir")
    lora_state, metadata = load_lora_and_metadata(cfg.lora) if cfg.lora is not None else (None, None)
    choice = choose_model(metadata, cfg.lora, cfg.model_version, cfg.zero_cond_t)
    if rows is None:
        preset = PRESETS[choice.version]
        too_many = FAMILIES[preset.family].reference_refusal(preset, len(cfg.references))
        if too_many is not None:
            raise EditTunerError(f"--image: {too_many}")
        references, mask = _read_inputs(cfg.references, cfg.mask)
    for note in choice.notes:   # the editor makes the same choice from the same flags and metadata
        print(f"warning: {note}", file=sys.stderr, flush=True)
    # The base model is the family the LoRA was trained for (or --model_version names).
    model = replace(cfg.model, family=PRESETS[choice.version].family)
    editor = Editor(model, cfg.model_version, cfg.resize, base_quantization=cfg.base_quantization,
                    zero_cond_t=cfg.zero_cond_t)
    editor.set_lora(cfg.lora, cfg.lora_strength, lora_state, metadata)
    if rows is not None:
        return _sample_rows(editor, rows, cfg, progress)
    result = editor.edit(references, cfg.prompt, cfg.sampler, mask)
    _save_image(result.image, Path(cfg.output))
    return [(Path(cfg.output), result)]


def _sample_rows(editor: Editor, rows: list, cfg: SampleConfig, progress: bool) -> list[tuple[Path, EditResult]]:
    from tqdm import tqdm

    output_dir = Path(cfg.output_dir)
    written, skipped = [], []
    for number, row in enumerate(tqdm(rows, desc="sample", unit="image", disable=not progress or len(rows) < 2)):
        try:
            references, mask = _read_inputs(row.edit_images, row.mask if cfg.use_dataset_masks else None)
            result = editor.edit(references, row.prompt, cfg.sampler, mask)
        except EditTunerError as exc:
            skipped.append({"row": number, "id": row.id, "reason": str(exc)})
            continue
        output = output_dir / safe_filename(row.id, ".png")
        _save_image(result.image, output)
        written.append((output, result))
    report = output_dir / SKIPPED_REPORT
    if not skipped:
        report.unlink(missing_ok=True)   # from an earlier run: every row is written now
        return written
    write_json(report, skipped)
    listed = "; ".join(f"row {s['row']} (id {s['id']!r}): {s['reason']}" for s in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    raise RowsSkipped(f"--dataset_json {cfg.dataset_json}: {len(skipped)} of {len(rows)} rows skipped, "
                      f"{len(written)} written to {output_dir}; every reason is in {report}: {listed}{more}",
                      written, skipped)
