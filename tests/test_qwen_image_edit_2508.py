"""The original Qwen-Image-Edit as --model_version 2508: the engine's single-image prompt path, one reference per
row, its launcher, sampling and the app."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from edittuner import cli
from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache
from edittuner.families.qwen_image_edit.encoding import make_encoding_pipe
from edittuner.images import prepare_images
from edittuner.dataset import load_dataset
from edittuner.errors import EditTunerError
from edittuner.families import PRESETS
from edittuner.models import ModelSource
from edittuner.sampling import Editor, SamplerConfig
from edittuner.families.qwen_image_edit.tiny import build_tiny_encoders

from conftest import ROOT, TINY_PIXELS

PROMPT = "Invert the colors inside the marked region."
FAST = ("--steps", "1", "--guidance", "1", "--max_pixels", TINY_PIXELS)


@pytest.fixture(scope="module")
def demo(demo_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo2508") / "demo"
    shutil.copytree(demo_dir, folder)
    return folder


@pytest.fixture(scope="module")
def launched(demo, tmp_path_factory):
    """Qwen-Image-Edit.sh on the tiny model and the demo's one-reference rows, previews included."""
    tmp = tmp_path_factory.mktemp("launch2508")
    env = {"DATASET_JSON": str(demo / "dataset_single_ref.json"), "CACHE_DIR": str(tmp / "cache"),
           "OUTPUT_DIR": str(tmp / "run"), "STEPS": "20", "NUM_PROCESSES": "1", "VALIDATION_STEPS": "10"}
    result = subprocess.run(["bash", str(ROOT / "Qwen-Image-Edit.sh")], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


@pytest.fixture(scope="module")
def cache_2508(demo, resize, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache2508")
    precompute_cache(PrecomputeConfig(dataset_json=demo / "dataset_single_ref.json", cache_dir=cache,
                                      model=ModelSource(), resize=resize, model_version="2508"), progress=False)
    return cache


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cached_prompt_is_the_engines_single_image_path(demo, cache_2508, resize):
    """Bitwise the engine's QwenImageUnit_PromptEmbedder with ONE PIL image (encode_prompt_edit: no "Picture 1:",
    the reference as sized for the VAE), and the reference latents of its EditImageEmbedder's single-image path."""
    from diffsynth.pipelines.qwen_image import QwenImageUnit_EditImageEmbedder, QwenImageUnit_PromptEmbedder
    pipe = make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)
    manifest = json.loads((cache_2508 / "manifest.json").read_text())
    samples = load_dataset(demo / "dataset_single_ref.json")
    assert manifest["model_version"] == "2508" and len(samples) == len(manifest["samples"]) == 6
    for sample, record in zip(samples, manifest["samples"]):
        cached = load_file(cache_2508 / record["file"])
        _, refs, _ = prepare_images(sample, resize)
        with torch.no_grad():
            engine = QwenImageUnit_PromptEmbedder().process(pipe, sample.prompt, edit_image=refs[0])["prompt_emb"][0]
            multi = QwenImageUnit_PromptEmbedder().process(pipe, sample.prompt, edit_image=refs)["prompt_emb"][0]
            latents = QwenImageUnit_EditImageEmbedder().process(pipe, refs[0], False, 128, 64, False)["edit_latents"]
        assert torch.equal(cached["prompt_emb"], engine)
        assert cached["prompt_emb"].shape != multi.shape   # not the 2509/2511 template
        assert torch.equal(cached["ref.0"], latents[0]) and "ref.1" not in cached
        assert record["hashes"]["prompt_template"] == "single"


def test_multi_template_caches_are_never_reused_for_2508(cache_2508, demo, resize, tmp_path):
    """Another version's cache is refused by name, and even without its identity file no sample is reused."""
    cache = tmp_path / "cache"
    shutil.copytree(cache_2508, cache)
    with pytest.raises(EditTunerError, match=r"single-image template \(--model_version 2508\), but --model_version "
                                             r"2511 needs the multi-image template"):
        precompute_cache(PrecomputeConfig(dataset_json=demo / "dataset_single_ref.json", cache_dir=cache,
                                          model=ModelSource(), resize=resize, model_version="2511"), progress=False)
    with pytest.raises(EditTunerError, match="--model_version 2509 needs the multi-image template"):
        CacheReader(cache, expected_model_version="2509")
    (cache / "cache_identity.json").unlink()
    result = precompute_cache(PrecomputeConfig(dataset_json=demo / "dataset_single_ref.json", cache_dir=cache,
                                               model=ModelSource(), resize=resize, model_version="2509"),
                              progress=False)
    assert (result["encoded"], result["skipped"]) == (6, 0)
    CacheReader(cache, expected_model_version="2509")


def test_rows_with_several_references_are_refused_for_2508(demo, resize, tmp_path, capsys):
    rows = json.loads((demo / "dataset.json").read_text())
    two = next(r for r in rows if len(r["edit_image"]) == 2)
    three = dict(rows[0], id="three", edit_image=rows[0]["edit_image"] * 3)
    dataset = demo / "several_refs.json"
    dataset.write_text(json.dumps([two, three]))
    cache = tmp_path / "cache"
    with pytest.raises(EditTunerError) as caught:
        precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, model=ModelSource(), resize=resize,
                                          model_version="2508"), progress=False)
    message = str(caught.value)
    assert f"row 0, id {two['id']!r}: edit_image lists 2 reference image(s), but Qwen-Image-Edit-2508" in message
    assert "row 1, id 'three': edit_image lists 3 reference image(s)" in message
    assert "--model_version 2509 or 2511" in message and not list((cache / "samples").iterdir())
    # `sample`: the single edit before the model loads, and each such row of a batch, by name
    source = demo / two["edit_image"][0]
    code, _, err = run(capsys, "sample", "--model_version", "2508", "--image", source, "--image", source,
                       "--prompt", PROMPT, "--output", tmp_path / "x.png", *FAST)
    assert code == 2 and "--image: 2 reference image(s), but Qwen-Image-Edit-2508" in err
    code, _, err = run(capsys, "sample", "--model_version", "2508", "--dataset_json", dataset,
                       "--output_dir", tmp_path / "out", *FAST)
    assert code == 2 and f"row 0 (id {two['id']!r}): 2 reference image(s)" in err and "row 1 (id 'three')" in err


