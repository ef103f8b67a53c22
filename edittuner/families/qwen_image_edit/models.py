"""The engine's Qwen-Image models at any size, and loading them from a model directory in the official layout.

diffsynth's ``QwenImageDiT`` and ``QwenImageTextEncoder`` hard-code the 20B / 7B sizes. ``EditDiT`` and
``EditTextEncoder`` are subclasses whose constructors take the sizes from a config; every forward path,
block and helper is the engine's own, so the tiny model runs exactly the code the real one runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings
from diffsynth.models.qwen_image_dit import QwenEmbedRope, QwenImageDiT, QwenImageTransformerBlock
from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
from diffsynth.models.qwen_image_vae import QwenImageVAE
from safetensors import SafetensorError

from ...errors import EditTunerError
from ...weights import check_weight_files, load_strict, read_json, read_safetensors, weight_files
from .layout import check_model

if TYPE_CHECKING:
    from ...models import ModelSource

# Keys of diffusers' QwenImageTransformer2DModel config that shape the network.
DIT_CONFIG_KEYS = ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                   "axes_dims_rope", "in_channels", "out_channels", "patch_size")
VAE_CONFIG_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout")


class EditDiT(QwenImageDiT):
    """diffsynth's QwenImageDiT with its sizes taken from a diffusers-style transformer config."""

    def __init__(self, num_layers: int = 60, attention_head_dim: int = 128, num_attention_heads: int = 24,
                 joint_attention_dim: int = 3584, axes_dims_rope=(16, 56, 56), in_channels: int = 64,
                 out_channels: int = 16, patch_size: int = 2):
        torch.nn.Module.__init__(self)
        if sum(axes_dims_rope) != attention_head_dim:
            raise EditTunerError(f"transformer config: axes_dims_rope {list(axes_dims_rope)} must sum to "
                                 f"attention_head_dim {attention_head_dim}")
        if patch_size != 2 or in_channels != 64 or out_channels != 16:
            raise EditTunerError("transformer config: only patch_size 2, in_channels 64, out_channels 16 "
                                 "(the Qwen-Image latent layout) are supported")
        dim = num_attention_heads * attention_head_dim
        self.config = {"num_layers": num_layers, "attention_head_dim": attention_head_dim,
                       "num_attention_heads": num_attention_heads, "joint_attention_dim": joint_attention_dim,
                       "axes_dims_rope": list(axes_dims_rope), "in_channels": in_channels,
                       "out_channels": out_channels, "patch_size": patch_size}
        self.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(axes_dims_rope), scale_rope=True)
        self.time_text_embed = TimestepEmbeddings(256, dim, diffusers_compatible_format=True, scale=1000,
                                                  align_dtype_to_timestep=False, use_additional_t_cond=False)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = torch.nn.Linear(in_channels, dim)
        self.txt_in = torch.nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = torch.nn.ModuleList(
            [QwenImageTransformerBlock(dim=dim, num_attention_heads=num_attention_heads,
                                       attention_head_dim=attention_head_dim) for _ in range(num_layers)])
        self.norm_out = AdaLayerNorm(dim, single=True)
        self.proj_out = torch.nn.Linear(dim, patch_size * patch_size * out_channels)

    @classmethod
    def from_config(cls, config: dict) -> "EditDiT":
        return cls(**{k: config[k] for k in DIT_CONFIG_KEYS if k in config})


class EditTextEncoder(QwenImageTextEncoder):
    """diffsynth's QwenImageTextEncoder around any Qwen2.5-VL config (the engine's is fixed at 7B)."""

    def __init__(self, config):
        from transformers import Qwen2_5_VLModel
        torch.nn.Module.__init__(self)
        self.model = Qwen2_5_VLModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.config = config

    @classmethod
    def wrap(cls, hf_model) -> "EditTextEncoder":
        """Adopt a loaded ``Qwen2_5_VLForConditionalGeneration`` without copying its weights."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        self.config = hf_model.config
        return self


@dataclass
class Encoders:
    """What phase 1 needs: the Qwen2.5-VL text encoder with its processor, and the VAE."""

    text_encoder: EditTextEncoder
    processor: Any
    vae: QwenImageVAE
    fingerprint: str


def dit_config(source: ModelSource) -> dict:
    check_model(source, ("transformer",))
    return read_json(source.folder("transformer") / "config.json")


def dit_skeleton(config: dict) -> EditDiT:
    with torch.device("meta"):
        return EditDiT.from_config(config)


def load_dit(source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> EditDiT:
    check_model(source, ("transformer",))
    folder = source.folder("transformer")
    config = read_json(folder / "config.json")
    with torch.device("meta"):
        dit = EditDiT.from_config(config)
    # Rope tables are plain tensors computed in __init__, so they must not live on the meta device.
    dit.pos_embed = QwenEmbedRope(theta=10000, axes_dim=dit.config["axes_dims_rope"], scale_rope=True)
    state = read_safetensors(weight_files(folder, "diffusion_pytorch_model"), dtype)
    load_strict(dit, state, str(folder), assign=True)
    return dit.to(device)


def load_encoders(source: ModelSource, dtype: torch.dtype, device: str | torch.device,
                  fingerprint: str | None) -> Encoders:
    check_model(source, ("text_encoder", "vae", "processor"))
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    te_folder = source.folder("text_encoder")
    check_weight_files(weight_files(te_folder, "model"))   # transformers' own error would not name the file
    try:
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(te_folder), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise EditTunerError(f"{te_folder}: cannot load the Qwen2.5-VL text encoder ({exc})") from None
    text_encoder = EditTextEncoder.wrap(hf).eval()

    vae = load_vae(source, dtype, device)

    processor_folder = source.folder("processor")
    try:
        processor = Qwen2VLProcessor.from_pretrained(str(processor_folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise EditTunerError(f"{processor_folder}: cannot load the Qwen2-VL processor ({exc})") from None
    return Encoders(text_encoder.to(device), processor, vae, fingerprint)


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> QwenImageVAE:
    """The VAE alone: phase 2 decodes its validation previews with it (the text encoder stays unloaded)."""
    check_model(source, ("vae",))
    vae_folder = source.folder("vae")
    vae_config = read_json(vae_folder / "config.json")
    vae = QwenImageVAE(**{k: vae_config[k] for k in VAE_CONFIG_KEYS if k in vae_config})
    load_strict(vae, read_safetensors([vae_folder / "diffusion_pytorch_model.safetensors"], dtype), str(vae_folder))
    return vae.to(device=device, dtype=dtype).eval()
