"""Phase 1: encode every sample once into a cache of safetensors files plus a JSON manifest.

Per sample, ``samples/<id>.safetensors`` holds:
    prompt_emb      (L, D)     the text encoder's hidden states of the family's edit template for the model version
                               (Qwen: encoding.PROMPT_TEMPLATES), with the references as vision context
    target          (C, h, w)  VAE latents of the target
    ref.K           (C, h_k, w_k) VAE latents of reference K (K = 0, 1, 2)
    white           (C, h, w)  VAE latents of a pure-white image the size of the target (bridge training)
    mask            (1, h, w)  the edit mask on the latent grid, in [0, 1] (only when the row has one)
    ref_gt          (C, h_g, w_g) VAE latents of the row's ref_gt image, sized as a target (only when it has one)
    ref_gt_white    (C, h_g, w_g) VAE latents of a white image the size of ref_gt (the sub stream's start for it)
    negative_prompt_emb (L', D) the CFG negative prompt, encoded with the references: always in ``validation/``
                               (CFG previews), in ``samples/`` with ``--negative_prompts on`` (``--cfg_dropout``);
                               the manifest's ``negative_prompt`` names it (null: not every sample has one)
Its safetensors metadata carries the sample's manifest record, so the manifest can always be rebuilt
from the files, and a re-run skips every sample whose sources still hash the same.
The manifest says ``ref_gt_encoded``: written by a phase 1 that encodes ref_gt (an older manifest lacks it, and
``--sub_stream_target ref_gt`` refuses it; a re-run of phase 1 keeps the files of rows without a ref_gt, whose
tensors and source hashes are unchanged, and encodes the rows that have one).
The manifest's copy of each record adds ``file_sha256``, the sha256 of the cache file's bytes as phase 1 wrote
them: ``CacheReader.load`` checks it (once per file per process) and a re-run re-encodes a file that no longer
matches it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from bisect import bisect_right
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .atomic import FolderLock, atomic_path, check_output_dir, write_json
from .configs import PrecomputeConfig
from .dataset import GenerateConfig, Sample, generate_dataset_json, load_dataset
from .defaults import DEFAULT_NEGATIVE_PROMPT
from .errors import EditTunerError, about
from .families import DEFAULT_MODEL_VERSION, FAMILIES, PRESETS, Family
from .images import ResizeConfig, check_aspect_ratio, probe_image
from .sources import SOURCES_FILE, SOURCES_SUBDIR, Source, per_epoch, read_datasets_file

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
IDENTITY = "cache_identity.json"
VALIDATION_SUBDIR = "validation"       # phase 1 encodes the validation pairs here, in the same format
REFUSED = "refused_rows.json"          # rows phase 1 could not encode, with the reason (only while there are any)
SHOWN_REFUSALS = 10                    # refused rows named in the error message itself


def _versions_using(family: Family, prompt_template: str) -> str:
    return " / ".join(name for name, preset in sorted(family.presets.items())
                      if preset.prompt_template == prompt_template)


def cache_identity(encoder_fingerprint: str | None, resize: ResizeConfig, family: Family,
                   prompt_template: str | None = None) -> dict:
    return {"format": CACHE_FORMAT, "encoders": encoder_fingerprint,
            "templates": family.prompt_identity(prompt_template), "resize": resize.as_dict()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_hashes(sample: Sample) -> dict:
    hashes = {"prompt": hashlib.sha256(sample.prompt.encode()).hexdigest(),
              "image": sha256_file(sample.image),
              "edit_image": [sha256_file(p) for p in sample.edit_images],
              "back_mask": sha256_file(sample.mask) if sample.mask else None}
    # Only a row with a ref_gt names it: a row without one hashes as before ref_gt was encoded, so its file is
    # reused, while a file encoded without the row's ref_gt (or with another one) no longer matches.
    if sample.ref_gt is not None:
        hashes["ref_gt"] = sha256_file(sample.ref_gt)
    return hashes


def record_pixels(record: dict, resize: ResizeConfig):
    """The pixels phase 1 encoded for a cache record, (target, references, mask) sized as it sized them, read from
    the source files the record names; None when a file is gone or no longer hashes as it did then (a cache
    moved to another machine, a dataset edited since), so a caller can fall back to the latents' round trip."""
    from .images import prepare_images

    sources = record.get("sources") or {}
    try:
        sample = Sample(id=record["id"], prompt=record.get("prompt", ""), image=Path(sources["image"]),
                        edit_images=tuple(Path(p) for p in sources["edit_image"]),
                        mask=Path(sources["back_mask"]) if sources.get("back_mask") else None)
        hashes = record["hashes"]
        if (sha256_file(sample.image) != hashes["image"]
                or [sha256_file(p) for p in sample.edit_images] != hashes["edit_image"]
                or (sha256_file(sample.mask) if sample.mask else None) != hashes.get("back_mask")):
            return None
        return prepare_images(sample, resize)
    except (KeyError, TypeError, OSError, EditTunerError):
        return None


