"""The pure train step on 8 fake CPU devices: sharded == single device, remat and gradient
accumulation change nothing, the objectives' pieces, and one trace per run."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from jaxdiff import sharding as shd
from jaxdiff.schedules import NoiseSchedule, ScheduleConfig, add_noise
from jaxdiff.train import losses
from jaxdiff.train.config import ConfigError, TrainConfig
from jaxdiff.train.loop import prepare
from jaxdiff.train.state import SMALL_LEAF, frozen_for_compute, init_state
from jaxdiff.train.step import jit_train_step, train_step

# A one-level UNet: the smallest that has every kind of block, so each compile is short.
MICRO_UNET = {
    "block_out_channels": (32,),
    "down_block_types": ("CrossAttnDownBlock2D",),
    "up_block_types": ("CrossAttnUpBlock2D",),
    "sample_size": 8,
}
CFG = TrainConfig(
    unet=MICRO_UNET,
    resolution=16,
    batch_size=8,
    caption_dropout=0.25,
    min_snr_gamma=5.0,
    offset_noise=0.1,
    learning_rate=1e-3,
    min_shard_size=256,
)
STEPS = 2


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    # Cached VAE moments rather than images: the step's compile is then shorter (the loop
    # tests run the VAE-encoding path).
    return {
        "latents": rng.normal(0.0, 1.0, (8, 8, 8, 8)).astype(np.float32),
        "input_ids": rng.integers(0, 1000, (8, 77)).astype(np.int32),
    }


def _train(cfg, mesh, batch, unet_params):
    """STEPS steps from `unet_params` (None: random init, born sharded); counts traces."""
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return train_step(*args, **kwargs)

    run = prepare(cfg, mesh)
    state = init_state(run.setup, mesh, jax.random.key(0), {"unet": unet_params}, run.frozen)
    initial = jax.device_get(state.params["unet"])
    initial_arrays = jax.tree_util.tree_leaves(state.params)
    created = [(x.sharding, x.addressable_shards[0].data.size, x.size) for x in initial_arrays]
    step = jit_train_step(run.setup, run.state_shardings, mesh, counted)
    metrics = []
    for _ in range(STEPS):
        state, m = step(state, shd.shard_batch(batch, mesh), jax.random.key(7))
        metrics.append(jax.device_get(m))
    return {
        "metrics": metrics,
        "orders": {  # each array's memory order, major to minor
            jax.tree_util.keystr(path): x.format.layout.major_to_minor
            for path, x in jax.tree_util.tree_leaves_with_path(state)
        },
        "params": jax.device_get(state.params),
        "ema": jax.device_get(state.ema_tree()),
        "initial": initial,
        "traces": len(traces),
        "created": created,  # (sharding, size of one shard, size) of each initial parameter
        "run": run,
        "step": step,
        "state": state,  # the last one, on its devices
    }


MESHES = {
    "single": ((1, 1), CFG),
    "data": ((8, 1), CFG),
    "fsdp": ((2, 4), CFG),
    "remat": ((8, 1), dataclasses.replace(CFG, remat=True)),
    "accum": ((1, 1), dataclasses.replace(CFG, grad_accum=2)),
}


@pytest.fixture(scope="module")
def runs(batch):
    """name -> the result of `_train`; the FSDP run initializes, the others start from it."""
    cache = {}

    def get(name):
        if "fsdp" not in cache:
            cache["fsdp"] = _train(CFG, shd.make_mesh(2, 4), batch, None)
        if name not in cache:
            (data, fsdp), cfg = MESHES[name]
            mesh = shd.make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
            cache[name] = _train(cfg, mesh, batch, cache["fsdp"]["initial"])
        return cache[name]

    return get


def _assert_same_run(a, b, what):
    ma, pa, ea = a["metrics"], a["params"], a["ema"]
    mb, pb, eb = b["metrics"], b["params"], b["ema"]
    for i, (x, y) in enumerate(zip(ma, mb, strict=True)):
        assert_close(x["loss"], y["loss"], f"{what}: loss of step {i + 1}")
        assert_close(x["grad_norm"], y["grad_norm"], f"{what}: grad norm of step {i + 1}")
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves(pb), strict=True
    ):
        assert_close(x, y, f"{what}: {jax.tree_util.keystr(path)}")
    for x, y in zip(jax.tree_util.tree_leaves(ea), jax.tree_util.tree_leaves(eb), strict=True):
        assert_close(x, y, f"{what}: EMA")


@pytest.mark.parametrize("name", ["data", "fsdp"])
def test_sharded_step_equals_single_device(runs, name):
    _assert_same_run(runs(name), runs("single"), name)


@pytest.mark.slow  # about 45 s on 2 cores; CI runs it in its slow pass
def test_conv_kernels_in_the_devices_order_train_the_same(batch, runs, monkeypatch, tmp_path):
    """On a GPU the train state keeps each convolution kernel, its Adam moments and its EMA in the
    order cuDNN reads ([out, kh, kw, in]; jaxdiff.sharding.CONV_KERNEL_LAYOUTS), so the update
    transposes nothing. Here the CPU is told to use that order: the run is the default order's,
    and a checkpoint of it resumes into the same order (jaxdiff.train.loop.restored_state)."""
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train.loop import restored_state

    reference = runs("fsdp")  # in the default order: before the CPU is told otherwise
    monkeypatch.setitem(shd.CONV_KERNEL_LAYOUTS, "cpu", (3, 0, 1, 2))
    mesh = shd.make_mesh(2, 4)
    laid = _train(CFG, mesh, batch, reference["initial"])
    _assert_same_run(laid, reference, "conv kernels in [out, kh, kw, in] order")
    kernels = {k for k in laid["orders"] if k.endswith("['kernel']")}
    four_d = {k for k in kernels if len(laid["orders"][k]) == 4 and not k.startswith(".frozen")}
    trees = {k.split("[")[0] for k in four_d}
    assert len(four_d) > 10 and trees == {".params", ".ema_params", ".opt_state"}, trees
    assert sum(".mu[" in k for k in four_d) == sum(".nu[" in k for k in four_d) > 0
    for key, order in laid["orders"].items():
        expected = (3, 0, 1, 2) if key in four_d else tuple(range(len(order)))
        assert order == expected, key
    assert reference["orders"][sorted(four_d)[0]] == (0, 1, 2, 3)

    # A checkpoint restores in the default order; the state the loop resumes with is laid out.
    run, state = laid["run"], laid["state"]
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, state.checkpointed(), data={"position": 40}, config={})
    restored, position = restored_state(run, ckpt, 5)
    ckpt.close()
    assert position == 40
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree_util.tree_leaves(state), strict=True
    ):
        assert a.format.layout.major_to_minor == b.format.layout.major_to_minor, path
        assert a.sharding == b.sharding, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    laid["step"](restored, shd.shard_batch(batch, mesh), jax.random.key(7))  # takes it as it is

    # A checkpoint with the EMA and moments packed (no FSDP) resumes into the same order.
    ckpt = Checkpointer(tmp_path / "packed", async_save=False)
    ckpt.save(5, runs("single")["state"].checkpointed(), data={"position": 40}, config={})
    restored, _ = restored_state(run, ckpt, 5)
    ckpt.close()
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree_util.tree_leaves(state), strict=True
    ):
        assert a.format.layout.major_to_minor == b.format.layout.major_to_minor, path
        assert a.sharding == b.sharding, path


def test_norm_clip_and_finiteness_reduce_small_leaves_together():
    """`state.global_norm`, `clip_by_global_norm` and `all_finite` are optax's norm and clipping
    and a per-leaf finiteness check, reduced in one concatenation of the leaves of at most
    SMALL_LEAF elements and the larger leaves' reductions to their major axis on a GPU (one
    final kernel)."""
    import optax

    from jaxdiff.train import state as st

    rng = np.random.default_rng(0)
    tree = {
        "big": rng.normal(0, 1, (300, 300)).astype(np.float32),  # over SMALL_LEAF: on its own
        "conv": rng.normal(0, 1, (3, 3, 64, 128)).astype(np.float32),
        "bias": rng.normal(0, 3, (320,)).astype(np.float32),
        "scale": {"a": rng.normal(0, 1, (4, 8)).astype(np.float32), "b": np.float32(2.5)},
    }
    assert tree["big"].size > st.SMALL_LEAF > tree["bias"].size
    # Together only where no parameter is split over devices (FSDP's all-gathers otherwise).
    assert (st.small_leaf_limit(1), st.small_leaf_limit(4)) == (st.SMALL_LEAF, 0)
    norm = float(st.global_norm(tree))
    assert_close(norm, float(optax.tree.norm(tree)), "global norm")
    assert_close(norm, np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(tree))))
    for max_norm in (norm / 3, norm * 2):  # clipped, then left alone
        ours, _ = st.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        ref, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        for a, b in zip(
            jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True
        ):
            assert_close(a, b, f"clipped at {max_norm}")
    assert st.clip_by_global_norm(1.0).init(tree) == optax.clip_by_global_norm(1.0).init(tree)
    assert bool(st.all_finite(tree))

    # A large leaf reduced along its rows, to the axis major in memory: a dense kernel's first,
    # a convolution kernel's output channels (first in cuDNN's order).
    def axes(fn, primitive):
        eqns = jax.make_jaxpr(fn)(tree).jaxpr.eqns
        found = {
            e.invars[0].aval.shape: e.params["axes"] for e in eqns if e.primitive.name == primitive
        }
        return found[(300, 300)], found[(3, 3, 64, 128)]

    assert axes(st.global_norm, "reduce_sum") == ((1,), (0, 1, 2))
    assert axes(st.all_finite, "reduce_and") == ((1,), (0, 1, 2))
    # The parameters' large leaves behind a barrier, kept out of the update's kernel.
    fenced = [
        v.aval.shape
        for e in jax.make_jaxpr(st.all_finite)(tree).jaxpr.eqns
        if e.primitive.name == "optimization_barrier"
        for v in e.invars
    ]
    assert (300, 300) in fenced and (3, 3, 64, 128) in fenced and (320,) not in fenced

    def first_inf(x):
        return np.where(np.arange(x.size).reshape(x.shape) == 0, np.inf, x).astype(np.float32)

    assert_close(float(st.global_norm(tree, 0)), norm, "each leaf on its own")
    for what, broken in [
        ("a small leaf", {**tree, "bias": first_inf(tree["bias"])}),
        ("a large leaf", {**tree, "big": first_inf(tree["big"])}),
        ("a 4-D leaf", {**tree, "conv": first_inf(tree["conv"])}),
        ("a scalar", {**tree, "scale": {**tree["scale"], "b": np.float32(np.nan)}}),
    ]:
        for small in (st.SMALL_LEAF, 0):
            assert not bool(st.all_finite(broken, small)), what
            assert not np.isfinite(float(st.global_norm(broken, small))), what


@pytest.mark.parametrize("model", ["tiny", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_frozen_weights_in_the_compute_dtype_change_nothing(model):
    """With bfloat16 compute, `prepare` keeps the frozen text encoders' and VAE's kernels and
    embeddings in bfloat16 (`state.frozen_for_compute`): the modules cast them so on every use,
    so the conditioning and the VAE's latents are the float32 weights' bit for bit."""
    from jaxdiff.train.step import conditioning

    cfg = TrainConfig(model=model, resolution=16, batch_size=2, compute_dtype="bfloat16")
    run = prepare(cfg, shd.make_mesh(1, 1, devices=jax.devices()[:1]))
    host = {name: run.base.params[name] for name in run.frozen}  # the float32 weights
    assert set(run.frozen) >= {"vae", "text_encoder"}
    for name, params in run.frozen.items():
        for x, ref in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(host[name]), strict=True
        ):
            assert x.dtype == (jnp.bfloat16 if np.ndim(ref) >= 2 else np.float32), name
    assert TrainConfig().compute_dtype == "float32"  # a float32 run keeps them as they are
    assert frozen_for_compute(host, TrainConfig()) is host

    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int32)}
    if run.setup.sdxl:
        batch["input_ids_2"] = rng.integers(0, 1000, (2, 77)).astype(np.int32)
        batch["time_ids"] = np.tile(np.float32([[16, 16, 0, 0, 16, 16]]), (2, 1))
    cond = jax.jit(lambda p: conditioning(run.setup, p, batch))
    for a, b in zip(
        jax.tree_util.tree_leaves(cond(run.frozen)),
        jax.tree_util.tree_leaves(cond(host)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vae = run.setup.modules["vae"]
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    encode = jax.jit(lambda p: vae.apply({"params": p}, images, method="encode").mean)
    np.testing.assert_array_equal(
        np.asarray(encode(run.frozen["vae"])), np.asarray(encode(host["vae"]))
    )


def test_remat_changes_nothing(runs):
    _assert_same_run(runs("remat"), runs("data"), "remat")


def test_remat_cuts_what_the_backward_pass_keeps(batch):
    """The values jax keeps from the loss's forward pass for its backward (the residuals of
    `jax.vjp`): with remat, little more than the blocks' inputs. This is the saving that a
    compiler keeping jax's recomputation in the backward pass realizes, as XLA's GPU compiler
    does; its CPU compiler schedules the recomputation early and saves almost nothing
    (docs/benchmarks.md, session 12)."""
    import math

    from jaxdiff.train import step as train_step_module

    def kept_bytes(cfg):
        run = prepare(cfg, shd.make_mesh(1, 1, jax.devices()[:1]))
        draws = train_step_module._draws(run.setup, batch, jax.random.key(0))

        def backward(params):
            loss = functools.partial(
                train_step_module._unet_loss,
                frozen=run.frozen,
                micro={**batch, **draws},
                setup=run.setup,
            )
            return jax.vjp(lambda p: loss(p)[0], params)[1]

        kept = jax.eval_shape(backward, run.abstract["params"])
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(kept))

    plain, remat = kept_bytes(CFG), kept_bytes(dataclasses.replace(CFG, remat=True))
    assert remat < 0.5 * plain, (remat, plain)


def test_gradient_accumulation_equals_one_big_batch(runs):
    _assert_same_run(runs("accum"), runs("single"), "grad_accum=2")


def test_loss_is_finite_and_params_move(runs):
    r = runs("single")
    assert all(np.isfinite(m["loss"]) and m["params_finite"] == 1.0 for m in r["metrics"])
    moved = jax.tree_util.tree_map(
        lambda a, b: np.abs(a - b).max(), r["params"]["unet"], r["initial"]
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_step_is_traced_once(runs):
    assert runs("data")["traces"] == 1


def test_fsdp_runs_reduce_each_leaf_on_its_own(runs):
    """`prepare` sets the limit from its mesh: the sharded and single-device runs above, which
    train the same, reduce their small leaves each on its own and together."""
    assert runs("fsdp")["run"].setup.small_leaf == 0
    assert runs("single")["run"].setup.small_leaf == SMALL_LEAF


def test_runs_that_split_no_parameter_pack_the_ema_and_moments(runs):
    """Without FSDP the EMA and each Adam moment are a few arrays of every parameter's elements
    (a step passes 4 arrays a parameter otherwise); the sharded and single-device runs above,
    one packed and one not, train the same."""
    import optax

    from jaxdiff.train import state as st

    def shadows(name):
        state = runs(name)["state"]
        (adam,) = [
            x
            for x in jax.tree_util.tree_leaves(
                state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
            )
            if isinstance(x, optax.ScaleByAdamState)
        ]
        return state, [state.ema_params, adam.mu, adam.nu]

    params = jax.tree_util.tree_leaves(runs("single")["state"].params)
    groups = -(-len(params) // st.PACK_LEAVES)
    assert groups > 1  # MICRO_UNET's parameters fill more than one
    state, packed = shadows("single")
    assert runs("single")["run"].setup.packed and st.is_packed(state.checkpointed())
    for shadow in packed:
        assert isinstance(shadow, list) and len(shadow) == groups
        assert all(x.ndim == 1 for x in shadow)
        assert sum(x.size for x in shadow) == sum(x.size for x in params)
    # The rest are counters: the step, Adam's and the learning rate schedule's.
    leaves = jax.tree_util.tree_leaves(state.checkpointed())
    counters = [x for x in leaves if x.ndim == 0]
    assert len(leaves) == len(params) + 3 * groups + len(counters) and len(counters) == 3
    state, trees = shadows("fsdp")
    assert not runs("fsdp")["run"].setup.packed and not st.is_packed(state.checkpointed())
    structure = jax.tree_util.tree_structure(runs("fsdp")["state"].params)
    assert all(jax.tree_util.tree_structure(t) == structure for t in trees)
    # The EMA and Adam's moments in `pack`'s order: the same numbers either way.
    for tree, flat in zip(trees, packed, strict=True):
        for x, y in zip(st.pack(jax.device_get(tree)), flat, strict=True):
            assert_close(np.asarray(x), np.asarray(y), "packed state")


@pytest.mark.parametrize("packed", [False, True])
def test_the_optimizer_is_optax_adamw_with_global_norm_clipping(packed, monkeypatch):
    """`state.optimizer`, tree or packed (in groups of 2 here), updates as optax's
    `clip_by_global_norm` then `adamw` with weight decay on kernels only."""
    import optax

    from jaxdiff.train import state as st

    monkeypatch.setattr(st, "PACK_LEAVES", 2)
    cfg = dataclasses.replace(CFG, weight_decay=0.1, grad_clip=1.0)
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 4, 5)), "bias": rng.normal(size=(5,))},
        "dense": {"kernel": rng.normal(size=(5, 6)), "bias": rng.normal(size=(6,))},
        "norm": {"scale": rng.normal(size=(6,))},
    }
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    ours = st.optimizer(cfg, optax.constant_schedule(1e-2), packed=packed)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            1e-2,
            cfg.adam_b1,
            cfg.adam_b2,
            cfg.adam_eps,
            weight_decay=0.1,
            mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p),
        ),
    )
    got, want = params, params
    got_state, want_state = ours.init(params), reference.init(params)
    for i in range(3):  # the first step's gradient is clipped, the others are not
        scale = 10.0 if i == 0 else 0.01
        grads = jax.tree_util.tree_map(lambda x, s=scale, k=i: s * jnp.cos(x + k), params)
        update, got_state = jax.jit(ours.update)(grads, got_state, got)
        got = optax.apply_updates(got, update)
        update, want_state = reference.update(grads, want_state, want)
        want = optax.apply_updates(want, update)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        assert_close(x, y, f"optimizer, packed={packed}: {jax.tree_util.keystr(path)}")


def test_pack_and_unpack_are_each_others_inverse(monkeypatch):
    from jaxdiff.train import state as st

    monkeypatch.setattr(st, "PACK_LEAVES", 2)
    kernel = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # [kh, kw, in, out]
    tree = {"a": {"kernel": kernel}, "b": np.arange(5.0), "c": np.ones((2, 3))}
    packed = [np.asarray(x) for x in st.pack(tree)]
    assert [x.shape for x in packed] == [(125,), (6,)]  # "a" and "b", then "c"
    # A convolution kernel as [out, kh, kw, in], the order a GPU keeps it in.
    np.testing.assert_array_equal(packed[0][:120], kernel.transpose(3, 0, 1, 2).reshape(-1))
    assert packed[0][120:].tolist() == list(range(5))
    back = st.unpack(packed, tree)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.shares_memory(back["b"], packed[0])  # numpy in, views out
    with pytest.raises(ValueError, match="125"):
        st.unpack([np.zeros(126), np.zeros(6)], tree)
    with pytest.raises(ValueError, match="125"):
        st.unpack([np.zeros(125)], tree)

    # Device arrays (a state's EMA) are cut in one jitted program, compiled once for the shapes.
    on_device = jax.tree_util.tree_map(jnp.asarray, tree)
    state = st.TrainState(
        step=jnp.int32(0), params=on_device, ema_params=st.pack(on_device), opt_state=(), frozen={}
    )
    programs = st._cut_program._cache_size()
    for _ in range(2):
        ema = state.ema_tree()
        assert st._cut_program._cache_size() == programs + 1
        assert jax.tree_util.tree_structure(ema) == jax.tree_util.tree_structure(tree)
        leaves = zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(tree), strict=True)
        for x, y in leaves:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("source, target", [("single", "fsdp"), ("fsdp", "single")])
def test_a_checkpoint_resumes_on_a_mesh_of_the_other_layout(runs, source, target, tmp_path):
    """A run checkpointed without FSDP (EMA and moments packed) resumes with FSDP (trees), and
    the other way: the same numbers, in the resuming run's layout and places."""
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train import state as st
    from jaxdiff.train.loop import restored_state

    saved = runs(source)["state"]
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(3, saved.checkpointed(), data={"position": 24}, config={})
    run = runs(target)["run"]
    restored, position = restored_state(run, ckpt, 3)
    ckpt.close()
    assert position == 24 and st.is_packed(restored.checkpointed()) == run.setup.packed
    expected = st.repack(jax.device_get(saved.checkpointed()), run.setup.packed)
    got = restored.checkpointed()
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for x, y in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, where in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(run.shardings), strict=True
    ):
        assert x.sharding.is_equivalent_to(where, x.ndim)


