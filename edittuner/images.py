"""Reading images safely and the resize rules shared by phase 1, sampling and the dataset generator."""

from __future__ import annotations

import errno
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops, ImageOps

from .errors import EditTunerError
from .options import positive_int

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
BUCKET_GRID = 32                      # the side multiple of aspect buckets (ResizeConfig.buckets)
REFERENCE_SIZES = ("own", "target")   # ResizeConfig.reference_size

# Refuse anything that declares more pixels than this, from its header, before decoding it (decompression
# bombs). Kept below Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS) so that our message, which names
# the size, is the one the user sees; Pillow's softer warning is silenced in favour of this check.
MAX_DECLARED_PIXELS = 128 * 1024 * 1024

# EXIF orientations that turn the stored image by 90 degrees (width and height swap once applied).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


class ImageTooLarge(EditTunerError):
    """The header declares more pixels than MAX_DECLARED_PIXELS (refused before any decoding)."""


def _unreadable(path: Path, exc: BaseException) -> EditTunerError:
    """The clearest message we can give for an image that cannot be opened or decoded."""
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLarge(f"{path}: declares too many pixels ({exc}); refused from its header as a possible "
                             "decompression bomb; downscale it or remove it")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return EditTunerError(f"{path}: symbolic link loop; point the link at a real file or remove it")
    if isinstance(exc, FileNotFoundError) and path.is_symlink():
        return EditTunerError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist); "
                              "fix or remove it")
    return EditTunerError(f"{path}: unreadable image ({exc}); replace or remove it")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """The size the image has once its EXIF orientation is applied (what ``load_rgb`` returns)."""
    width, height = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block: load_rgb's exif_transpose ignores it too
        orientation = None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str


