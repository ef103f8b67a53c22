import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache
from edittuner.families.qwen_image_edit.encoding import make_encoding_pipe
from edittuner.images import prepare_images
from edittuner.dataset import load_dataset
from edittuner.errors import EditTunerError
from edittuner.images import ResizeConfig
from edittuner.models import ModelSource
from edittuner.families.qwen_image_edit.tiny import build_tiny_encoders

from conftest import ROOT, TINY_PIXELS, absolute_rows


def test_cache_contents_match_the_engine_pipeline(demo_dir, demo_cache, resize):
    """Each cached tensor equals what diffsynth's own pipeline units compute for that sample."""
    from diffsynth.pipelines.qwen_image import QwenImageUnit_EditImageEmbedder, QwenImageUnit_PromptEmbedder
    samples = load_dataset(demo_dir / "dataset.json")
    manifest = json.loads((demo_cache / "manifest.json").read_text())
    assert [r["id"] for r in manifest["samples"]] == [s.id for s in samples]
    pipe = make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)
    for sample, record in zip(samples, manifest["samples"]):
        cached = load_file(demo_cache / record["file"])
        target, refs, mask = prepare_images(sample, resize)
        assert target.size[0] * target.size[1] <= TINY_PIXELS and target.size[0] % 16 == 0
        with torch.no_grad():
            engine_prompt = QwenImageUnit_PromptEmbedder().process(pipe, sample.prompt, edit_image=refs)["prompt_emb"][0]
            engine_refs = QwenImageUnit_EditImageEmbedder().process(pipe, refs, False, 128, 64, False)["edit_latents"]
            engine_target = pipe.vae.encode(pipe.preprocess_image(target))[0]
        torch.testing.assert_close(cached["prompt_emb"], engine_prompt, rtol=0, atol=0)
        for k, ref in enumerate(engine_refs):
            torch.testing.assert_close(cached[f"ref.{k}"], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(cached["target"], engine_target, rtol=0, atol=0)
        assert cached["white"].shape == cached["target"].shape
        h, w = cached["target"].shape[-2:]
        if sample.mask is None:   # a demo photo without red: no mask
            assert "mask" not in cached
        else:
            assert cached["mask"].shape == (1, h, w) and cached["mask"].max() == 1 and cached["mask"].min() == 0
        assert record["hashes"]["image"] and len(record["hashes"]["edit_image"]) == len(sample.edit_images)
        assert record["sources"]["image"] == str(sample.image)
    # two references where the row has two (the "Picture 2" tint samples)
    assert any("ref.1" in load_file(demo_cache / r["file"]) for r in manifest["samples"])


def test_white_latents_are_the_vae_of_a_white_image(demo_cache):
    record = json.loads((demo_cache / "manifest.json").read_text())["samples"][0]
    cached = load_file(demo_cache / record["file"])
    w, h = record["target_size"]
    vae = build_tiny_encoders(0).vae
    with torch.no_grad():
        white = vae.encode(torch.ones(1, 3, h, w))[0]
    torch.testing.assert_close(cached["white"], white, rtol=0, atol=0)


def test_manifest_records_model_and_settings(demo_cache, resize):
    manifest = json.loads((demo_cache / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["model_version"] == "2511"
    assert manifest["identity"]["resize"] == resize.as_dict()
    assert manifest["identity"]["encoders"].startswith("tiny:")
    assert manifest["identity"]["templates"].startswith("diffsynth-2.1.12:")
    assert not list(Path(demo_cache).rglob("*.tmp"))


def _copy_dataset(demo_dir, tmp_path):
    import shutil
    shutil.copytree(demo_dir, tmp_path / "demo")
    return tmp_path / "demo" / "dataset.json"


def test_second_run_skips_and_changed_sources_are_reencoded(demo_dir, tmp_path, resize):
    dataset = _copy_dataset(demo_dir, tmp_path)
    cfg = PrecomputeConfig(dataset_json=dataset, cache_dir=tmp_path / "cache", model=ModelSource(), resize=resize)
    first = precompute_cache(cfg, progress=False)
    assert first["encoded"] == 8 and first["skipped"] == 0
    again = precompute_cache(cfg, progress=False)
    assert again["encoded"] == 0 and again["skipped"] == 8
    sample = load_dataset(dataset)[2]
    Image.new("RGB", Image.open(sample.image).size, (0, 0, 255)).save(sample.image)
    third = precompute_cache(cfg, progress=False)
    assert third["encoded"] == 1 and third["skipped"] == 7


def test_other_resize_settings_or_encoders_are_refused(demo_cache, demo_dir, tmp_path):
    other = ResizeConfig(max_pixels=64 * 64)
    with pytest.raises(EditTunerError, match="resize settings"):
        CacheReader(demo_cache, expected_resize=other)
    with pytest.raises(EditTunerError, match="other encoders"):
        CacheReader(demo_cache, expected_encoders=ModelSource(tiny_seed=1).encoder_fingerprint())
    with pytest.raises(EditTunerError, match="other encoders or resize settings"):
        precompute_cache(PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=demo_cache,
                                          model=ModelSource(tiny_seed=1), resize=other), progress=False)
    with pytest.raises(EditTunerError, match="no manifest.json"):
        CacheReader(tmp_path)


def test_killed_run_resumes_to_the_same_cache(demo_dir, tmp_path, resize):
    """SIGKILL phase 1 mid-way, re-run it: no half-written file, and the result equals an uninterrupted cache."""
    big = [dict(row, id=f"r{i:02d}") for i, row in enumerate(absolute_rows(demo_dir) * 2)]
    dataset = tmp_path / "big.json"
    dataset.write_text(json.dumps(big))
    reference = tmp_path / "reference"
    precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=reference, model=ModelSource(), resize=resize),
                     progress=False)
    cache = tmp_path / "killed"
    cmd = [sys.executable, "-m", "edittuner", "precompute", "--dataset_json", str(dataset), "--cache_dir", str(cache),
           "--max_pixels", str(TINY_PIXELS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cache / "samples").glob("*.safetensors"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list((cache / "samples").glob("*.safetensors"))
    assert 3 <= len(done) < len(big) and not (cache / "manifest.json").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"reused {len(done)}" in rerun.stdout
    for record in json.loads((reference / "manifest.json").read_text())["samples"]:
        a, b = load_file(reference / record["file"]), load_file(cache / record["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(cache.rglob("*.tmp"))
