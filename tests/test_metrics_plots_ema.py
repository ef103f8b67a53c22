"""Edit metrics (metrics.py, `edittuner evaluate`), run plots (plots.py, `edittuner plot`) and the LoRA EMA (ema.py)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edittuner.cli import main
from edittuner.configs import EvaluateConfig
from edittuner.dataset import load_dataset
from edittuner.errors import EditTunerError
from edittuner.metrics import edit_metrics, evaluate_predictions
from edittuner.plots import plot_metrics, smoothed
from edittuner.trainer import TrainConfig, train


def _ssim_by_hand(x: np.ndarray, y: np.ndarray, win: int = 7) -> float:
    """SSIM (Wang et al. 2004) as scikit-image defines its default: uniform win x win windows over the valid
    region, sample (co)variances, K1 = 0.01, K2 = 0.03, data range 255, mean over windows and channels."""
    from numpy.lib.stride_tricks import sliding_window_view
    c1, c2, n = (0.01 * 255) ** 2, (0.03 * 255) ** 2, win * win
    values = []
    for ch in range(x.shape[2]):
        a = sliding_window_view(x[..., ch].astype(np.float64), (win, win)).reshape(-1, n)
        b = sliding_window_view(y[..., ch].astype(np.float64), (win, win)).reshape(-1, n)
        ma, mb = a.mean(1), b.mean(1)
        va, vb = a.var(1, ddof=1), b.var(1, ddof=1)
        cov = ((a - ma[:, None]) * (b - mb[:, None])).sum(1) / (n - 1)
        values.append((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(values))


def test_edit_metrics_against_hand_computation():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    output = np.clip(target.astype(int) + rng.integers(-40, 41, target.shape), 0, 255).astype(np.uint8)
    output[:12] = target[:12]   # the top half untouched: only the bottom half was "edited"
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[12:] = 255
    got = edit_metrics(output, target, mask)
    diff = np.abs(output.astype(float) - target.astype(float))
    assert got["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / (diff ** 2).mean()), rel=1e-12)
    assert got["ssim"] == pytest.approx(_ssim_by_hand(output, target), abs=1e-9)
    assert got["l1"] == pytest.approx(diff.mean())
    assert got["l1_in_mask"] == pytest.approx(diff[12:].mean()) and got["l1_in_mask"] > 5
    assert got["l1_outside_mask"] == 0.0
    # PSNR inside the mask: scikit-image's PSNR of the edited rows alone.
    from skimage.metrics import peak_signal_noise_ratio
    assert got["psnr_in_mask"] == pytest.approx(peak_signal_noise_ratio(target[12:], output[12:], data_range=255))
    # Float images in [0, 1], PIL images and a PIL mask of another size (resized) give the same numbers.
    as_float = edit_metrics(output / 255.0, target / 255.0, mask.astype(bool))
    assert all(as_float[k] == pytest.approx(got[k]) for k in got)
    big_mask = Image.fromarray(mask).resize((64, 48), Image.Resampling.NEAREST)
    as_pil = edit_metrics(Image.fromarray(output), Image.fromarray(target), big_mask)
    soft = np.asarray(big_mask.resize((32, 24), Image.Resampling.BILINEAR), dtype=float) / 255   # edge rows: ~0.5
    assert as_pil["l1_in_mask"] == pytest.approx((diff.mean(2) * soft).sum() / soft.sum())
    assert as_pil["l1_outside_mask"] == pytest.approx((diff.mean(2) * (1 - soft)).sum() / (1 - soft).sum())
    assert as_pil["psnr"] == got["psnr"] and len(np.unique(soft)) > 2
    same = edit_metrics(target, target)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0) and same["l1_in_mask"] is None
    with pytest.raises(EditTunerError, match="differ in size"):
        edit_metrics(output[:20], target)


def _predictions(demo_dir, folder, rows):
    """Each row's target as its prediction, the second one brightened; plus a file no row names."""
    folder.mkdir()
    for i, sample in enumerate(rows):
        image = Image.open(sample.image).convert("RGB")
        if i == 1:
            image = image.point(lambda v: min(255, v + 20))
        image.save(folder / f"{sample.id}.png")
    Image.new("RGB", (8, 8)).save(folder / "not-a-row.png")
    (folder / "_skipped.json").write_text("[]")   # what `sample --dataset_json` may leave: not an image, ignored


