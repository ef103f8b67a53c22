"""--init_lora: a run started from a LoRA begins where that LoRA's run ended (its eval loss), from any layout we
read; every mismatch with the run (version, family, rank, targets) is one message; --resume wins over it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from edittuner.cache import sha256_file
from edittuner.errors import EditTunerError
from edittuner.families.qwen_image_edit.tiny import build_tiny_dit
from edittuner.init_lora import inspect_init_lora, load_init_lora
from edittuner.lora import export_lora, inject_lora, lora_parameters, read_lora_file, save_lora
from edittuner.trainer import TrainConfig, check_train, train


def _cfg(trained_run, tmp_path, **kw):
    _, _, cfg = trained_run
    return TrainConfig(**{**cfg.__dict__, "output_dir": tmp_path / "run", "init_lora": trained_run[0] / "lora.safetensors",
                          **kw})


def test_a_run_started_from_a_lora_begins_at_its_eval_loss(trained_run, tmp_path):
    out, result, _ = trained_run
    cfg = _cfg(trained_run, tmp_path, max_steps=1)
    summary = train(cfg, progress=False)
    # The same eval samples and draws on the same weights: the source run's final eval loss, exactly.
    assert summary["eval_loss_start"] == result["eval_loss_end"]
    record = {"path": str((out / "lora.safetensors").resolve()), "sha256": sha256_file(out / "lora.safetensors")}
    assert summary["init_lora"] == record == json.loads((cfg.output_dir / "summary.json").read_text())["init_lora"]
    assert json.loads((cfg.output_dir / "config.json").read_text())["resolved"]["init_lora"] == record
    assert json.loads((cfg.output_dir / "checkpoints/step-1/trainer_state.json").read_text())["init_lora"] == record


def _delta(dit, scale):
    """{module: scale * B @ A} of the adapters in ``dit``."""
    params = dict(lora_parameters(dit))
    return {n.split(".lora_A.")[0]: scale * params[n.replace(".lora_A.", ".lora_B.")] @ p
            for n, p in params.items() if ".lora_A." in n}


@pytest.mark.parametrize("fmt", ["diffsynth", "comfyui", "diffusers"])
def test_every_layout_loads_the_same_delta_whatever_the_runs_alpha(trained_run, tmp_path, fmt):
    source = trained_run[0] / "lora.safetensors"
    path = tmp_path / f"{fmt}.safetensors"
    export_lora(source, path, fmt)
    file_state, _ = read_lora_file(source)
    cfg = _cfg(trained_run, tmp_path, init_lora=path, alpha=2.0)   # rank 8, alpha 2: the adapter scales B by 1/4
    dit = build_tiny_dit(0)
    inject_lora(dit, cfg.lora_targets, cfg.rank, cfg.alpha, cfg.spec.family)
    assert load_init_lora(dit, cfg).rank == 8
    for module, delta in _delta(dit, cfg.alpha / cfg.rank).items():
        want = file_state[f"diffusion_model.{module}.lora_B.weight"] @ file_state[f"diffusion_model.{module}.lora_A.weight"]
        torch.testing.assert_close(delta, want, rtol=1e-6, atol=1e-7)


def _rewritten(trained_run, tmp_path, name, drop=(), keep=None, **metadata):
    state, meta = read_lora_file(trained_run[0] / "lora.safetensors")
    meta = {k: v for k, v in {**meta, **metadata}.items() if v is not None}
    state = {k: v for k, v in state.items() if not any(d in k for d in drop) and (keep is None or keep(k))}
    save_lora(tmp_path / name, state, meta)
    return tmp_path / name


def test_each_mismatch_is_one_message_naming_the_file_its_value_and_the_fix(trained_run, tmp_path):
    lora = trained_run[0] / "lora.safetensors"
    cases = [
        ({"rank": 4}, rf"--init_lora {lora}: this LoRA has rank 8, but this run trains --rank 4; pass --rank 8 to match"),
        ({"model_version": "2509", "zero_cond_t": None},
         r"trained for Qwen-Image-Edit-2511 \(--model_version 2511\), but this run trains Qwen-Image-Edit-2509 "
         r"\(--model_version 2509\); pass --model_version 2511 to match"),
        ({"lora_targets": ("to_q", "to_k")}, r"this LoRA targets to_q,to_k,to_v,.*,proj_out, but this run targets "
                                             r"to_q,to_k; pass --lora_targets to_q,to_k,to_v,.*proj_out to match"),
        ({"init_lora": tmp_path / "none.safetensors"}, "none.safetensors: no such file"),
    ]
    for change, message in cases:
        with pytest.raises(EditTunerError, match=message):
            inspect_init_lora(_cfg(trained_run, tmp_path, **change))
    other = _rewritten(trained_run, tmp_path, "longcat.safetensors", family="longcat-image-edit",
                       base_model="LongCat-Image-Edit")
    with pytest.raises(EditTunerError, match=r"trained for the longcat-image-edit family \(LongCat-Image-Edit\), but "
                                             r"this run trains Qwen-Image-Edit-2511 \(the qwen-image-edit family\)"):
        inspect_init_lora(_cfg(trained_run, tmp_path, init_lora=other))
    mixed = _rewritten(trained_run, tmp_path, "mixed.safetensors", keep=lambda k: "img_in" not in k)
    state = load_file(mixed)
    state["diffusion_model.img_in.lora_A.weight"] = torch.zeros(4, 64)
    state["diffusion_model.img_in.lora_B.weight"] = torch.zeros(32, 4)
    save_lora(mixed, state, {})
    with pytest.raises(EditTunerError, match=r"its layers have ranks \[4, 8\] \(e.g. .* is 8\)"):
        inspect_init_lora(_cfg(trained_run, tmp_path, init_lora=mixed))
    # The launchers' check (train --dry_run) refuses it from the header, before phase 1, leaving no folder.
    with pytest.raises(EditTunerError, match="pass --rank 8 to match"):
        check_train(_cfg(trained_run, tmp_path, rank=4))
    assert not (tmp_path / "run").exists()


def test_a_file_without_metadata_is_checked_layer_by_layer(trained_run, tmp_path):
    """A foreign file records no version or targets: the run compares its layers with the ones it trains."""
    bare = _rewritten(trained_run, tmp_path, "bare.safetensors", drop=("txt_mod.1",),
                      **{k: None for k in ("family", "base_model", "target_modules", "zero_cond_t")})
    assert read_lora_file(bare)[1].keys() == {"format", "rank", "alpha", "alpha_folded_into_lora_B"}
    cfg = _cfg(trained_run, tmp_path, init_lora=bare)
    assert inspect_init_lora(cfg).version is None
    dit = build_tiny_dit(0)
    inject_lora(dit, cfg.lora_targets, cfg.rank, cfg.alpha, cfg.spec.family)
    with pytest.raises(EditTunerError, match=r"bare.safetensors: its layers differ from this run's --lora_targets "
                                             r"to_q,.*: \d+ layer\(s\) this run trains are not in it \(e.g. "
                                             r"transformer_blocks.0.txt_mod.1"):
        load_init_lora(dit, cfg)
    narrow = _cfg(trained_run, tmp_path, init_lora=bare, lora_targets=("to_q",))
    dit = build_tiny_dit(0)
    inject_lora(dit, narrow.lora_targets, narrow.rank, narrow.alpha, narrow.spec.family)
    with pytest.raises(EditTunerError, match=r"it has \d+ layer\(s\) this run does not train"):
        load_init_lora(dit, narrow)


def test_resume_wins_over_init_lora(trained_run, tmp_path, capsys):
    out = trained_run[0]
    shutil.copytree(out, tmp_path / "run")
    wrong = _rewritten(trained_run, tmp_path, "wrong.safetensors", base_model="Qwen-Image-Edit-2509")  # never read
    summary = train(_cfg(trained_run, tmp_path, init_lora=wrong, resume="latest", eval_samples=0), progress=False)
    assert "--resume latest wins over --init_lora" in capsys.readouterr().out and summary["init_lora"] is None
    a, b = load_file(tmp_path / "run/lora.safetensors"), load_file(out / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)   # the checkpoint's LoRA, not the init file's