def test_a_step_takes_the_frozen_weights_without_donating_them(runs, batch):
    """The step donates the state but for its frozen weights (`TrainStepFn`): the new state holds
    the same frozen arrays, and the program takes the text encoder's as arguments only, and not
    the VAE's, which a step on cached latents never reads."""
    import re

    r = runs("single")
    state = jax.tree_util.tree_map(jnp.copy, r["state"])  # the fixture's state stays whole
    data = shd.shard_batch(batch, r["run"].mesh)
    new, _ = r["step"](state, data, jax.random.key(1))
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.params))
    frozen = jax.tree_util.tree_leaves(state.frozen)
    assert frozen and not any(x.is_deleted() for x in frozen)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(new.frozen), frozen, strict=True))
    text = r["step"].lower(new, data, jax.random.key(1)).as_text()
    main = next(line for line in text.splitlines() if "func.func public @main(" in line)
    arguments = len(re.findall(r"%arg\d+:", main))
    leaves = jax.tree_util.tree_leaves
    text_encoder = len(leaves(new.frozen["text_encoder"]))
    assert len(leaves(new.frozen["vae"])) > 0
    assert arguments == len(leaves(new.checkpointed())) + text_encoder + len(leaves(data)) + 1


def test_born_sharded_init_matches_rules(runs):
    """Random init through jit(init, out_shardings) on the FSDP mesh: created on its shards."""
    r = runs("fsdp")
    expected = jax.tree_util.tree_leaves(r["run"].shardings["params"])
    assert all(c[0] == e for c, e in zip(r["created"], expected, strict=True))
    sharded = [c for c in r["created"] if not c[0].is_fully_replicated]
    assert sharded, "the FSDP mesh shards no parameter"
    assert all(shard * 4 == size for _, shard, size in sharded)


