"""The built-in tiny model: the engine's classes at tiny width and depth, made deterministically from a seed.

Nothing is downloaded: the tokenizer is a byte-level BPE with Qwen's chat special tokens, built with
``tokenizers``; the processor is transformers' Qwen2-VL processor around it; the text encoder is a
two-layer Qwen2.5-VL with a vision tower; the VAE and DiT are diffsynth's classes at small sizes. The text encoder
is random from the seed; the VAE loads ``tiny_vae.safetensors`` beside this file, fitted to the demo photos by
``scripts/fit_tiny_vae.py`` (a random VAE reconstructs no photo, so previews would show nothing), the same weights
for every seed. The DiT of seed 0 (the default) loads ``tiny_dit.safetensors``, a base fitted by
``scripts/fit_tiny_dit.py`` to reproduce its first reference (a random DiT outputs noise, so a demo LoRA could show
no edit); other seeds give random inits, for tests that need distinct models.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from diffsynth.models.qwen_image_vae import QwenImageVAE

from ...errors import EditTunerError
from .models import EditDiT, EditTextEncoder, Encoders

TINY_TEXT_DIM = 32
# Width 128: a 2x2 patch of 16 latent channels is 64 numbers, and a narrower stream cannot carry it to copy it.
TINY_DIT = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 8,
            "joint_attention_dim": TINY_TEXT_DIM, "axes_dims_rope": [4, 6, 6],
            "in_channels": 64, "out_channels": 16, "patch_size": 2}
TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_scales": [],
            "temperal_downsample": [False, True, True], "dropout": 0.0}
TINY_VAE_WEIGHTS = Path(__file__).with_name("tiny_vae.safetensors")
TINY_DIT_WEIGHTS = Path(__file__).with_name("tiny_dit.safetensors")
FITTED_DIT_SEED = 0
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _seeded(seed: int, salt: int):
    """A forked RNG so that building the tiny model never disturbs the caller's random state."""
    rng = torch.random.fork_rng(devices=[])
    rng.__enter__()
    torch.manual_seed(seed * 1000 + salt)
    return rng


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    # Byte-level BPE with no merges: every byte is a token, so any prompt encodes, deterministically.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)


def build_processor():
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer()
    # Same patch geometry as the real processor (14 px patches, 2x2 merge, temporal 2).
    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def tiny_text_encoder_config():
    from transformers import Qwen2_5_VLConfig

    tokenizer = build_tokenizer()
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    text = {"hidden_size": TINY_TEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tokenizer),
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": TINY_TEXT_DIM, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1], "in_chans": 3}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def random_tiny_dit(seed: int = 0) -> EditDiT:
    rng = _seeded(seed, 1)
    try:
        return EditDiT.from_config(TINY_DIT)
    finally:
        rng.__exit__(None, None, None)


def with_fitted_base(dit: torch.nn.Module, seed: int, path: Path) -> torch.nn.Module:
    """Seed 0: the random init replaced by the fitted base in ``path``; any other seed: the random init as it is."""
    if seed == FITTED_DIT_SEED:
        dit.load_state_dict(fitted_weights(path, "DiT", "fit_tiny_dit.py"))
    return dit


def build_tiny_dit(seed: int = 0) -> EditDiT:
    return with_fitted_base(random_tiny_dit(seed), seed, TINY_DIT_WEIGHTS)


@lru_cache(maxsize=4)
def _tiny_encoder_state(seed: int):
    rng = _seeded(seed, 2)
    try:
        text_encoder = EditTextEncoder(tiny_text_encoder_config())
    finally:
        rng.__exit__(None, None, None)
    return text_encoder.state_dict(), fitted_weights(TINY_VAE_WEIGHTS)


