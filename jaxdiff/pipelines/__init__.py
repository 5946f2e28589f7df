"""Pipelines: text-to-image, image-to-image, inpainting, outpainting for SD 1.x, 2.x and SDXL."""

from jaxdiff.pipelines.stable_diffusion import (
    GenerationResult,
    PipelineInputError,
    StableDiffusion,
    generate_fn_for_model,
    load,
)

__all__ = [
    "GenerationResult",
    "PipelineInputError",
    "StableDiffusion",
    "generate_fn_for_model",
    "load",
]