def test_bf16_compute_keeps_float32_master_weights(batch, runs):
    unet_params = runs("fsdp")["initial"]
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
    mesh = shd.make_mesh(8, 1)
    run = prepare(cfg, mesh)
    assert run.setup.modules["unet"].dtype == jnp.bfloat16
    state = jax.eval_shape(
        lambda: init_state(run.setup, mesh, jax.random.key(0), {"unet": unet_params}, run.frozen)
    )
    new_state, metrics = jax.eval_shape(
        functools.partial(train_step, setup=run.setup), state, batch, jax.random.key(0)
    )
    for leaf in jax.tree_util.tree_leaves((new_state.params, new_state.ema_params)):
        assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32


# ----------------------------------------------------------------------------- objectives


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig.sd15())


def test_targets(schedule):
    x0 = jnp.full((2, 2, 2, 1), 0.5)
    noise = jnp.full((2, 2, 2, 1), -1.0)
    t = jnp.asarray([10, 900])
    a = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
    s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    assert_close(losses.diffusion_target(schedule, "epsilon", x0, noise, t), noise, "eps")
    assert_close(losses.diffusion_target(schedule, "sample", x0, noise, t), x0, "x0")
    assert_close(
        losses.diffusion_target(schedule, "v_prediction", x0, noise, t), a * noise - s * x0, "v"
    )
    # With the eps target, x_t - sigma eps = alpha x0: the objective is the forward process's.
    x_t = add_noise(schedule, x0, noise, t)
    assert_close(x_t - s * noise, a * x0, "x_t")