def sample_filename(sample_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id)[:80]
    # The hash keeps ids that differ only in unsafe characters apart.
    return f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}.safetensors"


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _existing_record(path: Path, content: dict, expected_file_sha256: str | None = None,
                     unnamed_template: str | None = None) -> tuple[dict, str] | None:
    """(record, file sha256) of an already-encoded sample whose sources are unchanged, else None.

    ``expected_file_sha256`` is the file's hash in the previous manifest: a file altered since (tampered, or
    torn by a broken disk) is re-encoded. Without a previous manifest (a run killed before writing it) the
    file is trusted if its header parses and its source hashes match. ``unnamed_template``: the prompt template
    of records that name none (cached before records named it).
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads(f.metadata()["record"])
        file_sha256 = sha256_file(path)
    except Exception:  # a torn or foreign file: re-encode it
        return None
    if expected_file_sha256 is not None and file_sha256 != expected_file_sha256:
        return None
    hashes = record.get("hashes")
    if not isinstance(hashes, dict):
        return None
    hashes = {"prompt_template": unnamed_template, **hashes}
    if "negative_prompt" not in content:   # a sample cached with its negative serves a run that does not ask for it
        hashes.pop("negative_prompt", None)
    return (record, file_sha256) if hashes == content else None


def _previous_file_hashes(cache_dir: Path) -> dict[str, str]:
    """file -> sha256 from the manifest of an earlier run, if there is a readable one."""
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text(encoding="utf-8"))
        return {r["file"]: r["file_sha256"] for r in manifest["samples"] if r.get("file_sha256")}
    except Exception:  # none yet, or unreadable: fall back to the per-file checks
        return {}


def _disk_error(exc: OSError, what: str, cache_dir: Path) -> EditTunerError:
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    cause = "the disk is full" if full else (exc.strerror or str(exc))
    return EditTunerError(f"{what}: {cause}; every sample encoded so far is kept in {cache_dir}. "
                          f"{'Free some space' if full else 'Fix the problem'} and re-run `edittuner precompute` "
                          "with the same flags: it reuses them and encodes the rest")


def check_validation_overlap(train: list[Sample], validation: list[Sample], train_json, validation_json) -> None:
    """Refuse validation pairs that are also training rows (same id, or same target file)."""
    ids = {s.id for s in train}
    images = {os.path.realpath(s.image) for s in train}
    shared = [s.id for s in validation if s.id in ids or os.path.realpath(s.image) in images]
    if shared:
        shown = ", ".join(repr(i) for i in shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise EditTunerError(
            f"--validation_json {validation_json}: {len(shared)} of its {len(validation)} pairs are also training "
            f"rows of {train_json} (same id or target image: {shown}), so validation would not be held out. Remove "
            "them from one of the two files, or regenerate both with `edittuner dataset --val_fraction F` (a stale "
            "<name>_val.json from an earlier split is the usual cause)")


def row_refusal(sample: Sample, resize: ResizeConfig, encoder, model_version: str | None = None) -> str | None:
    """Why phase 1 cannot encode this row, read from its image headers; None when it can. Refused: more references
    than ``model_version`` takes, an unreadable image, an aspect ratio the engine cannot take (each image as it is,
    and each reference as it reaches the vision encoder: ``encoder``, the version's SampleEncoder), a mask whose
    size is not the target's."""
    if model_version is not None:
        preset = PRESETS[model_version]
        too_many = FAMILIES[preset.family].reference_refusal(preset, len(sample.edit_images))
        if too_many is not None:
            return f"edit_image lists {too_many}"
    try:
        target = probe_image(sample.image)
        check_aspect_ratio(target.width, target.height, f"target {sample.image}")
        target_size = resize.target_size(target.width, target.height)
        for k, path in enumerate(sample.edit_images):
            info = probe_image(path)
            what = f"reference edit_image[{k}] {path}"
            check_aspect_ratio(info.width, info.height, what)
            fitted = resize.reference_size_for(info.width, info.height, target_size)
            check_aspect_ratio(*encoder.vision_size(*fitted),
                               f"{what} ({info.width}x{info.height}) {encoder.vision_note()}")
        if sample.ref_gt is not None:
            info = probe_image(sample.ref_gt)
            check_aspect_ratio(info.width, info.height, f"ref_gt {sample.ref_gt}")
        if sample.mask is not None:
            mask = probe_image(sample.mask)
            if (mask.width, mask.height) != (target.width, target.height):
                return (f"mask {sample.mask} is {mask.width}x{mask.height} but the target {sample.image} is "
                        f"{target.width}x{target.height}; make the mask exactly the target's size (white = edited)")
    except EditTunerError as exc:
        return str(exc)
    return None


def precompute_cache(cfg: PrecomputeConfig, progress: bool = True) -> dict:
    """Encode the dataset into ``cfg.cache_dir`` (and ``cfg.validation_json`` into its ``validation/``); shard
    across processes when run under accelerate.

    A row phase 1 cannot encode (``row_refusal``, or an image that fails to decode) is refused and every other
    sample is encoded; then EditTunerError lists the refused rows (all of them in ``refused_rows.json``) and no
    manifest is written for that set, so phase 2 cannot start on it until they are fixed or removed.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU processes do not see each other
    if cfg.datasets is None:
        sets = _with_validation(cfg, [(cfg, load_dataset(cfg.dataset_json, root=cfg.data_root,
                                                         base_path=cfg.dataset_base_path, warn=state.is_main_process))],
                                state)
    else:
        sources = read_datasets_file(cfg.datasets, cfg.resize)
    cfg.model.check(cfg.family.encoder_components)
    check_output_dir(cfg.cache_dir, "--cache_dir")
    # One phase 1 at a time per cache folder: a second is refused, naming the first.
    with FolderLock(cfg.cache_dir, "phase 1 (precompute)") if state.is_main_process else nullcontext():
        if cfg.datasets is not None:   # a raw folder's dataset JSON is written into the cache: under the lock
            sets = _with_validation(cfg, [_source_set(cfg, source, state) for source in sources], state)
        for set_cfg, _ in sets:
            check_output_dir(set_cfg.cache_dir, "--cache_dir")
        results = [_encode_set(set_cfg, samples, state, progress) for set_cfg, samples in sets]
        if any(part["refused"] for part in results):
            raise _refused_error([(set_cfg, part) for (set_cfg, _), part in zip(sets, results)])
        if state.is_main_process:
            _record_sources(cfg, sources if cfg.datasets is not None else None, results)
    state.wait_for_everyone()
    validation_part = results.pop() if cfg.validation_json is not None else None
    result = results[0] if cfg.datasets is None else {
        "sources": {source.name: part for source, part in zip(sources, results)}, "manifest": None}
    if validation_part is not None:
        result["validation"] = validation_part
    return result


def _with_validation(cfg: PrecomputeConfig, sets: list, state) -> list:
    """The training sets plus, with --validation_json, its pairs (held out from every training set) encoded into
    <cache_dir>/validation with the CFG negative prompt."""
    if cfg.validation_json is None:
        return sets
    validation = load_dataset(cfg.validation_json, root=cfg.data_root, warn=state.is_main_process)
    training = [sample for _, samples in sets for sample in samples]
    check_validation_overlap(training, validation, cfg.datasets or cfg.dataset_json, cfg.validation_json)
    return sets + [(replace(cfg, dataset_json=cfg.validation_json, datasets=None, dataset_base_path=None,
                            cache_dir=Path(cfg.cache_dir) / VALIDATION_SUBDIR, validation_json=None,
                            negative_prompt=DEFAULT_NEGATIVE_PROMPT if cfg.negative_prompt is None
                            else cfg.negative_prompt), validation)]


def _source_set(cfg: PrecomputeConfig, source: Source, state) -> tuple[PrecomputeConfig, list[Sample]]:
    """One --datasets source as phase 1 encodes it: into <cache_dir>/sources/<name>, with its own resize settings.
    A raw folder becomes a dataset JSON there first (the generator's skip report beside it)."""
    folder = Path(cfg.cache_dir) / SOURCES_SUBDIR / source.name
    dataset = source.path
    if source.is_raw:
        dataset = folder / "dataset.json"
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            with about("--datasets"):
                report = generate_dataset_json(GenerateConfig(raw_dir=source.path, output=dataset,
                                                              prompt=source.prompt), progress=False)
            print(f"source {source.name}: {report.summary()}")
        state.wait_for_everyone()
    set_cfg = replace(cfg, dataset_json=dataset, datasets=None, dataset_base_path=source.base_path,
                      cache_dir=folder, resize=source.resize(cfg.resize), validation_json=None)
    with about("--datasets"):
        samples = load_dataset(dataset, root=cfg.data_root, base_path=source.base_path, warn=state.is_main_process)
    return set_cfg, samples


def _record_sources(cfg: PrecomputeConfig, sources: list[Source] | None, results: list[dict]) -> None:
    """sources.json for phase 2 (the sources, their folders and sizes), written last; a single-dataset run removes
    one left by an earlier --datasets run into this folder, whose sources phase 2 would read instead."""
    path = Path(cfg.cache_dir) / SOURCES_FILE
    if sources is None:
        path.unlink(missing_ok=True)
        return
    write_json(path, {"format": CACHE_FORMAT, "datasets": str(Path(cfg.datasets).resolve()), "sources": [
        {**source.as_json(), "folder": f"{SOURCES_SUBDIR}/{source.name}", "samples": len(part["manifest"]["samples"])}
        for source, part in zip(sources, results)]})


def _claim_cache_dir(cfg: PrecomputeConfig, identity: dict, state) -> None:
    """Refuse a cache made with other encoders or resize settings, then record this run's identity."""
    cache_dir = Path(cfg.cache_dir)
    identity_path = cache_dir / IDENTITY
    if identity_path.is_file():
        existing = json.loads(identity_path.read_text())
        cached_template = cfg.family.template_of(existing)
        if cached_template not in (None, cfg.prompt_template) and not cfg.overwrite:
            raise EditTunerError(
                f"cache {cache_dir} holds prompts encoded with the engine's {cached_template}-image template "
                f"(--model_version {_versions_using(cfg.family, cached_template)}), but --model_version {cfg.model_version} needs "
                f"the {cfg.prompt_template}-image template. Use another --cache_dir, or pass --overwrite to "
                "re-encode this one.")
        if existing != identity and not cfg.overwrite:
            raise EditTunerError(
                f"cache {cache_dir} was made with other encoders or resize settings:\n"
                f"  cache: {json.dumps(existing, sort_keys=True)}\n  run:   {json.dumps(identity, sort_keys=True)}\n"
                "Use another --cache_dir, or pass --overwrite to re-encode this one.")
    state.wait_for_everyone()
    if state.is_main_process:
        try:
            write_json(identity_path, identity)
            (cache_dir / "samples").mkdir(parents=True, exist_ok=True)
            for stale in (cache_dir / "samples").glob(".*.tmp"):  # left by a run killed mid-write
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise _disk_error(exc, f"writing {identity_path}", cache_dir) from None
    state.wait_for_everyone()


def _plan(cfg: PrecomputeConfig, rows: list[tuple[int, Sample]], encoder):
    """This process's rows sorted into refused, reused (their file hashes) and to encode."""
    cache_dir = Path(cfg.cache_dir)
    previous = _previous_file_hashes(cache_dir)
    todo, file_hashes, refused, reused = [], {}, [], 0
    for row, sample in rows:
        reason = row_refusal(sample, cfg.resize, encoder, cfg.model_version)
        if reason is not None:
            refused.append({"row": row, "id": sample.id, "reason": reason})
            continue
        hashes = {**source_hashes(sample), "prompt_template": cfg.prompt_template}
        if cfg.negative_prompt is not None:
            hashes["negative_prompt"] = cfg.negative_prompt
        path = cache_dir / "samples" / sample_filename(sample.id)
        name = f"samples/{path.name}"
        existing = None if cfg.overwrite else \
            _existing_record(path, hashes, previous.get(name), cfg.family.unnamed_prompt_template)
        if existing is not None:
            file_hashes[name] = existing[1]
            reused += 1
        else:
            todo.append((row, sample, hashes, path))
    return todo, file_hashes, refused, reused


def _encode_todo(cfg: PrecomputeConfig, todo: list, state, dtype, encoder, progress: bool):
    """Encode and write each sample of ``todo``; returns (file hashes, rows refused because an image would not
    decode). A failed write (full disk) stops the run; everything written so far stays."""
    file_hashes, refused = {}, []
    if not todo:
        return file_hashes, refused
    encoder.attach(cfg.model.load_encoders(dtype=dtype, device=state.device), state.device, dtype)
    for row, sample, hashes, path in tqdm(todo, desc=f"phase 1 [{state.process_index}]", unit="sample",
                                          disable=not progress):
        try:
            target, refs, mask = encoder.prepare(sample, cfg.resize)
            ref_gt = encoder.prepare_ref_gt(sample, cfg.resize)
        except EditTunerError as exc:   # the header was fine, the pixels are not (truncated file, blank mask)
            refused.append({"row": row, "id": sample.id, "reason": str(exc)})
            continue
        tensors = encoder.encode(sample.prompt, target, refs, mask, cfg.negative_prompt)
        if ref_gt is not None:
            tensors.update(encoder.encode_ref_gt(ref_gt))
        tensors = {k: (v.to(dtype) if v.is_floating_point() and k != "mask" else v) for k, v in tensors.items()}
        record = {"id": sample.id, "file": f"samples/{path.name}", "prompt": sample.prompt,
                  "sources": {"image": str(sample.image), "edit_image": [str(p) for p in sample.edit_images],
                              "back_mask": str(sample.mask) if sample.mask else None,
                              "ref_gt": str(sample.ref_gt) if sample.ref_gt else None},
                  "hashes": hashes, "target_size": list(target.size),
                  "shapes": {k: list(v.shape) for k, v in tensors.items()}}
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"record": json.dumps(record), "format": str(CACHE_FORMAT)})
                file_hashes[record["file"]] = sha256_file(tmp)
        except OSError as exc:
            raise _disk_error(exc, f"writing cache file {path}", Path(cfg.cache_dir)) from None
    return file_hashes, refused


