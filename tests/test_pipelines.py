"""Pipeline properties: determinism, sharding, compilation, img2img, inpainting, the CLI."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_entries import entries, programs, recompiled
from PIL import Image
from tolerances import assert_close

from jaxdiff.cli import main
from jaxdiff.convert import save_pipeline
from jaxdiff.convert.diffusers import random_pipeline
from jaxdiff.pipelines import StableDiffusion
from jaxdiff.pipelines.stable_diffusion import _denoise_jit, denoise, extend_canvas, slerp

KW = dict(steps=3, sampler="euler", progress=False)


@pytest.fixture(scope="module")
def weights():
    return random_pipeline("tiny", seed=5)


@pytest.fixture(scope="module")
def pipe(weights):
    return StableDiffusion(weights)


@pytest.fixture(scope="module")
def model_dir(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_pipeline(weights, path)
    return path


def test_image_depends_only_on_its_seed(pipe):
    batch = pipe.generate("a red circle", seed=10, batch=3, **KW)
    alone = pipe.generate("a red circle", seed=12, batch=1, **KW)
    assert [p["seed"] for p in batch.parameters] == [10, 11, 12]
    assert_close(batch.images[2], alone.images[0], "image 2 of a batch vs the same seed alone")
    assert np.abs(batch.images[0] - batch.images[1]).max() > 0.05  # different seeds differ


def test_one_device_and_eight_devices_agree(weights, pipe):
    assert pipe.mesh.devices.size == 8
    single = StableDiffusion(weights, devices=jax.devices()[:1])
    a = pipe.generate("a blue square", seed=3, batch=2, **KW)
    b = single.generate("a blue square", seed=3, batch=2, **KW)
    assert_close(a.images, b.images, "8-device vs 1-device batch")


def test_fsdp_sharded_parameters_give_the_same_images(weights, pipe):
    sharded = StableDiffusion(weights, shard_params=True)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(sharded.params)}
    assert any("fsdp" in s for s in specs)  # some parameters really are split
    a = pipe.generate("a blue square", seed=3, batch=2, **KW)
    b = sharded.generate("a blue square", seed=3, batch=2, **KW)
    assert_close(a.images, b.images, "replicated vs FSDP-sharded parameters")


def test_conv_kernels_laid_out_for_the_device_give_the_same_images(weights, pipe, monkeypatch):
    """The pipeline places each convolution kernel in the order the devices' convolutions read
    (on a GPU, [out, kh, kw, in]; `jaxdiff.sharding.put_params`), and its programs take it so:
    here the CPU is told to use the GPU's order."""
    from jaxdiff import sharding

    monkeypatch.setitem(sharding.CONV_KERNEL_LAYOUTS, "cpu", (3, 0, 1, 2))
    laid = StableDiffusion(weights)
    kernel = laid.params["unet"]["conv_in"]["kernel"]
    assert kernel.format.layout.major_to_minor == (3, 0, 1, 2)
    assert pipe.params["unet"]["conv_in"]["kernel"].format.layout.major_to_minor == (0, 1, 2, 3)
    a = pipe.generate("a blue square", seed=3, batch=2, **KW)
    b = laid.generate("a blue square", seed=3, batch=2, **KW)
    assert_close(b.images, a.images, "conv kernels in [out, kh, kw, in] order vs the default")


def test_seed_guidance_and_prompt_do_not_recompile(pipe):
    pipe.generate("warm up", seed=0, **KW)
    before = _denoise_jit._cache_size()
    pipe.generate("another prompt", seed=1, guidance=3.0, negative_prompt="dark", **KW)
    pipe.generate("a third one", seed=2, guidance=9.0, **KW)
    assert _denoise_jit._cache_size() == before
    pipe.generate("a third one", seed=2, guidance=9.0, steps=4, sampler="euler", progress=False)
    assert _denoise_jit._cache_size() == before + 1  # a step count is a shape: it compiles


