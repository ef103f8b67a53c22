"""Hostile inputs: broken or exotic images, escaping or looping paths, bad encodings, tampered or foreign caches,
a full disk during a checkpoint save, and unsafe deserialisation anywhere in the code we ship.

Each gets one clear EditTunerError naming the culprit and the fix, or a skip recorded in the generator's
<output>_skipped.json; nothing already made is lost. (Zero-byte/truncated images in the generator, missing files
and duplicate ids are covered in test_dataset.py.)
"""

import ast
import errno
import json
import os
import re
import resource
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache
from edittuner.images import prepare_images
from edittuner.checkpoint import checkpoint_steps, load_state, save_state, write_checkpoint
from edittuner.dataset import GenerateConfig, generate_dataset_json, load_dataset
from edittuner.errors import EditTunerError
from edittuner.images import ImageTooLarge, load_rgb, probe_image
from edittuner.models import ModelSource

from conftest import ROOT


def _img(path: Path, size=(80, 64), color=(200, 10, 10), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height RGB pixels, followed by a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _exif_rotated(path: Path, orientation: int) -> Path:
    """80x40 stored pixels, left half red, right half blue, with an EXIF orientation tag."""
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def _close(pixel, expected, tol=8):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


# ---------------------------------------------------------------------------------------------------------------
# Images

def test_corrupt_and_truncated_images_get_one_clear_error(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(4096))
    truncated = _img(tmp_path / "trunc.png", size=(256, 256), color=(1, 2, 3))
    truncated.write_bytes(truncated.read_bytes()[:120])
    for bad in (garbage, truncated):
        with pytest.raises(EditTunerError, match=f"{bad.name}: unreadable image .*replace or remove it"):
            load_rgb(bad)                          # what phase 1 decodes
    with pytest.raises(EditTunerError, match="unreadable image"):
        probe_image(truncated, verify=True)        # the generator's --verify
    assert probe_image(truncated).width == 256     # the header alone is fine (documented: --verify decodes)


@pytest.mark.parametrize("width, height, message", [(100000, 100000, "decompression bomb"),
                                                    (12000, 12000, "declares 12000x12000 pixels")])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, width, height, message):
    bomb = _png_header_only(tmp_path / "bomb.png", width, height)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for read in (probe_image, lambda p: probe_image(p, verify=True), load_rgb):
        with pytest.raises(ImageTooLarge, match=message) as info:
            read(bomb)
        assert "bomb.png" in str(info.value) and "downscale it or remove it" in str(info.value)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib} KiB: the pixels were allocated"
    # the generator records it as a skip of its own kind
    raw = tmp_path / "raw"
    (raw / "target").mkdir(parents=True)
    shutil.copy(bomb, raw / "target/b.png")
    _img(raw / "source/b.png")
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "ds.json", prompt="p"),
                                   progress=False)
    assert [s["id"] for s in report.skipped] == ["b"] and report.skipped[0]["reason"].startswith("too large: ")


@pytest.fixture
def exotic(tmp_path):
    """Images in modes that must be converted, not rejected."""
    d = tmp_path / "exotic"
    d.mkdir()
    _img(d / "cmyk.jpg", size=(64, 64), mode="CMYK", color=(0, 255, 255, 0), quality=95)   # pure red in CMYK
    _img(d / "cmyk.tif", size=(64, 64), mode="CMYK", color=(255, 0, 255, 0))              # pure green
    grey16 = np.zeros((64, 64), dtype=np.uint16)
    grey16[:, 16:32], grey16[:, 32:] = 32768, 65535
    Image.fromarray(grey16).save(d / "grey16.png")
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 32, 64))                     # left half: index 0, transparent
    palette.save(d / "palette.png", transparency=0)
    _exif_rotated(d / "rot6.jpg", 6)
    _exif_rotated(d / "rot8.jpg", 8)
    return d


