"""Rematerialization of model blocks, without touching the model code.

Under `remat_blocks()`, every call of a ResNet block or a transformer block (UNet, VAE) runs
inside Flax's lifted `nn.remat`: the backward pass recomputes the block's activations instead of
keeping them, so training memory falls to roughly the block inputs, for one extra forward pass.
Results are the same (up to XLA reordering float operations). Applied by method interception,
so the models need no remat flag of their own.
"""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn

from jaxdiff.models.layers import ResnetBlock2D
from jaxdiff.models.unet import BasicTransformerBlock

# The block types whose activations are recomputed: every residual and attention block.
REMAT_TYPES = (ResnetBlock2D, BasicTransformerBlock)

_inside = contextvars.ContextVar("jaxdiff_remat_inside", default=False)


def _call_block(module, *args):
    token = _inside.set(True)  # the call below must not be intercepted a second time
    try:
        return module(*args)
    finally:
        _inside.reset(token)


def _interceptor(next_fun, args, kwargs, context):
    if (
        context.method_name != "__call__"
        or kwargs
        or _inside.get()
        or not isinstance(context.module, REMAT_TYPES)
    ):
        return next_fun(*args, **kwargs)
    return nn.remat(_call_block, prevent_cse=True)(context.module, *args)


@contextlib.contextmanager
def remat_blocks(enabled: bool = True):
    """Within this context, `module.apply` rematerializes every block (see module docstring)."""
    if not enabled:
        yield
        return
    with nn.intercept_methods(_interceptor):
        yield
