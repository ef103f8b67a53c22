"""The engine's Qwen-Image models at any size, and loading them from a model directory in the official layout.

diffsynth's ``QwenImageDiT`` and ``QwenImageTextEncoder`` hard-code the 20B / 7B sizes. ``EditDiT`` and
``EditTextEncoder`` are subclasses whose constructors take the sizes from a config; every forward path,
block and helper is the engine's own, so the tiny model runs exactly the code the real one runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings
from diffsynth.models.qwen_image_dit import QwenEmbedRope, QwenImageDiT, QwenImageTransformerBlock
from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
from diffsynth.models.qwen_image_vae import QwenImageVAE
from safetensors import SafetensorError, safe_open

from .errors import EditTunerError

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


# ----------------------------------------------------------------------------------------------------------------
# Official layout: transformer/, text_encoder/, vae/, processor/ (tokenizer/ is optional for editing).

REQUIRED_FILES = {
    "transformer": ["config.json", ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")],
    "text_encoder": ["config.json", ("model.safetensors.index.json", "model.safetensors")],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "processor": [("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")],
}


def missing_files(component: str, folder: Path) -> list[str]:
    """Files of ``component`` absent from ``folder``, shards named in an index included."""
    missing = []
    for entry in REQUIRED_FILES[component]:
        options = entry if isinstance(entry, tuple) else (entry,)
        present = [name for name in options if (folder / name).is_file()]
        if not present:
            missing.append(str(folder / options[0]))
            continue
        if present[0].endswith(".index.json"):
            for shard in sorted(set(_read_index(folder / present[0]).values())):
                if not (folder / shard).is_file():
                    missing.append(str(folder / shard))
    return missing


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EditTunerError(f"{path}: not a valid safetensors index ({type(exc).__name__}: {exc}); re-download "
                             "that file") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EditTunerError(f"{path}: not a valid safetensors index (\"weight_map\" must map tensor names to "
                             "file names); re-download that file")
    return weight_map


def weight_files(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(_read_index(index).values()))]
    return [folder / f"{stem}.safetensors"]


# What a weight file that is truncated (an interrupted download), empty or not safetensors at all raises.
# SafetensorError subclasses neither OSError nor ValueError.
_WEIGHT_FILE_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def _bad_weight_file(path: Path, exc: BaseException) -> EditTunerError:
    return EditTunerError(f"{path}: not a complete safetensors file ({exc}); an interrupted download leaves a "
                          "truncated file: re-download that file")


def check_weight_files(files: list[Path]) -> None:
    """Open each file's header (cheap: no tensor is read), which is enough to catch a truncated download."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except _WEIGHT_FILE_ERRORS as exc:
            raise _bad_weight_file(path, exc) from None


