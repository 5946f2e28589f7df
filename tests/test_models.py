"""Presets, parameter counts, logical axes and the dtype policy of jaxdiff's models."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from tolerances import BF16_RTOL, FLOAT16_ATOL

from jaxdiff.cli import main
from jaxdiff.convert.diffusers import config_to_dict
from jaxdiff.models.build import abstract_params, logical_axes, module_for, random_params
from jaxdiff.models.clip_text import CLIPTextConfig
from jaxdiff.models.config_io import ConfigError
from jaxdiff.models.layers import count_params
from jaxdiff.models.presets import PRESETS
from jaxdiff.models.unet import UNetConfig
from jaxdiff.models.vae import VAEConfig
from jaxdiff.tokenizer import bundled_clip_tokenizer, tokenize

# The counts of the released checkpoints (diffusers' and transformers' `num_parameters()`).
RELEASED_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.mark.parametrize("preset", sorted(RELEASED_COUNTS))
def test_params_command_prints_released_counts(preset, capsys):
    assert main(["params", "--preset", preset]) == 0
    assert json.loads(capsys.readouterr().out) == RELEASED_COUNTS[preset]


def _reference_count(name, config) -> int:
    """Build the PyTorch model from jaxdiff's exported config on the meta device and count."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    d = config_to_dict(config)
    with torch.device("meta"):
        if isinstance(config, UNetConfig):
            model = UNet2DConditionModel.from_config(d)
        elif isinstance(config, VAEConfig):
            model = AutoencoderKL.from_config(d)
        else:
            cls = CLIPTextModelWithProjection if config.with_projection else CLIPTextModel
            model = cls(HFConfig(**{k: v for k, v in d.items() if k != "architectures"}))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_matches_the_reference_architecture(preset):
    for name, config in PRESETS[preset].components().items():
        assert count_params(abstract_params(config)) == _reference_count(name, config), name


def test_config_round_trips_through_diffusers_json():
    for preset in PRESETS.values():
        for config in preset.components().values():
            d = json.loads(json.dumps(config_to_dict(config)))
            if isinstance(config, CLIPTextConfig):
                assert CLIPTextConfig.from_transformers(d) == config
            else:
                assert type(config).from_diffusers(d) == config


def test_text_config_asks_transformers_only_for_keys_it_does_not_know(monkeypatch):
    """A config.json as transformers writes it (generic keys like `return_dict`) loads; one
    with only CLIP's own keys loads without importing transformers' config module (which
    imports torch); a misspelled key is still an error."""
    from transformers import CLIPTextConfig as HFConfig

    import jaxdiff.models.clip_text as clip_text

    config = CLIPTextConfig.tiny()
    written = HFConfig(**{k: v for k, v in config_to_dict(config).items() if k != "architectures"})
    written = {**written.to_dict(), "architectures": ["CLIPTextModel"]}
    assert "return_dict" in written  # a generic key, not one of CLIP's
    assert CLIPTextConfig.from_transformers(written) == config

    calls = []
    generic = clip_text._generic_transformers_fields
    monkeypatch.setattr(
        clip_text, "_generic_transformers_fields", lambda: calls.append(1) or generic()
    )
    assert CLIPTextConfig.from_transformers(config_to_dict(config)) == config
    assert calls == []
    assert CLIPTextConfig.from_transformers(written) == config
    assert calls == [1]
    with pytest.raises(ConfigError, match="unknown config field 'hiden_size'"):
        CLIPTextConfig.from_transformers({**config_to_dict(config), "hiden_size": 32})


KNOWN_AXES = {None, "embed", "heads", "mlp", "conv_in", "conv_out", "norm", "vocab"}


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_every_parameter_has_logical_axes(preset):
    for name, config in PRESETS[preset].components().items():
        axes = traverse_util.flatten_dict(
            logical_axes(config), is_leaf=lambda _, x: isinstance(x, tuple)
        )
        shapes = traverse_util.flatten_dict(abstract_params(config))
        assert axes.keys() == shapes.keys()
        for path, names in axes.items():
            assert len(names) == len(shapes[path].shape), path
            assert set(names) <= KNOWN_AXES, (path, names)
            assert any(n is not None for n in names), f"{name}: {'/'.join(path)} has no named axis"
            if path[-1] == "kernel" and len(names) == 4:
                assert names == (None, None, "conv_in", "conv_out")


