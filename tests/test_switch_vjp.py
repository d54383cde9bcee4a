"""switch_vjp.switch against its twin, jax.lax.switch: values and gradients, with closed-over
float and int arrays, int operands and int outputs; and its residuals are the inputs only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.parallel import switch_vjp


def problem():
    k = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(k[0], (8, 4)), jax.random.normal(k[1], (4, 4)),
            jax.random.normal(k[2], (4,)))


def branches_over(w, b, counts):
    """Three branches of different inner shapes (like the exchange rounds' buffers),
    closing over float weights and int counts; outputs (float, int)."""
    def make(rows):
        def branch(x, n):
            h = jnp.tanh(jnp.concatenate([x, x[:rows]]) @ w)  # a residual of `rows` shape
            y = h[:8] * b + jnp.sum(h[8:] ** 2) + counts[rows % 3]
            return y * jnp.float32(1 + rows), n + rows
        return branch
    return [make(r) for r in (1, 3, 6)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_switch_equals_lax_switch(index):
    x, w, b = problem()
    counts = jnp.arange(3, dtype=jnp.int32)

    def loss(sw, x, w, b):
        y, n = sw(jnp.int32(index), branches_over(w, b, counts), x, jnp.int32(7))
        return jnp.sum(jnp.sin(y)) + n.astype(jnp.float32), n

    def run(sw):
        return jax.jit(jax.value_and_grad(lambda *a: loss(sw, *a), (0, 1, 2),
                                          has_aux=True))(x, w, b)
    (ref, n_ref), g_ref = run(jax.lax.switch)
    with jax.checking_leaks():  # the backward keeps no tracer of the forward's trace
        (got, n), g = run(switch_vjp.switch)
    assert int(n) == int(n_ref)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_residuals_are_the_inputs():
    """lax.switch under linearize keeps the union of every branch's residuals (zeros for the
    branches not taken); switch_vjp.switch keeps none of the branches' inner shapes."""
    x, w, b = problem()
    counts = jnp.arange(3, dtype=jnp.int32)

    def residual_shapes(sw):
        f = lambda x, w: sw(jnp.int32(1), branches_over(w, b, counts), x, jnp.int32(7))[0]
        jaxpr = jax.make_jaxpr(lambda x, w: jax.linearize(f, x, w)[1](x, w))(x, w)
        return {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars
                if eqn.primitive.name == "cond"}
    inner = {(9, 4), (11, 4), (14, 4)}  # concat(x, x[:rows]) @ w for rows 1, 3, 6
    assert inner <= residual_shapes(jax.lax.switch)
    assert not inner & residual_shapes(switch_vjp.switch)