def test_launcher_trains_2508_end_to_end(launched):
    tmp, result = launched
    assert result.stdout.splitlines()[0].startswith("Qwen-Image-Edit: no MODEL_DIR set")
    config = json.loads((tmp / "run/config.json").read_text())
    assert config["model_version"] == "2508" and config["zero_cond_t"] is False
    assert config["lora_targets"] == list(PRESETS["2508"].lora_targets)
    assert json.loads((tmp / "cache/manifest.json").read_text())["model_version"] == "2508"
    summary = json.loads((tmp / "run/summary.json").read_text())
    assert summary["eval_loss_end"] < summary["eval_loss_start"], summary
    assert (tmp / "run/validation/step-000010.png").is_file()
    with safe_open(str(tmp / "run/lora.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["base_model"] == "Qwen-Image-Edit-2508" and metadata["zero_cond_t"] == "false"


def test_sample_takes_2508_from_the_loras_metadata(launched, demo, tmp_path, capsys):
    lora = launched[0] / "run/lora.safetensors"
    source = demo / "raw/source/01_chelsea.png"
    common = ("--lora", lora, "--prompt", PROMPT, *FAST)
    code, _, err = run(capsys, "sample", "--image", source, "--output", tmp_path / "a.png", *common)
    assert code == 0 and (tmp_path / "a.png").is_file() and "warning" not in err, err
    # Two references: refused, since the LoRA says 2508 (the default version, 2511, takes three) ...
    code, _, err = run(capsys, "sample", "--image", source, "--image", source, "--output", tmp_path / "b.png", *common)
    assert code == 2 and "Qwen-Image-Edit-2508 (--model_version 2508) takes exactly 1" in err
    # ... unless a flag overrides the LoRA's version, which is a warning.
    code, _, err = run(capsys, "sample", "--model_version", "2511", "--image", source, "--image", source,
                       "--output", tmp_path / "c.png", *common)
    assert code == 0 and f"warning: --model_version 2511 overrides the version {lora} was trained for " \
                         "(Qwen-Image-Edit-2508)" in err


def test_sampling_2508_is_the_engines_pipeline_and_the_app_offers_it(demo, resize):
    """Our flow sampler with the single-image template equals diffsynth's pipeline given one PIL image."""
    from edittuner.app import NO_LORA, EditSession, build_parser
    from edittuner.images import fit_reference
    from edittuner.images import load_rgb
    editor = Editor(model_version="2508", resize=resize)
    source = load_rgb(demo / "raw/source/03_rocket.png")
    ref = fit_reference(source, resize)
    ours = editor.edit([source], PROMPT, SamplerConfig(sampler="flow", steps=2, guidance=4.0, seed=3))
    pipe = make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)
    pipe.dit = editor.dit
    engine = pipe(prompt=PROMPT, negative_prompt=" ", cfg_scale=4.0, edit_image=ref, edit_image_auto_resize=False,
                  height=ref.size[1], width=ref.size[0], seed=3, num_inference_steps=2, zero_cond_t=False,
                  progress_bar_cmd=lambda x: x)
    assert np.array_equal(np.asarray(ours.image), np.asarray(engine))
    parser = build_parser()
    assert "2508" in next(a for a in parser._actions if a.dest == "model_version").choices
    assert parser.parse_args(["--model_version", "2508"]).model_version == "2508"
    session = EditSession(editor, train_dir=demo / "no-train")
    image, _, status = session.edit(source, None, None, PROMPT, NO_LORA, 1.0, "flow", 1, 1.0, 0)
    assert image.size == ref.size and "Qwen-Image-Edit-2508 with zero_cond_t off" in status
    with pytest.raises(EditTunerError, match="takes exactly 1"):
        session.edit(source, Image.new("RGB", (64, 64)), None, PROMPT, NO_LORA, 1.0, "flow", 1, 1.0, 0)
