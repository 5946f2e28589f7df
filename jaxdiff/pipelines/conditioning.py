"""Prompt conditioning inside the jitted pipelines: CLIP text encoders and SDXL's size ids.

SD 1.x / 2.x condition on the last hidden state of one CLIP text encoder (with `clip_skip`, an
earlier layer passed through the final layer norm, as diffusers does). SDXL concatenates the
penultimate hidden states of both encoders and adds the projected pooled output of the second,
plus six "micro-conditioning" numbers (Podell et al. 2023, section 2.2).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiff.models.build import module_for
from jaxdiff.models.layers import LayerNorm


def encode_sd(params, config, ids, *, clip_skip=None, dtype=jnp.float32):
    """SD 1.x / 2.x: ids [B, T] -> context [B, T, D]."""
    out = module_for(config, dtype=dtype).apply({"params": params}, ids)
    if not clip_skip:
        return out.last_hidden_state
    hidden = out.hidden_states[-(clip_skip + 1)]
    norm = LayerNorm(config.layer_norm_eps, dtype=dtype)
    return norm.apply({"params": params["text_model"]["final_layer_norm"]}, hidden)


def encode_sdxl(encoders, ids, *, clip_skip=None, dtype=jnp.float32):
    """SDXL: encoders = [(params, config) or None, (params, config)], ids = [ids_1, ids_2].

    Returns (context [B, T, D1 + D2], pooled [B, P]): penultimate hidden states (or
    `clip_skip` layers further back) concatenated, and the second encoder's projected output.
    """
    hidden, pooled = [], None
    for enc, enc_ids in zip(encoders, ids, strict=True):
        if enc is None:  # the refiner has only the second encoder
            continue
        params, config = enc
        out = module_for(config, dtype=dtype).apply({"params": params}, enc_ids)
        hidden.append(out.hidden_states[-((clip_skip or 0) + 2)])
        if out.text_embeds is not None:
            pooled = out.text_embeds
    return jnp.concatenate(hidden, axis=-1), pooled


def sdxl_time_ids(
    batch: int,
    *,
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
) -> np.ndarray:
    """SDXL's micro-conditioning, [B, 6] (or [B, 5] for the refiner, which takes an aesthetic
    score in place of the target size), as diffusers' `_get_add_time_ids`. Sizes are (h, w)."""
    if aesthetic_score is not None:
        ids = [*original_size, *crops_coords_top_left, aesthetic_score]
    else:
        ids = [*original_size, *crops_coords_top_left, *(target_size or original_size)]
    return np.tile(np.asarray(ids, np.float32), (batch, 1))
