"""Issue 12, data side: extreme aspect ratios, a stale validation split, masks (size, alpha), truncated
safetensors files and an unwritable --cache_dir. Each gets one clear EditTunerError (or a generator skip) naming
the culprit and the fix; phase 1 refuses the rows it cannot encode and still encodes all the others."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from edittuner.cache import REFUSED, CacheReader, PrecomputeConfig, precompute_cache, row_refusal
from edittuner.families.qwen_image_edit.encoding import make_encoding_pipe, reference_prompt_embedder
from edittuner.images import fit_reference
from edittuner.dataset import GenerateConfig, Sample, generate_dataset_json
from edittuner.errors import EditTunerError
from edittuner.images import ResizeConfig, load_mask
from edittuner.models import ModelSource
from edittuner.families.qwen_image_edit.tiny import build_tiny_encoders

from conftest import TINY_PIXELS, absolute_rows


def _img(path: Path, size=(80, 64), color=(200, 10, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _demo_rows(demo_dir: Path, count: int) -> list[dict]:
    """The first ``count`` demo rows with absolute paths, so that a JSON anywhere can hold them."""
    return absolute_rows(demo_dir)[:count]


def _write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. Extreme aspect ratio

def test_generator_skips_extreme_aspect_ratios_with_the_reason(tmp_path):
    raw = tmp_path / "raw"
    _img(raw / "target/ok.png"); _img(raw / "source/ok.png")
    _img(raw / "target/tall_ref.png"); _img(raw / "source/tall_ref.png", size=(64, 20000))
    _img(raw / "target/wide_target.png", size=(20000, 64)); _img(raw / "source/wide_target.png")
    _img(raw / "target/edge.png", size=(64, 12800)); _img(raw / "source/edge.png")      # exactly 200:1 is fine
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "ds.json", prompt="p"),
                                   progress=False)
    assert sorted(r["id"] for r in json.loads((tmp_path / "ds.json").read_text())) == ["edge", "ok"]
    skipped = {s["id"]: s["reason"] for s in json.loads(report.skipped_output.read_text())}
    assert set(skipped) == {"tall_ref", "wide_target"}
    assert skipped["tall_ref"].startswith("extreme aspect ratio: source/tall_ref.png: 64x20000")
    assert skipped["wide_target"].startswith("extreme aspect ratio: target/wide_target.png: 20000x64")
    assert "crop or pad" in skipped["tall_ref"] and "extreme aspect ratio" in report.summary()


# (width, height, resize, what the engine does with it as a reference). Measured on the tiny model: what breaks
# is the Qwen2-VL processor (more than 200:1, or an empty side) after the engine's resize to --vl_pixels
# (rounded to multiples of 32), so the limit on the image itself depends on --vl_pixels and --ref_max_pixels.
_BIG_REFS = dict(max_pixels=TINY_PIXELS, ref_max_pixels=1024 * 1024)
_VL_CASES = [
    (64, 12800, ResizeConfig(**_BIG_REFS), "passes"),                          # 200:1 at the default --vl_pixels
    (64, 12864, ResizeConfig(**_BIG_REFS), "passes"),                          # 201:1: engine copes, refused anyway
    (64, 10048, ResizeConfig(**_BIG_REFS, vl_pixels=512 * 512), "passes"),     # 157:1 -> 6272x32 (196:1)
    (64, 10112, ResizeConfig(**_BIG_REFS, vl_pixels=512 * 512), "fails"),      # 158:1 -> 6432x32 (201:1)
    (64, 6400, ResizeConfig(**_BIG_REFS, vl_pixels=28 * 28 * 4), "fails"),     # 100:1 -> a side of 0 pixels
]


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)


@pytest.mark.parametrize("width, height, resize, engine", _VL_CASES)
def test_phase_1_refusal_covers_every_reference_the_engine_cannot_encode(tmp_path, tiny_pipe, width, height,
                                                                         resize, engine):
    ref = _img(tmp_path / "ref.png", size=(width, height))
    sample = Sample(id="x", prompt="p", image=_img(tmp_path / "t.png"), edit_images=(ref,))
    embedder = reference_prompt_embedder(resize.vl_pixels)
    try:
        embedder.process(tiny_pipe, "p", edit_image=[fit_reference(Image.open(ref), resize)])
        outcome = "passes"
    except ValueError as exc:    # what transformers / PIL raise, deep inside the engine
        assert "aspect ratio" in str(exc) or "must be > 0" in str(exc)
        outcome = "fails"
    assert outcome == engine
    reason = row_refusal(sample, resize, embedder)
    if max(width, height) / min(width, height) > 200:
        assert reason is not None and f"{width}x{height} has an aspect ratio" in reason
    elif outcome == "fails":
        assert reason is not None and "ref.png" in reason and f"--vl_pixels {resize.vl_pixels}" in reason
    else:
        assert reason is None


def test_phase_1_refuses_bad_rows_encodes_the_rest_and_exits_2(demo_dir, tmp_path, resize, capsys):
    from edittuner.cli import main
    good = _demo_rows(demo_dir, 3)
    tall = _img(tmp_path / "tall.png", size=(64, 20000))
    small_mask = _img(tmp_path / "small_mask.png", size=(64, 64), color=255, mode="L")
    broken = _img(tmp_path / "broken.png", size=(96, 96))
    broken.write_bytes(broken.read_bytes()[:150])        # the header parses, the pixels do not
    bad = [dict(good[0], id="tall_ref", edit_image=[str(tall)]),
           dict(good[1], id="mask_size", back_mask=str(small_mask)),
           dict(good[2], id="truncated", image=str(broken))]
    dataset = _write_json(tmp_path / "ds.json", [good[0], bad[0], good[1], bad[1], bad[2], good[2]])
    cache = tmp_path / "cache"
    code = main(["precompute", "--dataset_json", str(dataset), "--cache_dir", str(cache),
                 "--max_pixels", str(TINY_PIXELS)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"row 1, id 'tall_ref': reference edit_image[0] {tall}: 64x20000 has an aspect ratio" in err
    assert f"row 3, id 'mask_size': mask {small_mask} is 64x64 but the target" in err and "is 96x96" in err
    assert "row 4, id 'truncated'" in err and "broken.png" in err
    assert "re-run `edittuner precompute` with the same flags" in err
    # every other sample is encoded; no manifest, so phase 2 cannot start on the partial cache
    assert len(list((cache / "samples").glob("*.safetensors"))) == 3
    assert not (cache / "manifest.json").exists()
    listed = json.loads((cache / REFUSED).read_text())["refused"]
    assert [(r["row"], r["id"]) for r in listed] == [(1, "tall_ref"), (3, "mask_size"), (4, "truncated")]
    # the fix: drop the rows; the re-run reuses everything and finishes
    _write_json(dataset, good)
    result = precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, model=ModelSource(),
                                               resize=resize), progress=False)
    assert (result["encoded"], result["skipped"], result["refused"]) == (0, 3, [])
    assert len(CacheReader(cache)) == 3 and not (cache / REFUSED).exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Stale validation split

def test_regenerating_without_val_fraction_removes_the_stale_split(tmp_path):
    raw = tmp_path / "raw"
    for stem in ("a", "b", "c", "d"):
        _img(raw / "target" / f"{stem}.png"); _img(raw / "source" / f"{stem}.png")
    out = tmp_path / "data/ds.json"
    first = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="p", val_fraction=0.5),
                                  progress=False)
    val = out.with_name("ds_val.json")
    assert first.val_output == val and val.is_file()
    again = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="p"), progress=False)
    assert not val.exists() and again.val_output is None
    assert f"removed the stale {val}: 2 of its 2 validation pairs are training rows now" in again.summary()
    # a validation set made from other data (as the demo does) has no training row in it: kept, and said so
    other = tmp_path / "raw_val"
    _img(other / "target/v.png"); _img(other / "source/v.png")
    generate_dataset_json(GenerateConfig(raw_dir=other, output=val, prompt="p"), progress=False)
    kept = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="p"), progress=False)
    assert val.is_file() and f"kept {val}: none of its 1 validation pairs is a training row" in kept.summary()


@pytest.mark.parametrize("same", ["id", "image"])
def test_phase_1_refuses_validation_pairs_that_are_training_rows(demo_dir, tmp_path, resize, same):
    rows = _demo_rows(demo_dir, 4)
    dataset = _write_json(tmp_path / "ds.json", rows)
    overlap = rows[1:3] if same == "id" else [dict(r, id=f"renamed_{r['id']}") for r in rows[1:3]]
    validation = _write_json(tmp_path / "ds_val.json", overlap)
    with pytest.raises(EditTunerError) as info:
        precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=tmp_path / "cache", model=ModelSource(),
                                          resize=resize, validation_json=validation), progress=False)
    message = str(info.value)
    assert f"--validation_json {validation}: 2 of its 2 pairs are also training rows of {dataset}" in message
    assert repr(overlap[0]["id"]) in message and "--val_fraction" in message
    assert not (tmp_path / "cache").exists()          # refused before anything was written or encoded


# ---------------------------------------------------------------------------------------------------------------
# 3. Masks: alpha

def test_mask_alpha_means_not_edited(tmp_path):
    # a white stroke on a transparent layer whose hidden colour is white too (what most editors export)
    layer = Image.new("RGBA", (64, 32), (255, 255, 255, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 16, 32))
    layer.paste((255, 255, 255, 128), (16, 0, 32, 32))            # half-transparent white: half edited
    layer.save(tmp_path / "stroke.png")
    mask = load_mask(tmp_path / "stroke.png")
    assert mask.mode == "L" and mask.size == (64, 32)
    assert [mask.getpixel((x, 5)) for x in (5, 20, 40)] == [255, 128, 0]
    # LA, and a palette with a transparent index
    la = Image.new("LA", (8, 8), (255, 0)); la.paste((255, 255), (0, 0, 4, 8)); la.save(tmp_path / "la.png")
    assert [load_mask(tmp_path / "la.png").getpixel((x, 1)) for x in (1, 6)] == [255, 0]
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 255, 255, 255, 255, 255] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 4, 8))
    palette.save(tmp_path / "palette.png", transparency=0)           # index 0 (white, transparent) is not edited
    assert [load_mask(tmp_path / "palette.png").getpixel((x, 1)) for x in (1, 6)] == [255, 0]
    # a fully opaque alpha channel changes nothing: the grey level is the mask
    opaque = Image.new("RGBA", (8, 8), (0, 0, 0, 255)); opaque.paste((255, 255, 255, 255), (0, 0, 4, 8))
    opaque.save(tmp_path / "opaque.png")
    assert [load_mask(tmp_path / "opaque.png").getpixel((x, 1)) for x in (1, 6)] == [255, 0]
    # a black stroke on a transparent layer would mark nothing: refused, not guessed
    dark = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    dark.paste((0, 0, 0, 255), (0, 0, 4, 8))
    dark.save(tmp_path / "dark.png")
    with pytest.raises(EditTunerError, match="dark.png: the mask's visible pixels are all black.*paint the region"):
        load_mask(tmp_path / "dark.png")


# ---------------------------------------------------------------------------------------------------------------
# 4. Truncated safetensors files

@pytest.fixture(scope="module")
def official_model(tmp_path_factory):
    from test_models import write_official_layout
    root = tmp_path_factory.mktemp("official")
    write_official_layout(root)
    return root


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae"])
def test_truncated_model_shard_names_the_file(official_model, tmp_path, component):
    model = tmp_path / "model"
    shutil.copytree(official_model, model)
    shard = sorted((model / component).glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])     # an interrupted download
    source = ModelSource(model_dir=str(model))
    load = {"transformer": source.load_dit, "text_encoder": source.load_encoders, "vae": source.load_vae}[component]
    with pytest.raises(EditTunerError) as info:
        load()
    assert str(shard) in str(info.value) and "re-download that file" in str(info.value)
    assert not issubclass(SafetensorError, (OSError, ValueError, RuntimeError))    # why it needs its own catch


def test_broken_shard_index_names_the_file(official_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(official_model, model)
    index = model / "transformer/diffusion_pytorch_model.safetensors.index.json"
    for text in ("[1, 2]", '{"weight_map": ["a"]}', '{"weight_map": {"a": 3}}'):
        index.write_text(text)
        with pytest.raises(EditTunerError, match=f"{index.name}: not a valid safetensors index.*re-download"):
            ModelSource(model_dir=str(model)).load_dit()


def test_truncated_cache_file_is_one_clear_error(demo_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    reader = CacheReader(cache)
    reader.load(0)                                   # verified against its sha256 once, then read directly
    victim = cache / reader.records[0]["file"]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(EditTunerError, match=f"{victim.name}: unreadable cache file .*re-run `edittuner precompute`"):
        reader.load(0)


# ---------------------------------------------------------------------------------------------------------------
# 5. Unwritable --cache_dir (tests run as root: chmod would not stop them, so the folder cannot exist instead)

def test_unwritable_cache_dir_is_refused_before_encoding(demo_dir, tmp_path, resize, monkeypatch, capsys):
    from edittuner.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the encoders were loaded before the --cache_dir check")

    monkeypatch.setattr(ModelSource, "load_encoders", never)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = lambda cache: PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=cache,  # noqa: E731
                                         model=ModelSource(), resize=resize)
    for cache in (blocker / "cache", blocker):
        with pytest.raises(EditTunerError, match=f"--cache_dir {cache}: {blocker} is a file, not a folder"):
            precompute_cache(cfg(cache), progress=False)
    # a read-only file system (simulated: root writes through permissions)
    import edittuner.atomic as atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(EditTunerError, match=r"--cache_dir .*ro_cache: cannot write in .*ro_cache \(Read-only "
                                             r"file system\); choose a folder you can write to"):
        precompute_cache(cfg(tmp_path / "ro_cache"), progress=False)
    monkeypatch.undo()
    code = main(["precompute", "--dataset_json", str(demo_dir / "dataset.json"), "--cache_dir", str(blocker / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "is a file, not a folder" in err
