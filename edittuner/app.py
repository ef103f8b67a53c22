"""The Gradio editing app (`python app_gradio.py`): try a LoRA from the run outputs on your own image.

One ``Editor`` holds the base model for the life of the process. A LoRA is applied as forward hooks
(``Editor.set_lora``) and only when the choice, its strength or the file changed, so switching LoRAs never reloads
the base, and choosing "none" gives exactly the base model's output again.

The source image goes into Gradio's ImageEditor: what the user paints with the brush (the union of the brush
layers' alpha) is the mask, white = regenerate; an image with no strokes is edited whole. Every upload is checked
(header only) before anything decodes it: the editor's background, brush layers and composite alike. Unreadable
files and images over ``MAX_UPLOAD_PIXELS`` or ``MAX_UPLOAD_BYTES`` (a header too large even for Pillow included)
are refused with one clear message, as is every ``EditTunerError`` (``gr.Error``).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a closed network

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .errors import EditTunerError  # noqa: E402
from .cli import model_source  # noqa: E402
from .configs import DEFAULT_GUIDANCE, DEFAULT_STEPS, SampleConfig, SamplerConfig  # noqa: E402
from .families import DEFAULT_MODEL_VERSION  # noqa: E402
from .images import ResizeConfig  # noqa: E402
from .options import add_options, from_args  # noqa: E402
from .sampling import Editor  # noqa: E402

NO_LORA = "none"
MAX_UPLOAD_PIXELS = 40_000_000          # 40 megapixels, checked from the header before decoding
MAX_UPLOAD_BYTES = 64 * 1024 * 1024     # per file
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7999
BRUSH_COLOR = ("#ff3b8d", 0.6)  # any colour: only the strokes' alpha makes the mask


# ---- uploads ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadLimits:
    max_pixels: int = MAX_UPLOAD_PIXELS
    max_bytes: int = MAX_UPLOAD_BYTES


def check_upload(data: str | os.PathLike | bytes, what: str, limits: UploadLimits = UploadLimits()) -> None:
    """Refuse an upload that is too large or not an image, reading only its header."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        size, opener = len(data), (lambda: Image.open(io.BytesIO(bytes(data))))
    else:
        try:
            size = Path(data).stat().st_size
        except OSError:
            raise EditTunerError(f"{what}: the uploaded file is missing; upload it again") from None
        opener = (lambda: Image.open(data))
    if size == 0:
        raise EditTunerError(f"{what}: the file is empty (0 bytes); upload a PNG, JPEG or WebP image")
    if size > limits.max_bytes:
        raise EditTunerError(f"{what}: the file is {size / 2**20:.1f} MB, over the limit of "
                             f"{limits.max_bytes / 2**20:.0f} MB; upload a smaller image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with opener() as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise _bomb(what, exc, limits) from None
    except (OSError, SyntaxError, ValueError):
        raise EditTunerError(f"{what}: unreadable file; it is not an image this app can open "
                             f"(use PNG, JPEG or WebP)") from None
    if width * height > limits.max_pixels:
        raise EditTunerError(f"{what}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
                             f"{limits.max_pixels / 1e6:g} megapixels; downscale it and upload it again")


def _bomb(what: str, exc: Image.DecompressionBombError, limits: UploadLimits) -> EditTunerError:
    """Pillow refuses to open an image whose header declares more than 2 * MAX_IMAGE_PIXELS: too large, not
    unreadable. Pillow names the pixel count only in its message."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)) / 1e6:,.0f} megapixels" if found else \
        f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:,.0f} megapixels"
    return EditTunerError(f"{what}: its header declares {size}, over the limit of {limits.max_pixels / 1e6:g} "
                          "megapixels (refused before decoding); downscale it and upload it again")


def _decode(open_image, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return open_image()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise gr.Error(f"{what}: unreadable file; it is not an image this app can open (use PNG, JPEG or WebP)",
                       print_exception=False) from None


def _upload_parts(component, payload) -> list[tuple[str, str | bytes | None]]:
    """(what, file path or bytes) of each image in a gr.Image or gr.ImageEditor payload: for the editor its
    background, every brush layer and the composite (Gradio decodes all of them)."""
    what = component.what
    if isinstance(component, gr.ImageEditor):
        if payload.id is not None and payload.id in component.blob_storage:  # the browser sends the canvas as blobs
            cached = component.blob_storage[payload.id]
            background, layers, composite = cached.background, cached.layers, cached.composite
        else:
            background, composite = (f and f.path for f in (payload.background, payload.composite))
            layers = [x and x.path for x in payload.layers]
        return [(what, background), *((f"{what} (brush layer)", x) for x in layers), (f"{what} (composite)", composite)]
    return [(what, payload.path)]


def guard_uploads(component, what: str, limits: UploadLimits):
    """Check every upload of an image component (size, pixels, readability) before Gradio decodes it.

    The instance's own ``preprocess`` is wrapped: no subclass, so the front end and the API schema stay Gradio's
    (and Gradio writes no .pyi stub beside this module, as it does for component subclasses)."""
    gradio_preprocess = component.preprocess
    component.what, component.limits = what, limits

    def preprocess(payload):
        if payload is not None:
            try:
                for part, data in _upload_parts(component, payload):
                    if data is not None:
                        check_upload(data, part, limits)
            except EditTunerError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        return _decode(lambda: gradio_preprocess(payload), what)

    component.preprocess = preprocess
    return component


def flatten(image: Image.Image | None) -> Image.Image | None:
    """RGB on white (transparent areas become white, as `images.load_rgb` does for files)."""
    if image is None:
        return None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def mask_from_layers(layers: list[Image.Image] | None, size: tuple[int, int]) -> Image.Image | None:
    """The union of the brush layers' alpha as an 'L' mask of ``size`` (255 = regenerate); None if nothing is painted."""
    union = np.zeros((size[1], size[0]), dtype=np.uint8)
    for layer in layers or []:
        if layer is None:
            continue
        alpha = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        union = np.maximum(union, np.asarray(alpha, dtype=np.uint8))
    if not union.any():
        return None
    return Image.fromarray(np.where(union > 0, 255, 0).astype(np.uint8), mode="L")


# ---- LoRA discovery --------------------------------------------------------------------------------------------

def discover_loras(train_dir: str | os.PathLike) -> list[str]:
    """`train_dir/**/lora*.safetensors`, as POSIX paths relative to ``train_dir``, sorted."""
    root = Path(train_dir)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.glob("**/lora*.safetensors") if p.is_file())