def test_random_params_are_seeded_per_parameter_whatever_the_thread_count(monkeypatch):
    """The draws run on a thread pool: the same seed gives the same values there and drawn one
    by one, another seed other values, in the requested dtype, kernels ~ N(0, 1/fan_in)."""
    from jaxdiff.models import build

    cfg = PRESETS["tiny"].unet
    many = random_params(cfg, seed=3)
    monkeypatch.setattr(build, "parallel_map", lambda fn, *items: list(map(fn, *items)))
    one = random_params(cfg, seed=3)
    other = random_params(cfg, seed=4, param_dtype=jnp.bfloat16)
    a, b, c = (traverse_util.flatten_dict(p) for p in (many, one, other))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert a[key].dtype == np.float32 and c[key].dtype == jnp.bfloat16
        if key[-1] == "kernel":
            assert not np.array_equal(a[key], np.asarray(c[key], np.float32)), key
    big = max((k for k in a if k[-1] == "kernel"), key=lambda k: a[k].size)
    fan_in = np.prod(a[big].shape[:-1])
    assert abs(a[big].std() * np.sqrt(fan_in) - 1) < 0.05, (big, a[big].shape)
    assert all(np.all(a[k] == 1) for k in a if k[-1] == "scale")
    assert all(np.all(a[k] == 0) for k in a if k[-1] == "bias")


def test_bfloat16_compute_keeps_float32_where_it_matters():
    cfg = PRESETS["tiny"].unet
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    t = np.array([10.0, 900.0], np.float32)
    f32 = jax.jit(module_for(cfg).apply)({"params": params}, x, t, ctx)
    bf16_model = module_for(cfg, dtype=jnp.bfloat16)
    bf16 = jax.jit(bf16_model.apply)({"params": params}, x, t, ctx)
    assert bf16.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(bf16, np.float32) - f32) / np.linalg.norm(f32)
    assert rel < BF16_RTOL, rel

    # Storage in bfloat16 is separate from compute.
    half_params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    out = jax.jit(module_for(cfg, dtype=jnp.float32, param_dtype=jnp.bfloat16).apply)(
        {"params": half_params}, x, t, ctx
    )
    assert out.dtype == jnp.float32

    # The VAE decoder hands back float32 pixels even when it computes in bfloat16.
    vcfg = PRESETS["tiny"].vae
    vae = module_for(vcfg, dtype=jnp.bfloat16)
    img = jax.jit(functools.partial(vae.apply, method=vae.decode))(
        {"params": random_params(vcfg)}, np.zeros((1, 4, 4, 4), np.float32)
    )
    assert img.dtype == jnp.float32


def test_group_norm_survives_activations_that_overflow_float16():
    from jaxdiff.models.layers import GroupNorm

    x = jnp.full((1, 4, 4, 8), 300.0, jnp.float16) + jnp.arange(8, dtype=jnp.float16)
    gn = GroupNorm(2, 1e-6, dtype=jnp.float16)
    y = gn.apply(gn.init(jax.random.key(0), x), x)
    # The sum of squares is ~1.4e6, beyond float16's 65504: a float16 variance would be inf.
    assert y.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(y)))
    g = np.asarray(x, np.float64).reshape(1, 16, 2, 4)
    ref = (
        (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    ).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=FLOAT16_ATOL)


