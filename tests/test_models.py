import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edittuner.errors import EditTunerError
from edittuner.models import ModelSource
from edittuner.families.qwen_image_edit.models import EditDiT
from edittuner.families.qwen_image_edit.tiny import TINY_DIT, TINY_VAE, build_processor, build_tiny_dit, build_tiny_encoders


def write_official_layout(root, seed=0, old_text_encoder_keys=False):
    """The tiny model saved the way the official release is laid out, by diffusers' and transformers' own writers."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    dit = build_tiny_dit(seed)
    peer = QwenImageTransformer2DModel(**{k: v for k, v in TINY_DIT.items()})
    peer.load_state_dict(dit.state_dict())
    peer.save_pretrained(root / "transformer", max_shard_size="100KB")
    encoders = build_tiny_encoders(seed)
    hf = Qwen2_5_VLForConditionalGeneration(encoders.text_encoder.config)
    hf.model.load_state_dict(encoders.text_encoder.model.state_dict())
    hf.lm_head.load_state_dict(encoders.text_encoder.lm_head.state_dict())
    hf.save_pretrained(root / "text_encoder", max_shard_size="200KB")
    if old_text_encoder_keys:
        # The released Qwen-Image text encoder uses transformers-4 key names (model.layers..., visual...).
        index_path = root / "text_encoder/model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        rename = lambda k: k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")  # noqa: E731
        for shard in set(index["weight_map"].values()):
            state = load_file(root / "text_encoder" / shard)
            save_file({rename(k): v for k, v in state.items()}, root / "text_encoder" / shard, metadata={"format": "pt"})
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    vae.load_state_dict(encoders.vae.state_dict())
    vae.save_pretrained(root / "vae")
    build_processor().save_pretrained(root / "processor")
    return dit, encoders


def test_default_sizes_are_the_engines_20b_dit():
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    with torch.device("meta"):
        ours, engine = EditDiT(num_layers=2).state_dict(), QwenImageDiT(num_layers=2).state_dict()
    assert ours.keys() == engine.keys()
    assert all(ours[k].shape == engine[k].shape for k in ours)


def test_tiny_model_is_deterministic_per_seed():
    a, b, c = build_tiny_dit(0), build_tiny_dit(0), build_tiny_dit(1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.img_in.weight, c.img_in.weight)


def test_tiny_vae_calibration_gives_unit_latents_and_keeps_the_decoder_path():
    import copy

    from diffsynth.models.qwen_image_vae import QwenImageVAE

    from edittuner.families.qwen_image_edit.tiny import _calibration_images, calibrate_latent_scale
    torch.manual_seed(3)
    raw = QwenImageVAE(**TINY_VAE).eval()
    calibrated = copy.deepcopy(raw)
    calibrate_latent_scale(calibrated)
    images = _calibration_images(count=4)
    with torch.no_grad():
        before, after = raw.encode(images), calibrated.encode(images)
        # decode(encode(x)) is the same function: the rescaling is undone before the decoder sees it.
        assert torch.allclose(raw.decode(before), calibrated.decode(after), atol=1e-4)
        flipped = calibrated.encode(images.flip(-1))
    # Uncalibrated, every latent is a near-constant offset; calibrated, content moves it by its own scale.
    assert before.std(dim=(0, 2, 3)).mean() < 0.2
    assert 0.6 < after.std(dim=(0, 2, 3)).mean() < 1.5 and after.mean().abs() < 0.3
    assert (flipped - after).pow(2).mean().sqrt() > 0.3


@pytest.mark.parametrize("old_keys", [False, True])
def test_official_layout_discovery_and_key_mapping(tmp_path, old_keys):
    dit, encoders = write_official_layout(tmp_path, old_text_encoder_keys=old_keys)
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1  # really sharded
    source = ModelSource(model_dir=str(tmp_path))
    loaded = source.load_dit()
    for key, value in dit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded_enc = source.load_encoders()
    assert source.encoder_fingerprint().startswith("dir:")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = encoders.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids))[-1]
        got = loaded_enc.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids))[-1]
    assert torch.equal(expected, got)
    for key, value in encoders.vae.state_dict().items():
        assert torch.equal(loaded_enc.vae.state_dict()[key], value), key
    assert loaded_enc.processor.tokenizer("<|im_start|>hi").input_ids == encoders.processor.tokenizer("<|im_start|>hi").input_ids


def test_incomplete_model_dir_lists_missing_files(tmp_path):
    write_official_layout(tmp_path)
    shards = sorted((tmp_path / "transformer").glob("*.safetensors"))
    shards[1].unlink()
    (tmp_path / "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(EditTunerError) as info:
        ModelSource(model_dir=str(tmp_path)).check(("transformer", "text_encoder", "vae", "processor"))
    message = str(info.value)
    assert shards[1].name in message and "vae/diffusion_pytorch_model.safetensors" in message
    with pytest.raises(EditTunerError, match="no such directory"):
        ModelSource(model_dir=str(tmp_path / "nope")).load_dit()


def test_wrong_weights_name_the_folder(tmp_path):
    write_official_layout(tmp_path)
    config = json.loads((tmp_path / "transformer/config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "transformer/config.json").write_text(json.dumps(config))
    with pytest.raises(EditTunerError, match="missing"):
        ModelSource(model_dir=str(tmp_path)).load_dit()
