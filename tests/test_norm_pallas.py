"""The norm kernels (kernels/norm_pallas.py, interpret mode on the CPU) against their twins:
the block's add + RMSNorm (layers.add_rms_norm_xla) and the mixer's gated norm
(layers.gated_rms_norm_xla): outputs and the gradients of every input and the scale.
Inside shard_map at the layouts users run: tests/test_kernels_in_shard_map.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.kernels import norm_pallas
from jmamba.layers import add_rms_norm, add_rms_norm_xla, gated_rms_norm_xla


def _value_and_grads(fn, h, r, w, dy, dres):
    def loss(h, r, w):
        y, res = fn(h, r, w)
        return (jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
                + jnp.sum(res.astype(jnp.float32) * dres))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(h, r, w)


@pytest.mark.parametrize("h_dtype,r_dtype,out_dtype,rows,width,tol", [
    (jnp.float32, jnp.float32, jnp.float32, 128, 128, 1e-6),  # a program loops 8 steps
    (jnp.float32, jnp.float32, jnp.float32, 1024, 32, 1e-6),  # 4 programs of 16 steps
    (jnp.bfloat16, jnp.float32, jnp.bfloat16, 128, 64, 1e-2),  # residual_in_fp32
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, 128, 64, 1e-2),  # residual_in_fp32 off
])
def test_add_norm_kernel_equals_twin(h_dtype, r_dtype, out_dtype, rows, width, tol):
    k = jax.random.split(jax.random.key(0), 5)
    shape = (4, rows // 4, width)
    h = jax.random.normal(k[0], shape).astype(h_dtype)
    r = (3.0 * jax.random.normal(k[1], shape)).astype(r_dtype)
    w = 1.0 + 0.1 * jax.random.normal(k[2], (width,))
    dy = jax.random.normal(k[3], shape).astype(out_dtype)
    dres = jax.random.normal(k[4], shape).astype(r_dtype)
    kern = _value_and_grads(lambda h, r, w: norm_pallas.add_rms_norm(h, r, w, 1e-5, out_dtype),
                            h, r, w, dy, dres)
    twin = _value_and_grads(lambda h, r, w: add_rms_norm_xla(h, r, w, 1e-5, out_dtype),
                            h, r, w, dy, dres)
    np.testing.assert_allclose(kern[0], twin[0], rtol=max(tol, 1e-6))
    for g_kern, g_twin, like in zip(kern[1], twin[1], (h, r, w)):
        assert g_kern.dtype == g_twin.dtype == like.dtype
        a, b = (np.asarray(g.astype(jnp.float32)) for g in (g_kern, g_twin))
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b))
    y_kern, res_kern = norm_pallas.add_rms_norm(h, r, w, 1e-5, out_dtype)
    y_twin, res_twin = add_rms_norm_xla(h, r, w, 1e-5, out_dtype)
    np.testing.assert_array_equal(res_kern, res_twin)  # the add is the same single rounding
    assert y_kern.dtype == y_twin.dtype == out_dtype


def test_rows_the_kernel_cannot_take_fall_back_to_xla():
    assert norm_pallas.fits(48, 64) and norm_pallas.fits(7, 1024)  # one row a block
    assert not norm_pallas.fits(48, 96)  # width not a power of two
    assert not norm_pallas.fits(48, 8192)  # wider than a step may hold
    h = jnp.ones((2, 5, 96))
    y, res = add_rms_norm(h, h, jnp.ones((96,)), 1e-5, jnp.float32, impl="pallas")
    np.testing.assert_allclose(y, 1.0, rtol=1e-5)
    np.testing.assert_array_equal(res, 2.0)


@pytest.mark.parametrize("dtype,groups,tol", [(jnp.float32, 1, 1e-5), (jnp.bfloat16, 2, 1e-2)])
def test_gated_norm_kernel_equals_twin(dtype, groups, tol):
    k = jax.random.split(jax.random.key(1), 4)
    shape, width = (2, 16, 128), 128  # 32 rows: a backward program loops over 2 steps
    y = jax.random.normal(k[0], shape).astype(dtype)
    z = (2.0 * jax.random.normal(k[1], shape)).astype(dtype)
    w = 1.0 + 0.1 * jax.random.normal(k[2], (width,))
    do = jax.random.normal(k[3], shape).astype(dtype)

    def value_and_grads(fn):
        def loss(y, z, w):
            return jnp.sum(fn(y, z, w).astype(jnp.float32) * do.astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(y, z, w)
    kern = value_and_grads(lambda y, z, w: norm_pallas.gated_rms_norm(y, z, w, 1e-5, dtype,
                                                                      groups))
    twin = value_and_grads(lambda y, z, w: gated_rms_norm_xla(y, z, w, 1e-5, dtype, groups))
    np.testing.assert_allclose(kern[0], twin[0], rtol=max(tol, 1e-6))
    for g_kern, g_twin, like in zip(kern[1], twin[1], (y, z, w)):
        assert g_kern.dtype == g_twin.dtype == like.dtype
        a, b = (np.asarray(g.astype(jnp.float32)) for g in (g_kern, g_twin))
        assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b))