def _equations(fn, *args):
    """fn(*args)'s jaxpr's equations, with those of the calls in it (a custom gradient's primal,
    a nested jit) in place of the call, their variables the caller's."""
    from jax.extend.core import Literal

    rename = {}

    def flat(jaxpr):
        for eqn in jaxpr.eqns:
            inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
            inner = getattr(inner, "jaxpr", inner)
            if inner is None or len(inner.invars) != len(eqn.invars):
                yield eqn, [v if isinstance(v, Literal) else rename.get(v, v) for v in eqn.invars]
                continue
            for mine, theirs in zip(inner.invars, eqn.invars, strict=True):
                rename[mine] = theirs if isinstance(theirs, Literal) else rename.get(theirs, theirs)
            yield from flat(inner)
            for mine, theirs in zip(eqn.outvars, inner.outvars, strict=True):
                rename[mine] = theirs if isinstance(theirs, Literal) else rename.get(theirs, theirs)

    return list(flat(jax.make_jaxpr(fn)(*args).jaxpr))


def _reductions_after_reductions(fn, x):
    """How many reduce_sum equations of fn(x)'s jaxpr (calls in it included) depend on another
    reduce_sum's output."""
    from jax.extend.core import Literal

    after_reduce, count = set(), 0
    for eqn, invars in _equations(fn, x):
        fed = any(not isinstance(v, Literal) and v in after_reduce for v in invars)
        if eqn.primitive.name == "reduce_sum":
            count += fed
            after_reduce.update(eqn.outvars)
        elif fed:
            after_reduce.update(eqn.outvars)
    return count


def _sum_sizes(fn, *args, rows=False) -> list[int]:
    """How many elements each reduce_sum of `fn`'s jaxpr (calls in it included) adds into one;
    with `rows`, only those that keep the last axis: sums over rows, as a bias's or a norm
    scale's gradient."""
    return [
        int(np.prod([e.invars[0].aval.shape[a] for a in e.params["axes"]]))
        for e, _ in _equations(fn, *args)
        if e.primitive.name == "reduce_sum"
        and not (rows and e.invars[0].aval.ndim - 1 in e.params["axes"])
    ]


def test_add_last_sums_the_last_axis_at_every_length():
    from tolerances import assert_close

    from jaxdiff.models.layers import _add_axis, _add_last

    x = np.random.default_rng(0).standard_normal((3, 41)).astype(np.float32)
    sizes = range(1, 42)

    @jax.jit  # every length in one program: one compile, not one per operation and length
    def sums(x):
        last = [_add_last(x[:, :size]) for size in sizes]
        return last, [_add_axis(x[:, :size].T[None], 1) for size in sizes]  # any axis

    for size, got, other in zip(sizes, *sums(jnp.asarray(x)), strict=True):
        assert got.shape == (3, 1) and other.shape == (1, 1, 3)
        assert_close(got[:, 0], x[:, :size].sum(-1), f"{size} channels")
        assert_close(other[0, 0], x[:, :size].sum(-1), f"{size} rows")


@pytest.mark.parametrize(
    "shape, blocks",
    [
        ((2, 4096, 320), 64),  # SD 1.5's first level at b2: 6 tiles of channels, 384 blocks
        ((16, 4096, 320), 8),  # b16: 48 tiles, 384
        ((2, 256, 1280), 4),  # no block under 64 rows
        ((2, 64, 1280), 1),
        ((1, 512 * 512, 128), 256),  # the VAE's last level at 512 px: 1,024 rows a block
        ((1, 2048 * 2048, 128), 1024),  # at 2048 px: 4,096 rows a block, not more
        ((2, 9 * 1024, 320), 64),  # 96x96 latents
        ((3, 35, 32), 1),
    ],
)
def test_norm_blocks_fill_the_gpu_within_their_row_limits(shape, blocks):
    from jaxdiff.models.layers import _norm_blocks

    assert _norm_blocks(*shape) == blocks


