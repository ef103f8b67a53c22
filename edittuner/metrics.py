"""Edit metrics: how close an edited image is to its target, and whether the unedited region stayed put.

One function, ``edit_metrics``, scores every output the project judges: validation previews during training
(trainer.py) and a folder of predictions (`edittuner evaluate`). The numbers, on 8-bit pixel values:

- ``psnr``: peak signal-to-noise ratio of the whole image in dB (data range 255; identical images: infinity,
  written as null in JSON);
- ``ssim``: structural similarity of the whole image (scikit-image's, 7x7 uniform window, per channel, mean);
- ``l1``: mean absolute difference over the whole image, in 8-bit levels (0-255);
- ``l1_in_mask`` / ``l1_outside_mask``: the same weighted by the edit mask m (white = edited, values in [0, 1]:
  sum(m |d|) / sum(m), and with 1 - m outside): the edit region, and the region that should not change. None
  without a mask, or where the mask leaves that region empty.

`edittuner evaluate` matches predictions to dataset rows by file stem == sample id (the id made file-safe the way
`edittuner sample --dataset_json` names its outputs: ``<id>.png``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_path, safe_filename, write_json
from .errors import EditTunerError

METRICS = ("psnr", "ssim", "psnr_in_mask", "l1", "l1_in_mask", "l1_outside_mask")
PREDICTION_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ASPECT_TOLERANCE = 0.05   # a prediction may differ from its target's aspect by the floor to a size multiple


def _pixels(image, what: str) -> np.ndarray:
    """An RGB image as float64 H x W x 3 in 8-bit levels: a PIL image, uint8 (0-255) or float (0-1) array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise EditTunerError(f"{what}: expected an RGB image (H x W x 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    raise EditTunerError(f"{what}: pixel type {array.dtype} not understood; give uint8 (0-255) or float (0-1)")


def _mask_weights(mask, shape: tuple[int, int]) -> np.ndarray:
    """An edit mask as weights in [0, 1] of size ``shape`` (H, W): PIL (L or any mode), bool, uint8 or float."""
    if isinstance(mask, Image.Image):
        if mask.size != (shape[1], shape[0]):
            mask = mask.convert("L").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
        mask = np.asarray(mask.convert("L"))
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., 0]
    if array.shape != shape:
        raise EditTunerError(f"edit mask: shape {array.shape} does not match the image's {shape}")
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _weighted_l1(diff: np.ndarray, weights: np.ndarray) -> float | None:
    total = float(weights.sum())
    return float((diff.mean(axis=2) * weights).sum() / total) if total > 0 else None