# ---- the session: one Editor, handlers -------------------------------------------------------------------------

class EditSession:
    """The loaded base model and what the app's handlers do with it (one edit at a time)."""

    def __init__(self, editor: Editor, train_dir: str | os.PathLike = "train", limits: UploadLimits = UploadLimits(),
                 output_dir: str | os.PathLike | None = None):
        self.editor = editor
        self.train_dir = Path(train_dir)
        self.limits = limits
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="edittuner-app-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.lora_key: tuple | None = None      # (path, mtime, strength) of the LoRA on the editor, None = base
        self.lora_loads = 0                     # how often set_lora actually ran (tests and the status line)
        self.lora_notes: tuple[str, ...] = ()   # warnings of the LoRA's version choice (flags overriding it)
        self.edits = 0
        self._lock = threading.Lock()

    # LoRA
    def lora_choices(self) -> list[str]:
        return [NO_LORA, *discover_loras(self.train_dir)]

    def resolve_lora(self, choice: str | None) -> Path | None:
        if not choice or choice == NO_LORA:
            return None
        root = self.train_dir.resolve()
        path = (root / choice).resolve()
        if root not in path.parents or not path.name.endswith(".safetensors"):
            raise EditTunerError(f"LoRA {choice!r}: not a LoRA file under {self.train_dir}")
        if not path.is_file():
            raise EditTunerError(f"LoRA {choice}: the file is gone from {self.train_dir}; press refresh and pick again")
        return path

    def apply_lora(self, choice: str | None, strength: float) -> None:
        """Put the chosen LoRA on the base model; a no-op when the choice, strength and file are unchanged."""
        path = self.resolve_lora(choice)
        key = None if path is None else (str(path), path.stat().st_mtime_ns, float(strength))
        if key == self.lora_key:
            return
        self.lora_key = None  # set_lora removes the previous LoRA first, even when the new one is refused
        try:
            notes = self.editor.set_lora(path, float(strength))
        except EditTunerError as exc:
            self.lora_notes = self.editor.set_lora(None)
            raise EditTunerError(str(exc).replace(f"--lora {path}", f"LoRA {choice}")) from None
        self.lora_notes = tuple(note.replace(str(path), f"LoRA {choice}") for note in notes)
        self.lora_key = key
        self.lora_loads += 1

    # editing
    def edit(self, source, reference_2, reference_3, prompt: str, lora: str | None, strength: float, sampler: str,
             steps: float, guidance: float, seed: float, negative_prompt: str = " ", stream: str = "main"):
        """Handler of the Edit button: (result image, PNG file path, status line)."""
        started = time.perf_counter()
        background = source.get("background") if isinstance(source, dict) else source
        if background is None:
            raise EditTunerError("no source image: upload the image to edit first")
        if not (prompt or "").strip():
            raise EditTunerError("the instruction is empty: type what the edit should do")
        image = flatten(background)
        mask = mask_from_layers(source.get("layers") if isinstance(source, dict) else None, image.size)
        references = [image] + [flatten(r) for r in (reference_2, reference_3) if r is not None]
        config = SamplerConfig(sampler=sampler, steps=int(steps), guidance=float(guidance), seed=int(seed),
                               negative_prompt=negative_prompt if negative_prompt is not None else " ",
                               stream=stream or "main")
        with self._lock:
            self.apply_lora(lora, strength)
            result = self.editor.edit(references, prompt, config, mask)
            self.edits += 1
            output = self.output_dir / f"edit-{self.edits:04d}.png"
        result.image.save(output, format="PNG")
        lora_text = f"LoRA {lora} at {float(strength):g}" if self.lora_key else "no LoRA"
        status = (f"done in {result.seconds:.2f} s (request {time.perf_counter() - started:.2f} s): "
                  f"{result.image.width}x{result.image.height}, {config.sampler} {config.steps} steps, "
                  f"{'guidance ' + format(config.guidance, 'g') + ', ' if config.sampler == 'flow' else ''}"
                  f"seed {config.seed}, {lora_text}, {len(references)} reference(s), "
                  f"{self.editor.preset.base_model} with zero_cond_t {'on' if self.editor.zero_cond_t else 'off'}"
                  + "".join(f"; warning: {note}" for note in self.lora_notes))
        if mask is not None:
            share = float(np.asarray(mask).mean() / 255 * 100)
            status += (f"; masked ({share:.0f}% of the image regenerated): outside the mask the VAE round trip "
                       f"alone would move pixels by {result.vae_roundoff_outside_mask:.2f}/255 on average "
                       f"(source pixels kept there)")
        else:
            status += "; no mask (whole image edited)"
        return result.image, str(output), status