def test_group_norm_of_16_bit_input_takes_one_pass_within_its_rounding():
    """A bfloat16 input's statistics come from one pass over x (one GPU kernel for both sums,
    per channel and block of positions, then additions over the blocks and each group's
    channels), and the output stays within its own bfloat16 rounding of float64 math on the same
    input, at a mean 20 standard deviations from zero, where one pass loses the most to float32."""
    from tolerances import BF16_OUTPUT_RTOL, FLOAT32_ATOL

    from jaxdiff.models.layers import GroupNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(20.0 + rng.standard_normal((2, 64, 64, 320)), jnp.bfloat16)
    gn = GroupNorm(32, 1e-5, dtype=jnp.bfloat16)
    params = gn.init(jax.random.key(0), x)
    y = jax.jit(gn.apply)(params, x)
    g = np.asarray(x, np.float64).reshape(2, -1, 32, 10)
    mean, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
    ref = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= FLOAT32_ATOL + BF16_OUTPUT_RTOL * np.abs(ref)), err.max()

    def norm(x):
        return gn.apply(params, x)

    assert _reductions_after_reductions(norm, x) == 0
    # Each sum over a block of 64 positions only (`_norm_blocks`: 64 blocks of 4,096 positions);
    # the blocks and the group's channels are added up (`_add_axis`).
    sums = [e for e, _ in _equations(norm, x) if e.primitive.name == "reduce_sum"]
    assert [(e.invars[0].aval.shape, e.params["axes"]) for e in sums] == [
        ((2, 64, 64, 32, 10), (2,))
    ] * 2
    # float32 keeps the two-pass variance, the squares of x less its mean.
    assert _reductions_after_reductions(norm, x.astype(jnp.float32)) == 1