def probe_image(path: str | os.PathLike, verify: bool = False) -> ImageInfo:
    """Read an image's header (and with ``verify`` decode every pixel); raise EditTunerError if unusable.

    ``width`` and ``height`` are those after the EXIF orientation is applied, as ``load_rgb`` returns them.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise EditTunerError(f"{path}: the file is empty (0 bytes); replace or remove it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                mode = img.mode
                if width * height > MAX_DECLARED_PIXELS:
                    raise ImageTooLarge(
                        f"{path}: declares {width}x{height} pixels, over the limit of {MAX_DECLARED_PIXELS}; "
                        "refused from its header (possible decompression bomb); downscale it or remove it")
                width, height = _oriented_size(img)
                if verify:
                    img.load()
    except EditTunerError:
        raise
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from None
    return ImageInfo(width, height, mode)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully as RGB, applying its EXIF orientation.

    CMYK converts to RGB, 16-bit greyscale scales to 8 bits (65535 -> 255), and transparency (RGBA, LA, PA,
    palette with a transparent index) is composited onto white.
    """
    probe_image(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _decode_rgb(path)
    except _DECODE_ERRORS as exc:
        raise _unreadable(Path(path), exc) from None


def _decode_rgb(path) -> Image.Image:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale to 8 bits instead of clipping.
            img = img.point(lambda v: v / 256).convert("L")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def load_mask(path: str | os.PathLike) -> Image.Image:
    """A mask as single-channel 8-bit: white (255) marks the region the edit changes, black (0) what it keeps.

    How alpha is read (RGBA, LA, palette with a transparent index): a transparent pixel means "not edited",
    whatever colour it hides, and the mask is the grey level multiplied by alpha (composited onto black): a white
    stroke on a transparent layer marks the stroke, a half-transparent white pixel counts half. A fully opaque
    alpha channel is ignored. A mask whose visible pixels are all black (a dark brush on a transparent layer)
    would mark nothing and is refused with a message, not guessed. EXIF orientation and 16-bit greyscale are
    handled as in ``load_rgb``.
    """
    probe_image(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _decode_mask(Path(path))
    except _DECODE_ERRORS as exc:
        raise _unreadable(Path(path), exc) from None


def _decode_mask(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = img.point(lambda v: v / 256).convert("L")
        if not (img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)):
            return img.convert("L")
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        grey = rgba.convert("RGB").convert("L")     # the colour alone: RGBA -> RGB drops alpha, no compositing
        if alpha.getextrema()[0] == 255:
            return grey
        mask = ImageChops.multiply(grey, alpha)
        if mask.getextrema()[1] == 0 and alpha.getextrema()[1] > 0:
            raise EditTunerError(f"{path}: the mask's visible pixels are all black, so it marks nothing as edited "
                                 "(black and transparent both mean 'not edited'); paint the region to edit white "
                                 "on a black or transparent background")
        return mask


@dataclass(frozen=True)
class ResizeConfig:
    """How phase 1 sizes images. Every field is part of the cache's identity.

    max_pixels: target (and by default reference) images larger than this are scaled down, keeping aspect.
    multiple: width and height are then floored to a multiple of this (16 is what the DiT needs: VAE /8, patch 2).
    ref_max_pixels: pixel budget for references fed to the VAE/DiT (None = max_pixels).
    vl_pixels: area the references are resized to for the Qwen2.5-VL encoder (the engine uses 384*384).
    buckets: aspect buckets: every image scaled (up or down) to near max_pixels, sides floored to a grid of
        max(BUCKET_GRID, multiple), so that few sizes exist and phase 2 can fill batches from one size.
    reference_size: "own" (each reference keeps its aspect ratio, sized by the rule above) or "target" (resized to
        the target's size: pixel-aligned edits; SimpleTuner's reference_strict / match_target_res).
    """

    max_pixels: int = field(default=1024 * 1024, metadata={"type": positive_int, "help": (
        "scale target images down to at most this many pixels (default 1048576 = 1024^2)")})
    multiple: int = field(default=16, metadata={"help": "floor width/height to a multiple of 16, 32 or 64 (default 16)"})
    ref_max_pixels: int | None = field(default=None, metadata={
        "type": positive_int, "help": "pixel budget for reference images (default: --max_pixels)"})
    vl_pixels: int = field(default=384 * 384, metadata={"type": positive_int, "help": (
        "area references are resized to for the Qwen2.5-VL encoder (default 147456 = 384^2, as the engine)")})
    buckets: bool = field(default=False, metadata={"help": (
        f"on: aspect buckets, every image scaled (up or down) to near --max_pixels on a {BUCKET_GRID}-pixel grid "
        "(--multiple where larger), so --batch_size B trains real batches of B; off (default): scale down only, "
        "sides floored to --multiple")})
    reference_size: str = field(default="own", metadata={"choices": REFERENCE_SIZES, "help": (
        "own (default): each reference keeps its own aspect ratio; target: references resized to the target's size "
        "(pixel-aligned edits)")})

    def __post_init__(self):
        if self.multiple not in (16, 32, 64):
            raise EditTunerError(f"--multiple {self.multiple}: must be 16, 32 or 64 (the DiT needs multiples of 16)")
        if self.max_pixels < self.multiple ** 2:
            raise EditTunerError(f"--max_pixels {self.max_pixels}: must be at least {self.multiple ** 2}")
        if self.ref_max_pixels is not None and self.ref_max_pixels < self.multiple ** 2:
            raise EditTunerError(f"--ref_max_pixels {self.ref_max_pixels}: must be at least {self.multiple ** 2}")
        if not 28 * 28 <= self.vl_pixels <= 4096 * 4096:
            raise EditTunerError(f"--vl_pixels {self.vl_pixels}: must be between {28 * 28} and {4096 * 4096}")
        if self.reference_size not in REFERENCE_SIZES:
            raise EditTunerError(f"--reference_size {self.reference_size}: choose {' or '.join(REFERENCE_SIZES)}")

    @property
    def grid(self) -> int:
        """The side multiple of the sizes phase 1 gives: the bucket grid, or --multiple without buckets."""
        return max(BUCKET_GRID, self.multiple) if self.buckets else self.multiple

    def as_dict(self) -> dict:
        settings = {"max_pixels": self.max_pixels, "multiple": self.multiple,
                    "ref_max_pixels": self.ref_max_pixels, "vl_pixels": self.vl_pixels}
        # The newer switches join the identity only when set, so caches made before they existed stay valid.
        if self.buckets:
            settings["buckets"] = True
        if self.reference_size != "own":
            settings["reference_size"] = self.reference_size
        return settings

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The size phase 1 gives a target of ``width`` x ``height`` (its bucket with --buckets on)."""
        if self.buckets:
            return bucket_size(width, height, self.max_pixels, self.grid)
        return fit_size(width, height, self.max_pixels, self.multiple)

    def reference_size_for(self, width: int, height: int, target: tuple[int, int] | None = None) -> tuple[int, int]:
        """The size of a reference of ``width`` x ``height``: the target's size with reference_size target (when
        there is one: sampling has none, its first reference is the edited image), else its own rule."""
        if self.reference_size == "target" and target is not None:
            return target
        budget = self.ref_max_pixels or self.max_pixels
        if self.buckets:
            return bucket_size(width, height, budget, self.grid)
        return fit_size(width, height, budget, self.multiple)


def bucket_size(width: int, height: int, max_pixels: int, grid: int) -> tuple[int, int]:
    """The aspect bucket of (width, height): scaled (up or down) to ``max_pixels`` keeping aspect, sides floored to
    ``grid``; never more than ``max_pixels`` (an extreme aspect ratio gives up length on its long side)."""
    scale = math.sqrt(max_pixels / (width * height))
    w = max(grid, int(width * scale) // grid * grid)
    h = max(grid, int(height * scale) // grid * grid)
    if w * h > max_pixels:   # a short side raised to one grid step: shorten the long side to stay in budget
        if w > h:
            w = max(grid, max_pixels // h // grid * grid)
        else:
            h = max(grid, max_pixels // w // grid * grid)
    return w, h


def fit_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """Scale (width, height) down to at most ``max_pixels`` keeping aspect, then floor to ``multiple``."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS if image.mode != "L" else Image.Resampling.BILINEAR)


# The most extreme width:height (or height:width) ratio accepted for an image fed to the model: the Qwen2.5-VL
# processor refuses anything over 200:1 deep inside transformers. With the default resize settings every image up
# to 200:1 passes the engine's resizes (measured: the first failure is at 256:1). Shared by the dataset generator,
# phase 1 and sampling, which refuse such images up front with the image named.
MAX_ASPECT_RATIO = 200


def check_aspect_ratio(width: int, height: int, what: str) -> None:
    """Raise EditTunerError naming ``what`` if width:height is more extreme than MAX_ASPECT_RATIO (or empty)."""
    if width <= 0 or height <= 0:
        raise EditTunerError(f"{what}: empty image ({width}x{height}); replace or remove it")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise EditTunerError(f"{what}: {width}x{height} has an aspect ratio of {ratio:.4g}:1; the model accepts at "
                             f"most {MAX_ASPECT_RATIO}:1; crop or pad it to a less extreme shape")


# ---- a sample's images as every family encodes them (8x8 latent cells) -----------------------------------

def fit_reference(image: Image.Image, resize: ResizeConfig, target: tuple[int, int] | None = None) -> Image.Image:
    """Size one reference image: the one rule phase 1, sampling and the app share (``target``: the target's size,
    which --reference_size target gives every reference)."""
    return resize_to(image.convert("RGB"), resize.reference_size_for(*image.size, target))


def load_references(paths, resize: ResizeConfig, target: tuple[int, int] | None = None) -> list[Image.Image]:
    return [fit_reference(load_rgb(path), resize, target) for path in paths]


def mask_to_latent_grid(mask: Image.Image, size: tuple[int, int]):
    """An edit mask (white = edited) as the fraction of each 8x8 latent cell it covers: a tensor (1, h/8, w/8)."""
    import numpy as np
    import torch

    w, h = size
    grid = mask.convert("L").resize((w, h), Image.Resampling.BILINEAR).resize((w // 8, h // 8), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]


def fit_target(image: Image.Image, resize: ResizeConfig) -> Image.Image:
    """Size an image the model generates (the target, a ref_gt): the target's pixel budget and multiple."""
    return resize_to(image, resize.target_size(*image.size))


def prepare_images(sample, resize: ResizeConfig):
    """Decode and size a dataset row's target, references and mask exactly as phase 1 encodes them."""
    target = fit_target(load_rgb(sample.image), resize)
    mask = load_mask(sample.mask) if sample.mask else None
    return target, load_references(sample.edit_images, resize, target.size), mask


def prepare_ref_gt(sample, resize: ResizeConfig) -> Image.Image | None:
    """A row's ref_gt image (None without one), sized as a target: it is what the LBM sub stream generates from a
    white image with --sub_stream_target ref_gt, at its own size (not the target's: it renders the reference)."""
    return fit_target(load_rgb(sample.ref_gt), resize) if getattr(sample, "ref_gt", None) else None
