"""CFG (prompt) dropout: phase 1's per-sample negative prompt embeddings, the (seed, position) draw and its rate,
p = 0 unchanged, and a dropped sample really conditioned on the negative (flow and LBM, batches, both families)."""

import json
import math

import pytest
import torch

from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache
from edittuner.defaults import DEFAULT_NEGATIVE_PROMPT
from edittuner.errors import EditTunerError
from edittuner.images import prepare_images
from edittuner.dataset import load_dataset
from edittuner.models import ModelSource
from edittuner.tracking import read_metrics
from edittuner.trainer import TrainConfig, TrainingRun, cfg_dropped, train
from conftest import absolute_rows

SAME_SHAPE_IDS = ("00_astronaut", "04_hubble_deep_field", "05_immunohistochemistry")  # 96x96, one reference each


def _subset(demo_dir, name: str, ids, out):
    rows = absolute_rows(demo_dir, name, ids)
    out.write_text(json.dumps(rows))
    return out


@pytest.fixture(scope="module")
def negative_cache(demo_dir, resize, tmp_path_factory):
    """Same-shape one-reference Qwen pairs (LBM needs the reference at the target's size), with negatives."""
    work = tmp_path_factory.mktemp("negatives")
    dataset = _subset(demo_dir, "dataset.json", SAME_SHAPE_IDS, work / "dataset.json")
    cfg = PrecomputeConfig(dataset_json=dataset, cache_dir=work / "cache", model=ModelSource(), resize=resize,
                           negative_prompts=True)
    precompute_cache(cfg, progress=False)
    return cfg


