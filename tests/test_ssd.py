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


# Packed documents (seq_idx): one row of three documents, of lengths that cross the chunk
# boundaries (chunk 8), against each document run alone.
DOCS = (5, 11, 8)


def _packed_vs_alone(fn, with_state):
    """(packed outputs, final state and gradients; the same assembled from each document run
    alone). The initial state goes to the first document only; the final state is the last
    document's; per-token gradients line up; per-head ones (A, D, dt_bias) add up."""
    L = sum(DOCS)
    args = random_inputs(jax.random.key(11), 1, L, 4, 8, 2, 6, with_state=with_state)
    w = jax.random.normal(jax.random.key(12), (1, L, 4, 8))
    seq_idx = jnp.asarray(np.repeat([7, 3, 9], DOCS)[None], jnp.int32)  # any values work
    bounds = np.cumsum((0,) + DOCS)

    def loss_packed(x, dt, A, Bm, Cm, D, dtb, s0):
        y, s = fn(x, dt, A, Bm, Cm, D, dtb, s0, seq_idx_BxL=seq_idx)
        return jnp.sum(y * w) + jnp.sum(s ** 2), (y, s)

    def loss_alone(x, dt, A, Bm, Cm, D, dtb, s0):
        total, ys, s = 0.0, [], None
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            cut = lambda t: t[:, a:b]
            y, s = fn(cut(x), cut(dt), A, cut(Bm), cut(Cm), D, dtb, s0 if i == 0 else None)
            total, ys = total + jnp.sum(y * w[:, a:b]), ys + [y]
        return total + jnp.sum(s ** 2), (jnp.concatenate(ys, axis=1), s)

    n = 8 if with_state else 7
    grad = lambda f: jax.jit(jax.grad(f, argnums=tuple(range(n)), has_aux=True))(*args)
    return grad(loss_packed), grad(loss_alone)


@pytest.mark.parametrize("twin,with_state", [("reference", True), ("chunked", True),
                                             ("chunked", False), ("kernel", True)])
def test_packed_documents_equal_each_document_alone(twin, with_state):
    """All three twins; the kernel in interpret mode, inside no shard_map (the kernels'
    shard_map typing is tested in test_kernels_in_shard_map.py, with seq_idx too)."""
    from jmamba.kernels.ssd_pallas import ssd_pallas
    fn = {"reference": ssd_reference,
          "chunked": lambda *a, **k: ssd_chunked(*a, chunk_size=8, **k),
          "kernel": lambda *a, **k: ssd_pallas(*a, chunk_size=8, interpret=True, **k)}[twin]
    (g_packed, (y_p, s_p)), (g_alone, (y_a, s_a)) = _packed_vs_alone(fn, with_state)
    np.testing.assert_allclose(y_p, y_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_p, s_a, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_packed, g_alone):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_packed_documents_leak_without_seq_idx():
    """The test above can fail: without seq_idx, the packed row differs from the documents
    run alone (state flows from one document into the next)."""
    args = random_inputs(jax.random.key(11), 1, sum(DOCS), 4, 8, 2, 6, with_state=False)
    y_packed, _ = ssd_chunked(*args, chunk_size=8)
    y_second, _ = ssd_chunked(*(a[:, 5:16] if a is not None and a.ndim > 1 else a
                                for a in args), chunk_size=8)
    assert not np.allclose(y_packed[:, 5:16], y_second, atol=1e-3)


def test_the_conv_does_not_see_across_documents():
    """The mixer's causal conv1d with seq_idx: each document's outputs equal the document's
    conv run alone."""
    from flax import nnx
    from jmamba.config import ModelConfig
    from jmamba.layers import Mamba2Mixer
    mixer = Mamba2Mixer(ModelConfig(d_model=16, headdim=8, d_state=8, chunk_size=8),
                        nnx.Rngs(0))
    L = sum(DOCS)
    x = jax.random.normal(jax.random.key(4), (2, L, mixer.conv1d_kernel.shape[1]))
    seq_idx = jnp.asarray(np.tile(np.repeat([0, 1, 2], DOCS), (2, 1)), jnp.int32)
    packed = mixer.causal_conv(x, seq_idx)
    bounds = np.cumsum((0,) + DOCS)
    alone = jnp.concatenate([mixer.causal_conv(x[:, a:b]) for a, b in
                             zip(bounds[:-1], bounds[1:])], axis=1)
    np.testing.assert_allclose(packed, alone, rtol=1e-6, atol=1e-6)
    assert not np.allclose(mixer.causal_conv(x), alone, atol=1e-3)


@pytest.mark.parametrize("impl", ["auto", "kernel"])
def test_dispatcher_passes_seq_idx(impl):
    from jmamba.ssd import ssd
    args = random_inputs(jax.random.key(11), 1, sum(DOCS), 4, 8, 2, 6, with_state=False)
    seq_idx = jnp.asarray(np.repeat([0, 1, 2], DOCS)[None], jnp.int32)
    want, _ = ssd_reference(*args, seq_idx_BxL=seq_idx)
    got, _ = ssd(*args, seq_idx, chunk_size=8, impl=impl)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
