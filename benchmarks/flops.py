"""Analytic FLOP count of one LoRA training step of the Qwen-Image DiT, for MFU.

The model is ``edittuner.models.EditDiT`` (diffsynth's ``QwenImageDiT`` at any size) run through diffsynth's
``model_fn_qwen_image`` (what ``edittuner.objectives.DiTDenoiser`` calls at batch 1), with peft LoRA adapters
from ``edittuner.lora.inject_lora``. tests/test_flops.py checks every number here against
``torch.utils.flop_counter.FlopCounterMode`` on a small EditDiT.

Conventions
-----------
* One multiply-add is 2 FLOPs; an (M, K) @ (K, N) matmul is 2*M*K*N. Only matmuls are counted: Linear layers
  (bias adds are ignored, as FlopCounterMode ignores them in addmm) and the two attention matmuls. Elementwise
  work (LayerNorm/RMSNorm, RoPE, SiLU/GELU, softmax, the adaLN modulation, residual adds, LoRA's scaling and
  dropout, the loss) is not counted: it is O(tokens * width) against O(tokens * width^2) for the matmuls.
* Batch 1, as ``model_fn_qwen_image``. A batch of B same-shape samples (``batched_model_fn``) is B times this.

Symbols
-------
L layers, d = heads * head_dim (3072 in the real model), D_txt = joint_attention_dim (3584), C_in = 64 packed
latent channels in, C_out = 64 out (2x2 patch * 16 latent channels), N_i image tokens (target + references,
after 2x2 packing), N_t text tokens, S = N_i + N_t, r the LoRA rank, T the number of timestep embeddings:
T = 2 with ``zero_cond_t`` (2511: the sample's timestep and timestep 0 for the reference tokens), else 1.

Forward (``dit_forward_flops``)
-------------------------------
per block:
    image stream   2*N_i*d*d * 4 (to_q, to_k, to_v, to_out.0) + 2*N_i*d*4d * 2 (img_mlp)   = 24*N_i*d^2
    text stream    the same with N_t (add_q/k/v_proj, to_add_out, txt_mlp)                  = 24*N_t*d^2
    modulation     img_mod.1 on T timestep rows (2*T*d*6d), txt_mod.1 on 1 row (2*d*6d)     = 12*(T+1)*d^2
    attention      QK^T and PV over the joint sequence, all heads: 2 * 2*S*S*d             = 4*S^2*d
outside the blocks:
    img_in 2*N_i*C_in*d, txt_in 2*N_t*D_txt*d, time embedding MLP 2*T*(256*d + d*d), norm_out.linear 2*d*2d
    (one row), proj_out 2*N_i*d*C_out: proj_out runs over *all* image tokens, references included; the
    references' outputs are sliced off afterwards.
LoRA: every adapted Linear with M rows, fan-in k, fan-out n adds 2*M*r*(k + n) (x @ A^T, then @ B^T).
Adapted layers are those ``edittuner.lora.lora_module_names`` selects: a name equal to a target or ending in
"." + target, minus the last block's dead ends (``DEAD_END_IN_LAST_BLOCK``).

Backward (``lora_training_step_flops``), base frozen, only LoRA parameters require grad
---------------------------------------------------------------------------------------
What autograd actually runs, per Linear with M rows, fan-in k, fan-out n:
    frozen Linear: 2*M*k*n (input gradient) if its input requires grad and its output reaches the loss, else 0
                   (no weight gradient: the weight is frozen);
    LoRA adapter:  A's weight gradient 2*M*k*r, B's weight and input gradients 2 * 2*M*r*n, plus A's input
                   gradient 2*M*k*r only if the layer's input requires grad.
Attention: 2x its forward (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q) = 8*S^2*d per block.
Which inputs require grad is followed through the graph (``_linear_calls``). With the 2511 preset
(img_in, txt_in and proj_out adapted) both streams require grad from the first block on, so:
    * img_in, txt_in: no input gradient (latents and prompt embeddings are data), only their adapters';
    * the time embedding MLP and norm_out.linear: nothing at all (timestep in, nothing trainable upstream);
    * img_mod.1 / txt_mod.1: their input (the timestep embedding) needs no gradient, only their adapters';
    * last block: its text outputs never reach the loss (only image tokens go to proj_out), so to_add_out and
      txt_mlp (both Linears) run no backward; add_q_proj still does (autograd's attention backward produces a
      dQ for the text rows, zero as it is).
So for 2511, backward = (forward of the block Linears and proj_out, minus the last block's text tail, minus
the modulation Linears) + 2 * attention forward + the adapters' ~2x their forward.

Model FLOPs (what MFU uses) = forward + backward.
Hardware FLOPs = model FLOPs + what the GPU recomputes:
    * gradient checkpointing (diffsynth's ``gradient_checkpoint_forward``, non-reentrant
      ``torch.utils.checkpoint`` around each block): one more forward of every block, adapters included;
      the layers outside the blocks are not recomputed;
    * fused attention (FlashAttention, memory-efficient, cuDNN SDPA, FA3): the backward recomputes
      P = softmax(QK^T), one more 2*S^2*d per block (FlopCounterMode's formula for these kernels counts it too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edittuner.families import PRESETS
from edittuner.families.qwen_image_edit import selects_module

TIMESTEP_PROJ_DIM = 256  # TimestepEmbeddings(256, dim): sinusoidal features into the time embedding MLP


@dataclass(frozen=True)
class DiTShape:
    """What the FLOP count depends on: the DiT's sizes, the sequence lengths of one sample, the LoRA."""

    num_layers: int
    heads: int
    head_dim: int
    joint_attention_dim: int
    image_tokens: int  # target + references after 2x2 packing (1024x1024 -> 128x128 latents -> 4096 tokens)
    text_tokens: int  # prompt embedding length after the template prefix is dropped
    in_channels: int = 64  # packed latent channels into img_in (16 channels * 2x2 patch)
    out_channels: int = 64  # proj_out's width (EditDiT: patch_size**2 * out_channels = 4 * 16)
    lora_rank: int = 32
    lora_targets: tuple[str, ...] = field(default_factory=lambda: PRESETS["2511"].lora_targets)
    zero_cond_t: bool = True  # 2511: a second timestep embedding (t = 0) modulates the reference tokens

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def timestep_rows(self) -> int:
        return 2 if self.zero_cond_t else 1


