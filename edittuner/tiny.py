"""The built-in tiny model: the engine's classes at tiny width and depth, made deterministically from a seed.

Nothing is downloaded: the tokenizer is a byte-level BPE with Qwen's chat special tokens, built with
``tokenizers``; the processor is transformers' Qwen2-VL processor around it; the text encoder is a
two-layer Qwen2.5-VL with a vision tower; the VAE and DiT are diffsynth's classes at small sizes.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import torch
from diffsynth.models.qwen_image_vae import QwenImageVAE

from .models import EditDiT, EditTextEncoder, Encoders

TINY_TEXT_DIM = 32
TINY_DIT = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
            "joint_attention_dim": TINY_TEXT_DIM, "axes_dims_rope": [4, 6, 6],
            "in_channels": 64, "out_channels": 16, "patch_size": 2}
TINY_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_scales": [],
            "temperal_downsample": [False, True, True], "dropout": 0.0}
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


def build_tiny_dit(seed: int = 0) -> EditDiT:
    rng = _seeded(seed, 1)
    try:
        return EditDiT.from_config(TINY_DIT)
    finally:
        rng.__exit__(None, None, None)


@lru_cache(maxsize=4)
def _tiny_encoder_state(seed: int):
    rng = _seeded(seed, 2)
    try:
        text_encoder = EditTextEncoder(tiny_text_encoder_config())
        vae = QwenImageVAE(**TINY_VAE)
    finally:
        rng.__exit__(None, None, None)
    return text_encoder.state_dict(), vae.state_dict()


def build_tiny_encoders(seed: int = 0) -> Encoders:
    te_state, vae_state = _tiny_encoder_state(seed)
    text_encoder = EditTextEncoder(tiny_text_encoder_config())
    text_encoder.load_state_dict(te_state)
    vae = QwenImageVAE(**TINY_VAE)
    vae.load_state_dict(vae_state)
    return Encoders(text_encoder.eval(), build_processor(), vae.eval(), tiny_fingerprint(seed))


def tiny_fingerprint(seed: int) -> str:
    spec = json.dumps({"seed": seed, "text": tiny_text_encoder_config().to_dict(), "vae": TINY_VAE,
                       "tokens": SPECIAL_TOKENS}, sort_keys=True, default=str)
    return "tiny:" + hashlib.sha256(spec.encode()).hexdigest()[:16]