def _user_errors(fn):
    """Turn EditTunerError into gr.Error: one clear message in the page or the client."""
    @functools.wraps(fn)  # keeps the signature: the API's parameter names are the handler's
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EditTunerError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapped


# ---- the page --------------------------------------------------------------------------------------------------

def build_app(session: EditSession, title: str = "edittuner: try your LoRA") -> gr.Blocks:
    limits = session.limits
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload the image to edit, paint the region to change with the brush (or paint "
                    "nothing to edit the whole image), type the instruction and press **Edit**.")
        with gr.Row():
            with gr.Column():
                source = guard_uploads(gr.ImageEditor(
                    label="source image (paint the region to regenerate)", type="pil", image_mode="RGBA",
                    format="png", sources=("upload", "clipboard"), layers=False, transforms=(), elem_id="source",
                    brush=gr.Brush(colors=[BRUSH_COLOR], default_color=BRUSH_COLOR, color_mode="fixed")),
                    "source image", limits)
                with gr.Row():
                    reference_2, reference_3 = (
                        guard_uploads(gr.Image(label=f"reference {n} (optional)", type="pil", image_mode="RGBA",
                                             format="png", sources=("upload", "clipboard"), elem_id=f"reference_{n}"),
                                f"reference {n}", limits) for n in (2, 3))
                prompt = gr.Textbox(label="instruction", placeholder="e.g. Make it night", elem_id="prompt")
                with gr.Row():
                    lora = gr.Dropdown(choices=session.lora_choices(), value=NO_LORA,
                                       label=f"LoRA (under {session.train_dir})", elem_id="lora", scale=4)
                    refresh = gr.Button("refresh", elem_id="refresh", scale=1)
                strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength", elem_id="strength")
                with gr.Row():
                    sampler = gr.Radio(["flow", "bridge"], value="flow", label="sampler", elem_id="sampler")
                    steps = gr.Slider(1, 100, value=DEFAULT_STEPS["flow"], step=1, label="steps", elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(1.0, 10.0, value=DEFAULT_GUIDANCE, step=0.5,
                                         label="guidance (flow; 1 = no CFG)", elem_id="guidance")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                with gr.Accordion("advanced", open=False):
                    negative_prompt = gr.Textbox(value=" ", label="negative prompt (flow with guidance > 1)")
                    stream = gr.Radio(["main", "sub"], value="main",
                                      label="bridge start: the source (main) or a white image (sub)")
                run = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column():
                result = gr.Image(label="result", type="pil", format="png", interactive=False, elem_id="result",
                                  buttons=["download"])
                download = gr.File(label="download PNG", interactive=False, elem_id="download")
                status = gr.Textbox(label="status", interactive=False, elem_id="status")

        def refresh_loras(current):
            choices = session.lora_choices()
            return gr.Dropdown(choices=choices, value=current if current in choices else NO_LORA)

        def default_steps(name):
            return gr.Slider(value=DEFAULT_STEPS.get(name, 1))

        refresh.click(refresh_loras, inputs=[lora], outputs=[lora], api_name="refresh_loras")
        sampler.change(default_steps, inputs=[sampler], outputs=[steps], api_name=False)
        run.click(_user_errors(session.edit),
                  inputs=[source, reference_2, reference_3, prompt, lora, strength, sampler, steps, guidance, seed,
                          negative_prompt, stream],
                  outputs=[result, download, status], api_name="edit", concurrency_limit=1)
    return demo


# ---- command line ----------------------------------------------------------------------------------------------

# The app's help for the options it shares with `edittuner sample`, where the LoRA is picked in the app.
SHARED_OPTIONS_HELP = {
    "model_version": ("prompt template, references taken and zero_cond_t (default: the version the chosen LoRA was "
                      f"trained for, from its metadata, else {DEFAULT_MODEL_VERSION})"),
    "zero_cond_t": "on/off (default: as the chosen LoRA was trained, else the version's preset)",
    "base_quantization": "the DiT's blocks in int8 or fp8 (GPU, sm89+): the 20B base in about half the memory"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app_gradio.py", description="Gradio app: edit an image with the base "
                                     "model and a LoRA from the run outputs")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}, this "
                        "machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--auth", default=None, help="user:pass required to open the app")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--train_dir", default="train", help="where LoRAs are listed from: <train_dir>/**/lora*.safetensors")
    parser.add_argument("--max_upload_megapixels", type=float, default=MAX_UPLOAD_PIXELS / 1e6,
                        help=f"refuse larger uploads (default {MAX_UPLOAD_PIXELS / 1e6:g})")
    add_options(parser, SampleConfig, only=("model", "model_version", "zero_cond_t", "resize", "base_quantization"),
                helps=SHARED_OPTIONS_HELP)
    return parser


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise EditTunerError("--auth: write it as user:pass")
    return user, password


def load_editor(args) -> Editor:
    return Editor(model_source(args), args.model_version, from_args(ResizeConfig, args),
                  base_quantization=args.base_quantization, zero_cond_t=args.zero_cond_t)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        auth = parse_auth(args.auth)
        if not 0 < args.max_upload_megapixels:
            raise EditTunerError("--max_upload_megapixels: must be positive")
        print(f"loading the base model ({args.model_dir}) ...", flush=True)
        editor = load_editor(args)
    except EditTunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    session = EditSession(editor, args.train_dir, UploadLimits(max_pixels=int(args.max_upload_megapixels * 1e6)))
    print(f"{len(session.lora_choices()) - 1} LoRA(s) under {args.train_dir}", flush=True)
    demo = build_app(session)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, share=args.share,
                max_file_size=session.limits.max_bytes)
    return 0
