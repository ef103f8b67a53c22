"""benchmarks/real_scale.py: the real-scale GPU benchmark, run here at its tiny scale on the CPU (the same code
path), and the real-size models checked on the meta device (no memory).

The tiny run skips the compile case (``--skip compile``): compiling the blocks on this CPU takes ~35 s by itself,
and tests/test_performance.py already checks compiled blocks against eager ones.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

from benchmarks.flops import edit_prompt_tokens, lora_training_step_flops, real_2511_shape
from benchmarks.real_scale import (GROUPS, PHASE2_CASES, REAL_DIT, dit_on_meta, dit_shape, parse_cases, scale_for,
                                   text_encoder_config, text_encoder_on_meta)

# Refused on the CPU by PerformanceConfig.check, and the words each refusal must name.
CPU_REFUSALS = {"attention_efficient": "--attention efficient", "attention_cudnn": "--attention cudnn",
                "fp8": "--base_quantization fp8", "offload": "--offload_blocks"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_scale")
    result = subprocess.run([sys.executable, "-m", "benchmarks.real_scale", "--scale", "tiny", "--steps", "2",
                             "--out", str(out), "--skip", "compile"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), result.stdout


def test_tiny_run_measures_the_baseline_with_its_flop_count(tiny_run):
    results, _, _ = tiny_run
    assert results["status"] == "complete" and results["scale"] == "tiny"
    assert results["command"].startswith("python -m benchmarks.real_scale --scale tiny")
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and machine["host_ram_gib"] > 0 and machine["torch"] == torch.__version__
    base = results["phase2"]["baseline"]
    assert base["status"] == "ok", base
    assert base["median_step_s"] > 0 and len(base["step_s"]) == 2 and len(base["warmup_step_s"]) == 2
    assert len(base["losses"]) == 4 and all(loss == loss for loss in base["losses"])
    assert results["flops"]["model_flops"] > 0
    assert results["flops"]["model_flops"] == lora_training_step_flops(dit_shape(scale_for("tiny")), True)["model_flops"]
    assert base["mfu"] is None and results["peak_tflops"] is None  # no peak on the CPU
    assert base["lora_parameters"] > 0 and base["dit_weight_bytes"] > 0


def test_tiny_run_has_every_lever_row_measured_or_refused_by_name(tiny_run):
    results, _, _ = tiny_run
    rows = results["phase2"]
    assert set(rows) == set(PHASE2_CASES)
    for name, words in CPU_REFUSALS.items():
        assert rows[name]["status"] == "refused", (name, rows[name])
        assert words in rows[name]["error"]
    assert rows["compile"]["status"] == "skipped"
    for name in ("attention_sdpa", "attention_flash", "attention_math", "int8"):
        row = rows[name]
        assert row["status"] == "ok", (name, row)
        versus = row["vs_baseline"]
        assert versus["step_time_ratio"] > 0 and versus["loss"]["steps"] == 4
        assert versus["same_lora_init"]  # every case starts from the same weights and LoRA
    # Another SDPA kernel on the same weights, inputs and seeds: the same run, to float rounding.
    assert rows["attention_math"]["vs_baseline"]["loss"]["max_rel_diff"] < 1e-4
    int8 = rows["int8"]["vs_baseline"]
    assert int8["dit_weight_bytes_ratio"] < 0.6           # int8 blocks: about a quarter of fp32
    assert 0 < int8["prediction_rel_l2_diff"] < 0.05      # quantization shows in the output, and stays small
    assert int8["loss"]["max_rel_diff"] < 0.05


def test_tiny_run_measures_phase_1_and_writes_the_table(tiny_run):
    results, markdown, stdout = tiny_run
    phase1 = results["phase1"]
    assert phase1["status"] == "ok", phase1
    assert phase1["samples_per_s"] > 0 and phase1["prompt_tokens"] > 196  # the reference's 196 vision tokens + text
    assert phase1["latent_shape"] == [16, 8, 8]  # 64x64 target
    assert "| figure | value | baseline (same run) | ratio (value / baseline) |" in markdown
    assert "| phase 2 step, baseline" in markdown and "| step, attention math |" in markdown
    assert "| phase 1 (prompt with the reference" in markdown
    assert "| phase 2, base_quantization fp8 | refused: --base_quantization fp8" in markdown
    assert "FLOPs per step used for MFU" in markdown
    assert "| figure |" in stdout  # the table is printed at the end too


def _dit_parameters(layers, heads, head_dim, text_dim, in_channels=64, out_channels=64):
    """EditDiT's parameter count from its architecture (diffsynth's QwenImageTransformerBlock), counted by hand."""
    d = heads * head_dim
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731
    block = (2 * linear(d, 6 * d)                           # img_mod.1, txt_mod.1
             + 8 * linear(d, d)                             # to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out
             + 4 * head_dim                                 # norm_q, norm_k, norm_added_q, norm_added_k (RMSNorm)
             + 2 * (linear(d, 4 * d) + linear(4 * d, d)))   # img_mlp, txt_mlp
    outside = (linear(in_channels, d) + linear(text_dim, d) + text_dim   # img_in, txt_in, txt_norm
               + linear(256, d) + linear(d, d)                           # timestep embedding MLP
               + linear(d, 2 * d) + linear(d, out_channels))             # norm_out.linear, proj_out
    return layers * block + outside


def test_real_size_dit_on_meta_has_20_4_billion_parameters_and_no_memory():
    dit = dit_on_meta(REAL_DIT)
    params = list(dit.parameters())
    assert all(p.is_meta for p in params)
    count = sum(p.numel() for p in params)
    assert count == _dit_parameters(60, 24, 128, 3584) == 20_430_401_088
    assert len(dit.transformer_blocks) == 60 and dit.config["axes_dims_rope"] == [16, 56, 56]
    # The FLOP count MFU uses is the real 2511 shape at 1024x1024 with one reference.
    assert dit_shape(scale_for("real")) == real_2511_shape(text_tokens=edit_prompt_tokens())


def test_real_size_text_encoder_on_meta_is_qwen2_5_vl_7b():
    config = text_encoder_config("real")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.num_heads, vision.intermediate_size,
            vision.patch_size, vision.spatial_merge_size, vision.window_size) == (32, 1280, 3584, 16, 3420, 14, 2, 112)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    model = text_encoder_on_meta(config)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656  # Qwen2.5-VL-7B-Instruct, lm_head included


def test_case_selection():
    assert parse_cases("baseline,attention") == ("baseline", *GROUPS["attention"])
    assert parse_cases("quantization,phase1") == ("int8", "fp8", "phase1")
    with pytest.raises(SystemExit, match="unknown case 'fastest'"):
        parse_cases("fastest")


def test_a_lever_brings_the_baseline_along_and_the_budget_skips_cases(tmp_path):
    from benchmarks.real_scale import main
    assert main(["--scale", "tiny", "--only", "int8", "--budget_s", "0", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["cases_selected"] == ["baseline", "int8"] and results["status"] == "complete"
    assert {row["status"] for row in results["phase2"].values()} == {"skipped"}
    assert "--budget_s 0 reached" in results["phase2"]["int8"]["error"]
    assert "| phase 2, base_quantization int8 | skipped: --budget_s 0 reached" in (tmp_path / "results.md").read_text()


def test_card_table_recommends_the_fastest_case_that_fits_each_card():
    from benchmarks.real_scale import card_table
    rows = {"baseline": {"status": "ok", "median_step_s": 1.5, "peak_reserved_gib": 58.0},
            "compile": {"status": "ok", "median_step_s": 1.2, "peak_reserved_gib": 60.0},
            "int8": {"status": "ok", "median_step_s": 1.9, "peak_reserved_gib": 38.0},
            "offload": {"status": "ok", "median_step_s": 4.0, "peak_reserved_gib": 18.0},
            "fp8": {"status": "refused", "error": "no fp8"}}
    table = {line.split(" | ")[0].strip("| "): line for line in card_table(rows) if line.startswith("| ") and "GB" in line}
    assert table["24 GB"].split(" | ")[1].startswith("offload_blocks") and "int8" in table["24 GB"].split(" | ")[3]
    assert table["48 GB"].split(" | ")[1].startswith("base_quantization int8")
    assert table["80 GB"].split(" | ")[1].startswith("compile=True")
    assert "fp8" not in "".join(table.values())  # only measured cases
    assert card_table({"fp8": rows["fp8"]}) == []