def test_exotic_modes_decode_to_the_right_rgb(exotic):
    assert Image.open(exotic / "grey16.png").mode == "I;16" and Image.open(exotic / "cmyk.jpg").mode == "CMYK"
    assert Image.open(exotic / "palette.png").mode == "P"
    cmyk = load_rgb(exotic / "cmyk.jpg")
    assert cmyk.mode == "RGB" and _close(cmyk.getpixel((32, 32)), (255, 0, 0))
    assert _close(load_rgb(exotic / "cmyk.tif").getpixel((32, 32)), (0, 255, 0), tol=0)
    grey = load_rgb(exotic / "grey16.png")
    assert [grey.getpixel((x, 5)) for x in (0, 20, 40)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    palette = load_rgb(exotic / "palette.png")
    assert palette.getpixel((5, 5)) == (255, 255, 255) and palette.getpixel((50, 5)) == (255, 0, 0)
    for name, top, bottom in (("rot6.jpg", (255, 0, 0), (0, 0, 255)), ("rot8.jpg", (0, 0, 255), (255, 0, 0))):
        rotated = load_rgb(exotic / name)
        assert rotated.size == (40, 80), name                       # width and height swap
        assert _close(rotated.getpixel((20, 10)), top, 40) and _close(rotated.getpixel((20, 70)), bottom, 40), name
        info = probe_image(exotic / name)                           # the header read agrees with the decode
        assert (info.width, info.height) == (40, 80)


def test_exotic_modes_go_through_the_generator_and_phase_1(exotic, tmp_path, resize):
    raw = tmp_path / "raw"
    for name in ("cmyk.jpg", "cmyk.tif", "grey16.png", "palette.png", "rot6.jpg"):
        stem = name.replace(".", "_")
        (raw / "target").mkdir(parents=True, exist_ok=True)
        shutil.copy(exotic / name, raw / "target" / f"{stem}{Path(name).suffix}")
        _img(raw / "source" / f"{stem}.png", size=(64, 64))
    # stored 80x40 with orientation 6, displayed 40x80: a mask made at the displayed size matches it
    _img(raw / "mask/rot6_jpg.png", size=(40, 80), color=(255, 255, 255))
    out = tmp_path / "data/ds.json"
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="edit", verify=True, min_size=32),
                                   progress=False)
    assert report.skipped == [] and report.rows == 5
    rows = {r["id"]: r for r in json.loads(out.read_text())}
    assert (rows["rot6_jpg"]["width"], rows["rot6_jpg"]["height"]) == (40, 80)
    samples = load_dataset(out)
    for sample in samples:
        target, refs, mask = prepare_images(sample, resize)
        assert target.mode == "RGB" and all(r.mode == "RGB" for r in refs)
        if sample.id == "rot6_jpg":
            assert target.size[1] > target.size[0] and mask is not None
    result = precompute_cache(PrecomputeConfig(dataset_json=out, cache_dir=tmp_path / "cache", model=ModelSource(),
                                               resize=resize), progress=False)
    assert result["encoded"] == 5
    reader = CacheReader(tmp_path / "cache")
    assert all(torch.isfinite(reader.load(i)["target"]).all() for i in range(len(reader)))


# ---------------------------------------------------------------------------------------------------------------
# Dataset JSON: paths, symlinks, encodings

def _row(image, edit, **extra):
    return {"prompt": "p", "image": str(image), "edit_image": [str(edit)], **extra}


