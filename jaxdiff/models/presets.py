"""Named model presets: the component configs of the released Stable Diffusion checkpoints.

A preset is what a diffusers folder of that model holds, minus the weights: the configs of the
UNet, the VAE and the text encoders, the scheduler config, and the pipeline class. Parameter
shapes (and counts) follow from it without allocating anything (`jax.eval_shape`).
"""

from __future__ import annotations

import dataclasses

from jaxdiff.models.clip_text import CLIPTextConfig
from jaxdiff.models.unet import UNetConfig
from jaxdiff.models.vae import VAEConfig

_SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    pipeline_class: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig | None
    text_encoder_2: CLIPTextConfig | None
    scheduler: dict
    description: str

    def components(self) -> dict:
        """Component name -> config, for the components this model has."""
        out = {"unet": self.unet, "vae": self.vae}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    def model_index(self) -> dict:
        index = {"_class_name": self.pipeline_class}
        if self.text_encoder_2 is not None:
            index["force_zeros_for_empty_prompt"] = self.text_encoder is not None
        if self.text_encoder is None:
            index["requires_aesthetics_score"] = True
        return index


def _pndm(**overrides):
    return {"_class_name": "PNDMScheduler", **_SD_SCHEDULE, "skip_prk_steps": True, **overrides}


def _euler(**overrides):
    return {
        "_class_name": "EulerDiscreteScheduler",
        **_SD_SCHEDULE,
        "interpolation_type": "linear",
        **overrides,
    }


_PRESETS = [
    Preset(
        "sd15",
        "StableDiffusionPipeline",
        UNetConfig.sd15(),
        VAEConfig.sd(),
        CLIPTextConfig.vit_l(),
        None,
        _pndm(),
        "Stable Diffusion 1.5, 512x512",
    ),
    Preset(
        "sd15-inpaint",
        "StableDiffusionInpaintPipeline",
        UNetConfig.sd15_inpaint(),
        VAEConfig.sd(),
        CLIPTextConfig.vit_l(),
        None,
        _pndm(),
        "Stable Diffusion 1.5 inpainting (9-channel UNet), 512x512",
    ),
    Preset(
        "sd21",
        "StableDiffusionPipeline",
        UNetConfig.sd21(),
        VAEConfig.sd21(),
        CLIPTextConfig.vit_h(),
        None,
        {**_pndm(), "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
        "Stable Diffusion 2.1, 768x768, v-prediction",
    ),
    Preset(
        "sd21-base",
        "StableDiffusionPipeline",
        UNetConfig.sd21_base(),
        VAEConfig.sd(),
        CLIPTextConfig.vit_h(),
        None,
        _pndm(),
        "Stable Diffusion 2.1 base, 512x512, epsilon",
    ),
    Preset(
        "sdxl",
        "StableDiffusionXLPipeline",
        UNetConfig.sdxl(),
        VAEConfig.sdxl(),
        CLIPTextConfig.vit_l(),
        CLIPTextConfig.vit_bigg(),
        _euler(),
        "Stable Diffusion XL base 1.0, 1024x1024",
    ),
    Preset(
        "sdxl-refiner",
        "StableDiffusionXLImg2ImgPipeline",
        UNetConfig.sdxl_refiner(),
        VAEConfig.sdxl(),
        None,
        CLIPTextConfig.vit_bigg(),
        _euler(),
        "Stable Diffusion XL refiner 1.0, 1024x1024",
    ),
    Preset(
        "tiny",
        "StableDiffusionPipeline",
        UNetConfig.tiny(),
        VAEConfig.tiny(),
        CLIPTextConfig.tiny(),
        None,
        _pndm(),
        "a tiny random-weights model for tests (32x32 images)",
    ),
    Preset(
        "tiny-sdxl",
        "StableDiffusionXLPipeline",
        UNetConfig.tiny_sdxl(),
        VAEConfig.tiny(),
        CLIPTextConfig.tiny(),
        CLIPTextConfig.tiny(with_projection=True),
        _euler(),
        "a tiny random-weights model with SDXL's architecture, for tests (32x32 images)",
    ),
]
_PRESETS.append(
    Preset(
        "shapes",
        "StableDiffusionPipeline",
        UNetConfig(
            sample_size=16,
            # Attention at 8x8 and 4x4 only: at 16x16 it costs 45% of a CPU train step.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=64,
            attention_head_dim=4,
        ),
        VAEConfig(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=64,
        ),
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=256,
            projection_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            hidden_act="gelu",
        ),
        None,
        _euler(timestep_spacing="trailing"),
        "the bundled shapes model's architecture (64x64 images, 16x16 latents)",
    )
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