def test_min_snr_weights(schedule):
    t = jnp.asarray([0, 100, 500, 999])
    snr = np.asarray(schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t]))
    gamma = 5.0
    clipped = np.minimum(snr, gamma)
    assert_close(losses.min_snr_weights(schedule, "epsilon", t, gamma), clipped / snr, "eps")
    assert_close(
        losses.min_snr_weights(schedule, "v_prediction", t, gamma), clipped / (snr + 1), "v"
    )
    assert_close(losses.min_snr_weights(schedule, "epsilon", t, 0.0), np.ones(4), "off")
    # Zero terminal SNR: the weight is 1 (not 0/0).
    zero = NoiseSchedule.from_config(
        dataclasses.replace(ScheduleConfig.sd15(), rescale_betas_zero_snr=True)
    )
    w = losses.min_snr_weights(zero, "epsilon", jnp.asarray([999]), gamma)
    assert np.isfinite(np.asarray(w)).all() and float(w[0]) == 1.0


def test_timestep_bias_as_diffusers(schedule):
    """diffusers' generate_timestep_weights: the biased portion `multiplier` times as likely;
    and the step's draws follow those weights."""
    from types import SimpleNamespace

    from jaxdiff.train.step import _draws

    w = losses.timestep_weights(1000, "later", 4.0, 0.25)
    assert_close(w[:750], np.full(750, 1 / 1750), "unbiased")
    assert_close(w[750:], np.full(250, 4 / 1750), "biased")
    assert_close(losses.timestep_weights(1000, "earlier", 3.0, 0.1)[:100], np.full(100, 3 / 1200))
    assert losses.timestep_weights(1000, "none", 4.0, 0.25) is None
    with pytest.raises(ConfigError, match="timestep_bias_multiplier"):
        TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=0.0)

    latents = {"latents": jnp.zeros((20000, 2, 2, 8))}
    for strategy, expected in (("later", 1.0 / 1.75), ("none", 0.25)):
        cfg = TrainConfig(timestep_bias_strategy=strategy, timestep_bias_multiplier=4.0)
        setup = SimpleNamespace(cfg=cfg, schedule=schedule, latent_shape=(2, 2, 4))
        t = np.asarray(_draws(setup, latents, jax.random.key(0))["t"])
        assert t.min() >= 0 and t.max() <= 999
        assert abs(np.mean(t >= 750) - expected) < 0.015, (strategy, np.mean(t >= 750))