def test_evaluate_command(demo_dir, tmp_path, capsys):
    dataset = demo_dir / "dataset_val.json"
    rows = load_dataset(dataset)
    assert len(rows) == 2
    preds = tmp_path / "preds"
    _predictions(demo_dir, preds, rows)
    assert main(["evaluate", "--predictions", preds, "--dataset_json", dataset, "--out", tmp_path / "r.json"]) == 0
    printed = capsys.readouterr().out
    assert "not-a-row.png" in printed and "| id | PSNR (dB)" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["id"] for r in report["samples"]] == [s.id for s in rows]
    exact, brighter = report["samples"][:2]
    assert exact["psnr"] is None and exact["l1"] == 0   # identical: infinite PSNR, written as null
    assert brighter["l1"] > 10 and brighter["psnr"] < 30 and brighter["l1_in_mask"] is not None
    assert report["mean"]["psnr"] == pytest.approx(brighter["psnr"])   # the infinite one is left out of the mean
    assert report["ignored_files"] == ["not-a-row.png"]
    assert (tmp_path / "r.md").read_text().count("\n") == len(rows) + 3
    # Predictions at another size of the same aspect are compared with the target resized to them.
    small = Image.open(preds / f"{rows[0].id}.png").resize((48, 48))
    small.save(preds / f"{rows[0].id}.png")
    report = evaluate_predictions(EvaluateConfig(predictions=preds, dataset_json=dataset))
    assert report["samples"][0]["target_resized"] and (preds / "edit_metrics.md").is_file()

    def refused(*extra):
        assert main(["evaluate", "--predictions", preds, "--dataset_json", dataset, *extra]) == 2
        return capsys.readouterr().err
    Image.new("RGB", (48, 12)).save(preds / f"{rows[0].id}.png")
    assert "another aspect ratio" in refused()
    (preds / f"{rows[0].id}.png").write_bytes(b"not a png")
    assert f"prediction for {rows[0].id!r}" in refused()
    (preds / f"{rows[0].id}.png").unlink()
    err = refused()
    assert "no prediction for 1 of 2" in err and repr(rows[0].id) in err
    Image.new("RGB", (8, 8)).save(preds / f"{rows[1].id}.jpg")
    assert "share the stem" in refused()
    assert "name a .json file" in refused("--out", tmp_path / "r.md")
    preds = tmp_path / "nope"
    assert "no such folder" in refused()


