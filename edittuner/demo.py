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
# Blues: every demo edit turns red parts blue, so that one rule is what a LoRA learns (the swatch rows say it with
# a second reference).
SWATCHES = ((50, 80, 220), (40, 140, 230), (90, 60, 200), (30, 110, 190))
RED_MIN_SHARE = 0.03   # a photo with less red than this keeps no mask: its target is the source itself


def _photo(name: str, size: int) -> Image.Image:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    landscape = image.width > image.height * 1.2
    target = (size, size * 2 // 3 // 16 * 16) if landscape else (size, size)
    return ImageOps.fit(image, target, Image.Resampling.LANCZOS)


def red_mask(source: Image.Image) -> Image.Image | None:
    """The source's red parts (red well above green and blue), grown by a pixel; None when there are hardly any.
    The edit region is what the picture shows, so a model can see where to edit (a hidden box it could not)."""
    rgb = np.asarray(source, dtype=np.float32)
    red = (rgb[..., 0] > 1.4 * rgb[..., 1:].max(axis=-1)) & (rgb[..., 0] > 60)
    if red.mean() < RED_MIN_SHARE:
        return None
    return Image.fromarray((red * 255).astype(np.uint8), mode="L").filter(ImageFilter.MaxFilter(3))


def _edit(source: Image.Image, index: int) -> tuple[Image.Image, Image.Image | None, str, Image.Image | None]:
    """Turn the source's red parts blue; returns (target, mask, prompt, optional second reference). Every fourth
    pair takes the blue from a colour swatch (Picture 2); the others swap red and blue."""
    mask = red_mask(source)
    pixels = np.asarray(source, dtype=np.float32)
    if index % 4 == 2:
        color = SWATCHES[(index // 4) % len(SWATCHES)]
        swatch = Image.new("RGB", source.size, color)
        edited = pixels * 0.4 + np.asarray(color, dtype=np.float32) * 0.6
        prompt = "Paint the red parts of Picture 1 with the color of Picture 2."
    else:
        swatch, edited, prompt = None, pixels[..., ::-1], "Make the red parts blue."
    edited = Image.fromarray(edited.clip(0, 255).astype(np.uint8))
    target = source.copy() if mask is None else Image.composite(edited, source, mask)
    return target, mask, prompt, swatch


def _write_pairs(raw: Path, pairs: list[tuple[str, Image.Image]], first_index: int) -> None:
    for role in ("target", "source", "source_2", "mask"):
        (raw / role).mkdir(parents=True, exist_ok=True)
    for offset, (stem, source) in enumerate(pairs):
        index = first_index + offset
        target, mask, prompt, swatch = _edit(source, index)
        source.save(raw / "source" / f"{stem}.png")
        target.save(raw / "target" / f"{stem}.png")
        if mask is not None:
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
    # Validation: the astronaut and the coffee mirrored, the coffee with a swatch of another blue.
    held_out = [(f"val_{i:02d}_{PHOTOS[i]}", ImageOps.mirror(_photo(PHOTOS[i], size))) for i in (0, 2)]
    _write_pairs(out / "raw_val", held_out, len(PHOTOS) + 1)
    generate_dataset_json(GenerateConfig(raw_dir=out / "raw_val", output=out / "dataset_val.json", min_size=32),
                          progress=False)
    report = generate_dataset_json(GenerateConfig(raw_dir=out / "raw", output=out / "dataset.json", min_size=32),
                                   progress=False)
    for name in ("dataset", "dataset_val"):
        _single_reference_copy(out / f"{name}.json", out / f"{name.replace('dataset', SINGLE_REFERENCE)}.json")
    return report.summary()
