"""Issue 12: hostile outputs and files. Output names made from ids, outputs that cannot be written, crafted LoRA
files, app uploads (composite, huge headers), batch streaming, extreme aspect ratios. Every refusal is one
EditTunerError naming the culprit (the CLI: exit 2, one line), and what can be checked early is checked before the
model loads."""

import errno
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from edittuner import atomic, cli, sampling
from edittuner.atomic import safe_filename
from edittuner.errors import EditTunerError
from edittuner.images import MAX_ASPECT_RATIO, ResizeConfig, check_aspect_ratio
from edittuner.lora import load_lora_file
from edittuner.sampling import Editor, EditResult, SampleConfig, SamplerConfig, sample_images

from conftest import TINY_PIXELS

FAST = ("--steps", "1", "--guidance", "1", "--max_pixels", TINY_PIXELS)


@pytest.fixture(scope="module")
def editor(resize):
    return Editor(resize=resize)


@pytest.fixture
def shared_editor(editor, monkeypatch):
    """`sample` runs on this module's editor (base model only) instead of loading the model again."""
    def load(*args, **kwargs):
        editor.set_lora(None)
        return editor
    monkeypatch.setattr(sampling, "Editor", load)
    yield
    editor.set_lora(None)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if `sample` gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(sampling, "Editor", refuse)


@pytest.fixture(scope="module")
def source(demo_dir):
    return demo_dir / "raw/source/01_chelsea.png"


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args, expect: list[str]) -> str:
    """Exit 2 and one message line (after any progress bar) holding every ``expect``; no traceback."""
    code, _, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err, err
    message = err.rstrip("\n").split("\n")[-1]
    assert message.startswith(f"edittuner {args[0]}: error: ") and "\r" not in message, err
    for text in expect:
        assert text in message, (text, err)
    return message