@pytest.mark.parametrize("shape", [(2, 32, 32, 64), (3, 7, 5, 32), (2, 96, 256)])
def test_group_norm_gradient_of_16_bit_input_is_jaxs_of_the_two_pass_norm(shape):
    """The written-out gradient (`_gn_bwd`: two sums per channel in one pass) is jax's gradient
    of the float32 two-pass group norm, for x, the scale and the bias, with and without blocks
    of positions (run here on float32 input, where both are exact to float32 rounding); and the
    bfloat16 module's gradient sums no more than a block of positions into one number, where
    jax's gradient of the forward sums over every position and channel of a group."""
    from tolerances import assert_close

    from jaxdiff.models.layers import GroupNorm, _group_norm_one_pass, _two_pass

    rng = np.random.default_rng(1)
    c = shape[-1]
    x = jnp.asarray(1.0 + 2.0 * rng.standard_normal(shape), jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def two_pass(x, scale, bias):  # plain jax: its own derivative
        return _two_pass(x, scale, bias, 8, 1e-5)[0]

    def one_pass(x, scale, bias):
        return _group_norm_one_pass(x, scale, bias, 8, 1e-5)

    def loss(norm):
        return lambda *args: jnp.sum(norm(*args) * weights)

    assert_close(jax.jit(one_pass)(x, scale, bias), two_pass(x, scale, bias), "output")
    ours = jax.jit(jax.grad(loss(one_pass), (0, 1, 2)))(x, scale, bias)
    jaxs = jax.grad(loss(two_pass), (0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("x", "scale", "bias"), ours, jaxs, strict=True):
        assert_close(a, b, f"gradient of {name}")

    x16 = jnp.zeros((2, 64, 64, 320), jnp.bfloat16)
    gn16 = GroupNorm(32, 1e-5, dtype=jnp.bfloat16)
    params = gn16.init(jax.random.key(0), x16)

    def pull_back(params, x, cotangent):
        return jax.vjp(gn16.apply, params, x)[1](cotangent)

    # 64 positions a block; the scale's and bias's gradients add the batch's 2 sums.
    assert max(_sum_sizes(pull_back, params, x16, x16)) == 64


@pytest.mark.parametrize("shape", [(2, 32, 32, 64), (3, 7, 5, 32), (2, 96, 256)])
def test_group_norm_derivatives_of_float32_input_are_jaxs_of_the_two_pass_norm(shape):
    """A float32 group norm's derivative is written out (`_group_norm_two_pass`): its output,
    gradients and forward-mode derivatives are jax's of the plain two passes, and its gradient
    sums full-size arrays over positions twice (sum(dy) and sum(dy * xhat) per channel) where
    jax's transposed derivative sums them more often."""
    from tolerances import assert_close

    from jaxdiff.models.layers import GroupNorm, _two_pass

    rng = np.random.default_rng(2)
    c = shape[-1]
    x, weights, tangent = (
        jnp.asarray(1.0 + 2.0 * rng.standard_normal(shape), jnp.float32) for _ in range(3)
    )
    scale, bias, d_scale, d_bias = (
        jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(4)
    )
    gn = GroupNorm(8, 1e-5)

    def ours(x, scale, bias):
        return gn.apply({"params": {"scale": scale, "bias": bias}}, x)

    def jaxs(x, scale, bias):
        return _two_pass(x, scale, bias, 8, 1e-5)[0]

    np.testing.assert_array_equal(
        np.asarray(ours(x, scale, bias)), np.asarray(jaxs(x, scale, bias))
    )

    def loss(norm):
        return lambda *args: jnp.sum(norm(*args) * weights)

    got, want = (jax.grad(loss(f), (0, 1, 2))(x, scale, bias) for f in (ours, jaxs))
    for name, a, b in zip(("x", "scale", "bias"), got, want, strict=True):
        assert_close(a, b, f"gradient of {name}")
    primals, tangents = (x, scale, bias), (tangent, d_scale, d_bias)
    (y, dy), (y_ref, dy_ref) = (jax.jvp(f, primals, tangents) for f in (ours, jaxs))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    assert_close(dy, dy_ref, "forward-mode derivative")

    def full_size_sums(norm):
        def pull_back(x, scale, bias, cotangent):
            return jax.vjp(norm, x, scale, bias)[1](cotangent)

        return [
            e.params["axes"]
            for e, _ in _equations(pull_back, x, scale, bias, weights)
            if e.primitive.name == "reduce_sum" and e.invars[0].aval.size == x.size
        ]

    # The forward's mean and variance over each group, then the two sums over positions.
    assert full_size_sums(ours) == [(1, 3), (1, 3), (1,), (1,)]
    assert len(full_size_sums(jaxs)) > 4


@pytest.mark.parametrize("shape", [(8, 16, 96), (2, 77, 64), (3, 5, 7, 32)])
def test_layer_norm_gradient_of_16_bit_input_is_jaxs(shape):
    """LayerNorm's written-out gradient (`_ln_bwd`) is jax's gradient of the float32 norm for x,
    the scale and the bias (run on float32 input); the bfloat16 module's sums over rows go in
    blocks of at most 64 (`_position_sums`) where jax's sums all of them at once."""
    from tolerances import assert_close

    from jaxdiff.models.layers import LayerNorm, _layer_norm_16

    rng = np.random.default_rng(2)
    c = shape[-1]
    x = jnp.asarray(1.0 + 2.0 * rng.standard_normal(shape), jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ln = LayerNorm(1e-5)

    def jaxs(x, scale, bias):
        return ln.apply({"params": {"scale": scale, "bias": bias}}, x)

    def ours(x, scale, bias):
        return _layer_norm_16(x, scale, bias, 1e-5)

    assert_close(jax.jit(ours)(x, scale, bias), jaxs(x, scale, bias), "output")
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * weights), (0, 1, 2)))(x, scale, bias)
    want = jax.grad(lambda *a: jnp.sum(jaxs(*a) * weights), (0, 1, 2))(x, scale, bias)
    for name, a, b in zip(("x", "scale", "bias"), got, want, strict=True):
        assert_close(a, b, f"gradient of {name}")

    x16 = jnp.zeros((8, 256, 320), jnp.bfloat16)
    ln16 = LayerNorm(1e-5, dtype=jnp.bfloat16)
    params = ln16.init(jax.random.key(0), x16)

    def pull_back(params, x, cotangent):
        return jax.vjp(ln16.apply, params, x)[1](cotangent)

    # 2,048 rows in 32 blocks; float32 keeps jax's one sum.
    assert max(_sum_sizes(pull_back, params, x16, x16, rows=True)) == 64
    assert max(_sum_sizes(pull_back, params, x16.astype(jnp.float32), x16, rows=True)) == 2048


def _bias_gradient(layer, params, inputs, cotangent):
    return jax.vjp(layer.apply, params, inputs)[1](cotangent)[0]["params"]["bias"]