@lru_cache(maxsize=4)
def fitted_weights(path: Path, what: str = "VAE", script: str = "fit_tiny_vae.py") -> dict[str, torch.Tensor]:
    """A tiny model's committed fitted weights (the LongCat family's tiny model reads its own VAE file)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise EditTunerError(f"{path}: the built-in tiny model's {what} weights are missing (a broken install?); "
                             f"reinstall edittuner, or remake them with `python scripts/{script}`")
    return load_file(str(path))


@lru_cache(maxsize=4)
def weights_digest(path: Path) -> str:
    """sha256 of a weights file: part of the tiny model's fingerprint, so caches follow the weights."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _calibration_images(count: int = 8, size: int = 64) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1]: content at several scales, like photographs, from the current RNG."""
    fields = []
    for _ in range(count):
        field = sum(torch.nn.functional.interpolate(torch.randn(1, 3, cells, cells), size=(size, size), mode="bilinear",
                                                    align_corners=False) / cells ** 0.5 for cells in (2, 4, 8, 16))
        fields.append(torch.tanh(field))
    return torch.cat(fields)


def _round3(x: torch.Tensor) -> torch.Tensor:
    """Round to 3 significant digits, in float32."""
    scale = 10.0 ** (torch.floor(torch.log10(x.abs().clamp_min(1e-12))) - 2)
    return (torch.round(x / scale) * scale).float()


@torch.no_grad()
def calibrate_latent_scale(vae: QwenImageVAE) -> None:
    """Give the tiny VAE the latent statistics the engine assumes of the real one (scripts/fit_tiny_vae.py, after
    fitting; the committed weights hold the result).

    ``QwenImageVAE.encode`` normalises with the real VAE's per-channel mean and std. A random encoder's
    raw output is ~0.1 with a content spread of ~0.05, so after that normalisation every latent is a
    near-constant offset (content moves it by ~1 %) and a model cannot tell two images apart. We rescale
    ``quant_conv`` so that, on smooth random images, each normalised channel has mean 0 and std 1, and
    fold the inverse into ``post_quant_conv`` so that decoding sees exactly what it saw before.
    """
    # The tiny model must be bitwise the same in every process (a cache made by one is checked against
    # another's fingerprint and resumed by a third), but conv results depend on the thread count: measure
    # on one thread and round the statistics to 3 significant digits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = vae.quant_conv(vae.encoder(_calibration_images().unsqueeze(2)))[:, :vae.z_dim].double()
    finally:
        torch.set_num_threads(threads)
    raw_mean, raw_std = _round3(raw.mean(dim=(0, 2, 3, 4))), _round3(raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-6))
    real_mean, real_std = vae.mean.flatten(), 1 / vae.std.flatten()
    gain = real_std / raw_std                       # raw -> real scale: (raw - raw_mean) * gain + real_mean
    quant = vae.quant_conv
    quant.weight[:vae.z_dim] *= gain.view(-1, 1, 1, 1, 1)
    quant.bias[:vae.z_dim] = (quant.bias[:vae.z_dim] - raw_mean) * gain + real_mean
    post = vae.post_quant_conv                      # undo it: raw = (real - real_mean) / gain + raw_mean
    weight = post.weight.flatten(1)
    post.bias += weight @ (raw_mean - real_mean / gain)
    post.weight /= gain.view(1, -1, 1, 1, 1)


def build_tiny_encoders(seed: int = 0) -> Encoders:
    te_state, vae_state = _tiny_encoder_state(seed)
    text_encoder = EditTextEncoder(tiny_text_encoder_config())
    text_encoder.load_state_dict(te_state)
    vae = QwenImageVAE(**TINY_VAE)
    vae.load_state_dict(vae_state)
    return Encoders(text_encoder.eval(), build_processor(), vae.eval(), tiny_fingerprint(seed))


def tiny_fingerprint(seed: int) -> str:
    spec = json.dumps({"seed": seed, "text": tiny_text_encoder_config().to_dict(), "vae": TINY_VAE,
                       "vae_weights": weights_digest(TINY_VAE_WEIGHTS), "tokens": SPECIAL_TOKENS},
                      sort_keys=True, default=str)
    return "tiny:" + hashlib.sha256(spec.encode()).hexdigest()[:16]