def _weighted_psnr(diff: np.ndarray, weights: np.ndarray) -> float | None:
    """PSNR (dB, 8-bit peak) over the pixels ``weights`` marks: did the edited region come out like the target?"""
    total = float(weights.sum())
    if total <= 0:
        return None
    mse = float(((diff ** 2).mean(axis=2) * weights).sum() / total)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def edit_metrics(output, target, mask=None) -> dict:
    """PSNR and SSIM of ``output`` against ``target`` on the whole image, PSNR inside ``mask``, L1 overall, inside
    and outside ``mask``.

    ``output``/``target``: PIL images or H x W x 3 arrays (uint8 0-255 or float 0-1), the same size. ``mask``:
    white (1) = the region the edit changes; resized to the image when it is a PIL image of another size."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out, tgt = _pixels(output, "output"), _pixels(target, "target")
    if out.shape != tgt.shape:
        raise EditTunerError(f"output {out.shape[1]}x{out.shape[0]} and target {tgt.shape[1]}x{tgt.shape[0]} differ "
                             "in size; resize one to the other first")
    diff = np.abs(out - tgt)
    psnr = math.inf if not diff.any() else float(peak_signal_noise_ratio(tgt, out, data_range=255.0))
    side = min(out.shape[:2])
    # scikit-image's window is 7 pixels; smaller images get the largest odd window that fits.
    win = 7 if side >= 7 else (side if side % 2 else side - 1)
    ssim = float(structural_similarity(tgt, out, data_range=255.0, channel_axis=2, win_size=win)) if win >= 3 else None
    result = {"psnr": psnr, "ssim": ssim, "psnr_in_mask": None, "l1": float(diff.mean()), "l1_in_mask": None,
              "l1_outside_mask": None}
    if mask is not None:
        weights = _mask_weights(mask, out.shape[:2])
        result["psnr_in_mask"] = _weighted_psnr(diff, weights)
        result["l1_in_mask"] = _weighted_l1(diff, weights)
        result["l1_outside_mask"] = _weighted_l1(diff, 1.0 - weights)
    return result


def mean_metrics(rows: list[dict]) -> dict:
    """The mean of each metric over ``rows``, skipping None (no mask); PSNR means over finite values only (an
    exact match is infinite and would swamp the mean); None where no row has a value."""
    means = {}
    for key in METRICS:
        values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        means[key] = sum(values) / len(values) if values else None
    return means


def markdown_table(rows: list[dict], mean: dict) -> str:
    """One line per sample and the mean, as a Markdown table."""
    def cell(value, digits):
        if value is None:
            return "–"
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    digits = {"psnr": 2, "ssim": 4, "psnr_in_mask": 2, "l1": 2, "l1_in_mask": 2, "l1_outside_mask": 2}
    header = "| id | PSNR (dB) | SSIM | PSNR in mask (dB) | L1 | L1 in mask | L1 outside mask |"
    lines = [header, "|" + "---|" * 7]
    for row in [*rows, {"id": "**mean**", **mean}]:
        lines.append(f"| {row['id']} | " + " | ".join(cell(row.get(k), digits[k]) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


# ---- `edittuner evaluate` -------------------------------------------------------------------------------------

def _prediction_files(folder: Path) -> dict[str, Path]:
    """{file stem: path} for the image files in ``folder`` (other files, such as sample's _skipped.json, are not
    predictions); two images with one stem are refused, since either could be meant."""
    if not folder.is_dir():
        raise EditTunerError(f"--predictions {folder}: no such folder; point it at the folder of edited images "
                             "(e.g. the --output_dir of `edittuner sample --dataset_json`)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in PREDICTION_SUFFIXES or not path.is_file():
            continue
        if path.stem in files:
            raise EditTunerError(f"--predictions {folder}: {files[path.stem].name} and {path.name} share the stem "
                                 f"{path.stem!r}; keep one prediction per sample id")
        files[path.stem] = path
    return files


def _sized_like(target: Image.Image, mask: Image.Image | None, size: tuple[int, int], sample_id: str):
    """The target (and mask) at the prediction's size: sampling floors sides to a multiple, so sizes may differ a
    little; an aspect ratio off by more than ASPECT_TOLERANCE is another picture and is refused."""
    if target.size == size:
        return target, mask, False
    ratio = (size[0] / size[1]) / (target.width / target.height)
    if abs(ratio - 1) > ASPECT_TOLERANCE:
        raise EditTunerError(f"prediction for {sample_id!r} is {size[0]}x{size[1]}, but its target is "
                             f"{target.width}x{target.height}, another aspect ratio; predict at the target's aspect")
    mask = mask.resize(size, Image.Resampling.BILINEAR) if mask is not None else None
    return target.resize(size, Image.Resampling.LANCZOS), mask, True


def evaluate_predictions(cfg) -> dict:
    """`edittuner evaluate`: every dataset row's prediction scored against its target (masks from the rows'
    back_mask), written as JSON (``cfg.out``) and a Markdown table beside it (.md). Every row needs a
    prediction; images in the folder that no row names are listed and left out."""
    from .dataset import load_dataset
    from .images import load_mask, load_rgb

    samples = load_dataset(cfg.dataset_json, cfg.data_root)
    files = _prediction_files(Path(cfg.predictions))
    wanted = {safe_filename(s.id): s for s in samples}
    missing = [s.id for stem, s in wanted.items() if stem not in files]
    if missing:
        raise EditTunerError(f"--predictions {cfg.predictions}: no prediction for {len(missing)} of {len(samples)} "
                             f"rows of {cfg.dataset_json} (e.g. {', '.join(map(repr, missing[:5]))}); name each "
                             "<sample id>.png, as `edittuner sample --dataset_json` writes them")
    extra = sorted(files[stem].name for stem in files if stem not in wanted)
    rows = []
    for stem, sample in wanted.items():
        try:
            output = load_rgb(files[stem])
        except EditTunerError as exc:
            raise EditTunerError(f"prediction for {sample.id!r}: {exc}") from None
        target = load_rgb(sample.image)
        mask = load_mask(sample.mask) if sample.mask else None
        target, mask, resized = _sized_like(target, mask, output.size, sample.id)
        rows.append({"id": sample.id, "prediction": str(files[stem]), **edit_metrics(output, target, mask),
                     "target_resized": resized})
    mean = mean_metrics(rows)
    out = Path(cfg.out) if cfg.out else Path(cfg.predictions) / "edit_metrics.json"
    report = {"dataset_json": str(cfg.dataset_json), "predictions": str(cfg.predictions), "matching":
              "file stem == sample id", "samples": rows, "mean": mean, "ignored_files": extra}
    write_json(out, report)
    table = markdown_table(rows, mean)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table, encoding="utf-8")
    return {**report, "json": out, "markdown": out.with_suffix(".md"), "table": table}
