import json
from pathlib import Path

import pytest
from PIL import Image

from edittuner.dataset import GenerateConfig, generate_dataset_json, load_dataset
from edittuner.errors import EditTunerError


def _img(path: Path, size=(80, 64), color=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def raw(tmp_path):
    r = tmp_path / "raw"
    # a: one reference (jpg target, png source: pairing ignores extensions), prompt from .txt, mask
    _img(r / "target/a.jpg"); _img(r / "source/a.png"); _img(r / "mask/a.png")
    (r / "target/a.txt").write_text("make it red\n")
    # b: three references and ref_gt, prompt from prompts.jsonl
    for role in ("target", "source", "source_2", "source_3", "ref_gt"):
        _img(r / role / "b.png")
    # c: two references, prompt from --prompt
    for role in ("target", "source", "source_2"):
        _img(r / role / "c.webp", fmt="WEBP")
    # skips
    _img(r / "target/no_source.png")                                         # missing partner
    _img(r / "source/no_target.png")                                         # missing partner (other side)
    (r / "target").joinpath("zero.png").write_bytes(b"")                     # zero-byte
    _img(r / "source/zero.png")
    _img(r / "target/tiny.png", size=(20, 20)); _img(r / "source/tiny.png", size=(20, 20))   # too small
    _img(r / "target/badmask.png"); _img(r / "source/badmask.png"); _img(r / "mask/badmask.png", size=(64, 64))
    good = r / "target/trunc.png"; _img(good, size=(256, 256))
    good.write_bytes(good.read_bytes()[:200]); _img(r / "source/trunc.png")  # truncated
    (r / "target/trunc.txt").write_text("p")
    (r / "prompts.jsonl").write_text(json.dumps({"id": "b", "prompt": "use all three"}) + "\n")
    return r


def test_pairing_references_masks_and_skip_report(raw, tmp_path):
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=tmp_path / "out/ds.json", prompt="default prompt",
                                                  verify=True), progress=False)
    rows = json.loads((tmp_path / "out/ds.json").read_text())
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["a", "b", "c"]
    assert by_id["a"]["prompt"] == "make it red" and len(by_id["a"]["edit_image"]) == 1
    assert by_id["a"]["back_mask"].endswith("mask/a.png") and by_id["a"]["image"].endswith("target/a.jpg")
    assert by_id["b"]["prompt"] == "use all three"
    assert [Path(p).parent.name for p in by_id["b"]["edit_image"]] == ["source", "source_2", "source_3"]
    assert by_id["b"]["ref_gt"].endswith("ref_gt/b.png")
    assert by_id["c"]["prompt"] == "default prompt" and len(by_id["c"]["edit_image"]) == 2
    assert (by_id["a"]["width"], by_id["a"]["height"]) == (80, 64)
    skipped = {s["id"]: s["reason"] for s in json.loads(report.skipped_output.read_text())}
    assert skipped["no_source"].startswith("missing partner") and skipped["no_target"].startswith("missing partner")
    assert skipped["zero"].startswith("unreadable") and "empty" in skipped["zero"]
    assert skipped["trunc"].startswith("unreadable")
    assert skipped["tiny"].startswith("too small")
    assert skipped["badmask"].startswith("size mismatch")
    # rows resolve back to existing files
    samples = load_dataset(tmp_path / "out/ds.json")
    assert all(p.is_file() for s in samples for p in s.files())


def test_output_identical_with_one_and_two_workers(raw, tmp_path):
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.json"
        generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="p", workers=workers), progress=False)
        outputs.append((out.read_bytes(), out.with_name(out.stem + "_skipped.json").read_bytes()))
    assert outputs[0] == outputs[1]


def test_header_only_without_verify_and_empty_prompt_skip(raw, tmp_path):
    out = tmp_path / "nv.json"
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out), progress=False)
    skipped = {s["id"]: s["reason"] for s in report.skipped}
    assert skipped["c"].startswith("empty prompt")          # no .txt, no jsonl entry, no --prompt
    assert "trunc" in {r["id"] for r in json.loads(out.read_text())}  # header is fine; only --verify decodes


def test_strict_size_and_split(raw, tmp_path):
    _img(raw / "target/d.png", size=(96, 96)); _img(raw / "source/d.png", size=(64, 64))
    out = tmp_path / "s.json"
    report = generate_dataset_json(GenerateConfig(raw_dir=raw, output=out, prompt="p", strict_size=True,
                                                  val_fraction=0.5, split_seed=3), progress=False)
    assert any(s["id"] == "d" and s["reason"].startswith("size mismatch") for s in report.skipped)
    train = json.loads(out.read_text()); val = json.loads(out.with_name("s_val.json").read_text())
    assert len(train) + len(val) == 3 and len(val) == 2 and not {r["id"] for r in train} & {r["id"] for r in val}


def test_bad_raw_folder_and_flags(tmp_path):
    with pytest.raises(EditTunerError, match="target/ and source/"):
        GenerateConfig(raw_dir=tmp_path, output=tmp_path / "x.json")
    with pytest.raises(EditTunerError, match="--workers"):
        GenerateConfig(raw_dir=tmp_path, output=tmp_path / "x.json", workers=0)


@pytest.mark.parametrize("row, message", [
    ({"image": "t.png", "edit_image": ["s.png"]}, 'missing field "prompt"'),
    ({"prompt": " ", "image": "t.png", "edit_image": ["s.png"]}, "empty prompt"),
    ({"prompt": "p", "image": "t.png", "edit_image": ["s.png"], "width": "80"}, '"width" must be a whole number'),
    ({"prompt": ["p"], "image": "t.png", "edit_image": ["s.png"]}, '"prompt" must be text'),
    ({"prompt": "p", "image": "t.png", "edit_image": [3]}, r'"edit_image\[0\]" must be a file path'),
    ({"prompt": "p", "image": "t.png", "edit_image": "s.png", "back_mask": 1}, '"back_mask" must be a file path'),
    ({"prompt": "p", "image": "t.png", "edit_image": ["gone.png"]}, "does not exist"),
    ({"prompt": "p", "image": "t.png", "edit_image": []}, "1 to 3 reference"),
])
def test_bad_dataset_rows(tmp_path, row, message):
    _img(tmp_path / "t.png"); _img(tmp_path / "s.png")
    (tmp_path / "ds.json").write_text(json.dumps([row]))
    with pytest.raises(EditTunerError, match=message) as info:
        load_dataset(tmp_path / "ds.json")
    assert "row 0" in str(info.value) and "ds.json" in str(info.value)


def test_duplicate_ids_and_bad_json(tmp_path):
    _img(tmp_path / "t.png"); _img(tmp_path / "s.png")
    row = {"prompt": "p", "image": "t.png", "edit_image": "s.png"}
    (tmp_path / "dup.json").write_text(json.dumps([row, row]))
    with pytest.raises(EditTunerError, match="duplicate sample id"):
        load_dataset(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(EditTunerError, match="not valid JSON"):
        load_dataset(tmp_path / "bad.json")
