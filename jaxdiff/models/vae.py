"""The KL-regularized autoencoder (AutoencoderKL) that maps images to SD's latent space.

Kingma & Welling 2014 (the VAE); Rombach et al. 2022 (its use in latent diffusion). Module and
parameter names mirror diffusers' `AutoencoderKL`. Images and latents are NHWC; images in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import config_io
from jaxdiff.models.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    activation,
    attention,
    conv,
    dense,
)

Dtype = Any

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKL config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise config_io.ConfigError(
                f"VAE config: unsupported down_block_types {self.down_block_types!r}"
            )
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise config_io.ConfigError(
                f"VAE config: unsupported up_block_types {self.up_block_types!r}"
            )

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, raw: dict) -> VAEConfig:
        return config_io.from_dict(cls, raw, what="VAE config", fixed={"norm_type": "group"})

    def to_diffusers(self) -> dict:
        return config_io.to_dict(self, class_name="AutoencoderKL")

    @classmethod
    def sd(cls) -> VAEConfig:
        """The VAE of SD 1.x and 2.x."""
        return cls()

    @classmethod
    def sd21(cls) -> VAEConfig:
        return dataclasses.replace(cls(), sample_size=768)

    @classmethod
    def sdxl(cls) -> VAEConfig:
        return dataclasses.replace(cls(), sample_size=1024, scaling_factor=0.13025)

    @classmethod
    def tiny(cls) -> VAEConfig:
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        )


# ----------------------------------------------------------------------------- blocks


class SpatialAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own group norm and a residual."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, 1e-6, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q = dense(c, ("embed", "heads"), name="to_q", **kw)(y)
        k = dense(c, ("embed", "heads"), name="to_k", **kw)(y)
        v = dense(c, ("embed", "heads"), name="to_v", **kw)(y)
        y = dense(c, ("heads", "embed"), name="to_out_0", **kw)(attention(q, k, v, num_heads=1))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D without a time embedding: resnet, attention, resnet."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = dict(groups=self.groups, eps=1e-6, act_fn=self.act_fn, **kw)
        x = ResnetBlock2D(self.channels, name="resnets_0", **res)(x)
        if self.add_attention:
            x = SpatialAttention(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, name="resnets_1", **res)(x)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D and UpDecoderBlock2D: resnets, then a down- or upsampler (or none)."""

    channels: int
    num_layers: int
    groups: int
    act_fn: str
    resample: str | None  # "down", "up" or None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.channels,
                groups=self.groups,
                eps=1e-6,
                act_fn=self.act_fn,
                name=f"resnets_{j}",
                **kw,
            )(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> [B, H/f, W/f, 2*latent]
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        for i, ch in enumerate(cfg.block_out_channels):
            x = ResnetStack(
                ch,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                cfg.act_fn,
                "down" if i < n - 1 else None,
                name=f"down_blocks_{i}",
                **kw,
            )(x)
        x = MidBlock(
            cfg.block_out_channels[-1],
            cfg.norm_num_groups,
            cfg.act_fn,
            cfg.mid_block_add_attention,
            name="mid_block",
            **kw,
        )(x)
        x = GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
        x = activation(cfg.act_fn)(x)
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):  # [B, h, w, latent] -> [B, h*f, w*f, 3]
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, name="conv_in", **kw)(z)
        x = MidBlock(
            chans[0],
            cfg.norm_num_groups,
            cfg.act_fn,
            cfg.mid_block_add_attention,
            name="mid_block",
            **kw,
        )(x)
        for i, ch in enumerate(chans):
            x = ResnetStack(
                ch,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                cfg.act_fn,
                "up" if i < len(chans) - 1 else None,
                name=f"up_blocks_{i}",
                **kw,
            )(x)
        x = GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
        x = activation(cfg.act_fn)(x)
        # The last convolution runs in float32: SDXL's VAE overflows in float16 here.
        return conv(
            cfg.out_channels, 3, name="conv_out", dtype=jnp.float32, param_dtype=self.param_dtype
        )(x)


# ----------------------------------------------------------------------------- the autoencoder


class DiagonalGaussian(NamedTuple):
    mean: jax.Array  # [B, h, w, latent]
    logvar: jax.Array  # [B, h, w, latent], clipped to [-30, 20] as diffusers does

    def sample(self, key):
        std = jnp.exp(0.5 * self.logvar)
        return self.mean + std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self):
        """KL divergence to N(0, I), summed over latent dimensions: [B]."""
        var = jnp.exp(self.logvar)
        return 0.5 * jnp.sum(jnp.square(self.mean) + var - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """`encode(images) -> DiagonalGaussian`, `decode(latents) -> images`, `__call__` does both.

    The latents here are the raw ones; `scale_latents` / `unscale_latents` apply the config's
    `scaling_factor` and `shift_factor` for the diffusion model.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, **kw)

    def encode(self, images) -> DiagonalGaussian:
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents):
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)  # float32

    def __call__(self, images, key=None):
        posterior = self.encode(images)
        z = posterior.mean if key is None else posterior.sample(key)
        return self.decode(z)

    def dummy_inputs(self, batch: int = 1, size: int | None = None):
        size = size or self.config.sample_size
        return dict(images=jnp.zeros((batch, size, size, self.config.in_channels), jnp.float32))


def scale_latents(config: VAEConfig, latents):
    """Raw VAE latents -> the diffusion model's latents."""
    shift = config.shift_factor or 0.0
    return (latents - shift) * config.scaling_factor


def unscale_latents(config: VAEConfig, latents):
    """The diffusion model's latents -> raw VAE latents for `decode`."""
    shift = config.shift_factor or 0.0
    return latents / config.scaling_factor + shift