def test_add_per_channel_sums_its_gradient_in_blocks_for_16_bit_input():
    """`add_per_channel` (a bias, or a time embedding per sample) adds v over the other axes;
    v's gradient is the sum of the cotangent over them, for bfloat16 within the rounding of its
    own output, summed in blocks of at most 64 rows; float32 is jax's plain addition (its one
    reduction, and forward-mode derivatives). jaxdiff's Dense and convolution (biases through
    it) are flax's."""
    from tolerances import BF16_OUTPUT_RTOL, FLOAT32_ATOL

    from jaxdiff.models.layers import add_per_channel, conv, dense

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 1280)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)

    def v_gradient(x, v, cotangent):
        return jax.vjp(add_per_channel, x, v)[1](cotangent)[1]

    for v in (rng.standard_normal(1280), rng.standard_normal((8, 1280))):
        v = jnp.asarray(v, jnp.bfloat16)
        np.testing.assert_array_equal(
            np.asarray(add_per_channel(x, v)), np.asarray(x + v.reshape(-1, 1, 1, 1280))
        )
        c = np.asarray(cotangent, np.float64)
        want = c.sum((0, 1, 2)) if v.ndim == 1 else c.sum((1, 2))
        err = np.abs(np.asarray(jax.jit(v_gradient)(x, v, cotangent), np.float64) - want)
        assert np.all(err <= FLOAT32_ATOL + BF16_OUTPUT_RTOL * np.abs(want)), err.max()
        assert max(_sum_sizes(v_gradient, x, v, cotangent, rows=True)) == 64
        rows = 8 * 16 * 16 if v.ndim == 1 else 16 * 16
        as32 = (a.astype(jnp.float32) for a in (x, v, cotangent))
        assert max(_sum_sizes(v_gradient, *as32, rows=True)) == rows

    # jaxdiff's linear and convolution layers (`dense`, `conv`, as the models build them): flax's,
    # with the same parameters, their biases through add_per_channel.
    tokens = jnp.asarray(rng.standard_normal((4, 256, 96)), jnp.bfloat16)
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 8)), jnp.bfloat16)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    for ours, flax_layer, inputs, rows in [
        (dense(64, ("embed", "mlp"), **kw), nn.Dense(64, dtype=jnp.bfloat16), tokens, 1024),
        (conv(16, 3, **kw), nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), **kw), images, 2048),
    ]:
        params = nn.unbox(ours.init(jax.random.key(2), inputs))
        params = jax.tree_util.tree_map(lambda p: p + 0.5, params)  # a bias that is not zero
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
            flax_layer.init(jax.random.key(2), inputs)
        )
        out = ours.apply(params, inputs)
        np.testing.assert_array_equal(
            np.asarray(out, np.float32), np.asarray(flax_layer.apply(params, inputs), np.float32)
        )

        # Blocks of 64 rows, where flax's own layer sums all its rows at once.
        for layer, most in ((ours, 64), (flax_layer, rows)):
            pull = functools.partial(_bias_gradient, layer)
            assert max(_sum_sizes(pull, params, inputs, out, rows=True)) == most, layer

    # In float32 (the CPU's compute dtype, the parity tests') the addition is jax's own:
    # forward-mode derivatives go through the layers as through flax's.
    from tolerances import assert_close

    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    for ours, flax_layer, inputs in [
        (dense(64, ("embed", "mlp"), **kw), nn.Dense(64), tokens),
        (conv(16, 3, **kw), nn.Conv(16, (3, 3), padding=((1, 1), (1, 1))), images),
    ]:
        inputs = inputs.astype(jnp.float32)
        params = jax.tree_util.tree_map(
            lambda p: p + 0.5, nn.unbox(ours.init(jax.random.key(2), inputs))
        )
        tangent = jnp.asarray(rng.standard_normal(inputs.shape), jnp.float32)
        got, want = (
            jax.jvp(functools.partial(layer.apply, params), (inputs,), (tangent,))
            for layer in (ours, flax_layer)
        )
        assert_close(got[0], want[0], "float32 output")
        assert_close(got[1], want[1], "float32 forward-mode derivative")
    x32, v32 = x[:2].astype(jnp.float32), jnp.ones((2, 1280), jnp.float32)
    _, tangent = jax.jvp(add_per_channel, (x32, v32), (x32, v32))
    assert_close(tangent, x32 + v32[:, None, None, :], "add_per_channel's tangent")


