"""Our math against independent references: the engine's own loss, and diffusers' transformer."""

import pytest
import torch
from diffsynth.diffusion.loss import FlowMatchSFTLoss
from diffsynth.pipelines.qwen_image import QwenImagePipeline, model_fn_qwen_image
from einops import rearrange

from edittuner.objectives import FlowMatchConfig, flow_matching_losses
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser, training_scheduler
from edittuner.families.qwen_image_edit.tiny import TINY_DIT, TINY_TEXT_DIM, build_tiny_dit


def _inputs(seed=0, h=8, w=12, ref_hw=((8, 12),), text_len=37):
    g = torch.Generator().manual_seed(seed)
    return {"input_latents": torch.randn(1, 16, h, w, generator=g),
            "edit_latents": [torch.randn(1, 16, rh, rw, generator=g) for rh, rw in ref_hw],
            "prompt_emb": torch.randn(1, text_len, TINY_TEXT_DIM, generator=g),
            "prompt_emb_mask": torch.ones(1, text_len, dtype=torch.long), "height": h * 8, "width": w * 8}


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_engine_flow_match_sft_loss(seed, zero_cond_t):
    dit = build_tiny_dit(seed)
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = dit
    pipe.scheduler.set_timesteps(1000, training=True)
    inputs = _inputs(seed, ref_hw=((8, 12), (6, 6)))
    torch.manual_seed(100 + seed)
    engine = FlowMatchSFTLoss(pipe, **dict(inputs, zero_cond_t=zero_cond_t))
    conditioning = {k: v for k, v in inputs.items() if k != "input_latents"}
    ours = flow_matching_losses(DiTDenoiser(dit), training_scheduler(), [inputs["input_latents"]], [100 + seed],
                                dict(conditioning, zero_cond_t=zero_cond_t))[0]
    # Same ops in the same order on the same RNG draws: exactly equal.
    assert torch.equal(ours, engine)


def test_uniform_mask_weighting_is_plain_mse_and_masks_shift_weight():
    dit = build_tiny_dit(0)
    inputs = _inputs(3)
    conditioning = {k: v for k, v in inputs.items() if k != "input_latents"}
    mask = torch.zeros(1, 1, 8, 12); mask[..., :4, :] = 1
    losses = {}
    for name, cfg in {"plain": FlowMatchConfig(), "equal": FlowMatchConfig(masked_weight=2, unmasked_weight=2),
                      "inside": FlowMatchConfig(masked_weight=1, unmasked_weight=0)}.items():
        losses[name] = flow_matching_losses(DiTDenoiser(dit), training_scheduler(), [inputs["input_latents"]], [7],
                                            conditioning, cfg, masks=[mask])[0]
    assert torch.allclose(losses["plain"], losses["equal"])
    # With all weight inside the mask, the loss is the MSE over the masked half only: recompute it directly.
    torch.manual_seed(7)
    scheduler = training_scheduler()
    tid = torch.randint(0, 1000, (1,)); t = scheduler.timesteps[tid]
    noise = torch.randn_like(inputs["input_latents"])
    x_t = scheduler.add_noise(inputs["input_latents"], noise, t)
    pred = model_fn_qwen_image(dit=dit, latents=x_t, timestep=t, **conditioning)
    direct = ((pred - (noise - inputs["input_latents"])) ** 2)[..., :4, :].mean() * scheduler.training_weight(t)
    assert torch.allclose(losses["inside"], direct, rtol=1e-5)


def _diffusers_peer(dit, zero_cond_t):
    from diffusers import QwenImageTransformer2DModel
    peer = QwenImageTransformer2DModel(**TINY_DIT, zero_cond_t=zero_cond_t)
    peer.load_state_dict(dit.state_dict())
    return peer.eval()