def test_paths_may_not_escape_the_json_folder_or_the_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("EDITTUNER_DATA_ROOT", raising=False)
    project = tmp_path / "project"
    _img(project / "raw/t.png"); _img(project / "raw/s.png")
    outside = _img(tmp_path / "elsewhere/secret.png")
    data = project / "data"
    data.mkdir()
    # default: relative paths stay inside the JSON's folder
    (data / "up.json").write_text(json.dumps([_row("../raw/t.png", "../raw/s.png")]))
    with pytest.raises(EditTunerError, match=r'up.json, row 0: "image" path \'../raw/t.png\' leaves the dataset '
                                             r"JSON's folder .*--data_root"):
        load_dataset(data / "up.json")
    # sneaky forms of the same escape
    (data / "sneaky.json").write_text(json.dumps([_row("x/../../raw/t.png", "s.png")]))
    with pytest.raises(EditTunerError, match="leaves the dataset JSON's folder"):
        load_dataset(data / "sneaky.json")
    # opting in with a data root that contains them
    assert load_dataset(data / "up.json", root=project)[0].image == data / "../raw/t.png"
    monkeypatch.setenv("EDITTUNER_DATA_ROOT", str(project))
    assert len(load_dataset(data / "up.json")) == 1
    monkeypatch.delenv("EDITTUNER_DATA_ROOT")
    # absolute paths: accepted without a root (tools and tests write them), refused outside a root
    (data / "abs.json").write_text(json.dumps([_row(outside, project / "raw/s.png")]))
    assert load_dataset(data / "abs.json")[0].image == outside
    with pytest.raises(EditTunerError, match=r'abs.json, row 0: "image" path .*secret.png.* outside the data root'):
        load_dataset(data / "abs.json", root=project)
    # a symlink inside the root that points outside it is an escape too
    os.symlink(outside, project / "raw/link.png")
    (data / "link.json").write_text(json.dumps([_row("../raw/t.png", "../raw/link.png")]))
    with pytest.raises(EditTunerError, match=r'"edit_image\[0\]" path .*resolves to .*secret.png, outside the data root'):
        load_dataset(data / "link.json", root=project)
    with pytest.raises(EditTunerError, match="data root .*: no such directory"):
        load_dataset(data / "up.json", root=tmp_path / "nope")


def test_escaping_path_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    from edittuner.cli import main
    monkeypatch.delenv("EDITTUNER_DATA_ROOT", raising=False)
    _img(tmp_path / "raw/t.png"); _img(tmp_path / "raw/s.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/ds.json").write_text(json.dumps([_row("../raw/t.png", "../raw/s.png")]))
    code = main(["precompute", "--dataset_json", str(tmp_path / "data/ds.json"), "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "ds.json, row 0" in err and "leaves the dataset JSON's folder" in err
    assert not (tmp_path / "c/manifest.json").exists()
    # --data_root opts in: the same rows encode.
    code = main(["precompute", "--dataset_json", str(tmp_path / "data/ds.json"), "--cache_dir", str(tmp_path / "c"),
                 "--data_root", str(tmp_path), "--max_pixels", "4096"])
    assert code == 0 and (tmp_path / "c/manifest.json").is_file(), capsys.readouterr().err


def test_generator_writes_paths_that_load_dataset_accepts(tmp_path):
    raw = tmp_path / "raw"
    _img(raw / "target/a.png"); _img(raw / "source/a.png")
    inside = generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "inside.json", prompt="p"),
                                   progress=False)
    outside = generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "data/sub/outside.json",
                                                   prompt="p"), progress=False)
    row_in = json.loads(inside.output.read_text())[0]
    row_out = json.loads(outside.output.read_text())[0]
    assert row_in["image"] == "raw/target/a.png"                       # relative when inside the JSON's folder
    assert os.path.isabs(row_out["image"]) and ".." not in row_out["image"]   # else absolute, never ../
    assert load_dataset(inside.output)[0].image.resolve() == load_dataset(outside.output)[0].image.resolve()


