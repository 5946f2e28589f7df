"""The conditional UNet of Stable Diffusion 1.x, 2.x, SDXL and the inpainting models.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"; Podell et al.
2023, "SDXL". The module tree and parameter names mirror diffusers' `UNet2DConditionModel`
(`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel` is diffusers'
`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight`), so converting weights is a
rename plus kernel transposes. Inputs and activations are NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from jaxdiff.models import config_io
from jaxdiff.models.layers import (
    Downsample2D,
    GroupNorm,
    LayerNorm,
    ResnetBlock2D,
    Upsample2D,
    activation,
    attention,
    conv,
    dense,
    gelu,
)

Dtype = Any

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' UNet2DConditionModel config.json that SD models set.

    Field names and meanings are diffusers' own, quirks included: `attention_head_dim` is the
    number of heads when `num_attention_heads` is unset (see `heads`).
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # jaxdiff's attention softmax is always float32
    resnet_time_scale_shift: str = "default"
    resnet_out_scale_factor: float = 1.0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise config_io.ConfigError(
                "UNet config: down_block_types, up_block_types and block_out_channels differ in length"
            )
        known_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
        known_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
        for t in self.down_block_types:
            if t not in known_down:
                raise config_io.ConfigError(f"UNet config: unsupported down block type {t!r}")
        for t in self.up_block_types:
            if t not in known_up:
                raise config_io.ConfigError(f"UNet config: unsupported up block type {t!r}")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise config_io.ConfigError(
                f"UNet config: unsupported mid block {self.mid_block_type!r}"
            )
        if self.addition_embed_type not in (None, "text_time"):
            raise config_io.ConfigError(
                f"UNet config: unsupported addition_embed_type {self.addition_embed_type!r}"
            )
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise config_io.ConfigError(
                f"UNet config: unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}"
            )
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            config_io.per_block(getattr(self, name), n, f"UNet config: {name}")
        config_io.per_block(self.heads_raw, n, "UNet config: num_attention_heads")

    # Per-block views of settings that diffusers accepts as one value or one per block.
    @property
    def heads_raw(self):
        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`, a naming
        # quirk kept for compatibility with the first SD configs.
        return self.num_attention_heads or self.attention_head_dim

    @property
    def heads(self) -> tuple[int, ...]:
        return config_io.per_block(self.heads_raw, len(self.block_out_channels), "heads")

    @property
    def layers(self) -> tuple[int, ...]:
        return config_io.per_block(self.layers_per_block, len(self.block_out_channels), "layers")

    @property
    def cross_dims(self) -> tuple[int, ...]:
        return config_io.per_block(self.cross_attention_dim, len(self.block_out_channels), "cross")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return config_io.per_block(
            self.transformer_layers_per_block, len(self.block_out_channels), "transformer layers"
        )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # diffusers config.json <-> UNetConfig
    @classmethod
    def from_diffusers(cls, raw: dict) -> UNetConfig:
        return config_io.from_dict(
            cls, raw, what="UNet config", fixed=_UNET_FIXED, ignored=_UNET_IGNORED
        )

    def to_diffusers(self) -> dict:
        return config_io.to_dict(self, class_name="UNet2DConditionModel")

    # Presets: the configs of the released checkpoints, and a tiny one for tests.
    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> UNetConfig:
        return dataclasses.replace(cls.sd15(), in_channels=9)

    @classmethod
    def sd21(cls) -> UNetConfig:
        return dataclasses.replace(cls.sd21_base(), sample_size=96, upcast_attention=True)

    @classmethod
    def sd21_base(cls) -> UNetConfig:
        return cls(
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        )

    @classmethod
    def sdxl(cls) -> UNetConfig:
        return cls(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        return cls(
            sample_size=128,
            down_block_types=(
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(384, 768, 1536, 1536),
            transformer_layers_per_block=4,
            attention_head_dim=(6, 12, 24, 24),
            cross_attention_dim=1280,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2560,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        return cls(
            sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        )

    @classmethod
    def tiny_sdxl(cls) -> UNetConfig:
        """SDXL's architecture in miniature: no attention at the top level, text_time embedding."""
        return cls(
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=64,  # two 32-wide text encoders, concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,  # pooled projection + 6 time ids
        )


