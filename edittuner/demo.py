"""Demo data: scikit-image's public-domain sample photos made into edit pairs, with masks. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .atomic import write_json
from .dataset import GenerateConfig, generate_dataset_json

# The rows with one reference, for versions that take one (Qwen-Image-Edit.sh's demo): <name>.json, <name>_val.json.
SINGLE_REFERENCE = "dataset_single_ref"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "moon")
SWATCHES = ((220, 40, 40), (40, 160, 60), (50, 80, 220), (230, 180, 30))


def _photo(name: str, size: int) -> Image.Image:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    landscape = image.width > image.height * 1.2
    target = (size, size * 2 // 3 // 16 * 16) if landscape else (size, size)
    return ImageOps.fit(image, target, Image.Resampling.LANCZOS)


def _box_mask(size: tuple[int, int], index: int) -> Image.Image:
    w, h = size
    # A different rectangle per sample, always well inside the frame.
    x0 = (w // 8) * (1 + index % 3)
    y0 = (h // 8) * (1 + (index // 3) % 2)
    mask = Image.new("L", size, 0)
    mask.paste(255, (x0, y0, min(w, x0 + w // 2), min(h, y0 + h // 2)))
    return mask


def _edit(source: Image.Image, mask: Image.Image, index: int) -> tuple[Image.Image, str, Image.Image | None]:
    """Apply edit number ``index % 4`` inside the mask; returns (target, prompt, optional second reference)."""
    kind = index % 4
    swatch = None
    if kind == 0:
        edited, prompt = ImageOps.grayscale(source).convert("RGB"), "Make the marked region black and white."
    elif kind == 1:
        edited, prompt = ImageOps.invert(source), "Invert the colors inside the marked region."
    elif kind == 2:
        color = SWATCHES[(index // 4) % len(SWATCHES)]
        swatch = Image.new("RGB", source.size, color)
        tint = np.asarray(source, dtype=np.float32) * 0.4 + np.asarray(color, dtype=np.float32) * 0.6
        edited = Image.fromarray(tint.clip(0, 255).astype(np.uint8))
        prompt = "Tint the marked region of Picture 1 with the color of Picture 2."
    else:
        edited, prompt = source.filter(ImageFilter.GaussianBlur(3)), "Blur the marked region."
    return Image.composite(edited, source, mask), prompt, swatch


def _write_pairs(raw: Path, pairs: list[tuple[str, Image.Image]], first_index: int) -> None:
    for role in ("target", "source", "source_2", "mask"):
        (raw / role).mkdir(parents=True, exist_ok=True)
    for offset, (stem, source) in enumerate(pairs):
        index = first_index + offset
        mask = _box_mask(source.size, index)
        target, prompt, swatch = _edit(source, mask, index)
        source.save(raw / "source" / f"{stem}.png")
        target.save(raw / "target" / f"{stem}.png")
        mask.save(raw / "mask" / f"{stem}.png")
        (raw / "target" / f"{stem}.txt").write_text(prompt + "\n", encoding="utf-8")
        if swatch is not None:
            swatch.save(raw / "source_2" / f"{stem}.png")


def _single_reference_copy(dataset: Path, output: Path) -> None:
    """The rows of a dataset JSON that have one reference (same folder, so the relative paths stay valid)."""
    rows = json.loads(dataset.read_text(encoding="utf-8"))
    write_json(output, [row for row in rows if len(row["edit_image"]) == 1])


def make_demo_dataset(out: Path, size: int = 96) -> str:
    """Write out/raw/{target,source,source_2,mask}/ and out/dataset.json, plus held-out validation pairs (mirrored
    photos with other edits and masks) in out/raw_val/ and out/dataset_val.json, and their one-reference rows in
    out/dataset_single_ref.json and out/dataset_single_ref_val.json; return the generator's summary."""
    out = Path(out)
    _write_pairs(out / "raw", [(f"{i:02d}_{name}", _photo(name, size)) for i, name in enumerate(PHOTOS)], 0)
    # Validation: mirrored photos, other masks; invert on the astronaut (trained: grey), a new swatch on the coffee.
    held_out = [(f"val_{i:02d}_{PHOTOS[i]}", ImageOps.mirror(_photo(PHOTOS[i], size))) for i in (0, 2)]
    _write_pairs(out / "raw_val", held_out, len(PHOTOS) + 1)
    generate_dataset_json(GenerateConfig(raw_dir=out / "raw_val", output=out / "dataset_val.json", min_size=32),
                          progress=False)
    report = generate_dataset_json(GenerateConfig(raw_dir=out / "raw", output=out / "dataset.json", min_size=32),
                                   progress=False)
    for name in ("dataset", "dataset_val"):
        _single_reference_copy(out / f"{name}.json", out / f"{name.replace('dataset', SINGLE_REFERENCE)}.json")
    return report.summary()
