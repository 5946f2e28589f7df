"""Loading and saving diffusers-format folders: round trips, variants, shards, and bad input."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from reference import UNET_SD1, VAE_TINY, diffusers_unet, diffusers_vae, nchw, nhwc
from tolerances import assert_close

from jaxdiff.convert import WeightsError, load_component, load_pipeline, save_pipeline
from jaxdiff.convert.diffusers import random_pipeline
from jaxdiff.models.build import module_for
from jaxdiff.models.config_io import ConfigError


def _flat(params):
    return traverse_util.flatten_dict(params)


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-sdxl"
    weights = random_pipeline("tiny-sdxl", seed=3)
    save_pipeline(weights, out)
    return weights, out


def test_round_trip_is_exact(tiny_sdxl_folder):
    weights, out = tiny_sdxl_folder
    again = load_pipeline(out)
    assert again.configs == weights.configs
    assert again.family == "sdxl"
    for name in weights.params:
        _assert_same_params(again.params[name], weights.params[name])
    assert again.model_index["force_zeros_for_empty_prompt"] is True


def test_export_loads_in_diffusers_and_transformers(tiny_sdxl_folder):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    weights, out = tiny_sdxl_folder
    rng = np.random.default_rng(0)
    p = weights.params

    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, 64)).astype(np.float32)
    text_embeds = rng.standard_normal((1, 24)).astype(np.float32)
    time_ids = np.array([[32, 32, 0, 0, 32, 32]], np.float32)
    t = np.array([500.0], np.float32)
    ours = jax.jit(module_for(weights.configs["unet"]).apply)(
        {"params": p["unet"]}, x, t, ctx, text_embeds=text_embeds, time_ids=time_ids
    )
    with torch.no_grad():
        theirs = unet(
            nchw(x),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            added_cond_kwargs=dict(
                text_embeds=torch.from_numpy(text_embeds), time_ids=torch.from_numpy(time_ids)
            ),
        ).sample
    assert_close(ours, nhwc(theirs), "exported UNet")

    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    vae_module = module_for(weights.configs["vae"])
    ours = jax.jit(functools.partial(vae_module.apply, method=vae_module.decode))(
        {"params": p["vae"]}, z
    )
    with torch.no_grad():
        theirs = vae.decode(nchw(z)).sample
    assert_close(ours, nhwc(theirs), "exported VAE decoder")

    ids = np.array([[49406, 320, 1125, 49407] + [49407] * 73], np.int64)
    for name, cls in (
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ):
        ref = cls.from_pretrained(out / name).eval()
        ours = jax.jit(module_for(weights.configs[name]).apply)({"params": p[name]}, ids)
        with torch.no_grad():
            theirs = ref(torch.from_numpy(ids))
        assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), f"exported {name}")

    pipe = StableDiffusionXLPipeline.from_pretrained(out)  # the whole folder, tokenizers included
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_fp16_variant_and_shards_load(tmp_path):
    ref = diffusers_unet(UNET_SD1)
    ref.save_pretrained(tmp_path / "full")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref.half().save_pretrained(tmp_path / "half", variant="fp16")
    assert (tmp_path / "half" / "diffusion_pytorch_model.fp16.safetensors").is_file()

    _, full = load_component(tmp_path / "full")
    _, sharded = load_component(tmp_path / "sharded")
    _assert_same_params(sharded, full)
    _, half = load_component(tmp_path / "half", variant="fp16")
    _, half_default = load_component(tmp_path / "half")  # falls back to the only variant there
    _assert_same_params(half_default, half)
    for k, v in _flat(half).items():
        np.testing.assert_array_equal(v, _flat(full)[k].astype(np.float16).astype(np.float32))


def test_bfloat16_safetensors_load(tmp_path):
    ref = diffusers_vae(VAE_TINY)
    ref.save_pretrained(tmp_path / "f32")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, f32 = load_component(tmp_path / "f32")
    _, bf16 = load_component(tmp_path / "bf16")
    import ml_dtypes

    for k, v in _flat(bf16).items():
        expect = _flat(f32)[k].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(v, expect)


@pytest.mark.parametrize(
    "shape, axes, dtype",
    [
        ((517, 333), (1, 0), np.float32),  # a linear kernel, tiles not dividing it
        ((300, 70, 3, 3), (2, 3, 1, 0), np.float32),  # a conv kernel
        ((300, 70, 3, 3), (2, 3, 1, 0), np.float16),  # an fp16 variant, widened
        ((64, 8, 3, 3), (2, 3, 1, 0), np.float32),  # small: one plain copy
        ((1000,), (0,), np.float16),
    ],
)
def test_host_arrays_are_exact_contiguous_and_aligned(shape, axes, dtype):
    from jaxdiff.convert.diffusers import host_array

    source = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    view = np.transpose(source, axes)
    out = host_array(view, np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out, view.astype(np.float32))
    assert host_array(out, np.float32) is out  # already so: no copy


def test_loaded_parameters_are_used_in_place_on_the_cpu(tmp_path):
    """A loaded model is in host memory once: XLA's CPU backend computes on the loaded arrays
    themselves (jax.device_put copies nothing), where a copy doubled the memory of SD 1.5 (8.0
    rather than 4.1 GiB) while it loaded."""
    diffusers_unet(UNET_SD1).save_pretrained(tmp_path / "unet")
    _, params = load_component(tmp_path / "unet")
    leaves = jax.tree_util.tree_leaves(params)
    cpu = jax.devices("cpu")[0]
    copied = [
        x.shape for x in leaves if jax.device_put(x, cpu).unsafe_buffer_pointer() != x.ctypes.data
    ]
    assert not copied, f"{len(copied)} of {len(leaves)} parameters were copied: {copied[:3]}"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def vae_folder(tmp_path):
    diffusers_vae(VAE_TINY).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def _rewrite(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return path


def test_missing_key_is_named(vae_folder):
    path = _rewrite(vae_folder, lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(WeightsError, match=r"missing key decoder\.conv_out\.bias"):
        load_component(vae_folder)
    assert str(path.parent) in str(_error(vae_folder))


def test_unexpected_key_is_named(vae_folder):
    path = _rewrite(
        vae_folder, lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)})
    )
    err = _error(vae_folder)
    assert "unexpected key decoder.extra.weight" in err and str(path) in err


def test_wrong_shape_is_named(vae_folder):
    def edit(t):
        t["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)

    path = _rewrite(vae_folder, edit)
    err = _error(vae_folder)
    assert str(path) in err and "encoder.conv_in.weight" in err
    assert "(16, 3, 5, 5)" in err and "(16, 3, 3, 3)" in err


def test_truncated_file_is_named(vae_folder):
    path = vae_folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _error(vae_folder)
    assert str(path) in err and "truncated" in err


def test_pickles_are_refused(tmp_path, vae_folder):
    (vae_folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, vae_folder / "diffusion_pytorch_model.bin")
    err = _error(vae_folder)
    assert "diffusion_pytorch_model.bin" in err and "never unpickles" in err
    assert "safe_serialization=True" in err
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(WeightsError, match="never unpickles"):
        load_pipeline(ckpt)


def test_folder_that_is_not_a_pipeline(tmp_path, vae_folder):
    with pytest.raises(WeightsError, match="not a diffusers pipeline folder"):
        load_pipeline(vae_folder)
    with pytest.raises(WeightsError, match="no such folder"):
        load_pipeline(tmp_path / "nowhere")
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_pipeline(tmp_path)


def test_unknown_config_field_fails_loudly(vae_folder):
    cfg = json.loads((vae_folder / "config.json").read_text())
    cfg["lattent_channels"] = 4
    (vae_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="unknown config field 'lattent_channels'"):
        load_component(vae_folder)


def test_unsupported_architecture_option_fails_loudly():
    from jaxdiff.models.unet import UNetConfig

    with pytest.raises(ConfigError, match="class_embed_type='timestep' is not supported"):
        UNetConfig.from_diffusers(dict(UNET_SD1, class_embed_type="timestep"))
    with pytest.raises(ConfigError, match="unsupported down block type 'SimpleDownBlock2D'"):
        UNetConfig.from_diffusers(dict(UNET_SD1, down_block_types=("SimpleDownBlock2D",) * 3))


def _error(folder) -> str:
    with pytest.raises(WeightsError) as info:
        load_component(folder)
    return str(info.value)


def test_save_never_half_overwrites(tmp_path, tiny_sdxl_folder):
    weights, _ = tiny_sdxl_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeightsError, match="already exists"):
        save_pipeline(weights, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_pipeline(weights, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind
    shutil.rmtree(out)