# Fields diffusers has that jaxdiff implements only at their default value.
_UNET_FIXED = {
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "timestep_post_act": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "resnet_skip_time_act": False,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
# Fields that change nothing in the forward pass of the supported architectures.
_UNET_IGNORED = frozenset({"addition_embed_type_num_heads"})


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(
    timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
):
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `Timesteps`: [N] -> [N, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2, with LCM's optional guidance projection `cond_proj`."""

    out_dim: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, condition=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if condition is not None:
            x = x + dense(x.shape[-1], ("embed", "mlp"), use_bias=False, name="cond_proj", **kw)(
                condition
            )
        x = dense(self.out_dim, ("embed", "mlp"), name="linear_1", **kw)(x)
        x = activation(self.act_fn)(x)
        return dense(self.out_dim, ("mlp", "embed"), name="linear_2", **kw)(x)


# ----------------------------------------------------------------------------- transformer


# The collection that holds cross-attention keys and values computed ahead (`context_kv`).
CONTEXT_KV = "context_kv"


class Attention(nn.Module):
    """Self- or cross-attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0).

    Cross-attention takes its keys and values from the `context_kv` collection where the caller
    gives them (`context_kv` below), instead of projecting the context again."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):  # x: [B, T, C]; context: [B, S, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        q = dense(inner, ("embed", "heads"), use_bias=False, name="to_q", **kw)(x)
        if context is not None and self.has_variable(CONTEXT_KV, "k"):
            k, v = self.get_variable(CONTEXT_KV, "k"), self.get_variable(CONTEXT_KV, "v")
        else:
            context = x if context is None else context
            k = dense(inner, ("embed", "heads"), use_bias=False, name="to_k", **kw)(context)
            v = dense(inner, ("embed", "heads"), use_bias=False, name="to_v", **kw)(context)
        out = attention(q, k, v, num_heads=self.heads)
        return dense(x.shape[-1], ("heads", "embed"), name="to_out_0", **kw)(out)


def context_kv(params: dict, context, dtype=jnp.float32) -> dict:
    """Every cross-attention layer's keys and values of `context` ([B, S, D]), as its `to_k` and
    `to_v` compute them, in the tree the UNet reads as its `context_kv` collection:
    `unet.apply({"params": params, "context_kv": context_kv(params, context, dtype)}, x, t,
    context)` gives what the call without it gives.

    A sampler's context is the same on every step. Computed once, ahead of the loop, the
    projections leave the loop. Inside it XLA merges all of them into one product, and for that
    concatenates their weights on every step: SDXL's 140 matrices, 1.3 GB (docs/benchmarks.md,
    session 14)."""
    flat = traverse_util.flatten_dict(params)
    kv = {}
    for path in flat:
        if path[-3:] != ("attn2", "to_k", "kernel"):
            continue
        layer = path[:-2]
        for name, key in (("k", "to_k"), ("v", "to_v")):
            weight = flat[(*layer, key, "kernel")]
            proj = dense(
                weight.shape[-1],
                ("embed", "heads"),
                use_bias=False,
                dtype=dtype,
                param_dtype=weight.dtype,
            )
            kv[(*layer, name)] = proj.apply({"params": {"kernel": weight}}, context)
    return traverse_util.unflatten_dict(kv)


class GEGLU(nn.Module):
    """A projection to twice the width, half of it gating the other through exact GELU."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(2 * self.inner, ("embed", "mlp"), name="proj", **kw)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): net.0 projects to 2x inner and gates, net.2 goes back."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, name="net_0", **kw)(x)
        return dense(dim, ("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and a GEGLU feed-forward, each pre-norm with a residual."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + Attention(self.heads, self.head_dim, name="attn1", **kw)(
            LayerNorm(name="norm1", **kw)(x)
        )
        x = x + Attention(self.heads, self.head_dim, name="attn2", **kw)(
            LayerNorm(name="norm2", **kw)(x), context
        )
        return x + FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, projection in (1x1 conv or linear), transformer blocks, projection out, residual."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):  # x: [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        head_dim = c // self.heads
        inner = self.heads * head_dim
        residual = x
        x = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = dense(inner, ("conv_in", "heads"), name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, name="proj_in", **kw)(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(self.heads, head_dim, name=f"transformer_blocks_{i}", **kw)(
                x, context
            )
        if self.use_linear_projection:
            x = dense(c, ("heads", "conv_out"), name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
        return x + residual


# ----------------------------------------------------------------------------- blocks


def _resnet(cfg: UNetConfig, channels: int, name: str, kw: dict, scale: float | None = None):
    """A ResnetBlock2D with the config's norm, activation and time-embedding settings."""
    return ResnetBlock2D(
        channels,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        act_fn=cfg.act_fn,
        time_scale_shift=cfg.resnet_time_scale_shift,
        output_scale_factor=cfg.resnet_out_scale_factor if scale is None else scale,
        name=name,
        **kw,
    )


def _transformer(cfg: UNetConfig, block: int, name: str, kw: dict):
    """The Transformer2DModel of down block `block` (its heads and depth)."""
    return Transformer2DModel(
        cfg.heads[block],
        cfg.transformer_layers[block],
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        name=name,
        **kw,
    )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `attention`) or DownBlock2D; returns the skip outputs too."""

    config: UNetConfig
    index: int
    with_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, i = self.config, self.index
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = cfg.block_out_channels[i]
        skips = []
        for j in range(cfg.layers[i]):
            x = _resnet(cfg, out_ch, f"resnets_{j}", kw)(x, temb)
            if self.with_attention:
                x = _transformer(cfg, i, f"attentions_{j}", kw)(x, context)
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(out_ch, cfg.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with `attention`) or UpBlock2D, consuming skips from the down path."""

    config: UNetConfig
    index: int  # position in up_block_types
    with_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        cfg, i = self.config, self.index
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        rev = n - 1 - i  # the matching down block
        out_ch = cfg.block_out_channels[rev]
        for j in range(cfg.layers[rev] + 1):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = _resnet(cfg, out_ch, f"resnets_{j}", kw)(x, temb)
            if self.with_attention:
                x = _transformer(cfg, rev, f"attentions_{j}", kw)(x, context)
        if i < n - 1:
            x = Upsample2D(out_ch, name="upsamplers_0", **kw)(x, upsample_size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = cfg.block_out_channels[-1]

        x = _resnet(cfg, ch, "resnets_0", kw, cfg.mid_block_scale_factor)(x, temb)
        x = _transformer(cfg, -1, "attentions_0", kw)(x, context)
        return _resnet(cfg, ch, "resnets_1", kw, cfg.mid_block_scale_factor)(x, temb)


# ----------------------------------------------------------------------------- the UNet


class UNet2DConditionModel(nn.Module):
    """epsilon/v/x0 prediction from noisy latents, a timestep and text conditioning.

    __call__(sample [B, H, W, C_in], timesteps [B] or [], encoder_hidden_states [B, S, D],
             text_embeds [B, P] and time_ids [B, 6] for SDXL, timestep_cond [B, Dc] for LCM)
    -> [B, H, W, C_out] in the compute dtype.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        timestep_cond=None,
    ):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = sample.shape[0]
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # Time embedding (plus SDXL's pooled-text and size conditioning).
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        t_emb = timestep_embedding(
            timesteps,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).astype(self.dtype)
        if timestep_cond is not None:
            timestep_cond = timestep_cond.astype(self.dtype)
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, name="time_embedding", **kw)(
            t_emb, timestep_cond
        )
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL) needs text_embeds and time_ids")
            time_embeds = timestep_embedding(
                time_ids.reshape(-1),
                cfg.addition_time_embed_dim,
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                freq_shift=cfg.freq_shift,
            ).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + TimestepEmbedding(
                cfg.time_embed_dim, cfg.act_fn, name="add_embedding", **kw
            )(add.astype(self.dtype))

        # Down path, keeping every intermediate output for the skip connections.
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(sample)
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            x, block_skips = DownBlock(
                cfg, i, block_type == "CrossAttnDownBlock2D", name=f"down_blocks_{i}", **kw
            )(x, emb, context)
            skips.extend(block_skips)

        if cfg.mid_block_type is not None:
            x = MidBlock(cfg, name="mid_block", **kw)(x, emb, context)

        # Up path: each block takes layers+1 skips from the end of the list.
        n = len(cfg.up_block_types)
        for i, block_type in enumerate(cfg.up_block_types):
            take = cfg.layers[n - 1 - i] + 1
            block_skips, skips = skips[-take:], skips[:-take]
            upsample_size = skips[-1].shape[1:3] if i < n - 1 else None
            x = UpBlock(cfg, i, block_type == "CrossAttnUpBlock2D", name=f"up_blocks_{i}", **kw)(
                x, block_skips, emb, context, upsample_size
            )

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
        x = activation(cfg.act_fn)(x)
        return conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)

    def dummy_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None):
        """Inputs of the right shapes for `init` and `jax.eval_shape`."""
        cfg = self.config
        height = height or cfg.sample_size
        width = width or cfg.sample_size
        inputs = dict(
            sample=jnp.zeros((batch, height, width, cfg.in_channels), jnp.float32),
            timesteps=jnp.zeros((batch,), jnp.float32),
            encoder_hidden_states=jnp.zeros((batch, 77, cfg.cross_dims[0]), jnp.float32),
        )
        if cfg.addition_embed_type == "text_time":
            # Only the width of the concatenation [pooled text, 6 embedded ids] matters for
            # shapes (the refiner uses 5 ids and a wider pooled embedding).
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["text_embeds"] = jnp.zeros((batch, pooled), jnp.float32)
            inputs["time_ids"] = jnp.zeros((batch, 6), jnp.float32)
        if cfg.time_cond_proj_dim is not None:
            inputs["timestep_cond"] = jnp.zeros((batch, cfg.time_cond_proj_dim), jnp.float32)
        return inputs
