"""Tiny random PyTorch reference models (diffusers / transformers) built inside the tests."""

import numpy as np
import torch

# Configs of tiny models in the shape of each released family. Every one exercises the options
# that family's config.json sets.
UNET_SD1 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=4,  # the quirk: 4 heads
)
UNET_SD2 = dict(
    UNET_SD1,
    attention_head_dim=(2, 4, 8),  # SD 2.x: per-block head counts
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=40,
    flip_sin_to_cos=True,
    freq_shift=0,
)
UNET_SDXL = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=8,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=48,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + 6 embedded ids
)
UNET_INPAINT = dict(UNET_SD1, in_channels=9)

VAE_TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

CLIP_SD1 = dict(  # ViT-L-like: quick_gelu, and the legacy eos id 2 (pool at the largest id)
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    projection_dim=24,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_SD2 = dict(  # OpenCLIP-like: gelu, real eos id
    CLIP_SD1,
    hidden_act="gelu",
    eos_token_id=999,
    bos_token_id=998,
    pad_token_id=0,
    hidden_size=40,
    num_attention_heads=5,
    layer_norm_eps=1e-5,
)


def perturb_(module, seed=0, scale=0.02):
    """Add noise to every parameter: zero-initialized layers and unit norms become informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def diffusers_unet(config, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb_(UNet2DConditionModel(**config), seed)


def diffusers_vae(config, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(**config), seed)


def transformers_clip(config, with_projection=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return perturb_(cls(CLIPTextConfig(**config)), seed)


def nchw(x):
    """NHWC numpy/jax -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
    """NCHW torch -> NHWC numpy."""
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def token_ids(rng, batch, length, vocab, bos, eos, pad):
    """Random prompts: bos, words, eos, then padding; different lengths per row."""
    ids = np.full((batch, length), pad, np.int64)
    for b in range(batch):
        n = rng.integers(1, length - 2)
        ids[b, 0] = bos
        ids[b, 1 : n + 1] = rng.integers(3, min(vocab, 900), n)
        ids[b, n + 1] = eos
    return ids


# jaxdiff sampler -> the diffusers scheduler it reproduces, with the options that select it
# (diffusers' defaults otherwise: solver_order 2 for DPM-Solver++ and UniPC).
SCHEDULER_OF = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
