"""grouped_matmul's CPU path and custom VJP against jax.lax.ragged_dot and its autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.kernels import grouped_matmul as gm
from jmamba.kernels.grouped_matmul import grouped_matmul, kernel_usable
from jmamba.moe import swiglu_ragged

# Empty groups, and rows past sum(group sizes) (S = 24, sum = 21).
GROUP_SIZES = np.array([5, 0, 9, 7], np.int32)


def operands(S=24, D=16, F=32, E=4):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kx, (S, D)), jax.random.normal(kw, (E, D, F)),
            jax.random.normal(kc, (S, F)))


def test_cpu_path_equals_ragged_dot_and_never_picks_the_kernel():
    x, w, _ = operands()
    assert not kernel_usable(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    y = grouped_matmul(x, w, jnp.asarray(GROUP_SIZES))
    np.testing.assert_array_equal(y, jax.lax.ragged_dot(x, w, jnp.asarray(GROUP_SIZES)))
    np.testing.assert_array_equal(y[21:], 0.0)
    # Group 2 by hand: rows 5..13 use w[2].
    np.testing.assert_allclose(y[5:14], x[5:14] @ w[2], rtol=1e-5, atol=1e-5)


def test_custom_vjp_equals_autodiff_of_ragged_dot():
    x, w, ct = operands()
    gs = jnp.asarray(GROUP_SIZES)
    loss = lambda f: (lambda x, w: jnp.sum(f(x, w, gs) * ct))
    # The custom VJP's own rules on their XLA twins (grouped_matmul's xla path skips it).
    custom = lambda x, w, g: gm._gmm(x, w, g.astype(jnp.int32), (None, None, None))
    dx, dw = jax.grad(loss(custom), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dx[21:], 0.0)  # rows outside every group
    np.testing.assert_array_equal(dw[1], 0.0)  # the empty group


def test_swiglu_with_grouped_matmul_keeps_cpu_results():
    x, _, _ = operands()
    E, D, F = 4, 16, 8
    k = jax.random.split(jax.random.key(1), 3)
    ws = [jax.random.normal(k[0], (E, D, F)), jax.random.normal(k[1], (E, D, F)),
          jax.random.normal(k[2], (E, F, D))]
    gs = jnp.asarray(GROUP_SIZES)
    f = lambda mm: jax.value_and_grad(
        lambda x, ws: jnp.sum(swiglu_ragged(x, gs, *ws, jnp.float32, mm) ** 2),
        argnums=(0, 1))(x, ws)
    for a, b in zip(jax.tree.leaves(f(grouped_matmul)), jax.tree.leaves(f(jax.lax.ragged_dot))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_impl_refused_where_it_cannot_run():
    x, w, _ = operands()
    with pytest.raises(ValueError, match="kernel cannot take"):
        grouped_matmul(x, w, jnp.asarray(GROUP_SIZES), impl="kernel")


def test_kernel_path_wiring_with_stand_in_kernels(mosaic_standin):
    """The kernel path (padding, unwritten rows, custom VJP) on stand-in kernels
    (tests/conftest.py), against lax.ragged_dot."""
    x, w, ct = (a.astype(jnp.bfloat16) for a in operands())  # S = 24: padded to 32 rows
    gs, blocks = jnp.asarray(GROUP_SIZES), gm.Blocks(16, 16, 16, 2, 1)
    run = lambda impl: jax.value_and_grad(lambda x, w: jnp.sum(
        (gm.grouped_matmul(x, w, gs, impl, blocks) * ct).astype(jnp.float32)), (0, 1))(x, w)
    y_k, y_x = gm.grouped_matmul(x, w, gs, "kernel", blocks), gm.grouped_matmul(x, w, gs, "xla")
    np.testing.assert_array_equal(y_k, y_x)  # including the zero rows past sum(gs)
    for a, b in zip(jax.tree.leaves(run("kernel")), jax.tree.leaves(run("xla"))):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("xla_products", [("fwd",), ("dx",), ("dw",), ("fwd", "dx", "dw")])
def test_products_named_for_xla_skip_the_kernels(counted_kernels, xla_products):
    """xla_products sends those products to lax.ragged_dot and the rest to the kernels
    (stand-ins here, counted): same values and gradients as the all-kernel path."""
    calls = counted_kernels
    x, w, ct = (a.astype(jnp.bfloat16) for a in operands())
    gs, blocks = jnp.asarray(GROUP_SIZES), gm.Blocks(16, 16, 16, 2, 1)
    run = lambda **kw: jax.value_and_grad(lambda x, w: jnp.sum(
        (gm.grouped_matmul(x, w, gs, "kernel", blocks, **kw) * ct).astype(jnp.float32)),
        (0, 1))(x, w)
    mixed = run(xla_products=xla_products)
    assert sorted(calls) == sorted(set(gm.PRODUCTS) - set(xla_products))
    for a, b in zip(jax.tree.leaves(mixed), jax.tree.leaves(run())):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)
    if set(xla_products) == set(gm.PRODUCTS):  # all three: exactly the xla path's program
        trace = lambda impl, **kw: str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(
            gm.grouped_matmul(x, w, gs, impl, blocks, **kw).astype(jnp.float32)),
            (0, 1)))(x, w))
        assert trace("kernel", xla_products=xla_products) == trace("xla")
    from jmamba.config import EP_MATMULS, GMM_PRODUCTS  # config keeps copies (no jax import)
    assert GMM_PRODUCTS == gm.PRODUCTS and EP_MATMULS == gm.IMPLS
    with pytest.raises(ValueError, match="xla_products"):
        gm.grouped_matmul(x, w, gs, "kernel", blocks, xla_products=("dy",))


def test_real_kernels_in_the_mosaic_interpreter():
    """jax's Hopper kernels themselves (not stand-ins), run by Mosaic GPU's interpreter on
    the CPU with its race detector: forward, dX and dW against lax.ragged_dot, with an
    empty group, a group boundary inside a row tile and rows past sum(group sizes), as the
    ep receive buffer has them."""
    from jmamba.kernels.mosaic_interpret import interpreted_kernels
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (200, 128), jnp.bfloat16)  # padded to 256 rows
    w = (jax.random.normal(k[1], (4, 128, 128)) / 11.3).astype(jnp.bfloat16)
    ct = jax.random.normal(k[2], (200, 128), jnp.bfloat16)
    gs, blocks = jnp.asarray([37, 0, 90, 41], jnp.int32), gm.Blocks(64, 64, 64, 2, 1)

    def run(impl):
        y, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, gs, impl, blocks), x, w)
        return (y, *vjp(ct))
    reference = run("xla")
    with interpreted_kernels() as raced:
        kernel = run("kernel")
        assert not raced()
    for a, b in zip(kernel, reference):  # bf16 outputs: rounding of sums over 128-200 terms
        a, b = np.float32(a), np.float32(b)
        np.testing.assert_allclose(a, b, atol=2e-2 * np.max(np.abs(b)))
    assert not np.any(np.float32(kernel[0])[168:])  # rows past sum(gs) are zero
