"""ref_gt: phase 1 caches its latents and the white latents of its size; the LBM sub stream bridges white -> ref_gt
with --sub_stream_target ref_gt, rows without one fall back to the target and are counted in summary.json; a cache
from before ref_gt was encoded keeps its rows without one and is refused for ref_gt until phase 1 re-runs."""

import json
import shutil

import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from conftest import absolute_rows, tiny_dit_with_lora
from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache
from edittuner.configs import BridgeConfig
from edittuner.dataset import load_dataset
from edittuner.errors import EditTunerError
from edittuner.families import model_spec
from edittuner.images import fit_size, load_rgb
from edittuner.models import ModelSource
from edittuner.objectives import LatentBridgeMatching

# 96x96 demo rows with one reference (one latent shape): a ref_gt at the target's size, one of another size, none.
IDS = ("00_astronaut", "04_hubble_deep_field", "05_immunohistochemistry")
OTHER_SIZE = (64, 96)   # the second row's ref_gt: latents 12 x 8, the target's 12 x 12
# t = 0 and sigma = 0: every draw sits at its start z0, and the regression target is z0 - z1.
AT_START = dict(sigma=0.0, timestep_sampling="discrete", discrete_timesteps=(0.0,), discrete_probabilities=(1.0,))


def _rows(demo_dir, work, with_ref_gt: bool) -> list[dict]:
    rows = []
    for row in absolute_rows(demo_dir, ids=IDS):
        source = Image.open(row["edit_image"][0]).convert("RGB")
        if with_ref_gt and row["id"] == IDS[0]:
            ImageOps.mirror(source).save(work / "gt_same.png")
            row["ref_gt"] = str(work / "gt_same.png")
        elif with_ref_gt and row["id"] == IDS[1]:
            source.crop((16, 0, 16 + OTHER_SIZE[0], OTHER_SIZE[1])).save(work / "gt_other.png")
            row["ref_gt"] = str(work / "gt_other.png")
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def ref_gt_cache(demo_dir, resize, tmp_path_factory):
    work = tmp_path_factory.mktemp("ref_gt")
    (work / "dataset.json").write_text(json.dumps(_rows(demo_dir, work, True)))
    (work / "plain.json").write_text(json.dumps(_rows(demo_dir, work, False)))
    precompute_cache(PrecomputeConfig(dataset_json=work / "dataset.json", cache_dir=work / "cache",
                                      model=ModelSource(), resize=resize), progress=False)
    return work


def _lbm(**bridge) -> LatentBridgeMatching:
    return LatentBridgeMatching(BridgeConfig(**bridge), model_spec("2511"))


