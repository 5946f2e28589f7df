"""The GPU attention path's fallbacks, on the CPU: `jaxdiff.models.layers` is told the backend is a
GPU, and cuDNN's fused kernel is replaced by stand-ins that compile, or are refused when XLA
compiles them (an FFI call to a kernel that no backend registers: "No FFI handler registered"),
the way cuDNN refuses some graphs on some GPUs ("No valid engine configs for ...").

The stand-in kernel attends to 2 * v, so its output is told apart from XLA's attention."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from stand_ins import missing_kernel
from tolerances import assert_close

from jaxdiff.models import layers

BATCH, TOKENS, CONTEXT, HEADS, DIM = 2, 16, 8, 2, 8


def _unfused(q, k, v, is_causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


def _stand_in(q, k, v, is_causal, kv_lengths=None):
    return jax.nn.dot_product_attention(
        q, k, 2 * v, is_causal=is_causal, key_value_seq_lengths=kv_lengths
    )


def _refused_at_compile(q, k, v, is_causal):
    return missing_kernel(q + k.sum() + v.sum(), q)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _backward_refused(q, k, v, is_causal):
    return _stand_in(q, k, v, is_causal)


def _backward_refused_fwd(q, k, v, is_causal):
    return _stand_in(q, k, v, is_causal), (q, k, v)


def _backward_refused_bwd(is_causal, residuals, cotangent):
    return missing_kernel(cotangent, *residuals)


_backward_refused.defvjp(_backward_refused_fwd, _backward_refused_bwd)


def _refused_while_tracing(q, k, v, is_causal):
    raise NotImplementedError("head dim not supported")  # as jax's own checks do


@pytest.fixture
def gpu(monkeypatch):
    """layers believes it runs on a GPU, with `fused` as cuDNN's kernel; probes start afresh."""
    monkeypatch.setattr(layers, "_backend", lambda: "gpu")
    layers.clear_cudnn_probes()
    yield lambda fused: monkeypatch.setattr(layers, "_fused", fused)
    layers.clear_cudnn_probes()


def _inputs(batch=BATCH):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, TOKENS, HEADS * DIM), np.float32)
    k, v = (rng.standard_normal((batch, CONTEXT, HEADS * DIM), np.float32) for _ in range(2))
    cotangent = rng.standard_normal(q.shape, np.float32)
    return [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, cotangent)]


def _run(attend, q, k, v, cotangent):
    """Output and gradients of `attend` ([B, T, heads*dim] in and out) inside one jit."""

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def _ours(q, k, v):
    return layers.attention(q, k, v, num_heads=HEADS)


def _run_ours_without_warnings(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _run(_ours, *args)


def _split(kernel):
    """`kernel` ([B, T, N, H]) on [B, T, N*H] inputs, as `layers.attention` calls it."""

    def attend(q, k, v):
        b, t, _ = q.shape
        s = k.shape[1]
        out = kernel(
            q.reshape(b, t, HEADS, DIM),
            k.reshape(b, s, HEADS, DIM),
            v.reshape(b, s, HEADS, DIM),
            False,
        )
        return out.reshape(b, t, HEADS * DIM)

    return attend


def _assert_same(got, want, names=("out", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, name)


def _probes():
    return layers._cudnn_error.cache_info().currsize


def test_the_fused_kernel_runs_where_it_compiles(gpu):
    gpu(_stand_in)
    args = _inputs()
    # Sampling probes the forward alone; a gradient probes the backward too.
    out = jax.jit(_ours)(*args[:3])
    assert _probes() == 1
    got = _run_ours_without_warnings(*args)
    assert _probes() == 2
    _assert_same(got, _run(_split(_stand_in), *args))
    assert_close(out.astype(np.float32), got[0], "out")
    # The stand-in is what ran: XLA's attention of the same inputs differs.
    assert not np.allclose(got[0], _run(_split(_unfused), *args)[0], atol=0.1)


def test_a_backward_refused_at_compile_falls_back_to_xla_for_the_gradients_only(gpu):
    gpu(_backward_refused)
    args = _inputs()
    with pytest.warns(RuntimeWarning, match="backward does not .*No FFI handler"):
        got = _run(_ours, *args)
    fused = _run(_split(_stand_in), *args)
    unfused = _run(_split(_unfused), *args)
    assert_close(got[0], fused[0], "out")  # the fused forward
    _assert_same(got[1:], unfused[1:], ("dq", "dk", "dv"))  # XLA's backward


def test_a_forward_refused_at_compile_falls_back_to_xla_once_per_shape(gpu):
    gpu(_refused_at_compile)
    args = _inputs()
    with pytest.warns(RuntimeWarning, match="does not compile at 16x8 tokens.*No FFI handler"):
        got = _run(_ours, *args)
    _assert_same(got, _run(_split(_unfused), *args))
    # Another batch size at the same sequence lengths reuses the probe: no second warning.
    again = _run_ours_without_warnings(*_inputs(batch=3))
    _assert_same(again, _run(_split(_unfused), *_inputs(batch=3)))
    assert _probes() == 1  # the forward's; nothing probes a backward it will not use


def test_shapes_jax_refuses_while_tracing_fall_back_silently(gpu):
    """jax's documented limits (the SD VAE's head of 512) are no news: no warning."""
    gpu(_refused_while_tracing)
    args = _inputs()
    got = _run_ours_without_warnings(*args)
    _assert_same(got, _run(_split(_unfused), *args))


def test_float32_and_masked_attention_on_gpu_never_probe_the_fused_kernel(gpu):
    gpu(_refused_while_tracing)
    q, k, v, cotangent = (x.astype(jnp.float32) for x in _inputs())
    got = _run(_ours, q, k, v, cotangent)
    _assert_same(got, _run(_split(_unfused), q, k, v, cotangent))
    mask = jnp.ones((BATCH, 1, 1, CONTEXT), bool).at[1, ..., -3:].set(False)
    layers.attention(*_inputs()[:3], num_heads=HEADS, mask=mask)
    assert _probes() == 0


def test_an_odd_number_of_keys_takes_the_padded_kernel_for_gradients(gpu, monkeypatch):
    """jax 0.10 refuses cuDNN's backward at an odd number of keys (the UNet's 77-token
    cross-attention) while tracing: the gradient then goes through the kernel with one more key,
    masked by length (`_fused_padded`), and equals the unpadded attention's."""
    gpu(_stand_in)
    asked = []

    @functools.cache  # as the probe it stands in for
    def error(part, t, s, *rest):
        asked.append((part, s))
        return "" if part == "backward" and s % 2 else None

    monkeypatch.setattr(layers, "_cudnn_error", error)
    rng = np.random.default_rng(1)
    q, cotangent = (
        jnp.asarray(rng.standard_normal((BATCH, TOKENS, HEADS * DIM)), jnp.bfloat16)
        for _ in range(2)
    )
    k, v = (
        jnp.asarray(rng.standard_normal((BATCH, 7, HEADS * DIM)), jnp.bfloat16) for _ in range(2)
    )
    got = _run_ours_without_warnings(q, k, v, cotangent)
    assert asked == [("forward", 7), ("backward", 7), ("padded backward", 7)]
    _assert_same(got, _run(_split(_stand_in), q, k, v, cotangent))
    # The padded kernel is what ran: without the length, the zero key would take weight.
    unmasked = _run(
        _split(
            lambda q, k, v, c: _stand_in(
                q, *(jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (k, v)), c
            )
        ),
        q,
        k,
        v,
        cotangent,
    )
    assert not np.allclose(got[0], unmasked[0], atol=0.05)