def test_symlink_loops_do_not_hang_the_generator_or_load_dataset(tmp_path):
    raw = tmp_path / "raw"
    _img(raw / "target/ok.png"); _img(raw / "source/ok.png")
    os.symlink("loop.png", raw / "target/loop.png")                   # points at itself
    _img(raw / "source/loop.png")
    os.symlink("ping.png", raw / "target/pong.png"); os.symlink("pong.png", raw / "target/ping.png")
    _img(raw / "source/ping.png"); _img(raw / "source/pong.png")
    os.symlink("missing.png", raw / "target/dangling.png"); _img(raw / "source/dangling.png")
    os.symlink("..", raw / "target/up")                               # a directory cycle: not walked
    os.symlink("mask", raw / "mask")                                  # an optional role folder that loops
    out = tmp_path / "ds.json"
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="p", workers=2), progress=False)
    skipped = {s["id"]: s["reason"] for s in json.loads(report.skipped_output.read_text())}
    assert [r["id"] for r in json.loads(out.read_text())] == ["ok"]
    for stem in ("loop", "ping", "pong"):
        assert skipped[stem].startswith("unreadable") and "symbolic link loop" in skipped[stem], skipped
    assert "broken symbolic link" in skipped["dangling"]
    # a row naming a looping link: clear error, with or without a data root
    (tmp_path / "rows.json").write_text(json.dumps([_row("raw/target/loop.png", "raw/source/ok.png")]))
    for root in (None, tmp_path):
        with pytest.raises(EditTunerError, match=r'rows.json, row 0: "image" file .*loop.png is a symbolic link loop'):
            load_dataset(tmp_path / "rows.json", root=root)


def test_prompt_files_that_are_not_utf8_are_skipped_with_the_reason(tmp_path):
    raw = tmp_path / "raw"
    for stem in ("latin", "bom", "plain"):
        _img(raw / "target" / f"{stem}.png"); _img(raw / "source" / f"{stem}.png")
    (raw / "target/latin.txt").write_bytes("rends le café plus chaud".encode("latin-1"))
    (raw / "target/bom.txt").write_bytes("\ufeffmake it blue".encode("utf-8"))
    (raw / "target/plain.txt").write_text("make it grey", encoding="utf-8")
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "ds.json"), progress=False)
    rows = {r["id"]: r["prompt"] for r in json.loads((tmp_path / "ds.json").read_text())}
    assert rows == {"bom": "make it blue", "plain": "make it grey"}    # a UTF-8 BOM is not part of the prompt
    (reason,) = [s["reason"] for s in json.loads(report.skipped_output.read_text()) if s["id"] == "latin"]
    assert reason.startswith("prompt not UTF-8: ") and "latin.txt" in reason and "0xe9" in reason
    assert "prompt not UTF-8" in report.summary()