def test_lower_gives_the_program_without_running_it(pipe):
    from jaxdiff.bench.harness import memory_of
    from jaxdiff.pipelines.stable_diffusion import PipelineInputError

    before = _denoise_jit._cache_size()
    small = pipe.lower("a cat", batch=8, **KW).compile()
    large = pipe.lower("a cat", batch=64, **KW).compile()
    assert _denoise_jit._cache_size() == before  # nothing ran through the jitted function
    assert memory_of(large) > memory_of(small)  # a per-device figure that grows with the batch
    with pytest.raises(PipelineInputError, match="mode"):
        pipe.lower("a cat", mode="refine")
    with pytest.raises(PipelineInputError, match="steps"):
        pipe.lower("a cat", steps=0)


def test_latents_that_are_not_an_npy_file_are_named_as_such(pipe, tmp_path):
    """numpy reads a file without its header as a pickle, and refused that: the message spoke
    of pickled data. An .npz archive is no single array either."""
    from jaxdiff.pipelines.stable_diffusion import PipelineInputError

    (tmp_path / "noise.bin").write_bytes(b"\x00" * 64)
    np.savez(tmp_path / "noise.npz", x=np.zeros((1, 4, 16, 16), np.float32))
    for name in ("noise.bin", "noise.npz"):
        with pytest.raises(
            PipelineInputError, match="not a readable .npy file .no NumPy .npy head"
        ):
            pipe.generate("a cat", latents=str(tmp_path / name), **KW)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"width": 0}, "width must be >= 1, got 0"),
        ({"height": -8}, "height must be >= 1, got -8"),
        ({"guidance": float("inf")}, "guidance must be a finite number, got inf"),
        ({"eta": float("nan")}, "eta must be a finite number, got nan"),
        ({"guidance_rescale": -0.5}, "guidance_rescale must be >= 0, got -0.5"),
        ({"seed": -1}, r"seed must be in \[0, 4294967295\], got -1"),
        ({"seed": 2**32 - 2, "batch": 3}, r"\[0, 4294967293\] for a batch of 3, got 4294967294"),
    ],
)
def test_the_python_api_refuses_settings_out_of_range(pipe, kw, message):
    """The same checks as the command's, for callers of the library, before anything runs."""
    from jaxdiff.pipelines.stable_diffusion import PipelineInputError

    before = _denoise_jit._cache_size()
    with pytest.raises(PipelineInputError, match=message):
        pipe.generate("a cat", **{**KW, **kw})
    with pytest.raises(PipelineInputError, match="to_seed must be in"):
        pipe.interpolate("a cat", to_seed=2**32, frames=2, **KW)
    assert _denoise_jit._cache_size() == before