def _gather(state, cache_dir: Path, file_hashes: dict, refused: list) -> tuple[dict, list]:
    """Every process's file hashes and refused rows (through one small JSON file per process)."""
    if state.num_processes > 1:
        shard = cache_dir / f".file_hashes.{state.process_index}.json"
        write_json(shard, {"file_hashes": file_hashes, "refused": refused})
        state.wait_for_everyone()
        file_hashes, refused = {}, []
        for rank in range(state.num_processes):
            part = json.loads((cache_dir / f".file_hashes.{rank}.json").read_text(encoding="utf-8"))
            file_hashes.update(part["file_hashes"])
            refused += part["refused"]
        state.wait_for_everyone()
        shard.unlink(missing_ok=True)
    return file_hashes, sorted(refused, key=lambda r: r["row"])


def _encode_set(cfg: PrecomputeConfig, samples: list[Sample], state, progress: bool) -> dict:
    """Phase 1 for one dataset JSON into ``cfg.cache_dir``: the manifest only when no row was refused."""
    cache_dir = Path(cfg.cache_dir)
    identity = cache_identity(cfg.model.encoder_fingerprint(), cfg.resize, cfg.family, cfg.prompt_template)
    _claim_cache_dir(cfg, identity, state)
    dtype = _resolve_dtype(cfg.dtype, state.device)
    encoder = cfg.family.sample_encoder(cfg.preset, cfg.resize.vl_pixels)
    rows = list(enumerate(samples))[state.process_index::state.num_processes]
    todo, file_hashes, refused, reused = _plan(cfg, rows, encoder)
    start = time.perf_counter()
    encoded_hashes, late_refused = _encode_todo(cfg, todo, state, dtype, encoder, progress)
    elapsed = time.perf_counter() - start
    file_hashes, refused = _gather(state, cache_dir, {**file_hashes, **encoded_hashes}, refused + late_refused)
    manifest = None
    if state.is_main_process:
        if refused:
            write_json(cache_dir / REFUSED, {"dataset_json": str(cfg.dataset_json), "refused": refused})
        else:
            (cache_dir / REFUSED).unlink(missing_ok=True)
            manifest = write_manifest(cfg, samples, identity, str(dtype).replace("torch.", ""), file_hashes)
    state.wait_for_everyone()
    return {"encoded": len(todo) - len(late_refused), "skipped": reused, "seconds": elapsed, "manifest": manifest,
            "refused": refused}