def test_prompts_jsonl_and_dataset_json_that_are_not_utf8(tmp_path):
    raw = tmp_path / "raw"
    _img(raw / "target/a.png"); _img(raw / "source/a.png")
    (raw / "prompts.jsonl").write_bytes(b'{"id": "x", "prompt": "ok"}\n' + '{"id": "a", "prompt": "caf\xe9"}\n'
                                        .encode("latin-1"))
    with pytest.raises(EditTunerError, match=r"prompts.jsonl, line 2: not UTF-8 \(byte 0xe9"):
        generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "ds.json"), progress=False)
    rows = [{"prompt": "rends le café plus chaud", "image": "raw/target/a.png", "edit_image": ["raw/source/a.png"]}]
    (tmp_path / "latin.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(EditTunerError, match=r"dataset JSON .*latin.json: not UTF-8 \(byte 0xe9 at offset \d+\); "
                                             "re-save it as UTF-8"):
        load_dataset(tmp_path / "latin.json")
    (tmp_path / "utf16.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("utf-16"))
    (tmp_path / "bom.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("utf-8-sig"))
    for ok in ("utf16.json", "bom.json"):
        assert load_dataset(tmp_path / ok)[0].prompt == "rends le café plus chaud"
    (tmp_path / "surrogate.json").write_text('[{"prompt": "bad \\ud800", "image": "raw/target/a.png", '
                                             '"edit_image": "raw/source/a.png"}]')
    with pytest.raises(EditTunerError, match="surrogate.json, row 0: the prompt holds an invalid character"):
        load_dataset(tmp_path / "surrogate.json")


# ---------------------------------------------------------------------------------------------------------------
# Cache

@pytest.fixture
def cache_copy(demo_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(demo_cache, copy)
    return copy


def test_tampered_cache_file_is_refused_and_reencoded(cache_copy, demo_dir, resize):
    manifest = json.loads((cache_copy / "manifest.json").read_text())
    assert all(len(r["file_sha256"]) == 64 for r in manifest["samples"])
    reader = CacheReader(cache_copy)
    reader.load(0); reader.load(0)
    assert reader._verified == {0}                  # hashed once per file per process
    victim = cache_copy / manifest["samples"][3]["file"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF                                # one byte of tensor data: the header still parses
    victim.write_bytes(bytes(data))
    with pytest.raises(EditTunerError, match=f"{victim.name}: cache file changed on disk since phase 1 wrote it.*"
                                             "re-run `edittuner precompute`"):
        CacheReader(cache_copy).load(3)
    again = precompute_cache(PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=cache_copy,
                                              model=ModelSource(), resize=resize), progress=False)
    assert again["encoded"] == 1 and again["skipped"] == len(manifest["samples"]) - 1
    fresh = CacheReader(cache_copy)
    assert torch.isfinite(fresh.load(3)["target"]).all()


def test_cache_from_another_model_version_is_refused(cache_copy, demo_dir, resize):
    assert json.loads((cache_copy / "manifest.json").read_text())["model_version"] == "2511"
    CacheReader(cache_copy, expected_model_version="2511")
    with pytest.raises(EditTunerError, match="made for --model_version 2511, but this run trains --model_version "
                                             "2509; re-run `edittuner precompute --model_version 2509`"):
        CacheReader(cache_copy, expected_model_version="2509")
    # the fix the message gives: cheap, every sample is reused
    redo = precompute_cache(PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=cache_copy,
                                             model=ModelSource(), resize=resize, model_version="2509"), progress=False)
    assert redo["encoded"] == 0
    CacheReader(cache_copy, expected_model_version="2509")


def test_disk_full_while_writing_the_cache_keeps_what_was_encoded(demo_dir, tmp_path, resize, monkeypatch):
    import edittuner.cache as cache_module
    real_save, calls = cache_module.save_file, []

    def save_until_full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache_module, "save_file", save_until_full)
    cfg = PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=tmp_path / "cache", model=ModelSource(),
                           resize=resize)
    with pytest.raises(EditTunerError, match="the disk is full; every sample encoded so far is kept"):
        precompute_cache(cfg, progress=False)
    assert len(list((tmp_path / "cache/samples").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.setattr(cache_module, "save_file", real_save)
    assert precompute_cache(cfg, progress=False)["skipped"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Disk full during a checkpoint save

def test_disk_full_during_a_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    import edittuner.checkpoint as checkpoint_module
    checkpoints = tmp_path / "checkpoints"
    state = {"weights": torch.arange(6.0).reshape(2, 3), "step": 1, "lr": [1e-4]}

    def files(tmp):
        save_state(tmp, "optimizer", state)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": 1}))

    write_checkpoint(checkpoints, 1, files, keep_last=1)

    def save_half_then_fill_the_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint_module, "save_file", save_half_then_fill_the_disk)
    with pytest.raises(EditTunerError) as info:
        write_checkpoint(checkpoints, 2, files, keep_last=1)
    message = str(info.value)
    assert "step-2" in message and "the disk is full" in message and "free some disk space" in message
    assert f"the last good checkpoint is {checkpoints / 'step-1'}" in message and "--resume latest" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]      # no step-2, no temp directory
    assert checkpoint_steps(checkpoints) == [1]
    loaded = load_state(checkpoints / "step-1", "optimizer")
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["lr"] == [1e-4]
    # other OS errors get the same guarantees, without blaming the disk
    monkeypatch.setattr(checkpoint_module, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(EditTunerError, match="Permission denied; fix the problem") as info:
        write_checkpoint(checkpoints, 3, files)
    assert "disk is full" not in str(info.value) and checkpoint_steps(checkpoints) == [1]


def test_failed_swap_over_an_existing_checkpoint_restores_it(tmp_path, monkeypatch):
    """Re-saving step-N: if the final rename fails, the old step-N is put back under its name."""
    import edittuner.atomic as atomic_module
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, 5, lambda tmp: (tmp / "trainer_state.json").write_text('{"v": 1}'))
    real_replace, calls = os.replace, []

    def failing_second_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", failing_second_replace)
    with pytest.raises(EditTunerError, match="disk is full"):
        write_checkpoint(checkpoints, 5, lambda tmp: (tmp / "trainer_state.json").write_text('{"v": 2}'))
    monkeypatch.undo()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-5"]
    assert json.loads((checkpoints / "step-5/trainer_state.json").read_text()) == {"v": 1}


# ---------------------------------------------------------------------------------------------------------------
# No unsafe deserialisation in anything we ship

SCANNED = [ROOT / "edittuner", ROOT / "app_gradio.py", ROOT / "generate_dataset_json_mp.py", ROOT / "scripts",
           ROOT / "benchmarks"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _unsafe_calls(source: str, name: str) -> list[str]:
    """Every pickle-family import or call, torch.load without weights_only=True, numpy load with
    allow_pickle=True, yaml.load without a safe loader, yaml.unsafe_load and pandas.read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES or (module == "torch" and any(a.name == "load" for a in node.names)):
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            is_true = lambda key: isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True  # noqa: E731
            last = func.rsplit(".", 1)[-1]
            owner = func.rsplit(".", 1)[0] if "." in func else ""
            if owner.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}: {func}(...)")
            elif func == "torch.load" and not is_true("weights_only"):
                found.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("np", "numpy") and last == "load" and "allow_pickle" in kwargs \
                    and not (isinstance(kwargs["allow_pickle"], ast.Constant) and kwargs["allow_pickle"].value is False):
                found.append(f"{where}: {func}(allow_pickle=...)")
            elif owner == "yaml" and last in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
                found.append(f"{where}: {func}")
            elif owner == "yaml" and last in ("load", "load_all"):
                loader = kwargs.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if loader is None or ast.unparse(loader).rsplit(".", 1)[-1] not in ("SafeLoader", "CSafeLoader"):
                    found.append(f"{where}: {func} without Loader=yaml.SafeLoader")
            elif last in ("read_pickle", "from_pickle"):
                found.append(f"{where}: {func}")
    return found


def test_the_unsafe_load_scanner_catches_each_case():
    bad = """
import pickle
import dill as d
from joblib import load
from torch import load as tload
torch.load(path)
torch.load(path,
           weights_only=False)
np.load(path, allow_pickle=True)
numpy.load(path, allow_pickle=flag)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
pd.read_pickle(path)
marshal.loads(blob)
"""
    assert len(_unsafe_calls(bad, "bad.py")) == 13, _unsafe_calls(bad, "bad.py")
    good = """
torch.load(path, map_location="cpu", weights_only=True)
np.load(path)
np.load(path, allow_pickle=False)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
json.load(f)
"""
    assert _unsafe_calls(good, "good.py") == []


def test_no_unsafe_loads_in_anything_we_ship():
    files = [p for target in SCANNED for p in ([target] if target.is_file() else sorted(target.rglob("*")))
             if p.is_file()]
    assert any(p.name == "app_gradio.py" for p in files) and any(p.suffix == ".sh" for p in files)
    offenders = []
    for path in files:
        if path.suffix == ".py":
            offenders += _unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        elif path.suffix in (".sh", ".yaml", ".yml", ".toml"):
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if re.search(r"\bpickle\b|torch\.load\(|allow_pickle\s*=\s*True", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