def test_zero_terminal_snr_training():
    """rescale_betas_zero_snr=True: the run trains on diffusers' rescaled schedule (alpha_bar = 0
    at t = T), writes the flag into the scheduler config it exports, and refuses what diffusers
    would not sample that way (epsilon prediction; a scheduler class that drops the flag)."""
    from diffusers import DDIMScheduler

    from jaxdiff.models.presets import PRESETS
    from jaxdiff.train import state as st

    configs = PRESETS["tiny"].components()
    base = {"_class_name": "DDIMScheduler", **ScheduleConfig.sd15().to_diffusers()}
    base["prediction_type"] = "epsilon"
    cfg = dataclasses.replace(CFG, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    written = st.trained_scheduler_config(cfg, base)
    assert written["rescale_betas_zero_snr"] is True
    assert written["prediction_type"] == "v_prediction"
    assert "rescale_betas_zero_snr" not in base  # the base model's config is not modified
    setup = st.build_setup(cfg, configs, base)
    reference = DDIMScheduler.from_config(written).alphas_cumprod.numpy()
    assert float(setup.schedule.alphas_cumprod[-1]) == 0.0
    assert_close(setup.schedule.alphas_cumprod, reference, "zero-SNR alphas_cumprod")
    plain = st.build_setup(CFG, configs, base)
    assert float(plain.schedule.alphas_cumprod[-1]) > 1e-3

    with pytest.raises(ConfigError, match="epsilon"):
        dataclasses.replace(cfg, prediction_type="epsilon")
    with pytest.raises(ConfigError, match="v_prediction"):  # the scheduler's epsilon
        st.build_setup(dataclasses.replace(cfg, prediction_type=""), configs, base)
    with pytest.raises(ConfigError, match="PNDMScheduler"):
        st.build_setup(cfg, configs, {**base, "_class_name": "PNDMScheduler"})


@pytest.mark.slow  # about 45 s on 2 cores; CI runs it in its slow pass
def test_vae_decoder_only_fine_tune():
    """task="vae" with freeze_params: the encoder and quant_conv stay bit-identical (weights and
    EMA) while the decoder trains, and their gradients count in no norm; without it, the encoder
    moves too. A prefix that names no parameter is refused."""
    from flax import traverse_util

    from jaxdiff.train.loop import fresh_state

    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    frozen_prefixes = ("vae/encoder", "vae/quant_conv")

    def run(freeze):
        cfg = TrainConfig(
            task="vae", resolution=16, batch_size=4, learning_rate=1e-2, freeze_params=freeze
        )
        r = prepare(cfg, mesh)
        state = fresh_state(r)
        before = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
        step = jit_train_step(r.setup, r.state_shardings, mesh)
        norms = []
        for i in range(2):
            state, m = step(state, shd.shard_batch({"images": images}, mesh), jax.random.key(i))
            norms.append(float(m["grad_norm"]))
        after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
        ema = traverse_util.flatten_dict(jax.device_get(state.ema_tree()), sep="/")
        moved = {k for k in before if not np.array_equal(before[k], after[k])}
        ema_moved = {k for k in before if not np.array_equal(before[k], ema[k])}
        return set(before), moved, ema_moved, norms[0]

    names, moved, ema_moved, norm = run(frozen_prefixes)
    frozen = {k for k in names if k.startswith(frozen_prefixes)}
    assert frozen and any(k.startswith("vae/decoder/") for k in moved)
    assert not moved & frozen and not ema_moved & frozen
    assert any(k.startswith("vae/post_quant_conv/") for k in moved)
    _, moved_all, _, norm_all = run(())
    assert moved_all & frozen  # without freeze_params the same run moves the encoder
    # The same first step: its gradient norm counts the decoder's gradients only.
    assert 0 < norm < norm_all

    with pytest.raises(ConfigError, match="vae/encoders"):
        run(("vae/encoders",))
    with pytest.raises(ConfigError, match="freeze_params"):
        TrainConfig(freeze_params="vae/encoder")


def test_offset_noise_shifts_channels():
    noise = jnp.zeros((3, 4, 4, 2))
    out = losses.offset(noise, jax.random.key(0), 0.5)
    per_channel = np.asarray(out)
    assert np.allclose(per_channel, per_channel[:, :1, :1, :])  # constant over space
    assert np.abs(per_channel).max() > 0
    assert losses.offset(noise, jax.random.key(0), 0.0) is noise


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_unet_loss_and_gradients_as_diffusers(preset, tmp_path):
    """The UNet objective against diffusers' train_text_to_image(_sdxl).py in PyTorch, on the
    same weights and draws: latents sampled from cached moments and scaled, DDPM noising, the
    frozen text encoders (SDXL: both encoders' penultimate states, the second's pooled
    projection, the size ids), dropped captions encoded as the empty caption, MSE to the noise;
    the loss and every UNet gradient."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from jaxdiff.convert.diffusers import save_pipeline, state_dict_to_params
    from jaxdiff.tokenizer import bundled_tokenizer_dir
    from jaxdiff.train.loop import fresh_state
    from jaxdiff.train.step import _unet_loss

    cfg = TrainConfig(model=preset, resolution=32, batch_size=4, mesh_data=1)
    run = prepare(cfg, shd.make_mesh(1, 1, jax.devices()[:1]))
    state, setup = fresh_state(run), run.setup
    b, (h, w, c) = 4, setup.latent_shape
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 49406, (b, 77)).astype(np.int32)
    micro = {
        "latents": rng.normal(0.0, 1.0, (b, h, w, 2 * c)).astype(np.float32),
        "latent_eps": rng.normal(0.0, 1.0, (b, h, w, c)).astype(np.float32),
        "noise": rng.normal(0.0, 1.0, (b, h, w, c)).astype(np.float32),
        "t": np.array([3, 250, 640, 999], np.int32),
        "drop": np.array([False, True, False, False]),
        "input_ids": ids,
    }
    if setup.sdxl:
        micro["input_ids_2"] = np.roll(ids, 1, axis=0)
        micro["time_ids"] = np.array(
            [[64, 48, 0, 8, 32, 32], [32, 32, 0, 0, 32, 32], [40, 90, 4, 30, 32, 32]] * 2,
            np.float32,
        )[:b]
    loss, grads = jax.jit(
        jax.value_and_grad(lambda p: _unet_loss(p, state.frozen, micro, setup)[0])
    )(state.params)

    # The same weights in PyTorch, through a diffusers folder (the export path).
    params = {**run.base.params, **jax.device_get(state.params)}
    save_pipeline(dataclasses.replace(run.base, params=params), tmp_path / "model")
    configs = setup.configs
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet")
    tokenizer = CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    empty = tokenizer("", padding="max_length", max_length=77).input_ids

    def encode(name, ids, cls):
        model = cls.from_pretrained(tmp_path / "model" / name)
        ids = torch.from_numpy(np.where(micro["drop"][:, None], np.array(empty), ids))
        with torch.no_grad():
            return model(ids, output_hidden_states=True)

    added = None
    if setup.sdxl:
        one = encode("text_encoder", micro["input_ids"], CLIPTextModel)
        two = encode("text_encoder_2", micro["input_ids_2"], CLIPTextModelWithProjection)
        context = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        added = {"text_embeds": two.text_embeds, "time_ids": torch.from_numpy(micro["time_ids"])}
    else:
        context = encode("text_encoder", micro["input_ids"], CLIPTextModel).last_hidden_state
    mean, logvar = torch.from_numpy(micro["latents"]).permute(0, 3, 1, 2).chunk(2, dim=1)
    eps = torch.from_numpy(micro["latent_eps"]).permute(0, 3, 1, 2)
    latents = (mean + torch.exp(0.5 * logvar) * eps) * configs["vae"].scaling_factor
    scheduler = DDPMScheduler.from_config(
        {k: v for k, v in run.base.scheduler_config.items() if not k.startswith("_")}
    )
    noise = torch.from_numpy(micro["noise"]).permute(0, 3, 1, 2)
    t = torch.from_numpy(micro["t"]).long()
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, context, added_cond_kwargs=added).sample
    reference = torch.nn.functional.mse_loss(pred.float(), noise, reduction="mean")
    reference.backward()
    assert_close(loss, reference.item(), f"{preset} loss")
    torch_grads = {k: p.grad.numpy() for k, p in unet.named_parameters()}
    expected = state_dict_to_params(torch_grads, configs["unet"])
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(grads["unet"]))[0]
    reference_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert len(flat) == len(reference_flat)
    for path, g in flat:
        assert_close(g, reference_flat[path], f"{preset} gradient {jax.tree_util.keystr(path)}")