def write_dataset(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.json"
    path.write_text(json.dumps(rows))
    return path


def row(row_id, reference, prompt="Invert it", target=None):
    refs = reference if isinstance(reference, list) else [reference]
    return {"id": row_id, "prompt": prompt, "image": str(target or refs[0]), "edit_image": [str(r) for r in refs]}


# ---- 1. output names from dataset ids ----------------------------------------------------------------------------

def test_batch_output_names_stay_in_the_output_dir(source, shared_editor, tmp_path, capsys):
    outside = tmp_path / "absolute-target"
    ids = ["../../escape", str(outside), "", "x" * 300, "plain-id"]
    dataset = write_dataset(tmp_path / "data", [row(i, source) for i in ids])
    out_dir = tmp_path / "a" / "b" / "out"
    code, stdout, err = run(capsys, "sample", "--dataset_json", dataset, "--output_dir", out_dir, *FAST)
    assert code == 0, err
    expected = {safe_filename(i or source.stem, ".png") for i in ids}   # an empty id falls back to the image's stem
    assert {"plain-id.png", "01_chelsea.png"} <= expected and len(expected) == len(ids)
    assert set(os.listdir(out_dir)) == expected
    assert all(len(name) < 100 for name in expected)
    everything = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert everything == {dataset, *(out_dir / name for name in expected)}   # nothing written anywhere else
    assert not Path(f"{outside}.png").exists()


# ---- 2. outputs that cannot be written ---------------------------------------------------------------------------

def _native_lora(path: Path, a=None, b=None, metadata=None, prefix="diffusion_model.", extra=None) -> Path:
    state = {f"{prefix}img_in.lora_A.weight": torch.randn(4, 8) if a is None else a,
             f"{prefix}img_in.lora_B.weight": torch.randn(16, 4) if b is None else b, **(extra or {})}
    save_file(state, str(path), metadata=metadata)
    return path


def test_unwritable_outputs_are_refused_before_any_work(demo_dir, source, no_model, tmp_path, capsys):
    folder = tmp_path / "existing-folder"
    folder.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    single = ("sample", "--image", source, "--prompt", "Invert it", *FAST)
    refused(capsys, *single, "--output", folder, expect=[f"--output {folder}: is a folder"])
    refused(capsys, *single, "--output", blocker / "sub" / "edit.png",
            expect=[f"--output {blocker / 'sub' / 'edit.png'}", f"{blocker} is a file, not a folder"])
    batch = ("sample", "--dataset_json", demo_dir / "dataset.json", *FAST)
    refused(capsys, *batch, "--output_dir", blocker, expect=[f"--output_dir {blocker}", "is a file, not a folder"])
    refused(capsys, *batch, "--output_dir", blocker / "out", expect=[f"{blocker} is a file, not a folder"])
    lora_file = _native_lora(tmp_path / "lora.safetensors")
    refused(capsys, "export-lora", "--input", lora_file, "--output", folder, "--format", "comfyui",
            expect=[f"--output {folder}: is a folder"])
    assert os.listdir(folder) == []


def test_a_folder_that_takes_no_files_is_refused(tmp_path, monkeypatch):
    """A read-only disk refuses even root: the probe file the check writes is what finds it."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(EditTunerError, match=r"--output_dir .*ro: cannot write in .*ro \(Read-only file system\)"):
        atomic.check_output_dir(tmp_path / "ro", "--output_dir")
    with pytest.raises(EditTunerError, match=r"--output .*edit.png: cannot write in"):
        atomic.check_output_file(tmp_path / "ro" / "edit.png", "--output")


# ---- 3. crafted LoRA files ---------------------------------------------------------------------------------------

CRAFTED = {
    "alpha_metadata_zero": (dict(metadata={"alpha": "0"}), ['metadata "alpha" is \'0\'']),
    "alpha_metadata_nan": (dict(metadata={"alpha": "nan"}), ['metadata "alpha" is \'nan\'']),
    "alpha_metadata_text": (dict(metadata={"alpha": "sixteen"}), ['metadata "alpha" is \'sixteen\', not a number']),
    "rank_zero": (dict(a=torch.zeros(0, 8), b=torch.zeros(16, 0)), ["img_in.lora_A.weight has shape (0, 8)"]),
    "lora_A_0d": (dict(a=torch.tensor(1.0)), ["img_in.lora_A.weight has shape ()"]),
    "rank_mismatch": (dict(b=torch.randn(16, 3)), ["disagree on the rank"]),
    "nan_weights": (dict(b=torch.full((16, 4), float("nan"))), ["img_in.lora_B.weight holds 64 NaN or infinite"]),
    "peft_alpha_text": (dict(prefix="transformer.",
                             metadata={"lora_adapter_metadata": '{"r": 4, "lora_alpha": "abc"}'}),
                        ['lora_adapter_metadata "lora_alpha" is \'abc\', not a number']),
    "peft_not_a_dict": (dict(prefix="transformer.", metadata={"lora_adapter_metadata": "[4, 8]"}),
                        ['"lora_adapter_metadata" is a JSON list']),
    "alpha_two_values": (dict(extra={"diffusion_model.img_in.alpha": torch.tensor([4.0, 4.0])}),
                         ["diffusion_model.img_in.alpha holds 2 values"]),
    "alpha_tensor_zero": (dict(extra={"diffusion_model.img_in.alpha": torch.tensor(0.0)}),
                          ["diffusion_model.img_in.alpha is 0.0"]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_lora_files_get_one_clear_message(case, tmp_path, capsys):
    kwargs, expect = CRAFTED[case]
    crafted = _native_lora(tmp_path / f"{case}.safetensors", **kwargs)
    output = tmp_path / "out.safetensors"
    for fmt in ("comfyui", "diffusers"):
        refused(capsys, "export-lora", "--input", crafted, "--output", output, "--format", fmt,
                expect=[str(crafted), *expect])
    assert not output.exists()
    with pytest.raises(EditTunerError, match="|".join(map(str, [crafted]))):
        load_lora_file(crafted)   # what sampling, the app and the trainer's --resume read LoRAs with


def test_nan_lora_or_strength_never_reaches_sampling(editor, source, no_model, tmp_path, capsys):
    nan = _native_lora(tmp_path / "nan.safetensors", b=torch.full((16, 4), float("nan")))
    single = ("sample", "--image", source, "--prompt", "Invert it", "--output", tmp_path / "o.png", *FAST)
    refused(capsys, *single, "--lora", nan, expect=[str(nan), "NaN or infinite"])
    refused(capsys, *single, "--lora", nan, "--lora_strength", "nan", expect=["--lora_strength nan"])
    with pytest.raises(EditTunerError, match="NaN or infinite"):
        editor.set_lora(nan)   # the app's path
    assert not editor.lora.handles and not (tmp_path / "o.png").exists()


def test_an_edit_that_comes_out_nan_is_an_error_not_a_black_image(editor, source, shared_editor, tmp_path, capsys):
    """Finite weights so large that the DiT overflows: no NaN in the file, NaN in the result."""
    out_features, in_features = editor.dit.img_in.weight.shape
    huge = _native_lora(tmp_path / "huge.safetensors", a=torch.full((4, in_features), 1e30),
                        b=torch.full((out_features, 4), 1e30))
    output = tmp_path / "edit.png"
    refused(capsys, "sample", "--image", source, "--prompt", "Invert it", "--output", output, "--lora", huge, *FAST,
            expect=["NaN or infinite values", str(huge), "nothing was written"])
    assert not output.exists()


def test_one_flow_step_is_an_image_not_nan(editor, source):
    """The engine's 1-step schedule is 0/0; ours takes the one Euler step from the noise."""
    from edittuner.images import load_rgb
    result = editor.edit([load_rgb(source)], "Invert it", SamplerConfig(sampler="flow", steps=1, guidance=1.0))
    assert torch.isfinite(result.latents).all()
    assert len(set(result.image.getdata())) > 10   # not a flat black image


# ---- 4. app uploads ------------------------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_upload_guard_checks_the_composite_and_calls_huge_headers_too_large(tmp_path):
    gr = pytest.importorskip("gradio")
    from gradio.components.image_editor import EditorData, EditorDataBlobs
    from gradio.data_classes import FileData

    from edittuner.app import UploadLimits, check_upload, guard_uploads

    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.new("RGB", (32, 32)).save(small)
    Image.new("1", (12000, 12000)).save(big)   # 144 megapixels in a small file
    assert big.stat().st_size < 100_000
    component = guard_uploads(gr.ImageEditor(type="pil", image_mode="RGBA"), "source image", UploadLimits())
    too_big = r"source image \(composite\): 12000x12000 is 144.0 megapixels, over the limit of 40 megapixels"
    with pytest.raises(gr.Error, match=too_big):
        component.preprocess(EditorData(background=FileData(path=str(small)), layers=[],
                                        composite=FileData(path=str(big))))
    component.blob_storage["canvas"] = EditorDataBlobs(background=small.read_bytes(), layers=[],
                                                       composite=big.read_bytes())
    with pytest.raises(gr.Error, match=too_big):   # the browser's canvas arrives as blobs
        component.preprocess(EditorData(id="canvas", background=None, layers=[], composite=None))

    header = png_header(50000, 50000)
    (tmp_path / "huge.png").write_bytes(header)
    for data in (header, tmp_path / "huge.png"):
        with pytest.raises(EditTunerError, match=r"^reference 2: its header declares 2,500 megapixels, over the limit "
                                                 r"of 40 megapixels \(refused before decoding\)"):
            check_upload(data, "reference 2")


# ---- 5. check before loading, decode while streaming -------------------------------------------------------------

def test_unknown_output_type_is_refused_before_the_model_loads(source, no_model, tmp_path, capsys):
    refused(capsys, "sample", "--image", source, "--prompt", "Invert it", "--output", tmp_path / "edit.gif", *FAST,
            expect=[f"--output {tmp_path / 'edit.gif'}: .gif is not an image type", ".png, .jpg or .webp"])
    with pytest.raises(EditTunerError, match=r"\.gif is not an image type"):
        SampleConfig(references=(source,), prompt="p", output=Path("x.gif"))
    SampleConfig(references=(source,), prompt="p", output=Path("x.JPG"))   # case does not matter


def test_batch_decodes_each_row_just_before_its_edit(demo_dir, tmp_path, monkeypatch):
    decoded, seen = [], []
    real_load = sampling.load_rgb
    monkeypatch.setattr(sampling, "load_rgb", lambda path: decoded.append(path) or real_load(path))

    class CountingEditor:   # how many images had been decoded when each edit started
        def __init__(self, *args, **kwargs):
            pass

        def set_lora(self, *args):
            pass

        def edit(self, references, prompt, sampler, mask=None):
            seen.append(len(decoded))
            return EditResult(image=references[0], latents=torch.zeros(1), seconds=0.0)

    monkeypatch.setattr(sampling, "Editor", CountingEditor)
    raw = demo_dir / "raw"
    dataset = write_dataset(tmp_path, [row("a", raw / "source/00_astronaut.png"),
                                       row("b", [raw / "source/02_coffee.png", raw / "source_2/02_coffee.png"]),
                                       row("c", raw / "source/03_rocket.png")])
    written = sample_images(SampleConfig(dataset_json=dataset, output_dir=tmp_path / "out"), progress=False)
    assert seen == [1, 3, 4]   # decoding all rows first would have given [4, 4, 4]
    assert [p.name for p, _ in written] == ["a.png", "b.png", "c.png"]


# ---- 6. extreme aspect ratios ------------------------------------------------------------------------------------

def test_check_aspect_ratio():
    assert MAX_ASPECT_RATIO == 200
    check_aspect_ratio(64, 64 * 200, "x.png")
    check_aspect_ratio(64 * 200, 64, "x.png")
    with pytest.raises(EditTunerError, match=r"^x.png: 64x12864 has an aspect ratio of 201:1; the model accepts at "
                                             r"most 200:1; crop or pad it"):
        check_aspect_ratio(64, 12864, "x.png")
    with pytest.raises(EditTunerError, match="x.png: empty image"):
        check_aspect_ratio(0, 5, "x.png")


@pytest.fixture(scope="module")
def sliver(tmp_path_factory):
    path = tmp_path_factory.mktemp("sliver") / "sliver.png"
    Image.new("RGB", (64, 20000), (200, 30, 30)).save(path)
    return path


def test_extreme_reference_is_refused_before_the_model_loads(sliver, no_model, tmp_path, capsys):
    refused(capsys, "sample", "--image", sliver, "--prompt", "Invert it", "--output", tmp_path / "o.png", *FAST,
            expect=[f"{sliver}: 64x20000 has an aspect ratio of 312.5:1", "at most 200:1"])


def test_batch_skips_bad_rows_writes_the_rest_and_exits_2(demo_dir, sliver, shared_editor, tmp_path, capsys):
    raw = demo_dir / "raw"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Image.open(raw / "source/03_rocket.png").tobytes()[:200])
    rows = [row("good-1", raw / "source/00_astronaut.png"), row("sliver", sliver),
            row("corrupt", corrupt, target=raw / "target/03_rocket.png"), row("good-2", raw / "source/01_chelsea.png")]
    dataset = write_dataset(tmp_path / "data", rows)
    out_dir = tmp_path / "out"
    (out_dir).mkdir()
    (out_dir / "_skipped.json").write_text("[]")
    err = refused(capsys, "sample", "--dataset_json", dataset, "--output_dir", out_dir, *FAST,
                  expect=["2 of 4 rows skipped, 2 written", "row 1 (id 'sliver')", "aspect ratio of 312.5:1",
                          "row 2 (id 'corrupt')", "unreadable image", str(out_dir / "_skipped.json")])
    assert sorted(os.listdir(out_dir)) == ["_skipped.json", "good-1.png", "good-2.png"], err
    report = json.loads((out_dir / "_skipped.json").read_text())
    assert [(r["row"], r["id"]) for r in report] == [(1, "sliver"), (2, "corrupt")]
    del rows[1:3]   # fixed: a clean run removes the old report
    dataset = write_dataset(tmp_path / "data", rows)
    code, _, err = run(capsys, "sample", "--dataset_json", dataset, "--output_dir", out_dir, *FAST)
    assert code == 0 and sorted(os.listdir(out_dir)) == ["good-1.png", "good-2.png"], err


def test_editor_refuses_shapes_the_vision_encoder_cannot_take(editor, monkeypatch):
    """The app's path, and resize settings under which the engine's own resize breaks a modest 6:1 image."""
    with pytest.raises(EditTunerError, match=r"^reference 1: 64x20000 has an aspect ratio of 312.5:1"):
        editor.edit([Image.new("RGB", (64, 20000))], "Invert it", SamplerConfig(steps=1))
    monkeypatch.setattr(editor, "resize", ResizeConfig(max_pixels=TINY_PIXELS, vl_pixels=28 * 28))
    monkeypatch.setattr(editor, "encoder", editor.family.sample_encoder(editor.preset, 28 * 28))
    with pytest.raises(EditTunerError, match=r"^reference 2: 96x16, sized 96x16 for the model, becomes 64x0 for the "
                                             r"vision encoder at --vl_pixels 784.*raise --vl_pixels"):
        editor.edit([Image.new("RGB", (96, 96)), Image.new("RGB", (96, 16))], "Invert it", SamplerConfig(steps=1))