def _with_tanh_gelu(dit):
    """diffsynth's MLP uses x*sigmoid(1.702x); diffusers (the reference implementation) uses tanh-GELU."""
    import types
    from diffsynth.models.qwen_image_dit import ApproximateGELU
    for module in dit.modules():
        if isinstance(module, ApproximateGELU):
            module.forward = types.MethodType(lambda self, x: torch.nn.functional.gelu(self.proj(x), approximate="tanh"), module)
    return dit


def _both_outputs(dit, peer, zero_cond_t, ref_hw):
    inputs = _inputs(9, ref_hw=ref_hw)
    timestep = torch.tensor([437.0])
    pack = lambda x: rearrange(x, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)  # noqa: E731
    with torch.no_grad():
        ours = model_fn_qwen_image(dit=dit, latents=inputs["input_latents"], timestep=timestep,
                                   prompt_emb=inputs["prompt_emb"], prompt_emb_mask=inputs["prompt_emb_mask"],
                                   height=inputs["height"], width=inputs["width"],
                                   edit_latents=inputs["edit_latents"], zero_cond_t=zero_cond_t)
        packed = torch.cat([pack(inputs["input_latents"])] + [pack(e) for e in inputs["edit_latents"]], dim=1)
        shapes = [[(1, 4, 6)] + [(1, h // 2, w // 2) for h, w in ref_hw]]
        theirs = peer(hidden_states=packed, encoder_hidden_states=inputs["prompt_emb"],
                      encoder_hidden_states_mask=inputs["prompt_emb_mask"].float(), timestep=timestep / 1000,
                      img_shapes=shapes, return_dict=False)[0][:, :24]
    return pack(ours), theirs


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("ref_hw", [((8, 12),), ((6, 10),), ((10, 6), (4, 4))])
def test_dit_matches_diffusers_transformer(zero_cond_t, ref_hw):
    dit = build_tiny_dit(5).eval()
    peer = _diffusers_peer(dit, zero_cond_t)
    # 1) The engine's own activation: diffsynth approximates GELU by x*sigmoid(1.702x), which is up to 0.021
    #    away from diffusers' tanh-GELU pointwise; through the tiny model's 2 blocks that stays below 1e-2.
    ours, theirs = _both_outputs(dit, peer, zero_cond_t, ref_hw)
    assert ours.abs().mean() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)
    # 2) With that one activation aligned, everything else (rope over references of any size, zero_cond_t's
    #    two-row modulation, attention, norms) agrees to fp32 round-off: 1e-6 on O(1) outputs.
    ours, theirs = _both_outputs(_with_tanh_gelu(dit), peer, zero_cond_t, ref_hw)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_zero_cond_t_modulates_reference_tokens_with_t0():
    dit = build_tiny_dit(2).eval()
    inputs = _inputs(4, ref_hw=((6, 10),))
    timestep = torch.tensor([700.0])
    seen = {}

    def hook(module, args, kwargs):
        seen["temb"], seen["index"] = kwargs["temb"], kwargs["modulate_index"]

    handle = dit.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    kwargs = {k: v for k, v in inputs.items() if k != "input_latents"}
    with torch.no_grad():
        on = model_fn_qwen_image(dit=dit, latents=inputs["input_latents"], timestep=timestep, zero_cond_t=True, **kwargs)
        temb_on, index = seen["temb"], seen["index"]
        off = model_fn_qwen_image(dit=dit, latents=inputs["input_latents"], timestep=timestep, zero_cond_t=False, **kwargs)
        t0 = dit.time_text_embed(torch.tensor([0.0]), torch.float32)
        t = dit.time_text_embed(timestep / 1000, torch.float32)
    handle.remove()
    assert temb_on.shape[0] == 2
    torch.testing.assert_close(temb_on[0], t[0]); torch.testing.assert_close(temb_on[1], t0[0])
    # target tokens (4*6) use row 0, the reference tokens (3*5) use row 1 = t=0
    assert index.tolist() == [[0] * 24 + [1] * 15]
    assert seen["index"] is None
    assert not torch.allclose(on, off)
