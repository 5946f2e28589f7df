"""CLIP's text transformer: the prompt encoders of Stable Diffusion.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
OpenCLIP (Cherti et al. 2023) for the ViT-H and ViT-bigG encoders of SD 2.x and SDXL. The module
tree mirrors transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
(`text_model/encoder/layers_0/self_attn/q_proj/kernel` is `text_model.encoder.layers.0.self_attn.q_proj.weight`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import config_io
from jaxdiff.models.layers import LayerNorm, activation, attention, dense

Dtype = Any

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig that define the computation."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    # transformers picks the head from `architectures`; jaxdiff keeps it in the config.
    with_projection: bool = False

    @classmethod
    def from_transformers(cls, raw: dict) -> CLIPTextConfig:
        raw = dict(raw)
        model_type = raw.pop("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise config_io.ConfigError(
                f"text encoder config: unsupported model_type {model_type!r}"
            )
        archs = raw.pop("architectures", None) or ["CLIPTextModel"]
        if archs[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise config_io.ConfigError(
                f"text encoder config: unsupported architecture {archs[0]!r}"
            )
        raw["with_projection"] = archs[0] == "CLIPTextModelWithProjection"
        # transformers' generic keys only for a key jaxdiff does not know: importing its config
        # module imports torch where installed (0.9 s of every `jaxdiff generate` here).
        return config_io.from_dict(
            cls,
            raw,
            what="text encoder config",
            ignored=_CLIP_BOOKKEEPING_FIELDS,
            more_ignored=_generic_transformers_fields,
        )

    def to_transformers(self) -> dict:
        out = dataclasses.asdict(self)
        with_projection = out.pop("with_projection")
        arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
        out.update(architectures=[arch], model_type="clip_text_model", attention_dropout=0.0)
        return out

    @classmethod
    def vit_l(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14, the text encoder of SD 1.x and SDXL's first."""
        return cls()

    @classmethod
    def vit_h(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H/14 as SD 2.x ships it (23 of its 24 layers, GELU)."""
        return cls(
            hidden_size=1024,
            intermediate_size=4096,
            projection_dim=512,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            pad_token_id=1,
        )

    @classmethod
    def vit_bigg(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 with its projection, SDXL's second text encoder."""
        return cls(
            hidden_size=1280,
            intermediate_size=5120,
            projection_dim=1280,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            with_projection=True,
        )

    @classmethod
    def tiny(cls, with_projection: bool = False) -> CLIPTextConfig:
        return cls(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            with_projection=with_projection,
        )


# Keys of a CLIP text config.json that do not change the computation: bookkeeping, and CLIP's
# fields that only matter for training or initialization.
_CLIP_BOOKKEEPING_FIELDS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "attention_dropout",
        "dropout",
        "initializer_range",
        "initializer_factor",
        "output_attentions",
        "output_hidden_states",
    }
)


def _generic_transformers_fields() -> frozenset[str]:
    """The keys every transformers config.json carries whatever the model (ids, labels,
    return_dict...), as this transformers version writes them."""
    try:
        from transformers import PretrainedConfig

        return frozenset(PretrainedConfig().to_dict())
    except Exception:  # transformers is only needed for this list and for tokenizers
        return frozenset()


# ----------------------------------------------------------------------------- modules


class CLIPAttention(nn.Module):
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        q = dense(dim, ("embed", "heads"), name="q_proj", **kw)(x)
        k = dense(dim, ("embed", "heads"), name="k_proj", **kw)(x)
        v = dense(dim, ("embed", "heads"), name="v_proj", **kw)(x)
        out = attention(q, k, v, num_heads=self.heads, mask=mask)
        return dense(dim, ("heads", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(self.hidden_act)(h)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_eps
        x = x + CLIPAttention(cfg.num_attention_heads, name="self_attn", **kw)(
            LayerNorm(eps, name="layer_norm1", **kw)(x), mask
        )
        return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, name="mlp", **kw)(
            LayerNorm(eps, name="layer_norm2", **kw)(x)
        )


def _embed(num, features, axes, *, dtype, param_dtype, name):
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        name=name,
    )


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = _embed(
            cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="token_embedding", **kw
        )
        pos = _embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            (None, "embed"),
            name="position_embedding",
            **kw,
        )
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, D], after the final layer norm
    pooler_output: jax.Array  # [B, D], last_hidden_state at each sequence's EOS token
    hidden_states: tuple  # num_layers + 1 arrays [B, T, D]: embeddings, then each layer's output
    text_embeds: jax.Array | None  # [B, P], pooler_output projected (with_projection only)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        """Returns the input and every layer's output: num_hidden_layers + 1 arrays."""
        hidden_states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype
            )(x, mask)
            hidden_states.append(x)
        return hidden_states


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # causal: [1, 1, T, T]
        if attention_mask is not None:  # padding keys are never attended to
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = CLIPEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        hidden_states = CLIPEncoder(cfg, name="encoder", **kw)(x, mask)
        last = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(hidden_states[-1])
        if cfg.eos_token_id == 2:
            # Configs from before transformers PR #24773 carry a wrong eos id; transformers then
            # pools at the largest token id, which is EOS in CLIP's vocabulary.
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
        return last, pooled, tuple(hidden_states)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `config.with_projection`.

    __call__(input_ids [B, T] int, attention_mask [B, T] or None) -> CLIPTextOutput.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last, pooled, hidden = CLIPTextTransformer(cfg, name="text_model", **kw)(
            input_ids, attention_mask
        )
        text_embeds = None
        if cfg.with_projection:
            text_embeds = dense(
                cfg.projection_dim, ("embed", "mlp"), use_bias=False, name="text_projection", **kw
            )(pooled)
        return CLIPTextOutput(last, pooled, hidden, text_embeds)

    def dummy_inputs(self, batch: int = 1):
        return dict(input_ids=jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32))