def test_plot_of_a_real_run_and_of_prodigy_fields(trained_run, tmp_path, capsys):
    out, _, _ = trained_run
    png = out / "metrics.png"   # written by the run's finish
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 400 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50   # lines, text, not blank
    png.unlink()
    assert main(["plot", out]) == 0 and png.is_file()
    # A schedule-free run's lines (d, d_lr) and eval losses add panels; a torn last line is skipped.
    run = tmp_path / "sf"
    run.mkdir()
    lines = [{"step": s, "loss": 1 / s, "lr": 1.0, "d": 1e-6 * s, "d_lr": 1e-6 * s,
              **({"eval_loss": 0.5, "val_eval_loss": 0.6} if s % 5 == 0 else {})} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 21, "lo')
    taller = np.asarray(Image.open(plot_metrics(run)))
    assert taller.shape[0] > image.shape[0]   # four panels against the plain run's three
    assert smoothed([1.0, 0.0]) == pytest.approx([1.0, 0.9 * 0.1 / (1 - 0.9 ** 2)])
    for bad, message in ((tmp_path / "missing", "no such run folder"), (tmp_path, "no metrics.jsonl")):
        assert main(["plot", bad]) == 2
        assert message in capsys.readouterr().err


def _ema_by_hand(weights: list[dict], decay: float) -> dict:
    """diffusers' EMAModel rule: update k (1-based) uses min(decay, (1 + j) / (10 + j)), j = k - 1, and 0 at k = 1."""
    ema = None
    for k, w in enumerate(weights, start=1):
        j = k - 1
        d = 0.0 if j <= 0 else min(decay, (1 + j) / (10 + j))
        ema = {n: w[n].double().clone() for n in w} if ema is None else {n: d * ema[n] + (1 - d) * w[n].double()
                                                                        for n in w}
    return ema


def test_ema_equals_a_hand_computed_average_and_resumes_bitwise(demo_cache, resize, tmp_path):
    base = dict(cache_dir=demo_cache, resize=resize, learning_rate=5e-3, rank=4, alpha=8, gradient_accumulation=1,
                gradient_checkpointing=False, eval_samples=0, report_to="none", save_every=1, ema_decay=0.25,
                ema_every=2, ema_on_cpu=True)
    out = tmp_path / "full"
    result = train(TrainConfig(output_dir=out, max_steps=8, **base), progress=False)
    # The LoRA after each optimizer step (its checkpoints), averaged by hand at steps 2, 4, 6, 8.
    steps = [load_file(out / f"checkpoints/step-{s}/lora.safetensors") for s in (2, 4, 6, 8)]
    want = _ema_by_hand(steps, 0.25)
    got = load_file(out / "lora_ema.safetensors")
    assert result["lora_ema"] == str(out / "lora_ema.safetensors") and got.keys() == want.keys()
    assert max(float((got[k].double() - want[k]).abs().max()) for k in got) < 1e-6
    assert not all(torch.equal(got[k], steps[-1][k]) for k in got)   # an average, not the last weights
    from safetensors import safe_open
    with safe_open(str(out / "lora_ema.safetensors"), "pt") as f:
        assert f.metadata()["ema_decay"] == "0.25" and f.metadata()["alpha"] == "8.0"
    # Resumed from step 5 (between two updates) in another folder: the same EMA, bitwise.
    resumed = tmp_path / "resumed"
    train(TrainConfig(output_dir=resumed, max_steps=8, resume=str(out / "checkpoints/step-5"), **base), progress=False)
    again = load_file(resumed / "lora_ema.safetensors")
    assert all(torch.equal(again[k], got[k]) for k in got)
    assert all(torch.equal(a, b) for a, b in zip(load_file(resumed / "checkpoints/step-8/ema.safetensors").values(),
                                                 load_file(out / "checkpoints/step-8/ema.safetensors").values()))


def test_ema_refusals(demo_cache):
    with pytest.raises(EditTunerError, match="prodigy_sf, whose averaged"):
        TrainConfig(cache_dir=demo_cache, output_dir="x", optimizer="prodigy_sf", ema_decay=0.99)
    with pytest.raises(EditTunerError, match="--ema_decay 1.0: must be in"):
        TrainConfig(cache_dir=demo_cache, output_dir="x", ema_decay=1.0)
    with pytest.raises(EditTunerError, match="--ema_every 0"):
        TrainConfig(cache_dir=demo_cache, output_dir="x", ema_decay=0.9, ema_every=0)


def test_resume_without_ema_in_the_checkpoint_starts_it_there(demo_cache, resize, tmp_path, capsys):
    base = dict(cache_dir=demo_cache, resize=resize, learning_rate=5e-3, rank=4, gradient_accumulation=1,
                gradient_checkpointing=False, eval_samples=0, report_to="none", save_every=2)
    out = tmp_path / "run"
    train(TrainConfig(output_dir=out, max_steps=2, **base), progress=False)
    train(TrainConfig(output_dir=out, max_steps=3, resume="latest", ema_decay=0.5, **base), progress=False)
    assert "holds no EMA" in capsys.readouterr().out
    # One update after the resume: decay 0 at the first update, so the EMA is the step-3 LoRA itself.
    ema, lora = load_file(out / "lora_ema.safetensors"), load_file(out / "lora.safetensors")
    assert all(torch.equal(ema[k], lora[k]) for k in lora)
