"""The Pallas SSD kernel (interpret mode on CPU) against its twins ssd_reference and ssd_chunked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.kernels.ssd_pallas import ssd_pallas
from jmamba.ssd import kernel_fits, resolve_impl, ssd, ssd_chunked, ssd_reference
from tests.test_ssd import random_inputs

NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]


def kernel(chunk, block_t, **kw):
    return jax.jit(functools.partial(ssd_pallas, chunk_size=chunk, block_t=block_t, **kw))


def grads(fn, args, w_y, w_s):
    """Gradients of a loss that reads both outputs, so the final-state cotangent flows too."""
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y * w_y) + jnp.sum(s * w_s)
    return jax.jit(jax.grad(loss, argnums=range(8)))(*args)


# (batch, L, heads, head dim, groups, d_state, chunk, block_t): L not a multiple of the chunk,
# ngroups > 1, batch 1, several output blocks per chunk (block_t < chunk).
SHAPES = [(2, 64, 4, 8, 1, 6, 16, 8), (1, 50, 4, 8, 2, 6, 16, 16), (2, 37, 4, 8, 4, 6, 8, 8),
          (1, 96, 2, 16, 1, 16, 32, 8)]


def random_shape(seed):
    rng = np.random.default_rng(seed)
    G = int(rng.choice([1, 2]))
    chunk = int(rng.choice([8, 16]))
    return (int(rng.integers(1, 3)), int(rng.integers(5, 70)), G * int(rng.integers(1, 3)),
            int(rng.integers(2, 9)), G, int(rng.integers(2, 9)), chunk, 8)


@pytest.mark.parametrize("shape", SHAPES + [random_shape(s) for s in (0, 1)])
def test_outputs_equal_twins(shape):
    Bsz, L, H, P, G, N, chunk, bt = shape
    args = random_inputs(jax.random.key(L * H + N), Bsz, L, H, P, G, N)
    y, s = kernel(chunk, bt)(*args)
    y_ref, s_ref = ssd_reference(*args)
    y_chk, s_chk = ssd_chunked(*args, chunk_size=chunk)
    for got, want in [(y, y_ref), (s, s_ref), (y, y_chk), (s, s_chk)]:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_equal_twins(shape):
    Bsz, L, H, P, G, N, chunk, bt = shape
    args = random_inputs(jax.random.key(L + 1), Bsz, L, H, P, G, N)
    w_y = jax.random.normal(jax.random.key(8), (Bsz, L, H, P))
    w_s = jax.random.normal(jax.random.key(9), (Bsz, H, P, N))
    g = grads(kernel(chunk, bt), args, w_y, w_s)
    g_ref = grads(ssd_reference, args, w_y, w_s)
    g_chk = grads(functools.partial(ssd_chunked, chunk_size=chunk), args, w_y, w_s)
    for name, a, b, c in zip(NAMES, g, g_ref, g_chk):
        scale = float(jnp.max(jnp.abs(b)))  # relative to the gradient's own size
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(a / scale, c / scale, atol=1e-4, err_msg=name)


def test_final_state_cotangent_alone():
    args = random_inputs(jax.random.key(11), 1, 40, 2, 4, 1, 3)
    w_s = jax.random.normal(jax.random.key(12), (1, 2, 4, 3))
    zero_y = jnp.zeros((1, 40, 2, 4))
    g = grads(kernel(16, 8), args, zero_y, w_s)
    g_ref = grads(ssd_reference, args, zero_y, w_s)
    for name, a, b in zip(NAMES, g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_entry_point_and_no_initial_state():
    args = random_inputs(jax.random.key(13), 2, 24, 2, 4, 1, 3, with_state=False)
    y, s = ssd(*args, chunk_size=8, impl="kernel")
    y_chk, s_chk = ssd(*args, chunk_size=8, impl="chunked")
    np.testing.assert_allclose(y, y_chk, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, s_chk, rtol=1e-4, atol=1e-4)


def test_extreme_dt_and_A_stay_finite():
    x, dt, A, Bm, Cm, D, db, s0 = random_inputs(jax.random.key(7), 1, 64, 2, 4, 1, 3)
    dt = dt * 30.0  # softplus(dt) from ~0 to ~90
    A = jnp.array([-1e-4, -50.0])
    args = (x, dt, A, Bm, Cm, D, db, s0)
    y, s = kernel(32, 16)(*args)
    g = grads(kernel(32, 16), args, jnp.ones_like(x), jnp.ones_like(s0))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(s))
    assert all(np.all(np.isfinite(a)) for a in g)
    y_ref, s_ref = ssd_reference(*args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(s, s_ref, rtol=1e-3, atol=1e-3)


def test_bf16_inputs_close_to_fp32():
    args = random_inputs(jax.random.key(14), 1, 32, 2, 8, 1, 8)
    to_bf16 = [a.astype(jnp.bfloat16) for a in args[:5]] + list(args[5:])
    y, s = kernel(16, 16)(*to_bf16)
    y32, s32 = ssd_reference(*[a.astype(jnp.float32) for a in to_bf16])
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
    assert rel(y, y32) < 2e-2 and rel(s, s32) < 2e-2


def test_auto_picks_chunked_on_cpu_and_the_kernel_names_sizes_it_cannot_tile():
    assert resolve_impl("auto", 64, 128, 256) == "chunked"  # this suite runs on CPU
    assert resolve_impl("kernel", 64, 128, 256) == "kernel"
    assert kernel_fits(64, 128, 256) and not kernel_fits(64, 100, 256)
    assert not kernel_fits(8, 128, 256)
    args = random_inputs(jax.random.key(15), 1, 32, 2, 8, 1, 8)
    with pytest.raises(ValueError, match="powers of two.*ssm_impl=auto"):
        ssd_pallas(*args, chunk_size=16, interpret=False)  # GPU tiling, checked before lowering
