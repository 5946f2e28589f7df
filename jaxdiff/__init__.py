"""jaxdiff: latent diffusion (the Stable Diffusion family) in JAX and Flax."""

__version__ = "0.1.0"