@dataclass(frozen=True)
class _Linear:
    """One Linear call of the forward: its name in the DiT, rows, fan-in, fan-out, and autograd's view of it."""

    name: str
    rows: int
    fan_in: int
    fan_out: int
    lora: bool
    input_requires_grad: bool
    reaches_loss: bool
    in_block: bool

    @property
    def output_requires_grad(self) -> bool:
        return self.lora or self.input_requires_grad

    def forward(self, rank: int) -> int:
        base = 2 * self.rows * self.fan_in * self.fan_out
        return base + (2 * self.rows * rank * (self.fan_in + self.fan_out) if self.lora else 0)

    def backward(self, rank: int) -> int:
        if not (self.reaches_loss and self.output_requires_grad):
            return 0
        flops = 2 * self.rows * self.fan_in * self.fan_out if self.input_requires_grad else 0
        if self.lora:
            flops += 2 * self.rows * self.fan_in * rank  # dA
            flops += 2 * 2 * self.rows * rank * self.fan_out  # dB and d(x A^T)
            if self.input_requires_grad:
                flops += 2 * self.rows * self.fan_in * rank  # dx through A
        return flops


def _linear_calls(shape: DiTShape) -> tuple[list[_Linear], list[bool]]:
    """Every Linear call of one forward, in order, and per block whether its attention output requires grad."""
    d, n_i, n_t, rows_t = shape.width, shape.image_tokens, shape.text_tokens, shape.timestep_rows
    last = shape.num_layers - 1
    calls: list[_Linear] = []

    def linear(name, rows, fan_in, fan_out, input_rg, reaches=True, in_block=False) -> bool:
        call = _Linear(name, rows, fan_in, fan_out, selects_module(name, shape.lora_targets, shape.num_layers), input_rg, reaches,
                       in_block)
        calls.append(call)
        return call.output_requires_grad

    # Outside the blocks. Latents, prompt embeddings and the timestep are data: nothing upstream needs grad.
    img = linear("img_in", n_i, shape.in_channels, d, False)
    temb = linear("time_text_embed.timestep_embedder.linear_1", rows_t, TIMESTEP_PROJ_DIM, d, False)
    temb = linear("time_text_embed.timestep_embedder.linear_2", rows_t, d, d, temb)
    txt = linear("txt_in", n_t, shape.joint_attention_dim, d, False)

    attention_rg = []
    for i in range(shape.num_layers):
        p = f"transformer_blocks.{i}."
        # The text stream's outputs of the last block are discarded: its tail runs no backward.
        txt_tail_reaches = i < last

        def blk(name, rows, fan_in, fan_out, input_rg, reaches=True):
            return linear(p + name, rows, fan_in, fan_out, input_rg, reaches, in_block=True)

        img_mod = blk("img_mod.1", rows_t, d, 6 * d, temb)
        txt_mod = blk("txt_mod.1", 1, d, 6 * d, temb)  # on the first timestep embedding only
        img_x = img or img_mod  # modulated LayerNorm output
        txt_x = txt or txt_mod
        qkv = [blk("attn." + n, n_i, d, d, img_x) for n in ("to_q", "to_k", "to_v")]
        qkv += [blk("attn." + n, n_t, d, d, txt_x) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        attn = any(qkv)
        attention_rg.append(attn)
        img_attn = blk("attn.to_out.0", n_i, d, d, attn)
        txt_attn = blk("attn.to_add_out", n_t, d, d, attn, txt_tail_reaches)
        img = img or img_mod or img_attn  # residual + gated attention
        txt = txt or txt_mod or txt_attn
        hidden = blk("img_mlp.net.0.proj", n_i, d, 4 * d, img or img_mod)
        img_mlp = blk("img_mlp.net.2", n_i, 4 * d, d, hidden)
        hidden = blk("txt_mlp.net.0.proj", n_t, d, 4 * d, txt or txt_mod, txt_tail_reaches)
        txt_mlp = blk("txt_mlp.net.2", n_t, 4 * d, d, hidden, txt_tail_reaches)
        img = img or img_mod or img_mlp
        txt = txt or txt_mod or txt_mlp

    scale_shift = linear("norm_out.linear", 1, d, 2 * d, temb)
    linear("proj_out", n_i, d, shape.out_channels, img or scale_shift)  # all image tokens, references too
    return calls, attention_rg


def attention_forward_flops(shape: DiTShape) -> int:
    """QK^T and PV of one block's joint attention over text + image tokens, all heads: 4 * S^2 * d."""
    seq = shape.image_tokens + shape.text_tokens
    return 2 * 2 * seq * seq * shape.width


def dit_forward_flops(shape: DiTShape) -> int:
    """FLOPs of one forward of the DiT with its LoRA adapters at batch 1 (see the module docstring)."""
    calls, _ = _linear_calls(shape)
    return sum(c.forward(shape.lora_rank) for c in calls) + shape.num_layers * attention_forward_flops(shape)


def forward_breakdown(shape: DiTShape) -> dict[str, int]:
    """dit_forward_flops split into block Linears, attention, LoRA adapters and the layers outside the blocks."""
    calls, _ = _linear_calls(shape)
    r = shape.lora_rank
    lora = sum(c.forward(r) - c.forward(0) for c in calls)
    return {"block_linears": sum(c.forward(0) for c in calls if c.in_block),
            "attention": shape.num_layers * attention_forward_flops(shape),
            "lora": lora,
            "outside_blocks": sum(c.forward(0) for c in calls if not c.in_block)}


def lora_training_step_flops(shape: DiTShape, gradient_checkpointing: bool, fused_attention: bool = True) -> dict:
    """FLOPs of one LoRA training step (forward + backward, batch 1; the optimizer step is not counted).

    ``model_flops`` (forward + backward) is what MFU uses. ``hardware_flops`` adds what the GPU recomputes:
    one forward of every block with gradient checkpointing, and with ``fused_attention`` (FlashAttention /
    memory-efficient / cuDNN SDPA, FA3; False for PyTorch's math SDPA) the QK^T that the attention backward
    recomputes.
    """
    calls, attention_rg = _linear_calls(shape)
    r = shape.lora_rank
    attention = attention_forward_flops(shape)
    forward = sum(c.forward(r) for c in calls) + shape.num_layers * attention
    backward = sum(c.backward(r) for c in calls) + sum(2 * attention for rg in attention_rg if rg)
    recompute = 0
    if gradient_checkpointing:
        recompute = sum(c.forward(r) for c in calls if c.in_block) + shape.num_layers * attention
    attention_recompute = sum(attention // 2 for rg in attention_rg if rg) if fused_attention else 0
    return {"forward": forward, "backward": backward, "recompute": recompute,
            "attention_backward_recompute": attention_recompute,
            "model_flops": forward + backward,
            "hardware_flops": forward + backward + recompute + attention_recompute}


def mfu(model_flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilization: model_flops per step / seconds per step / peak FLOP/s (FLOP/s, not TFLOP/s)."""
    return model_flops / seconds / peak_flops


# Vendor datasheet peak dense (no 2:4 sparsity) BF16 tensor-core TFLOP/s, FP32 accumulate (NVIDIA's product
# pages / datasheets list the sparse figure, 2x these, with an asterisk). Keys are substrings of
# torch.cuda.get_device_name(); the first match wins, so the specific names come first.
PEAK_BF16_DENSE_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "H200 NVL": 835.0,
    "H200": 989.0,  # SXM
    "A100": 312.0,  # SXM and PCIe alike
    "L40S": 362.0,
    "RTX 4090": 165.0,  # GeForce: 165 with FP32 accumulate (330 with FP16 accumulate)
    "A6000": 155.0,  # RTX A6000 (Ampere), 154.8
}


def peak_tflops_for(name: str) -> float | None:
    """Dense BF16 peak TFLOP/s for a torch.cuda.get_device_name() string, or None for an unknown GPU."""
    for key, tflops in PEAK_BF16_DENSE_TFLOPS.items():
        if key.lower() in name.lower():
            return tflops
    return None


def vl_tokens_per_reference(vl_pixels: int = 384 * 384, aspect: float = 1.0) -> int:
    """Qwen2.5-VL tokens of one reference in the prompt embedding.

    diffsynth's QwenImageUnit_PromptEmbedder.resize_image sizes the reference to ``vl_pixels`` area in multiples
    of 32 (edittuner: --vl_pixels, default 384*384); Qwen2-VL's processor rounds each side to a multiple of 28
    (14 px patches, 2x2 merge), one token per 28x28: 384x384 -> 392x392 -> 14*14 = 196."""
    width_raw = (vl_pixels * aspect) ** 0.5
    width, height = round(width_raw / 32) * 32, round(width_raw / aspect / 32) * 32
    return max(1, round(height / 28)) * max(1, round(width / 28))


def edit_prompt_tokens(references: int = 1, instruction_tokens: int = 24, vl_pixels: int = 384 * 384) -> int:
    """Prompt embedding length of diffsynth's multi-image edit template (encode_prompt_edit_multi) after it
    drops the 64-token system prefix: per reference "Picture N: " (5 tokens: Picture, space, N, colon, space)
    + <|vision_start|> + the vision tokens + <|vision_end|>; then the instruction; then
    "<|im_end|>\\n<|im_start|>assistant\\n" (5 tokens). ``instruction_tokens`` is an estimate (24: a one-sentence
    edit instruction); the real Qwen tokenizer gives the exact count for a given prompt."""
    return references * (5 + 2 + vl_tokens_per_reference(vl_pixels)) + instruction_tokens + 5


def real_2511_shape(image_size: int = 1024, references: int = 1, text_tokens: int | None = None,
                    lora_rank: int = 32) -> DiTShape:
    """The real Qwen-Image-Edit-2511 DiT (60 blocks, 24 heads x 128 = 3072 wide, text 3584) with the 2511 LoRA
    preset, a square ``image_size`` target and ``references`` references of the same size (VAE /8, 2x2 packing:
    (image_size / 16)^2 tokens each). ``text_tokens`` defaults to edit_prompt_tokens(references) (232 for one
    reference). ``lora_rank`` defaults to the trainer's --rank default."""
    per_image = (image_size // 16) ** 2
    preset = PRESETS["2511"]
    return DiTShape(num_layers=60, heads=24, head_dim=128, joint_attention_dim=3584,
                    image_tokens=per_image * (1 + references),
                    text_tokens=edit_prompt_tokens(references) if text_tokens is None else text_tokens,
                    lora_rank=lora_rank, lora_targets=preset.lora_targets, zero_cond_t=preset.zero_cond_t)


if __name__ == "__main__":
    shape = real_2511_shape()
    print(shape)
    print({k: f"{v / 1e12:.2f} TFLOP" for k, v in forward_breakdown(shape).items()})
    print(f"forward {dit_forward_flops(shape) / 1e12:.2f} TFLOP")
    for ckpt in (False, True):
        step = lora_training_step_flops(shape, gradient_checkpointing=ckpt)
        print(f"gradient_checkpointing={ckpt}:", {k: f"{v / 1e12:.2f} TFLOP" for k, v in step.items()})