def _refused_error(parts: list[tuple[PrecomputeConfig, dict]]) -> EditTunerError:
    lines = ["phase 1 refused the rows below and encoded every other sample; it wrote no manifest for a dataset "
             "with refused rows, so phase 2 cannot start on it yet."]
    for cfg, part in parts:
        refused = part["refused"]
        if not refused:
            continue
        lines.append(f"{len(refused)} row(s) of {cfg.dataset_json} (all listed in {Path(cfg.cache_dir) / REFUSED}):")
        lines += [f"  row {r['row']}, id {r['id']!r}: {r['reason']}" for r in refused[:SHOWN_REFUSALS]]
        if len(refused) > SHOWN_REFUSALS:
            lines.append(f"  ... and {len(refused) - SHOWN_REFUSALS} more")
    lines.append("Fix or remove these rows (`edittuner dataset` skips such samples, with the reason) and re-run "
                 "`edittuner precompute` with the same flags: it reuses every sample already encoded.")
    return EditTunerError("\n".join(lines))


def write_manifest(cfg: PrecomputeConfig, samples: list[Sample], identity: dict, dtype: str,
                   file_hashes: dict[str, str] | None = None) -> dict:
    """The manifest: each file's record plus ``file_sha256`` (from ``file_hashes``, hashed here if missing)."""
    cache_dir = Path(cfg.cache_dir)
    file_hashes = file_hashes or {}
    records = []
    for sample in samples:
        path = cache_dir / "samples" / sample_filename(sample.id)
        with safe_open(str(path), framework="pt") as f:
            record = json.loads(f.metadata()["record"])
        record["file_sha256"] = file_hashes.get(record["file"]) or sha256_file(path)
        records.append(record)
    negatives = {r["hashes"].get("negative_prompt") if "negative_prompt_emb" in r["shapes"] else None for r in records}
    manifest = {"format": CACHE_FORMAT, "identity": identity, "model_version": cfg.model_version,
                "negative_prompt": negatives.pop() if len(negatives) == 1 else None,
                "model": cfg.model.describe(), "dtype": dtype, "dataset_json": str(Path(cfg.dataset_json).resolve()),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ref_gt_encoded": True, "samples": records}
    write_json(cache_dir / MANIFEST, manifest)
    return manifest


class CacheReader:
    """Phase 2's view of a cache: checked against the run's encoders and resize settings, then read per sample."""

    def __init__(self, cache_dir: str | os.PathLike, expected_resize: ResizeConfig | None = None,
                 expected_encoders: str | None = None, expected_model_version: str | None = None):
        self.cache_dir = Path(cache_dir)
        manifest_path = self.cache_dir / MANIFEST
        if not manifest_path.is_file():
            raise EditTunerError(f"--cache_dir {self.cache_dir}: no {MANIFEST}; run `edittuner precompute` first "
                                 "(or let it finish: the manifest is written last)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise EditTunerError(f"{manifest_path}: corrupt manifest ({exc}); re-run `edittuner precompute`") from None
        identity = self.manifest.get("identity", {})
        if self.manifest.get("format") != CACHE_FORMAT:
            raise EditTunerError(f"{manifest_path}: cache format {self.manifest.get('format')} is not "
                                 f"{CACHE_FORMAT}; re-run `edittuner precompute` into a new --cache_dir")
        # The model version first: another family's cache also has other encoders, and this says what to run.
        self._check_version(identity, expected_model_version)
        if expected_resize is not None and identity.get("resize") != expected_resize.as_dict():
            raise EditTunerError(f"cache {self.cache_dir} was made with resize settings {identity.get('resize')}, "
                                 f"but this run asks for {expected_resize.as_dict()}; pass the same resize flags "
                                 "as phase 1, or re-run phase 1 into a new --cache_dir")
        if expected_encoders is not None and identity.get("encoders") != expected_encoders:
            raise EditTunerError(f"cache {self.cache_dir} was made with other encoders ({identity.get('encoders')}) "
                                 f"than this run's model ({expected_encoders}); re-run phase 1 with this model "
                                 "into a new --cache_dir")
        self.records = self.manifest["samples"]
        self._verified: set[int] = set()   # files whose bytes matched file_sha256 (checked once per process)

    def _check_version(self, identity: dict, expected_model_version: str | None) -> None:
        """Refuse prompts encoded by another engine version or with another template than the run's version needs,
        and a manifest written for another version (whose samples a phase-1 re-run then reuses)."""
        cached_version = self.manifest.get("model_version")
        cached = PRESETS.get(cached_version) or PRESETS[DEFAULT_MODEL_VERSION]   # older manifests name none
        family = FAMILIES[cached.family]
        cached_template = family.template_of(identity)
        if cached_template is None:
            raise EditTunerError(f"cache {self.cache_dir} was made with other prompt templates "
                                 f"({identity.get('templates')}, now {family.prompt_identity()}); re-run phase 1")
        if expected_model_version is None:
            return
        expected = PRESETS[expected_model_version]
        if expected.family != cached.family:
            raise EditTunerError(
                f"cache {self.cache_dir} was made for --model_version {cached_version} ({cached.base_model}), but "
                f"this run trains --model_version {expected_model_version} ({expected.base_model}), another model "
                f"family whose encoders differ: run `edittuner precompute --model_version {expected_model_version}` "
                f"into a new --cache_dir, or train with --model_version {cached_version}")
        expected_template = expected.prompt_template
        if cached_template != expected_template:
            raise EditTunerError(
                f"cache {self.cache_dir} was made for --model_version {cached_version}, whose prompts use the engine's "
                f"{cached_template}-image template; --model_version {expected_model_version} needs the "
                f"{expected_template}-image template: run `edittuner precompute --model_version "
                f"{expected_model_version}` into a new --cache_dir, or train with --model_version {cached_version}")
        if cached_version != expected_model_version:
            raise EditTunerError(
                f"cache {self.cache_dir} was made for --model_version {cached_version}, but this run trains "
                f"--model_version {expected_model_version}; re-run `edittuner precompute --model_version "
                f"{expected_model_version}` on this --cache_dir (it reuses every encoded sample and only rewrites "
                f"the manifest), or train with --model_version {cached_version}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ref_gt_encoded(self) -> bool:
        """Whether phase 1 encoded every row's ref_gt: an older manifest cannot tell a row without one from a row
        whose ref_gt was not encoded."""
        return bool(self.manifest.get("ref_gt_encoded"))

    @property
    def has_negative_prompts(self) -> bool:
        """Whether every sample holds a negative_prompt_emb (what --cfg_dropout trains on)."""
        return all("negative_prompt_emb" in r.get("shapes", {}) for r in self.records)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """One sample's tensors. The first load of each file checks its bytes against the manifest's
        ``file_sha256`` (caches made before it was recorded are read unchecked)."""
        record = self.records[index]
        path = self.cache_dir / record["file"]
        expected = record.get("file_sha256")
        try:
            if index in self._verified or not expected:
                return load_file(str(path))
            data = path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise EditTunerError(
                    f"{path}: cache file changed on disk since phase 1 wrote it (sha256 {actual[:16]}..., the "
                    f"manifest has {expected[:16]}...); re-run `edittuner precompute` with the same flags: it "
                    "re-encodes this sample")
            tensors = load_safetensors_bytes(data)
            self._verified.add(index)
            return tensors
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise EditTunerError(f"{path}: unreadable cache file ({exc}); re-run `edittuner precompute` "
                                 "(it re-encodes missing or broken samples)") from None

    @property
    def sizes(self) -> list[int]:
        """Samples per source (a plain cache: one source), for the data order."""
        return [len(self.records)]

    per_epoch = None   # a plain cache: each sample once per epoch


class SourcesReader:
    """Phase 2's view of a --datasets cache: each source's CacheReader (checked against the run's settings with the
    source's own pixel budget and reference rule), their records one after another, and each source's slots per
    epoch (its repeats or weight)."""

    def __init__(self, cache_dir: str | os.PathLike, expected_resize: ResizeConfig | None = None,
                 expected_encoders: str | None = None, expected_model_version: str | None = None):
        self.cache_dir = Path(cache_dir)
        path = self.cache_dir / SOURCES_FILE
        try:
            self.sources = json.loads(path.read_text(encoding="utf-8"))["sources"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EditTunerError(f"{path}: unreadable ({exc}); re-run `edittuner precompute --datasets ...`") from None
        self.readers = []
        for entry in self.sources:
            own = Source(name=entry["name"], path=Path(entry["path"]), max_pixels=entry.get("max_pixels"),
                         reference_size=entry.get("reference_size"))
            self.readers.append(CacheReader(self.cache_dir / entry["folder"], own.resize(expected_resize)
                                            if expected_resize is not None else None, expected_encoders,
                                            expected_model_version))
        self.records = [{**record, "source": entry["name"]}
                        for entry, reader in zip(self.sources, self.readers) for record in reader.records]
        self.sizes = [len(reader) for reader in self.readers]
        self.per_epoch = per_epoch(self.sources, self.sizes)
        self._starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ref_gt_encoded(self) -> bool:
        return all(reader.ref_gt_encoded for reader in self.readers)

    @property
    def has_negative_prompts(self) -> bool:
        return all(reader.has_negative_prompts for reader in self.readers)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        k = bisect_right(self._starts, index) - 1
        return self.readers[k].load(index - self._starts[k])


def open_cache(cache_dir: str | os.PathLike, expected_resize: ResizeConfig | None = None,
               expected_encoders: str | None = None, expected_model_version: str | None = None):
    """The training cache phase 1 wrote: a --datasets cache (sources.json) or a plain one."""
    kind = SourcesReader if (Path(cache_dir) / SOURCES_FILE).is_file() else CacheReader
    return kind(cache_dir, expected_resize, expected_encoders, expected_model_version)
