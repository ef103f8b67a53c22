"""The demo that visibly learns: the tiny VAEs reconstruct the demo photos, the tiny fingerprint follows their
weights, and previews show source and target pixels."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from edittuner.cache import CacheReader, record_pixels
from edittuner.dataset import load_dataset
from edittuner.families import model_spec
from edittuner.images import prepare_images
from edittuner.models import ModelSource


# Mean round-trip PSNR (dB) the committed fits reach (`python scripts/fit_tiny_vae.py --family qwen --steps 1500`:
# 22.47; `--family longcat --steps 1000`: 21.50). Issue 16 asks for at least 20. A random VAE gives about 10.
MIN_MEAN_PSNR = {"2511": 20.0, "longcat": 20.0}


@pytest.mark.parametrize("version", ["2511", "longcat"])
def test_tiny_vaes_reconstruct_the_demo_photos(demo_dir, resize, version):
    """Phase 1's own encode and the previews' decode give the demo pictures back (PSNR from scikit-image)."""
    spec = model_spec(version)
    encoder = spec.family.sample_encoder(spec.preset, 0)
    encoders = ModelSource(family=spec.family.name).load_encoders(torch.float32, "cpu")
    encoder.attach(encoders, "cpu", torch.float32)
    scores = []
    for sample in load_dataset(demo_dir / "dataset.json") + load_dataset(demo_dir / "dataset_val.json"):
        target, refs, _ = prepare_images(sample, resize)
        for image in (target, *refs):
            with torch.no_grad():
                back = spec.family.decode(encoders.vae, encoder.encode_image(image)[None])
            scores.append(peak_signal_noise_ratio(np.asarray(image), np.asarray(back), data_range=255))
    assert np.mean(scores) >= MIN_MEAN_PSNR[version] and min(scores) >= 11, scores


@pytest.mark.parametrize("module", ["qwen_image_edit", "longcat_image_edit"])
def test_tiny_fingerprint_follows_the_vae_weights(module, tmp_path, monkeypatch):
    """Caches are keyed by the fingerprint: other VAE weights (one value changed) must give another fingerprint."""
    import importlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tiny = importlib.import_module(f"edittuner.families.{module}.tiny")
    before = tiny.tiny_fingerprint(0)
    state = load_file(tiny.TINY_VAE_WEIGHTS)
    with safe_open(str(tiny.TINY_VAE_WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1e-3
    save_file(state, str(tmp_path / "tiny_vae.safetensors"), metadata=metadata)
    monkeypatch.setattr(tiny, "TINY_VAE_WEIGHTS", tmp_path / "tiny_vae.safetensors")
    assert tiny.tiny_fingerprint(0) != before
    monkeypatch.undo()
    assert tiny.tiny_fingerprint(0) == before


def test_record_pixels_are_phase_1s_images_or_none_when_the_sources_changed(demo_dir, demo_cache, resize, tmp_path):
    reader = CacheReader(demo_cache)
    record = reader.records[0]
    target, refs, mask = record_pixels(record, resize)
    sample = next(s for s in load_dataset(demo_dir / "dataset.json") if s.id == record["id"])
    want_target, want_refs, want_mask = prepare_images(sample, resize)
    assert np.array_equal(np.asarray(target), np.asarray(want_target)) and list(target.size) == record["target_size"]
    assert [np.asarray(r).tolist() for r in refs] == [np.asarray(r).tolist() for r in want_refs]
    assert np.array_equal(np.asarray(mask), np.asarray(want_mask))
    # A source edited since phase 1 (here: a copy with one pixel changed), or gone: no pixels, the caller falls back.
    copy = tmp_path / "target.png"
    shutil.copy(record["sources"]["image"], copy)
    pixels = np.asarray(Image.open(copy)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(copy)
    assert record_pixels({**record, "sources": {**record["sources"], "image": str(copy)}}, resize) is None
    assert record_pixels({**record, "sources": {**record["sources"], "image": str(tmp_path / "gone.png")}},
                         resize) is None
