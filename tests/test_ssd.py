"""The chunked SSD against the sequential reference: outputs, final state and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.ssd import ssd_chunked, ssd_reference


def random_inputs(key, Bsz, L, H, P, G, N, with_state=True):
    k = jax.random.split(key, 8)
    x = jax.random.normal(k[0], (Bsz, L, H, P))
    dt = jax.random.normal(k[1], (Bsz, L, H)) - 1.0
    A = -jnp.exp(jax.random.uniform(k[2], (H,), minval=-1.0, maxval=2.0))
    Bm = jax.random.normal(k[3], (Bsz, L, G, N))
    Cm = jax.random.normal(k[4], (Bsz, L, G, N))
    D = jax.random.normal(k[5], (H,))
    dt_bias = jax.random.normal(k[6], (H,))
    s0 = jax.random.normal(k[7], (Bsz, H, P, N)) if with_state else None
    return x, dt, A, Bm, Cm, D, dt_bias, s0


@pytest.mark.parametrize("L,chunk,G,Bsz", [(64, 16, 1, 2), (50, 16, 2, 1), (37, 8, 4, 2),
                                           (128, 64, 1, 1), (7, 32, 2, 3)])
def test_chunked_equals_reference(L, chunk, G, Bsz):
    args = random_inputs(jax.random.key(L + chunk), Bsz, L, 4, 8, G, 6)
    y_ref, s_ref = ssd_reference(*args)
    y, s = ssd_chunked(*args, chunk_size=chunk)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)


def test_chunked_gradients_equal_reference():
    args = random_inputs(jax.random.key(3), 2, 40, 4, 8, 2, 6)
    w = jax.random.normal(jax.random.key(9), (2, 40, 4, 8))

    def loss(fn, *a):
        y, s = fn(*a)
        return jnp.sum(y * w) + jnp.sum(s ** 2)

    g_ref = jax.grad(lambda *a: loss(ssd_reference, *a), argnums=range(8))(*args)
    g = jax.grad(lambda *a: loss(lambda *b: ssd_chunked(*b, chunk_size=16), *a),
                 argnums=range(8))(*args)
    for name, a, b in zip(["x", "dt", "A", "B", "C", "D", "dt_bias", "s0"], g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3, err_msg=name)


def test_no_initial_state_means_zero_state():
    args = random_inputs(jax.random.key(5), 1, 20, 2, 4, 1, 3, with_state=False)
    y0, _ = ssd_chunked(*args, chunk_size=8)
    y1, _ = ssd_chunked(*args[:-1], jnp.zeros((1, 2, 4, 3)), chunk_size=8)
    np.testing.assert_array_equal(y0, y1)


def test_causal():
    args = list(random_inputs(jax.random.key(6), 1, 48, 2, 4, 1, 3))
    y, _ = ssd_chunked(*args, chunk_size=16)
    t0 = 20
    for i in (0, 1, 3, 4):  # perturb x, dt, B, C after t0
        changed = list(args)
        changed[i] = changed[i].at[:, t0 + 1:].add(5.0)
        y2, _ = ssd_chunked(*changed, chunk_size=16)
        np.testing.assert_array_equal(y2[:, :t0 + 1], y[:, :t0 + 1])
        assert not np.allclose(y2[:, t0 + 1:], y[:, t0 + 1:])


def test_extreme_dt_and_A_stay_finite():
    x, dt, A, Bm, Cm, D, db, s0 = random_inputs(jax.random.key(7), 1, 64, 2, 4, 1, 3)
    dt = dt * 30.0  # softplus(dt) from ~0 to ~90
    A = jnp.array([-1e-4, -50.0])
    y, s = ssd_chunked(x, dt, A, Bm, Cm, D, db, s0, chunk_size=32)
    g = jax.grad(lambda a: jnp.sum(ssd_chunked(x, dt, a, Bm, Cm, D, db, s0,
                                               chunk_size=32)[0]))(A)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(s)) and np.all(np.isfinite(g))
    y_ref, _ = ssd_reference(x, dt, A, Bm, Cm, D, db, s0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-3, atol=1e-3)
