"""Datasets from other tools (DiffSynth-Studio metadata), several sources in one run (--datasets), aspect buckets
(phase 1's sizes, phase 2's one-bucket micro-batches) and the data order they give."""

import json
import math
from collections import Counter

import pytest
from PIL import Image

from edittuner.batching import DataOrder, bucket_batches, sample_at
from edittuner.dataset import load_dataset
from edittuner.errors import EditTunerError
from edittuner.images import ResizeConfig, bucket_size
from edittuner.sources import per_epoch, read_datasets_file


def _img(path, size=(64, 64), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---- DiffSynth-Studio metadata --------------------------------------------------------------------------------

@pytest.fixture
def diffsynth(tmp_path):
    """DiffSynth's layout: images under a base folder, the metadata file elsewhere, paths relative to the base."""
    base = tmp_path / "example_image_dataset"
    for name in ("edit/a.jpg", "edit/b.jpg", "edit/b2.jpg", "out/a.jpg", "out/b.jpg", "other/a.jpg"):
        _img(base / name)
    meta = tmp_path / "meta"
    meta.mkdir()
    return base, meta


def test_diffsynth_csv_json_jsonl_read_relative_to_the_base_path(diffsynth, capsys):
    base, meta = diffsynth
    rows = [{"image": "out/a.jpg", "prompt": "make it red", "edit_image": "edit/a.jpg"},
            {"image": "out/b.jpg", "prompt": "add, a hat", "edit_image": ["edit/b.jpg", "edit/b2.jpg"]},
            {"image": "other/a.jpg", "prompt": "p", "edit_image": "edit/a.jpg"}]   # a.jpg again: another stem
    (meta / "metadata.json").write_text(json.dumps(rows))
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (meta / "metadata.csv").write_text(
        'image,prompt,edit_image\nout/a.jpg,make it red,edit/a.jpg\n'
        'out/b.jpg,"add, a hat","[""edit/b.jpg"", ""edit/b2.jpg""]"\nother/a.jpg,p,edit/a.jpg\n', encoding="utf-8")
    for name in ("metadata.json", "metadata.jsonl", "metadata.csv"):
        samples = load_dataset(meta / name, base_path=base)
        assert [s.id for s in samples] == ["a", "b", "other/a"], name
        assert samples[1].prompt == "add, a hat"
        assert samples[1].edit_images == (base / "edit/b.jpg", base / "edit/b2.jpg")
        assert samples[0].image == base / "out/a.jpg" and samples[0].edit_images == (base / "edit/a.jpg",)
    assert capsys.readouterr().err == ""
    with pytest.raises(EditTunerError, match=r"metadata.csv, row 0: \"image\" .* does not exist"):
        load_dataset(meta / "metadata.csv")   # without the base folder the paths are the file's folder's
    (meta / "up.jsonl").write_text(json.dumps(dict(rows[0], image="../out/a.jpg")))
    with pytest.raises(EditTunerError, match="leaves --dataset_base_path"):
        load_dataset(meta / "up.jsonl", base_path=base / "edit")


def test_unknown_fields_warn_once_wrong_types_stay_errors(diffsynth, capsys):
    base, meta = diffsynth
    rows = [{"image": "out/a.jpg", "prompt": "p", "edit_image": "edit/a.jpg"},
            {"image": "out/b.jpg", "prompt": "p", "edit_image": "edit/b.jpg", "seed": 3, "caption_2": "x"},
            {"image": "other/a.jpg", "prompt": "p", "edit_image": "edit/a.jpg", "seed": 4}]
    (meta / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_dataset(meta / "m.jsonl", base_path=base)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.jsonl: ignoring unknown field(s)" in err[0]
    assert '"caption_2" (first in row 1)' in err[0] and '"seed" (first in row 1)' in err[0]
    (meta / "bad.csv").write_text("image,prompt,edit_image,width\nout/a.jpg,p,edit/a.jpg,wide\n")
    with pytest.raises(EditTunerError, match=r'bad.csv, row 0: "width" must be a whole number'):
        load_dataset(meta / "bad.csv", base_path=base)
    (meta / "bad.jsonl").write_text(json.dumps(dict(rows[0], edit_image={"a": 1})))
    with pytest.raises(EditTunerError, match=r'row 0: "edit_image" must list 1 to 3'):
        load_dataset(meta / "bad.jsonl", base_path=base)


# ---- the datasets file ----------------------------------------------------------------------------------------

def test_datasets_file_yaml_json_and_its_refusals(tmp_path):
    _img(tmp_path / "a/t.png"); _img(tmp_path / "a/s.png")
    (tmp_path / "a/dataset.json").write_text(json.dumps([{"prompt": "p", "image": "t.png", "edit_image": "s.png"}]))
    (tmp_path / "raw/target").mkdir(parents=True); (tmp_path / "raw/source").mkdir()
    (tmp_path / "d.yaml").write_text("sources:\n  - path: a/dataset.json\n    repeats: 2\n    max_pixels: 2048\n"
                                     "  - path: raw\n    reference_size: target\n    prompt: make it blue\n")
    first, second = read_datasets_file(tmp_path / "d.yaml", ResizeConfig(max_pixels=4096))
    assert (first.name, first.repeats, first.resize(ResizeConfig()).max_pixels) == ("a-dataset", 2, 2048)
    assert second.is_raw and second.name == "raw" and second.resize(ResizeConfig()).reference_size == "target"
    (tmp_path / "d.json").write_text(json.dumps([{"path": "a/dataset.json", "weight": 3, "name": "x"},
                                                 {"path": "raw", "weight": 1}]))
    assert [s.weight for s in read_datasets_file(tmp_path / "d.json")] == [3.0, 1.0]
    for text, message in [
            ([{"path": "a/dataset.json", "weight": 1}, {"path": "raw"}], "give every source a \"weight\""),
            ([{"path": "a/dataset.json", "repeat": 2}], r"unknown key\(s\) \['repeat'\]"),
            ([{"path": "a/dataset.json"}, {"path": "a/dataset.json"}], "several sources are named"),
            ([{"path": "a/dataset.json", "repeats": 1.5}], "\"repeats\" must be a whole number"),
            ([{"path": "a/dataset.json", "max_pixels": 100}], "--max_pixels 100: must be at least 256"),
            ([{"path": "a/dataset.json", "reference_size": "loose"}], "choose own or target"),
            ([{"path": "nowhere.csv"}], "no such file or folder")]:
        (tmp_path / "bad.json").write_text(json.dumps(text))
        with pytest.raises(EditTunerError, match=message):
            read_datasets_file(tmp_path / "bad.json", ResizeConfig(max_pixels=4096))


# ---- data order: weights, buckets, resume ----------------------------------------------------------------------

def test_source_weights_and_repeats_give_their_proportions():
    sizes = [5, 3]
    for sources, expected in (([{"weight": 3}, {"weight": 1}], [6, 2]), ([{"repeats": 2}, {"repeats": 1}], [10, 3])):
        slots = per_epoch(sources, sizes)
        assert slots == expected
        order = DataOrder(sizes, slots, seed=4)
        epochs = 15
        drawn = [order.index(p) for p in range(sum(slots) * epochs)]
        share = sum(1 for i in drawn if i < 5) / len(drawn)
        assert share == pytest.approx(slots[0] / sum(slots))
        # each source goes through all its samples before repeating any: equal counts over whole cycles
        counts = Counter(drawn)
        assert len({counts[i] for i in range(5)}) == 1 and len({counts[i] for i in range(5, 8)}) == 1
    # mixed, not blocked: both sources appear within the first epoch's first half
    order = DataOrder(sizes, [6, 2], seed=0)
    assert {order.index(p) < 5 for p in range(8)} == {True, False}


def test_bucket_batches_are_full_and_the_order_is_a_function_of_seed_and_position():
    buckets = ["a", "b", "a", "a", "b", "c", "a", "c", "c", "a"]
    batch, positions = 3, range(3 * 40)
    order = DataOrder([10], None, seed=7, batch=batch, buckets=buckets)
    drawn = [order.index(p) for p in positions]
    for start in range(0, len(drawn), batch):
        assert len({buckets[i] for i in drawn[start:start + batch]}) == 1, drawn[start:start + batch]
    assert set(drawn) == set(range(10))
    # resume: a fresh order asked from the middle, backwards, gives the same samples
    fresh = DataOrder([10], None, seed=7, batch=batch, buckets=buckets)
    assert [fresh.index(p) for p in reversed(positions)] == drawn[::-1]
    assert drawn != [DataOrder([10], None, seed=8, batch=batch, buckets=buckets).index(p) for p in positions]
    # one bucket, batch 1, or no buckets: the plain per-epoch permutation of a single cache
    for kwargs in ({"batch": 1, "buckets": buckets}, {"batch": 2, "buckets": ["x"] * 10}, {"batch": 3}):
        plain = DataOrder([10], None, seed=7, **kwargs)
        assert [plain.index(p) for p in range(40)] == [sample_at(p, 10, 7) for p in range(40)]
    # several sources with buckets: weights hold per epoch, batches stay full
    mixed = DataOrder([6, 4], [6, 8], seed=1, batch=2, buckets=buckets)
    drawn = [mixed.index(p) for p in range(200)]
    assert all(buckets[drawn[i]] == buckets[drawn[i + 1]] for i in range(0, 200, 2))
    assert bucket_batches([0, 1, 2], ["a", "b", "a"], 2) == [0, 2, 1, 1]


@pytest.mark.parametrize("size", [(1000, 1000), (1920, 1080), (333, 999), (97, 3000), (4000, 20)])
@pytest.mark.parametrize("grid", [32, 64])
def test_bucket_sizes_on_the_grid_near_the_budget(size, grid):
    budget = 1024 * 1024
    w, h = bucket_size(*size, budget, grid)
    assert w % grid == 0 and h % grid == 0 and w * h <= budget
    ratio = max(size) / min(size)
    if ratio < 4:   # ordinary shapes: near the budget, aspect kept to within one grid step per side
        assert w * h >= 0.85 * budget
        assert abs(math.log(w / h) - math.log(size[0] / size[1])) < math.log(1 + grid / min(w, h)) * 2
    # the brute-force best candidate on the grid within budget is no closer in aspect by more than a grid step
    candidates = [(a, b) for a in range(grid, 4097, grid) for b in range(grid, 4097, grid) if a * b <= budget
                  and a * b >= 0.85 * budget]
    if candidates and ratio < 4:
        best = min(candidates, key=lambda c: abs(math.log(c[0] / c[1]) - math.log(size[0] / size[1])))
        assert abs(math.log(w / h / (best[0] / best[1]))) < 2 * grid / min(w, h)
    resize = ResizeConfig(max_pixels=budget, multiple=grid if grid == 64 else 16, buckets=True)
    assert resize.target_size(*size) == (w, h) and resize.grid == grid
    assert ResizeConfig(max_pixels=budget, reference_size="target").reference_size_for(5, 7, (w, h)) == (w, h)
    assert "buckets" not in ResizeConfig().as_dict() and ResizeConfig(buckets=True).as_dict()["buckets"] is True


# ---- phase 1 and 2 on several sources ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources_cache(tmp_path_factory):
    """Three sources: a dataset JSON (targets 96x64, references resized to the target), DiffSynth metadata (own
    reference aspect, a larger budget, twice per epoch) and a raw folder; aspect buckets on."""
    from edittuner.cache import PrecomputeConfig, precompute_cache
    from edittuner.models import ModelSource
    root = tmp_path_factory.mktemp("sources")
    rows = []
    for i in range(3):
        _img(root / f"a/t{i}.png", (96, 64), (40 * i, 90, 200)); _img(root / f"a/s{i}.png", (48, 32), (10, 40 * i, 9))
        rows.append({"prompt": f"edit {i}", "image": f"t{i}.png", "edit_image": [f"s{i}.png"]})
    (root / "a/dataset.json").write_text(json.dumps(rows))
    for i in range(2):
        _img(root / f"ds/img/t{i}.png", (64, 64), (9, 9, 60 * i)); _img(root / f"ds/img/e{i}.png", (40, 80))
    (root / "meta.csv").write_text("image,prompt,edit_image,extra\nimg/t0.png,blue,img/e0.png,1\n"
                                   "img/t1.png,green,img/e1.png,2\n")
    for i in range(2):
        _img(root / f"raw/target/r{i}.png", (64, 64), (200, 9, 60 * i)); _img(root / f"raw/source/r{i}.png")
    (root / "datasets.yaml").write_text(
        "sources:\n  - path: a/dataset.json\n    reference_size: target\n    max_pixels: 6144\n"
        "  - path: meta.csv\n    base_path: ds\n    name: diffsynth\n    repeats: 2\n"
        "  - path: raw\n    prompt: make it red\n")
    resize = ResizeConfig(max_pixels=4096, buckets=True)
    cfg = PrecomputeConfig(datasets=root / "datasets.yaml", cache_dir=root / "cache", model=ModelSource(),
                           resize=resize)
    result = precompute_cache(cfg, progress=False)
    return root / "cache", resize, result


def test_each_source_has_its_cache_sizes_and_slots(sources_cache):
    from edittuner.cache import open_cache
    cache, resize, result = sources_cache
    assert sorted(result["sources"]) == ["a-dataset", "diffsynth", "raw"]
    shapes = {}
    for name in result["sources"]:
        manifest = json.loads((cache / "sources" / name / "manifest.json").read_text())
        shapes[name] = {(tuple(r["shapes"]["target"]), tuple(r["shapes"]["ref.0"])) for r in manifest["samples"]}
    # 96x64 at its own budget 6144: kept; the 48x32 reference resized to the target's size
    assert shapes["a-dataset"] == {((16, 8, 12), (16, 8, 12))}
    # 64x64 at 4096; the 40x80 reference keeps its aspect in its bucket: 4096 px -> 45x90 -> 32x64 on the grid
    assert shapes["diffsynth"] == {((16, 8, 8), (16, 8, 4))}
    assert shapes["raw"] == {((16, 8, 8), (16, 8, 8))}
    reader = open_cache(cache, expected_resize=resize)
    assert reader.sizes == [3, 2, 2] and reader.per_epoch == [3, 4, 2] and len(reader.records) == 7
    assert reader.load(4)["target"].shape == (16, 8, 8)
    with pytest.raises(EditTunerError, match="resize settings"):
        open_cache(cache, expected_resize=ResizeConfig(max_pixels=4096))   # phase 2 without --buckets on


def test_training_on_sources_in_full_buckets_resumes_exactly(sources_cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    from edittuner.trainer import TrainConfig, train
    cache, resize, _ = sources_cache

    def run(out, steps, resume=None):
        cfg = TrainConfig(cache_dir=cache, output_dir=out, resize=resize, max_steps=steps, learning_rate=1e-3,
                          rank=4, gradient_accumulation=1, batch_size=2, gradient_checkpointing=False,
                          eval_samples=0, save_every=2, validation_steps=0, resume=resume)
        return train(cfg, progress=False)

    full = run(tmp_path / "full", 4)
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "full/checkpoints/step-2"))
    assert math.isfinite(full["loss"]) and resumed["loss"] == full["loss"]
    a, b = load_file(tmp_path / "full/lora.safetensors"), load_file(tmp_path / "resumed/lora.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