def test_bfloat16_pipeline_stores_its_weights_in_bfloat16(weights, pipe):
    """A 16-bit pipeline keeps its parameters in that dtype (half the memory, no per-call cast)
    and its images stay within bfloat16's error of the float32 pipeline's."""
    from tolerances import BF16_RTOL

    from jaxdiff.bench.harness import memory_of

    half = StableDiffusion(weights, dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {jnp.dtype("bfloat16")}
    a = half.generate("a red circle", seed=1, batch=2, **KW).images
    f = pipe.generate("a red circle", seed=1, batch=2, **KW).images
    rel = np.linalg.norm(a - f) / np.linalg.norm(f)
    assert rel < BF16_RTOL, rel
    program = {p: p.lower("a", batch=8, **KW).compile() for p in (half, pipe)}
    assert memory_of(program[half]) < memory_of(program[pipe])


def test_the_pipeline_keeps_no_host_copy_of_its_parameters():
    """Once its parameters are on the devices, the pipeline holds none of the loaded host arrays
    but those the CPU backend uses in place (64-byte aligned ones: the same memory): a second
    copy doubled the memory of a model on the CPU (SD 1.5 in float32: 8.1 GiB, not 4.3)."""
    import gc
    import weakref

    weights = random_pipeline("tiny", seed=5)
    host = [weakref.ref(x) for x in jax.tree_util.tree_leaves(weights.params)]
    pipe = StableDiffusion(weights)
    jax.block_until_ready(pipe.params)
    del weights
    gc.collect()
    in_place = {
        shard.data.unsafe_buffer_pointer()
        for x in jax.tree_util.tree_leaves(pipe.params)
        for shard in x.addressable_shards
    }
    copies = [x for x in (ref() for ref in host) if x is not None and x.ctypes.data not in in_place]
    assert not copies, f"{len(copies)} of {len(host)} host arrays are kept beside their copies"
    assert pipe.weights.tokenizers and pipe.family == "sd"
    assert pipe.generate("a cat", **KW).images.shape == (1, 32, 32, 3)


def test_a_16_bit_pipeline_reads_its_weights_straight_into_its_dtype(model_dir, monkeypatch):
    """`load(dtype="bfloat16")` makes no float32 copy of the model on the way (the loader reads
    into bfloat16), and its parameters are exactly those of casting the float32 load."""
    from jaxdiff.convert import diffusers as convert
    from jaxdiff.convert import load_pipeline
    from jaxdiff.pipelines import load

    made = []
    host_array = convert.host_array
    monkeypatch.setattr(
        convert, "host_array", lambda v, dtype: made.append(np.dtype(dtype)) or host_array(v, dtype)
    )
    half = load(model_dir, dtype="bfloat16")
    assert set(made) == {jnp.dtype("bfloat16")}
    monkeypatch.setattr(convert, "host_array", host_array)
    cast = StableDiffusion(load_pipeline(model_dir), dtype="bfloat16")
    got, want = (jax.tree_util.tree_leaves(p.params) for p in (half, cast))
    assert all(g.dtype == jnp.bfloat16 for g in got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_negative_prompt_and_guidance_change_the_image(pipe):
    base = pipe.generate("a red circle", seed=4, **KW).images
    neg = pipe.generate("a red circle", seed=4, negative_prompt="blue", **KW).images
    low = pipe.generate("a red circle", seed=4, guidance=2.0, **KW).images
    assert np.abs(base - neg).max() > 1e-3 and np.abs(base - low).max() > 1e-3


def _dots_by_scope(jaxpr, inside=False, found=None):
    """The input shapes of every dot_general in a closed jaxpr, split into those inside a loop
    (a scan's or while's body) and those outside, through every nested jaxpr."""
    found = found if found is not None else {"inside": [], "outside": []}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found["inside" if inside else "outside"].append(
                tuple(tuple(v.aval.shape) for v in eqn.invars)
            )
        loop = eqn.primitive.name in ("scan", "while")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _dots_by_scope(sub, inside or loop, found)
    return found


def test_the_sampler_projects_the_context_for_cross_attention_once(pipe, monkeypatch):
    """The context is the same on every step, so its cross-attention keys and values are
    computed ahead of the sampler's loop (`context_kv`): inside the loop no product projects the
    77 context tokens with a weight matrix; outside, at least two per cross-attention layer do
    (the text encoders' own projections are there too). Left inside, XLA merges them into one
    product and concatenates every layer's weights for it on every step: SDXL's 1.3 GB."""
    from jaxdiff.pipelines import stable_diffusion as sd

    calls = []

    class Capture:
        def lower(self, *args):
            calls.append(args)
            raise RuntimeError("captured")

    monkeypatch.setattr(sd, "_denoise_jit", Capture())
    with pytest.raises(RuntimeError, match="captured"):
        pipe.lower("a cat", steps=3, width=32, height=32)
    params, args, plan, static = calls[0]
    jaxpr = jax.make_jaxpr(functools.partial(sd.denoise, static=static))(params, args, plan)
    dots = _dots_by_scope(jaxpr.jaxpr)

    def projects_context(shapes):
        lhs, rhs = shapes
        return len(lhs) == 3 and lhs[1] == 77 and len(rhs) == 2

    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    layers = sum("attn2" in p and "to_k" in p and "unet" in p for p in paths)
    assert layers > 0
    assert not [d for d in dots["inside"] if projects_context(d)]
    assert len([d for d in dots["outside"] if projects_context(d)]) >= 2 * layers
    assert dots["inside"]  # the UNet's other products stay in the loop


def _denoise_latents(pipe, mode, **kw):
    """Run a pipeline with decoding off: its "images" are then the final latents."""
    import dataclasses

    import jaxdiff.pipelines.stable_diffusion as sd

    def latents_only(params, inputs, plan, static):
        return denoise(params, inputs, plan, dataclasses.replace(static, decode=False))

    original = sd._denoise_jit
    sd._denoise_jit = jax.jit(latents_only, static_argnames=("static",))
    try:
        return getattr(pipe, mode)(**kw).images
    finally:
        sd._denoise_jit = original


def test_inpainting_keeps_the_unmasked_region(pipe):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1.0  # repaint the middle
    latents = _denoise_latents(pipe, "inpaint", prompt="x", image=image, mask=mask, seed=1, **KW)
    # The known latents, encoded exactly as the pipeline encodes them (same per-image key).
    reference = _denoise_latents(
        pipe, "img2img", prompt="x", image=image, strength=0.0, seed=1, **KW
    )
    keep = np.ones((16, 16), bool)
    keep[4:12, 4:12] = False
    np.testing.assert_array_equal(latents[:, keep], reference[:, keep])
    assert np.abs(latents[:, ~keep] - reference[:, ~keep]).max() > 0.1  # the middle was repainted


def test_images_and_masks_come_as_pil_uint8_bool_or_floats_in_0_1(pipe):
    """A PIL image or a uint8 array (0-255) was used as floats as it stood, 255 times too
    bright, without a word; a float array outside [0, 1] is now refused."""
    from PIL import Image

    from jaxdiff.pipelines.images import ImageInputError

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cut = np.zeros((32, 32), bool)
    cut[8:24, 8:24] = True
    as_floats = dict(image=pixels / np.float32(255), mask=cut.astype(np.float32))
    expected = pipe.inpaint("x", strength=0.7, seed=1, **as_floats, **KW).images
    for image, mask in [
        (Image.fromarray(pixels), Image.fromarray(cut.astype(np.uint8) * 255)),
        (pixels, cut.astype(np.uint8) * 255),
        (pixels, cut),
    ]:
        got = pipe.inpaint("x", image=image, mask=mask, strength=0.7, seed=1, **KW).images
        np.testing.assert_array_equal(got, expected)
    for bad, message in [
        (pixels.astype(np.float32), r"image values must be in \[0, 1\], got \[0, 255\]"),
        (pixels / 127.5 - 1, r"image values must be in \[0, 1\], got \[-1, 1\]"),
        (pixels.astype(np.int64), "image has dtype int64"),
    ]:
        with pytest.raises(ImageInputError, match=message):
            pipe.img2img("x", bad, strength=0.5, **KW)


def test_img2img_strength_zero_is_the_vae_round_trip(pipe):
    from jaxdiff.models.build import module_for

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
    out = pipe.img2img("x", image, strength=0.0, seed=7, **KW).images
    latents = _denoise_latents(pipe, "img2img", prompt="x", image=image, strength=0.0, seed=7, **KW)
    vae_cfg = pipe.configs["vae"]
    vae = module_for(vae_cfg)
    decoded = jax.jit(functools.partial(vae.apply, method=vae.decode))(
        {"params": pipe.params["vae"]}, latents / vae_cfg.scaling_factor
    )
    assert_close(out, np.clip(np.asarray(decoded) / 2 + 0.5, 0, 1), "strength 0")
    partial = pipe.img2img("x", image, strength=0.6, seed=7, **KW).images
    assert np.abs(partial - out).max() > 1e-3


def test_outpaint_canvas_and_mask():
    image = np.random.default_rng(2).uniform(0, 1, (8, 6, 3)).astype(np.float32)
    canvas, mask = extend_canvas(image, (2, 0, 4, 4), factor=2)
    assert canvas.shape == (12, 12, 3) and mask.shape == (12, 12, 1)
    np.testing.assert_array_equal(canvas[0:8, 2:8], image)
    assert mask[0:8, 2:8].sum() == 0 and mask.sum() == 12 * 12 - 8 * 6
    np.testing.assert_array_equal(canvas[:8, 0], image[:, 0])  # edge pixels fill the new area


def test_slerp_ends_and_norm():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    frames = slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(frames[0], a, atol=1e-6)
    np.testing.assert_allclose(frames[-1], b, atol=1e-6)
    mid_norm = np.linalg.norm(frames[2])
    assert mid_norm > 0.95 * min(np.linalg.norm(a), np.linalg.norm(b))  # no dip towards zero


def test_interpolation_first_frame_is_the_plain_image(pipe):
    frames = pipe.interpolate("a red circle", to_prompt="a blue square", seed=5, frames=3, **KW)
    plain = pipe.generate("a red circle", seed=5, **KW)
    assert frames.images.shape[0] == 3
    assert_close(frames.images[0], plain.images[0], "frame 0")
    assert np.abs(frames.images[2] - plain.images[0]).max() > 1e-3


PROGRESS_CASES = {
    # Guidance with a negative prompt, a multistep history, per-step noise, and the known region
    # put back after every step; a batch of 3 padded to the 8 devices.
    "inpainting, DPM++ 2M SDE": lambda pipe, kw: pipe.inpaint(
        "x",
        _RNG_IMAGE,
        _MASK,
        negative_prompt="dark",
        seed=3,
        batch=3,
        **{**kw, "sampler": "dpmpp_2m_sde"},
    ),
    "img2img without a step": lambda pipe, kw: pipe.img2img(
        "x", _RNG_IMAGE, strength=0.2, seed=3, **kw
    ),
}
_RNG_IMAGE = np.random.default_rng(4).uniform(0, 1, (32, 32, 3)).astype(np.float32)
_MASK = np.zeros((32, 32, 1), np.float32)
_MASK[8:24, 8:24] = 1.0


@pytest.mark.parametrize(
    "case",
    [
        # about 25 s on 2 cores; the SD 1 parity test's DPM++ 2M runs step by step by default
        pytest.param("inpainting, DPM++ 2M SDE", marks=pytest.mark.slow),
        "img2img without a step",
    ],
)
def test_progress_bar_runs_the_same_computation_one_step_per_call(pipe, monkeypatch, case):
    """With a progress bar, generation runs as three programs (denoise_begin, one
    denoise_steps call per sampler step, denoise_finish) that can enter the persistent
    compilation cache; the images are the one program's (up to the rounding of operations XLA
    fuses across the programs' boundaries), and the bar counts every step once."""
    import contextlib

    from jaxdiff.pipelines import progress

    counts = []

    @contextlib.contextmanager
    def counting_bar(*, total, desc="denoising"):
        counts.append([total, 0])
        yield lambda: counts[-1].__setitem__(1, counts[-1][1] + 1)

    monkeypatch.setattr(progress, "bar", counting_bar)
    one_program = PROGRESS_CASES[case](pipe, KW).images
    step_by_step = PROGRESS_CASES[case](pipe, {**KW, "progress": True}).images
    assert_close(step_by_step, one_program, f"{case}: step by step vs one program")
    ran_steps = case != "img2img without a step"
    assert counts == ([[KW["steps"], KW["steps"]]] if ran_steps else [])


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_pngs_with_parameters_and_a_grid(tmp_path, model_dir):
    out = tmp_path / "img.png"
    argv = [
        "generate",
        "a red circle",
        "--model",
        str(model_dir),
        "--steps",
        "3",
        "--sampler",
        "euler",
        "--batch",
        "2",
        "--seed",
        "9",
        "--negative-prompt",
        "blue",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["img-0.png", "img-1.png", "img-grid.png"]
    with Image.open(tmp_path / "img-1.png") as im:
        text = im.text["parameters"]
        assert im.size == (32, 32)
    assert text.startswith("a red circle\nNegative prompt: blue\n")
    assert (
        "Steps: 3" in text
        and "Sampler: euler" in text
        and "Seed: 10" in text
        and "Size: 32x32" in text
    )
    with Image.open(tmp_path / "img-grid.png") as im:
        assert im.size == (64, 32)
    assert main(argv) == 2  # refuses to overwrite without --force


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--width", "33"], "not a multiple of the model's factor 2"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--sigmas", "weird"], "invalid choice: 'weird'"),
        # Before these were checked, 0 gave the default size, -16 a traceback.
        (["--width", "-16"], "--width must be >= 1, got -16"),
        (["--height", "0"], "--height must be >= 1, got 0"),
        # nan turned guidance off (nan > 1 is false) and inf gave a black image, without a word.
        (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
        (["--guidance-rescale", "inf"], "--guidance-rescale must be a finite number, got inf"),
        (["--eta", "-1"], "--eta must be >= 0, got -1.0"),
        (["--clip-skip", "-1"], "--clip-skip must be >= 0, got -1"),
        # -1 was a traceback; 2**32 the image of seed 0 labelled 4294967296.
        (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
        (["--seed", "4294967296"], "--seed: must be in [0, 4294967295], got 4294967296"),
        (
            ["--seed", "4294967295", "--batch", "2"],
            "--seed must be in [0, 4294967294] for a batch of 2, got 4294967295",
        ),
        (["interpolate", "--frames", "-3"], "--frames must be >= 2, got -3"),
        (["interpolate", "--to-seed", "-3"], "--to-seed: must be in [0, 4294967295], got -3"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, model_dir, capsys, extra, message):
    out = tmp_path / "x.png"
    command, extra = (extra[0], extra[1:]) if extra[0] == "interpolate" else ("generate", extra)
    code = main(
        [command, "p", "--model", str(model_dir), "--out", str(out), "--no-progress", *extra]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["init", "tiny", "OUT", "--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
        (["make-shapes", "OUT", "--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
        (["eval-shapes", "--reference", "--seed", "-1"], "argument --seed: must be in [0, 429"),
        (["generate", "p", "--seed", "x1"], "argument --seed: invalid int value: 'x1'"),
        # train's flags are config overrides, checked with the config (jaxdiff.train.config).
        (["train", "CONFIG", "--workdir", "OUT", "--seed", "-1"], "seed=-1 must be in [0, 4294"),
    ],
)
def test_every_seed_flag_takes_a_uint32_and_says_so_in_one_line(tmp_path, capsys, argv, message):
    """A negative seed reached numpy's generators as a traceback (init, make-shapes,
    eval-shapes, train) or wrapped (generate); now it is refused before any work."""
    config = str(Path(__file__).parents[1] / "configs" / "tiny.py")
    paths = {"OUT": str(tmp_path / "out"), "CONFIG": config}
    assert main([paths.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_images_and_folders(tmp_path, model_dir, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    cases = [
        (
            ["img2img", "p", "--image", str(image), "--strength", "1.5"],
            "--strength must be in [0, 1]",
        ),
        (["inpaint", "p", "--image", str(image), "--mask", str(mask)], "they must match"),
        (
            ["img2img", "p", "--image", str(tmp_path / "none.png"), "--strength", "0.5"],
            "no such file",
        ),
        (["outpaint", "p", "--image", str(image), "--extend", "1,2"], "LEFT,TOP,RIGHT,BOTTOM"),
        (["outpaint", "p", "--image", str(image), "--extend", "1,0,0,0"], "not a multiple"),
    ]
    for argv, message in cases:
        code = main(
            [*argv, "--model", str(model_dir), "--out", str(tmp_path / "o.png"), "--no-progress"]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    code = main(["generate", "p", "--model", str(tmp_path), "--out", str(tmp_path / "o.png")])
    assert code == 2 and "not a diffusers pipeline folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "mask.png"]


def test_cli_npy_output_and_latents_layout(tmp_path, model_dir, pipe):
    noise = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "out.npy"
    argv = [
        "generate",
        "a red circle",
        "--model",
        str(model_dir),
        "--steps",
        "3",
        "--sampler",
        "euler",
        "--batch",
        "2",
        "--latents",
        str(tmp_path / "noise.npy"),
        "--output-type",
        "npy",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    images = np.load(out)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    again = pipe.generate("a red circle", latents=noise, batch=2, **KW).images
    assert_close(images, again, "CLI vs API with the same latents")
    np.save(tmp_path / "bad.npy", noise[:, :, :8])
    argv[argv.index(str(tmp_path / "noise.npy"))] = str(tmp_path / "bad.npy")
    argv[argv.index(str(out))] = str(tmp_path / "other.npy")
    assert main(argv) == 2 and not (tmp_path / "other.npy").exists()
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert main(argv) == 2 and not (tmp_path / "other.npy").exists()


def test_samplers_command_lists_every_sampler(capsys):
    from jaxdiff.samplers import SAMPLERS

    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(SAMPLERS)
    assert len(lines) == 15 and all(len(line.split()) > 1 for line in lines)


def test_model_index_flags_are_kept(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_cli_reuses_the_persistent_compilation_cache(tmp_path, model_dir):
    """With the progress bar (the default), a second run compiles nothing; without it,
    generation is one program, cached too."""
    import os
    import subprocess
    import sys

    from jaxdiff.compilation_cache import host_tag

    env = dict(
        os.environ, JAXDIFF_CACHE_DIR=str(tmp_path / "cache"), XLA_FLAGS="", JAX_PLATFORMS="cpu"
    )
    cache = tmp_path / "cache" / host_tag()  # the entries of this machine's CPU
    base = [
        sys.executable,
        "-m",
        "jaxdiff",
        "generate",
        "a red circle",
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--sampler",
        "euler",
    ]

    def run(*extra):
        subprocess.run([*base, *extra], env=env, check=True, capture_output=True)
        return entries(cache)

    first = run("--out", str(tmp_path / "a.png"))
    assert {"jit_denoise_begin", "jit_denoise_steps", "jit_denoise_finish"} <= programs(first), (
        first
    )
    # The same command again with another seed: served from the cache, nothing compiled again.
    assert not recompiled(first, run("--seed", "5", "--out", str(tmp_path / "b.png")))
    # Without the progress bar, generation is one program; it is cached as well.
    second = run("--no-progress", "--out", str(tmp_path / "c.png"))
    assert "jit_denoise" in programs(second) - programs(first), second
    assert not recompiled(first, second), second


def test_the_command_line_imports_no_training_library_until_it_trains():
    """`jaxdiff generate` registers the `train` command but must not import the loop, optax or
    orbax (about half a second of its start); `from jaxdiff.train import ...` still works."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from jaxdiff.cli import build_parser\n"
        "build_parser()\n"
        "heavy = ('jaxdiff.train.loop', 'jaxdiff.checkpoint', 'optax', 'orbax.checkpoint')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from jaxdiff.train import TrainConfig, train\n"
        "print(train.__module__, TrainConfig.__module__, 'orbax.checkpoint' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[]", "jaxdiff.train.loop jaxdiff.train.config True"], out