def test_the_draw_is_a_function_of_seed_and_position_at_rate_p():
    n = 20_000
    for p in (0.1, 0.5):
        hits = sum(cfg_dropped(7, k, p) for k in range(n))
        assert abs(hits / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (p, hits / n)   # binomial, ~1e-5 false alarms
    assert [cfg_dropped(7, k, 0.3) for k in range(50)] == [cfg_dropped(7, k, 0.3) for k in range(50)]
    assert [cfg_dropped(7, k, 0.3) for k in range(50)] != [cfg_dropped(8, k, 0.3) for k in range(50)]
    assert not any(cfg_dropped(7, k, 0.0) for k in range(1000)) and all(cfg_dropped(7, k, 1.0) for k in range(1000))


def test_phase_1_stores_the_negative_encoded_with_the_samples_references(negative_cache, demo_cache):
    from edittuner.families.qwen_image_edit.encoding import QwenSampleEncoder
    from edittuner.families.qwen_image_edit.tiny import build_tiny_encoders
    reader, plain = CacheReader(negative_cache.cache_dir), CacheReader(demo_cache)
    assert reader.has_negative_prompts and not plain.has_negative_prompts
    assert reader.manifest["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and plain.manifest["negative_prompt"] is None
    encoder = QwenSampleEncoder("multi", negative_cache.resize.vl_pixels)
    encoder.attach(build_tiny_encoders(0), "cpu", torch.float32)
    by_id = {r["id"]: i for i, r in enumerate(plain.records)}
    for index, (sample, row) in enumerate(zip(map(reader.load, range(len(reader))),
                                              load_dataset(negative_cache.dataset_json))):
        _, refs, _ = prepare_images(row, negative_cache.resize)
        assert torch.equal(sample["negative_prompt_emb"], encoder.encode_prompt(DEFAULT_NEGATIVE_PROMPT, refs))
        assert sample["negative_prompt_emb"].shape[0] != sample["prompt_emb"].shape[0]   # batches must pad them
        alone = plain.load(by_id[reader.records[index]["id"]])
        assert alone.keys() == sample.keys() - {"negative_prompt_emb"}
        assert all(torch.equal(alone[k], sample[k]) for k in alone)   # the rest is what a plain phase 1 writes
    # A cache with negatives serves a phase 1 that does not ask for them: nothing re-encoded, nothing lost.
    again = precompute_cache(PrecomputeConfig(**{**negative_cache.__dict__, "negative_prompts": False,
                                                 "negative_prompt": None}), progress=False)
    assert again["encoded"] == 0 and CacheReader(negative_cache.cache_dir).has_negative_prompts


def test_cfg_dropout_is_refused_on_a_cache_without_negatives(demo_cache, resize, tmp_path):
    with pytest.raises(EditTunerError, match=r"--cfg_dropout 0.1: 8 of the 8 samples .* have no negative prompt "
                                             r"embedding; re-run phase 1 with `edittuner precompute --negative_prompts on"):
        train(TrainConfig(cache_dir=demo_cache, output_dir=tmp_path / "run", resize=resize, cfg_dropout=0.1),
              progress=False)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(EditTunerError, match="--cfg_dropout .*: must be in"):
            TrainConfig(cache_dir=demo_cache, output_dir=tmp_path, cfg_dropout=bad)


def _run(cache, out, resize, steps=2, **kw):
    cfg = TrainConfig(cache_dir=cache, output_dir=out, resize=resize, max_steps=steps, learning_rate=5e-3, rank=4,
                      gradient_accumulation=1, batch_size=2, eval_samples=0, save_every=1000,
                      gradient_checkpointing=False, **kw)
    train(cfg, progress=False)
    return read_metrics(out / "metrics.jsonl"), (out / "lora.safetensors")


def test_p_zero_trains_exactly_as_without_the_flag(negative_cache, resize, tmp_path):
    """The cache's negatives and --cfg_dropout 0 change nothing: same losses and LoRA, bitwise, as a plain cache
    of the same rows without the flag."""
    from safetensors.torch import load_file
    plain = tmp_path / "plain"
    precompute_cache(PrecomputeConfig(**{**negative_cache.__dict__, "cache_dir": plain, "negative_prompts": False,
                                         "negative_prompt": None}), progress=False)
    got, lora = _run(negative_cache.cache_dir, tmp_path / "p0", resize, cfg_dropout=0.0)
    want, ref = _run(plain, tmp_path / "ref", resize)
    assert [m["loss"] for m in got] == [m["loss"] for m in want] and "cfg_dropped" not in got[0]
    a, b = load_file(lora), load_file(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("objective", ["flow", "lbm"])
def test_a_dropped_sample_trains_on_its_negative_embedding(negative_cache, resize, tmp_path, monkeypatch, objective):
    """Batch 2, p = 0.5: the objective gets the negative exactly for the positions the draw drops (prompts and
    negatives of different lengths share a batch), the run's metrics count them, and the loss is finite."""
    seen = []
    original = TrainingRun.group_losses

    def spy(self, step, samples, positions, indices):
        seen.extend((p, i, s["prompt_emb"]) for p, i, s in zip(positions, indices, samples))
        return original(self, step, samples, positions, indices)
    monkeypatch.setattr(TrainingRun, "group_losses", spy)
    metrics, _ = _run(negative_cache.cache_dir, tmp_path / "run", resize, steps=3, seed=3, cfg_dropout=0.5,
                      objective=objective)
    reader = CacheReader(negative_cache.cache_dir)
    dropped = [cfg_dropped(3, p, 0.5) for p, _, _ in seen]
    assert len(seen) == 6 and 0 < sum(dropped) < 6   # both kinds, so batches mix lengths
    for (position, index, used), drop in zip(seen, dropped):
        cached = reader.load(index)
        assert torch.equal(used, cached["negative_prompt_emb" if drop else "prompt_emb"]), position
    assert [m["cfg_dropped"] for m in metrics] == [sum(dropped[k:k + 2]) for k in (0, 2, 4)]


def test_longcat_negatives_batch_with_their_prompts(demo_dir, resize, tmp_path):
    """LongCat pads every prompt to the pipeline's length, the negative too, so dropped and kept samples batch."""
    dataset = _subset(demo_dir, "dataset_single_ref.json", SAME_SHAPE_IDS[:2], tmp_path / "rows.json")
    cache = tmp_path / "cache"
    precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, model=ModelSource(family="longcat-image-edit"),
                                      resize=resize, model_version="longcat", negative_prompts=True), progress=False)
    reader = CacheReader(cache)
    sample = reader.load(0)
    assert reader.has_negative_prompts and sample["negative_prompt_emb"].shape == sample["prompt_emb"].shape
    assert not torch.equal(sample["negative_prompt_emb"], sample["prompt_emb"])
    metrics, _ = _run(cache, tmp_path / "run", resize, steps=1, model=ModelSource(family="longcat-image-edit"),
                      model_version="longcat", cfg_dropout=1.0)
    assert metrics[0]["cfg_dropped"] == 2 and math.isfinite(metrics[0]["loss"])