def read_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except _WEIGHT_FILE_ERRORS as exc:
            raise _bad_weight_file(path, exc) from None
    return state


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """load_state_dict that turns key mismatches into one readable error."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise EditTunerError(f"{where}: weights do not match the model: {'; '.join(parts)}. "
                             "Check that the folder holds a Qwen-Image component of the right kind.")
    model.load_state_dict(state, strict=True, assign=assign)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EditTunerError(f"{path}: unreadable JSON ({exc}); re-download that file") from None


def _hash_folder(folder: Path) -> str:
    """Identity of a component folder: small files by content, weight files by name and size."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        if path.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(str(path.stat().st_size).encode())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a directory in the official layout (with optional per-component
    overrides, e.g. 2511's DiT with Qwen-Image's text encoder and VAE), or the built-in tiny model."""

    model_dir: str = "tiny"
    tiny_seed: int = 0
    transformer_dir: str | None = None
    text_encoder_dir: str | None = None
    vae_dir: str | None = None
    processor_dir: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.model_dir == "tiny"

    @property
    def uses_tiny_encoders(self) -> bool:
        return self.is_tiny and not any((self.text_encoder_dir, self.vae_dir, self.processor_dir))

    def folder(self, component: str) -> Path:
        override = getattr(self, f"{component}_dir")
        if override:
            return Path(override)
        if self.is_tiny:
            raise EditTunerError(f"--{component}_dir is needed when --model_dir is tiny")
        return Path(self.model_dir) / component

    def describe(self) -> str:
        return f"built-in tiny model (seed {self.tiny_seed})" if self.is_tiny else f"model directory {self.model_dir}"

    def check(self, components: tuple[str, ...]) -> None:
        if self.is_tiny and not any(getattr(self, f"{c}_dir") for c in components):
            return
        if not self.is_tiny and not Path(self.model_dir).is_dir():
            raise EditTunerError(f"--model_dir {self.model_dir}: no such directory; pass a local Qwen-Image-Edit "
                                 "folder (transformer/, text_encoder/, vae/, processor/) or 'tiny'")
        missing = [m for c in components for m in missing_files(c, self.folder(c))]
        if missing:
            listing = "\n  ".join(missing)
            raise EditTunerError(f"the model directory is incomplete; missing files:\n  {listing}\n"
                                 "Copy them from the official release, or point --<component>_dir at a folder that has them.")

    def encoder_fingerprint(self) -> str | None:
        """Identity of everything phase 1 encodes with; None when those folders are not available here."""
        if self.uses_tiny_encoders:
            from .tiny import tiny_fingerprint
            return tiny_fingerprint(self.tiny_seed)
        try:
            folders = [self.folder(c) for c in ("text_encoder", "vae", "processor")]
        except EditTunerError:
            return None
        if not all(f.is_dir() for f in folders):
            return None
        return "dir:" + "-".join(_hash_folder(f) for f in folders)

    # ---- loading ----------------------------------------------------------------------------------------------

    def load_dit(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> EditDiT:
        if self.is_tiny and not self.transformer_dir:
            from .tiny import build_tiny_dit
            return build_tiny_dit(self.tiny_seed).to(device=device, dtype=dtype)
        self.check(("transformer",))
        folder = self.folder("transformer")
        config = _read_json(folder / "config.json")
        with torch.device("meta"):
            dit = EditDiT.from_config(config)
        # Rope tables are plain tensors computed in __init__, so they must not live on the meta device.
        dit.pos_embed = QwenEmbedRope(theta=10000, axes_dim=dit.config["axes_dims_rope"], scale_rope=True)
        state = read_safetensors(weight_files(folder, "diffusion_pytorch_model"), dtype)
        load_strict(dit, state, str(folder), assign=True)
        return dit.to(device)

    def load_encoders(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Encoders:
        if self.uses_tiny_encoders:
            from .tiny import build_tiny_encoders
            encoders = build_tiny_encoders(self.tiny_seed)
            encoders.text_encoder.to(device=device, dtype=dtype)
            encoders.vae.to(device=device, dtype=dtype)
            return encoders
        self.check(("text_encoder", "vae", "processor"))
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

        te_folder = self.folder("text_encoder")
        check_weight_files(weight_files(te_folder, "model"))   # transformers' own error would not name the file
        try:
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(te_folder), dtype=dtype, local_files_only=True)
        except (OSError, ValueError, SafetensorError) as exc:
            raise EditTunerError(f"{te_folder}: cannot load the Qwen2.5-VL text encoder ({exc})") from None
        text_encoder = EditTextEncoder.wrap(hf).eval()

        vae = self.load_vae(dtype, device)

        processor_folder = self.folder("processor")
        try:
            processor = Qwen2VLProcessor.from_pretrained(str(processor_folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise EditTunerError(f"{processor_folder}: cannot load the Qwen2-VL processor ({exc})") from None
        return Encoders(text_encoder.to(device), processor, vae, self.encoder_fingerprint())

    def load_vae(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> QwenImageVAE:
        """The VAE alone: phase 2 decodes its validation previews with it (the text encoder stays unloaded)."""
        if self.uses_tiny_encoders:
            from .tiny import build_tiny_encoders
            return build_tiny_encoders(self.tiny_seed).vae.to(device=device, dtype=dtype)
        self.check(("vae",))
        vae_folder = self.folder("vae")
        vae_config = _read_json(vae_folder / "config.json")
        vae = QwenImageVAE(**{k: vae_config[k] for k in VAE_CONFIG_KEYS if k in vae_config})
        load_strict(vae, read_safetensors([vae_folder / "diffusion_pytorch_model.safetensors"], dtype), str(vae_folder))
        return vae.to(device=device, dtype=dtype).eval()


def model_source_from_args(args) -> ModelSource:
    return ModelSource(model_dir=args.model_dir, tiny_seed=args.tiny_seed,
                       transformer_dir=getattr(args, "transformer_dir", None),
                       text_encoder_dir=getattr(args, "text_encoder_dir", None),
                       vae_dir=getattr(args, "vae_dir", None), processor_dir=getattr(args, "processor_dir", None))
