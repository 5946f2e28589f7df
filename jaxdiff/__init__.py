"""jaxdiff: latent diffusion (the Stable Diffusion family) in JAX and Flax.

import jaxdiff
pipe = jaxdiff.load("path/to/diffusers-folder")   # or None: the bundled model
result = pipe.generate("a red circle", steps=30, seed=0)
result.pil()[0].save("out.png")
"""

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """Load a diffusers-format Stable Diffusion folder as a `jaxdiff.pipelines.StableDiffusion`."""
    from jaxdiff.pipelines import load as _load

    return _load(path, **kwargs)
