"""End-to-end parity: jaxdiff's CLI against diffusers' pipelines, from the same initial noise.

Tiny random diffusers pipelines (SD 1-like, SD 2-like with v-prediction, SDXL-like) are built and
saved in the test; `jaxdiff generate --latents noise.npy --output-type npy` must give diffusers'
`output_type="np"` images.
"""

import numpy as np
import pytest
import torch
from reference import CLIP_SD1, CLIP_SD2, UNET_SD1, UNET_SD2, UNET_SDXL, VAE_TINY, perturb_
from tolerances import assert_close

from jaxdiff.cli import main
from jaxdiff.tokenizer import bundled_tokenizer_dir

SIZE = 32  # pixels; the tiny VAE's factor is 4, so 8x8 latents
STEPS = 5
SCHEDULER_CLASS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _clip(config, with_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cfg = dict(config, vocab_size=49408, max_position_embeddings=77)
    if cfg["eos_token_id"] != 2:  # the real CLIP ids, as SD 2 and SDXL configs have them
        cfg.update(bos_token_id=49406, eos_token_id=49407)
    torch.manual_seed(1)
    return perturb_(cls(CLIPTextConfig(**cfg)), seed=1)


def _parts(unet_config, prediction_type="epsilon"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(**unet_config), seed=2)
    vae = perturb_(AutoencoderKL(**VAE_TINY), seed=3)
    tok = CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    sched = DDIMScheduler(**SCHEDULE, prediction_type=prediction_type)
    return unet, vae, tok, sched


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    unet, vae, tok, sched = _parts(dict(UNET_SD1, cross_attention_dim=32))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip(dict(CLIP_SD1, hidden_size=32)),
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("sd1") / "model"
    pipe.save_pretrained(path)
    return StableDiffusionPipeline.from_pretrained(path), path  # as a user of diffusers loads it


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    unet, vae, tok, sched = _parts(UNET_SD2, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip(CLIP_SD2),
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("sd2") / "model"
    pipe.save_pretrained(path)
    return StableDiffusionPipeline.from_pretrained(path), path


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    config = dict(
        UNET_SDXL, cross_attention_dim=64, projection_class_embeddings_input_dim=24 + 6 * 8
    )
    unet, vae, tok, _ = _parts(config)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_clip(dict(CLIP_SD2, hidden_size=32, num_attention_heads=4)),
        text_encoder_2=_clip(
            dict(CLIP_SD2, hidden_size=32, num_attention_heads=4, projection_dim=24), True
        ),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            **{k: SCHEDULE[k] for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset")},
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
    )
    path = tmp_path_factory.mktemp("sdxl") / "model"
    pipe.save_pretrained(path)
    return StableDiffusionXLPipeline.from_pretrained(path), path


def _compare(
    tmp_path, pipe, path, sampler, batch, negative, guidance=7.5, progress=False, **options
):
    """options: guidance_rescale, clip_skip (given to both sides). progress: the CLI's default
    path, with its progress bar (one program per sampler step), instead of `--no-progress`."""
    import diffusers

    prompts = ["a small red circle on the left", "a large blue square"][:batch]
    rng = np.random.default_rng(batch)
    latents = rng.standard_normal((batch, 4, SIZE // 4, SIZE // 4)).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)
    out = tmp_path / "out.npy"
    argv = [
        "generate",
        prompts[0],
        "--model",
        str(path),
        "--latents",
        str(tmp_path / "noise.npy"),
        "--steps",
        str(STEPS),
        "--sampler",
        sampler,
        "--guidance",
        str(guidance),
        "--width",
        str(SIZE),
        "--height",
        str(SIZE),
        "--batch",
        str(batch),
        "--output-type",
        "npy",
        "--out",
        str(out),
    ]
    if not progress:
        argv.append("--no-progress")
    if negative:
        argv += ["--negative-prompt", negative]
    for name, value in options.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        argv += ["--" + name.replace("_", "-"), text]
    assert main(argv) == 0
    ours = np.load(out)

    cls = getattr(diffusers, SCHEDULER_CLASS[sampler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    expected = pipe(
        [prompts[0]] * batch,
        negative_prompt=[negative] * batch if negative else None,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        height=SIZE,
        width=SIZE,
        output_type="np",
        **options,
    ).images
    assert ours.shape == (batch, SIZE, SIZE, 3) and ours.dtype == np.float32
    assert_close(ours, expected, f"{sampler} batch {batch} negative={negative!r}")
    assert ours.std() > 0.01  # a real image, not a constant


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("batch,negative", [(1, None), (2, "blurry, green")])
def test_sd1_matches_diffusers(tmp_path, sd1, sampler, batch, negative):
    # DPM++ 2M (a multistep history in the carry) runs the CLI's default path, step by step.
    _compare(tmp_path, *sd1, sampler, batch, negative, progress=sampler == "dpmpp_2m")


def test_sd1_guidance_rescale_matches_diffusers(tmp_path, sd1):
    _compare(tmp_path, *sd1, "euler", 2, "blurry", guidance_rescale=0.7)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_conditioning_matches_the_reference(sd1, clip_skip):
    """diffusers' own clip_skip path fails with transformers 5 (`text_model` is gone), so this
    compares with what it computes: an earlier hidden state through the final layer norm."""
    from jaxdiff.convert import load_pipeline
    from jaxdiff.pipelines.conditioning import encode_sd
    from jaxdiff.tokenizer import bundled_clip_tokenizer, tokenize

    pipe, path = sd1
    weights = load_pipeline(path)
    ids = tokenize(bundled_clip_tokenizer(), ["a small red circle", "a blue square on the left"])
    ours = encode_sd(
        weights.params["text_encoder"], weights.configs["text_encoder"], ids, clip_skip=clip_skip
    )
    encoder = pipe.text_encoder
    with torch.no_grad():
        hidden = encoder(
            torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True
        ).hidden_states
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        expected = norm(hidden[-(clip_skip + 1)]).numpy()
    assert_close(ours, expected, f"clip_skip={clip_skip} conditioning")


@pytest.mark.parametrize(
    "sampler",
    ["ddim", pytest.param("euler", marks=pytest.mark.slow)],  # euler: SD 1 covers it
)
def test_sd2_v_prediction_matches_diffusers(tmp_path, sd2, sampler):
    _compare(tmp_path, *sd2, sampler, 2, "low quality")


@pytest.mark.parametrize(
    "batch,negative", [pytest.param(1, None, marks=pytest.mark.slow), (2, "ugly")]
)
def test_sdxl_matches_diffusers(tmp_path, sdxl, batch, negative):
    _compare(tmp_path, *sdxl, "euler", batch, negative, guidance=5.0)


def test_sdxl_micro_conditioning_matches_diffusers(tmp_path, sdxl):
    _compare(
        tmp_path, *sdxl, "euler", 1, "ugly", guidance=5.0,
        original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(40, 40),
    )  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_refiner(tmp_path_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    # The refiner conditions on the second text encoder only, and on 5 ids (an aesthetic score).
    config = dict(
        UNET_SDXL, cross_attention_dim=32, projection_class_embeddings_input_dim=24 + 5 * 8
    )
    unet, vae, tok, _ = _parts(config)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=_clip(
            dict(CLIP_SD2, hidden_size=32, num_attention_heads=4, projection_dim=24), True
        ),
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            **{k: SCHEDULE[k] for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset")},
            timestep_spacing="leading",
        ),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    path = tmp_path_factory.mktemp("refiner") / "model"
    pipe.save_pretrained(path)
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(path), path


@pytest.mark.slow  # about 30 s on 2 cores; CI runs it in its slow pass
def test_sdxl_base_and_refiner_match_diffusers(tmp_path, sdxl, sdxl_refiner):
    """With the CLI's progress bar (its default): both stages run one program per step."""
    (base, base_path), (refiner, refiner_path) = sdxl, sdxl_refiner
    latents = (
        np.random.default_rng(7).standard_normal((2, 4, SIZE // 4, SIZE // 4)).astype(np.float32)
    )
    np.save(tmp_path / "noise.npy", latents)
    out = tmp_path / "out.npy"
    steps, switch, prompt = 10, 0.7, "a small red circle"
    argv = [
        "generate",
        prompt,
        "--model",
        str(base_path),
        "--refiner",
        str(refiner_path),
        "--refiner-switch",
        str(switch),
        "--latents",
        str(tmp_path / "noise.npy"),
        "--steps",
        str(steps),
        "--sampler",
        "euler",
        "--width",
        str(SIZE),
        "--height",
        str(SIZE),
        "--batch",
        "2",
        "--negative-prompt",
        "blue",
        "--aesthetic-score",
        "4.5",
        "--negative-aesthetic-score",
        "1.5",
        "--output-type",
        "npy",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    handover = base(
        [prompt] * 2,
        negative_prompt=["blue"] * 2,
        num_inference_steps=steps,
        denoising_end=switch,
        latents=torch.from_numpy(latents),
        height=SIZE,
        width=SIZE,
        output_type="latent",
    ).images
    expected = refiner(
        [prompt] * 2,
        negative_prompt=["blue"] * 2,
        image=handover,
        num_inference_steps=steps,
        denoising_start=switch,
        aesthetic_score=4.5,
        negative_aesthetic_score=1.5,
        output_type="np",
    ).images
    assert_close(np.load(out), expected, "SDXL base + refiner")


@pytest.mark.slow  # about 40 s on 2 cores; CI runs it in its slow pass
def test_nine_channel_inpainting_matches_diffusers(tmp_path, monkeypatch):
    """SD 1.x inpainting UNet; the VAE's posterior noise of the masked image is made identical by
    handing diffusers the noise jaxdiff draws from each image's seed."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from jaxdiff.pipelines.stable_diffusion import _image_keys, _normal_per_image

    unet, vae, tok, sched = _parts(dict(UNET_SD1, in_channels=9, cross_attention_dim=32))
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=_clip(dict(CLIP_SD1, hidden_size=32)),
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path / "model"
    pipe.save_pretrained(path)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(path)

    rng = np.random.default_rng(11)
    image = (rng.uniform(0, 1, (SIZE, SIZE, 3)) * 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 10:30] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    latents = rng.standard_normal((2, 4, SIZE // 4, SIZE // 4)).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)
    seed = 21
    argv = [
        "inpaint",
        "a red circle",
        "--model",
        str(path),
        "--image",
        str(tmp_path / "image.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--steps",
        str(STEPS),
        "--sampler",
        "ddim",
        "--batch",
        "2",
        "--seed",
        str(seed),
        "--negative-prompt",
        "blue",
        "--output-type",
        "npy",
        "--out",
        str(tmp_path / "out.npy"),
        "--no-progress",
    ]
    # the CLI's --latents is for text-to-image; inpainting at strength 1 starts from the same noise
    from jaxdiff.pipelines import load

    ours = (
        load(path)
        .inpaint(
            "a red circle",
            tmp_path / "image.png",
            tmp_path / "mask.png",
            steps=STEPS,
            sampler="ddim",
            batch=2,
            seed=seed,
            negative_prompt="blue",
            latents=latents,
            progress=False,
        )
        .images
    )
    assert main(argv) == 0 and np.load(tmp_path / "out.npy").shape == (2, SIZE, SIZE, 3)

    _, enc_keys, _ = _image_keys(np.array([seed, seed + 1], np.uint32))
    eps = np.asarray(_normal_per_image(enc_keys, (SIZE // 4, SIZE // 4, 4)))
    eps = torch.from_numpy(np.ascontiguousarray(np.transpose(eps, (0, 3, 1, 2))))

    # diffusers encodes the masked image once for the batch; jaxdiff draws each image's posterior
    # noise from its own seed. So diffusers runs one image at a time, each with that image's noise.
    expected = []
    for i in range(2):

        def same_noise(encoder_output, generator=None, sample_mode="sample", i=i):
            dist = encoder_output.latent_dist
            return dist.mean + dist.std * eps[i : i + 1]

        monkeypatch.setattr(inpaint_module, "retrieve_latents", same_noise)
        expected.append(
            pipe(
                "a red circle",
                image=Image.fromarray(image),
                mask_image=Image.fromarray(mask),
                negative_prompt="blue",
                num_inference_steps=STEPS,
                guidance_scale=7.5,
                latents=torch.from_numpy(latents[i : i + 1]),
                height=SIZE,
                width=SIZE,
                output_type="np",
            ).images[0]
        )
    expected = np.stack(expected)
    assert_close(ours, expected, "9-channel inpainting")
