"""jaxdiff's UNet, VAE and CLIP text encoders against diffusers / transformers in float32.

Each reference model is tiny and random, saved with `save_pretrained`, loaded by jaxdiff's
loader, and run on the same inputs.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from reference import (
    CLIP_SD1,
    CLIP_SD2,
    UNET_INPAINT,
    UNET_SD1,
    UNET_SD2,
    UNET_SDXL,
    VAE_TINY,
    diffusers_unet,
    diffusers_vae,
    nchw,
    nhwc,
    token_ids,
    transformers_clip,
)
from tolerances import assert_close

from jaxdiff.convert import load_component
from jaxdiff.models.build import module_for


@pytest.mark.parametrize(
    "name,config,size",
    [
        ("sd1", UNET_SD1, (16, 16)),
        ("sd1-odd-size", UNET_SD1, (10, 14)),  # skips of odd size: upsample to the skip's size
        ("sd2", UNET_SD2, (16, 16)),
        ("sdxl", UNET_SDXL, (16, 16)),
        ("inpaint", UNET_INPAINT, (16, 16)),
    ],
)
def test_unet_matches_diffusers(tmp_path, name, config, size):
    ref = diffusers_unet(config)
    ref.save_pretrained(tmp_path)
    cfg, params = load_component(tmp_path)
    model = module_for(cfg)

    rng = np.random.default_rng(0)
    b = 2
    sample = rng.standard_normal((b, *size, config["in_channels"])).astype(np.float32)
    t = np.array([999.0, 17.0], np.float32)
    ctx = rng.standard_normal((b, 7, ref.config.cross_attention_dim)).astype(np.float32)
    extra, ref_extra = {}, {}
    if config.get("addition_embed_type") == "text_time":
        text_embeds = rng.standard_normal((b, 32)).astype(np.float32)
        time_ids = np.array(
            [[512, 512, 0, 0, 512, 512], [1024, 768, 16, 32, 1024, 1024]], np.float32
        )
        extra = dict(text_embeds=text_embeds, time_ids=time_ids)
        ref_extra = dict(
            added_cond_kwargs=dict(
                text_embeds=torch.from_numpy(text_embeds), time_ids=torch.from_numpy(time_ids)
            )
        )
    out = jax.jit(model.apply)({"params": params}, sample, t, ctx, **extra)
    with torch.no_grad():
        expected = ref(nchw(sample), torch.from_numpy(t), torch.from_numpy(ctx), **ref_extra).sample
    assert_close(out, nhwc(expected), f"{name} UNet noise prediction")


def test_vae_matches_diffusers(tmp_path):
    ref = diffusers_vae(VAE_TINY)
    ref.save_pretrained(tmp_path)
    cfg, params = load_component(tmp_path)
    model = module_for(cfg)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)

    posterior = jax.jit(functools.partial(model.apply, method=model.encode))(
        {"params": params}, images
    )
    decoded = jax.jit(functools.partial(model.apply, method=model.decode))(
        {"params": params}, latents
    )
    with torch.no_grad():
        dist = ref.encode(nchw(images)).latent_dist
        ref_decoded = ref.decode(nchw(latents)).sample
    assert_close(posterior.mean, nhwc(dist.mean), "VAE encoder mean")
    assert_close(posterior.logvar, nhwc(dist.logvar), "VAE encoder logvar")
    assert_close(decoded, nhwc(ref_decoded), "VAE decoder output")
    assert cfg.downsampling_factor == 4 and posterior.mean.shape == (2, 8, 8, 4)


@pytest.mark.parametrize(
    "name,config,with_projection,use_mask",
    [
        ("sd1", CLIP_SD1, False, False),
        ("sd2", CLIP_SD2, False, False),
        ("sdxl-2", CLIP_SD2, True, False),
        ("masked", CLIP_SD2, True, True),
    ],
)
def test_clip_matches_transformers(tmp_path, name, config, with_projection, use_mask):
    ref = transformers_clip(config, with_projection)
    ref.save_pretrained(tmp_path)
    cfg, params = load_component(tmp_path)
    assert cfg.with_projection == with_projection
    model = module_for(cfg)
    ids = token_ids(
        np.random.default_rng(2), 3, 16, config["vocab_size"], 998, 999, config["pad_token_id"]
    )
    mask = (np.arange(16)[None] <= np.argmax(ids == 999, axis=1)[:, None]).astype(np.int64)
    out = jax.jit(model.apply)({"params": params}, ids, mask if use_mask else None)
    with torch.no_grad():
        expected = ref(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask) if use_mask else None,
            output_hidden_states=True,
        )
    assert len(out.hidden_states) == config["num_hidden_layers"] + 1
    for i, (h, e) in enumerate(zip(out.hidden_states, expected.hidden_states, strict=True)):
        assert_close(h, e.numpy(), f"{name} hidden state {i}")
    assert_close(
        out.last_hidden_state, expected.last_hidden_state.numpy(), f"{name} last hidden state"
    )
    if with_projection:
        assert_close(out.text_embeds, expected.text_embeds.numpy(), f"{name} projected output")
    else:
        assert_close(out.pooler_output, expected.pooler_output.numpy(), f"{name} pooled output")


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers(tmp_path):
    """The real SD 1.5 UNet (859,520,964 parameters), random weights, at a 64x64 latent."""
    from jaxdiff.models.unet import UNetConfig

    config = UNetConfig.sd15().to_diffusers()
    ref = diffusers_unet({k: v for k, v in config.items() if not k.startswith("_")})
    ref.save_pretrained(tmp_path)
    cfg, params = load_component(tmp_path)
    assert cfg == UNetConfig.sd15()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    t = np.array([421.0], np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    out = jax.jit(module_for(cfg).apply)({"params": params}, sample, t, ctx)
    with torch.no_grad():
        expected = ref(nchw(sample), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    assert_close(out, nhwc(expected), "SD 1.5 UNet noise prediction")