def test_exact_gelu_is_torchs_in_each_dtype():
    """`layers.gelu` is torch's exact GELU: in float32 within the parity tolerance; in bfloat16
    torch's float32 formula rounded once, as torch rounds it, so that most outputs are torch's to
    the bit."""
    from tolerances import assert_close

    from jaxdiff.models import layers

    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32) * 4
    expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert_close(jax.jit(layers.gelu)(jnp.asarray(x)), expected, "float32")
    assert layers.activation("gelu") is layers.gelu

    x16 = jnp.asarray(x, jnp.bfloat16)
    ref16 = torch.nn.functional.gelu(torch.from_numpy(np.asarray(x16, np.float32)).bfloat16())
    ref16 = ref16.float().numpy()
    assert jax.jit(layers.gelu)(x16).dtype == jnp.bfloat16
    ours = np.asarray(jax.jit(layers.gelu)(x16), np.float32)
    # The two float32 erfs differ by up to 3e-7 (XLA's; torch's is within 3e-8 of the exact
    # value), so a rounding to bfloat16 may land one step apart (2^-7 of the power of two below
    # |ref|). Where 1 + erf cancels (large negative inputs, outputs near 0) the difference is
    # absolute: |x| / 2 * 3e-7, under 3e-6 for these inputs.
    with np.errstate(divide="ignore"):
        step = np.exp2(np.floor(np.log2(np.abs(ref16))) - 7)

    def within(values):
        return np.all(np.abs(values - ref16) <= step + 3e-6)

    assert within(ours) and np.mean(ours == ref16) > 0.9
    # jax's own form rounds x/2 and the erfc term to bfloat16 apart: a step off more often.
    plain = np.asarray(jax.jit(lambda v: jax.nn.gelu(v, approximate=False))(x16), np.float32)
    assert np.mean(plain == ref16) < 0.8


@pytest.mark.parametrize("preset", [pytest.param("tiny", marks=pytest.mark.slow), "tiny-sdxl"])
def test_context_kv_gives_the_call_without_it(preset):
    """A UNet given its cross-attention keys and values ahead (`context_kv`) returns what it
    returns projecting the context itself, and it reads them: a wrong cache changes the output."""
    from tolerances import assert_close

    from jaxdiff.models.unet import CONTEXT_KV, context_kv

    cfg = PRESETS[preset].unet
    params = random_params(cfg)
    unet = module_for(cfg)
    inputs = unet.dummy_inputs(2, cfg.sample_size, cfg.sample_size)
    keys = iter(jax.random.split(jax.random.key(0), len(inputs)))
    inputs = {
        k: jax.random.normal(next(keys), v.shape, v.dtype)
        if jnp.issubdtype(v.dtype, jnp.floating)
        else v
        for k, v in inputs.items()
    }
    kv = context_kv(params, inputs["encoder_hidden_states"])
    layers = [
        k for k in traverse_util.flatten_dict(params) if k[-3:] == ("attn2", "to_k", "kernel")
    ]
    assert len(traverse_util.flatten_dict(kv)) == 2 * len(layers) > 0

    def call(variables):
        return jax.jit(lambda v, x: unet.apply(v, **x))(variables, inputs)

    plain = call({"params": params})
    assert_close(call({"params": params, CONTEXT_KV: kv}), plain, "with context_kv")
    wrong = jax.tree_util.tree_map(jnp.zeros_like, kv)
    assert not np.allclose(call({"params": params, CONTEXT_KV: wrong}), plain, atol=1e-3)


def test_bundled_tokenizer_matches_clip_ids():
    tok = bundled_clip_tokenizer()
    ids = tokenize(tok, ["a photo of a cat", "x " * 100])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    # OpenAI CLIP's ids for these words; padding with <|endoftext|>, truncation keeps the EOS.
    np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 49407])
    assert ids[1, -1] == 49407 and ids[1, 0] == 49406