def test_cache_holds_ref_gt_latents_and_the_white_latents_of_its_size(ref_gt_cache, resize):
    """Bitwise the engine's VAE encoding (diffsynth's preprocess_image + QwenImageVAE.encode) of ref_gt sized as
    a target, and of an all-ones (white) image of that size; rows without a ref_gt hold neither."""
    from edittuner.families.qwen_image_edit.encoding import make_encoding_pipe
    from edittuner.families.qwen_image_edit.tiny import build_tiny_encoders

    manifest = json.loads((ref_gt_cache / "cache/manifest.json").read_text())
    assert manifest["ref_gt_encoded"] is True
    pipe = make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)
    samples = load_dataset(ref_gt_cache / "dataset.json")
    for sample, record in zip(samples, manifest["samples"]):
        cached = load_file(ref_gt_cache / "cache" / record["file"])
        assert record["sources"]["ref_gt"] == (str(sample.ref_gt) if sample.ref_gt else None)
        if sample.ref_gt is None:
            assert "ref_gt" not in cached and "ref_gt_white" not in cached and "ref_gt" not in record["hashes"]
            continue
        image = load_rgb(sample.ref_gt)
        image = image.resize(fit_size(*image.size, resize.max_pixels, resize.multiple))
        w, h = image.size
        with torch.no_grad():
            expected = pipe.vae.encode(pipe.preprocess_image(image))[0]
            white = pipe.vae.encode(torch.ones(1, 3, h, w))[0]
        assert torch.equal(cached["ref_gt"], expected) and torch.equal(cached["ref_gt_white"], white)
        assert cached["ref_gt"].shape[-2:] == (h // 8, w // 8) and record["hashes"]["ref_gt"]
    shapes = [r["shapes"].get("ref_gt") for r in manifest["samples"]]
    assert shapes == [[16, 12, 12], [16, OTHER_SIZE[1] // 8, OTHER_SIZE[0] // 8], None]


def test_an_older_cache_keeps_rows_without_ref_gt_and_is_refused_for_ref_gt_until_phase_1_reruns(ref_gt_cache,
                                                                                                tmp_path, resize):
    """A cache whose rows were encoded without their ref_gt (as before phase 1 encoded it): phase 2 with
    --sub_stream_target ref_gt refuses its manifest, naming the command; the re-run re-encodes only the rows
    that have a ref_gt."""
    cache = tmp_path / "cache"
    shutil.copytree(ref_gt_cache / "cache", cache)
    plain = PrecomputeConfig(dataset_json=ref_gt_cache / "plain.json", cache_dir=cache, model=ModelSource(),
                             resize=resize)
    assert precompute_cache(plain, progress=False)["encoded"] == 2   # ref_gt dropped from two rows: re-encoded
    manifest = json.loads((cache / "manifest.json").read_text())
    assert not any("ref_gt" in r["shapes"] for r in manifest["samples"])
    del manifest["ref_gt_encoded"]                                     # what an older phase 1 wrote
    (cache / "manifest.json").write_text(json.dumps(manifest))
    _lbm().check_cache(CacheReader(cache))                             # the target as endpoint: fine
    with pytest.raises(EditTunerError, match=r"did not encode ref_gt images; re-run `edittuner precompute` with the "
                                             r"same flags on this --cache_dir"):
        _lbm(sub_stream_target="ref_gt").check_cache(CacheReader(cache))
    again = precompute_cache(PrecomputeConfig(dataset_json=ref_gt_cache / "dataset.json", cache_dir=cache,
                                              model=ModelSource(), resize=resize), progress=False)
    assert (again["encoded"], again["skipped"]) == (2, 1)
    objective = _lbm(sub_stream_target="ref_gt")
    objective.check_cache(CacheReader(cache))
    assert objective.fallback_rows == [IDS[2]] and objective.summary() == {"sub_stream_fallback_rows": 1}


def test_a_cache_without_any_ref_gt_is_refused_for_ref_gt(demo_cache):
    with pytest.raises(EditTunerError, match="no sample of cache .* has a ref_gt image"):
        _lbm(sub_stream_target="ref_gt").check_cache(CacheReader(demo_cache))


def test_sub_stream_target_is_ref_gt_when_present_and_the_target_otherwise(ref_gt_cache):
    """All draws in the sub stream at t = 0 with a zero prediction: each loss is the MSE of z0 - z1, so it shows
    which endpoint each row bridged to. ref_gt rows: white of ref_gt's size -> ref_gt, unmasked (the mask covers
    the target); the row without: white -> target, mask-weighted as before. The ref_gt of another size runs in a
    forward of its own, with the conditioning for its size."""
    reader = CacheReader(ref_gt_cache / "cache")
    samples = [reader.load(i) for i in range(3)]
    calls = []

    def zero(latents, timestep, **conditioning):
        calls.append((tuple(latents.shape), conditioning["height"], conditioning["width"]))
        return torch.zeros_like(latents)

    plain = lambda z0, z1: float(((z0 - z1) ** 2).mean())  # noqa: E731

    def weighted(z0, z1, mask):
        if mask is None:   # a demo photo without red has no mask: plain MSE
            return plain(z0, z1)
        weight = 1 + mask.expand_as(z0)   # masked_weight 2, unmasked 1
        return float(((z0 - z1) ** 2 * weight).mean() / weight.mean())

    settings = dict(AT_START, sub_stream_probability=1.0, masked_weight=2.0)
    losses = _lbm(sub_stream_target="ref_gt", **settings).losses(zero, samples, [0, 1, 2], "cpu", torch.float32)
    a, b, c = samples
    expected = [plain(a["ref_gt_white"], a["ref_gt"]), plain(b["ref_gt_white"], b["ref_gt"]),
                weighted(c["white"], c["target"], c["mask"])]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert calls == [((2, 16, 12, 12), 96, 96), ((1, 16, 12, 8), 96, 64)]
    calls.clear()
    losses = _lbm(**settings).losses(zero, samples, [0, 1, 2], "cpu", torch.float32)
    assert losses.tolist() == pytest.approx([weighted(s["white"], s["target"], s.get("mask")) for s in samples], rel=1e-6)
    assert calls == [((3, 16, 12, 12), 96, 96)]


def test_a_batch_with_ref_gt_of_another_size_equals_the_engine_per_sample(ref_gt_cache):
    """The tiny DiT, a batch of three mixing streams (main, and sub to ref_gt of two sizes): each loss equals the
    engine's model_fn_qwen_image on that sample alone, at its endpoint's size."""
    from diffsynth.pipelines.qwen_image import model_fn_qwen_image

    from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser
    reader = CacheReader(ref_gt_cache / "cache")
    samples = [reader.load(i) for i in range(3)]
    dit = tiny_dit_with_lora()
    objective = _lbm(sub_stream_target="ref_gt", sigma=0.0, sub_stream_probability=0.5)
    seeds = [0, 3, 1]   # these draws: sub, sub, main
    with torch.no_grad():
        losses = objective.losses(DiTDenoiser(dit), samples, seeds, "cpu", torch.float32)
    for sample, seed, loss, sub in zip(samples, seeds, losses, (True, True, False)):
        torch.manual_seed(seed)
        assert (float(torch.rand(())) < 0.5) == sub
        t = objective.settings.discrete_timesteps[int(torch.multinomial(torch.tensor([0.25] * 4), 1))]
        z0, z1 = (sample["ref_gt_white"], sample["ref_gt"]) if sub else (sample["ref.0"], sample["target"])
        z_t = ((1 - t) * z0 + t * z1)[None]
        with torch.no_grad():
            prediction = model_fn_qwen_image(
                dit=dit, latents=z_t, timestep=torch.tensor([1000.0 * (1 - t)]), prompt_emb=sample["prompt_emb"][None],
                prompt_emb_mask=torch.ones(1, sample["prompt_emb"].shape[0], dtype=torch.long),
                height=z_t.shape[-2] * 8, width=z_t.shape[-1] * 8, edit_latents=[sample["ref.0"][None]],
                zero_cond_t=True)
        mse = ((prediction - (z0 - z1)[None]) ** 2).mean()
        torch.testing.assert_close(loss, mse, rtol=1e-5, atol=1e-7)


def test_an_lbm_run_counts_the_rows_that_fall_back_to_the_target(ref_gt_cache, resize, tmp_path, capsys):
    from edittuner.trainer import TrainConfig, train
    out = tmp_path / "run"
    train(TrainConfig(cache_dir=ref_gt_cache / "cache", output_dir=out, resize=resize, max_steps=1, rank=4,
                      learning_rate=1e-3, gradient_accumulation=1, eval_samples=0, validation_steps=0,
                      gradient_checkpointing=False, objective="lbm",
                      bridge=BridgeConfig(sub_stream_target="ref_gt", sub_stream_probability=1.0)), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sub_stream_fallback_rows"] == 1
    printed = capsys.readouterr().out
    assert printed.count("--sub_stream_target ref_gt: 1 sample(s) have no ref_gt") == 1 and repr(IDS[2]) in printed


def test_a_checkpoint_from_before_sub_stream_target_resumes(tmp_path):
    """Its bridge settings lack the new setting, which it ran at the default; another value is still refused."""
    from edittuner.trainer import TrainConfig, check_resume_settings, run_settings
    cfg = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, objective="lbm", max_steps=10)
    current = run_settings(cfg, "no", None)
    old = json.loads(json.dumps(current))
    del old["fixed"]["bridge"]["sub_stream_target"]
    assert check_resume_settings(tmp_path, {"step": 5, **old}, cfg, current) == []
    other = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, objective="lbm", max_steps=10,
                        bridge=BridgeConfig(sub_stream_target="ref_gt"))
    with pytest.raises(EditTunerError, match="bridge: checkpoint"):
        check_resume_settings(tmp_path, {"step": 5, **old}, other, run_settings(other, "no", None))


def test_an_unreadable_ref_gt_is_a_refused_row(ref_gt_cache, resize, tmp_path):
    rows = json.loads((ref_gt_cache / "dataset.json").read_text())[:1]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dataset.json").write_text(json.dumps([dict(rows[0], ref_gt=str(tmp_path / "empty.png"))]))
    with pytest.raises(EditTunerError, match=r"row 0, id '00_astronaut': .*empty.png: the file is empty"):
        precompute_cache(PrecomputeConfig(dataset_json=tmp_path / "dataset.json", cache_dir=tmp_path / "cache",
                                          model=ModelSource(), resize=resize), progress=False)
