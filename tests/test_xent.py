"""The cross-entropy's one-pass backward against log_softmax + autodiff (its twin)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.xent import linear_token_losses, token_losses, token_losses_plain


def value_and_grad(fn, logits, targets, mask):
    def loss(logits):
        nll, correct = fn(logits, targets, mask)
        return 0.37 * nll, correct
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 8e-3)])  # bf16: 1 ulp
def test_fused_cross_entropy_equals_its_twin(dtype, tol):
    k = jax.random.split(jax.random.key(0), 3)
    logits = (4 * jax.random.normal(k[0], (3, 32, 97))).astype(dtype)
    targets = jax.random.randint(k[1], (3, 32), 0, 97)
    mask = jax.random.uniform(k[2], (3, 32)) > 0.3
    (nll, correct), g = value_and_grad(token_losses, logits, targets, mask)
    (nll2, correct2), g2 = value_and_grad(token_losses_plain, logits, targets, mask)
    assert g.dtype == logits.dtype
    np.testing.assert_allclose(nll, nll2, rtol=1e-6)
    assert float(correct) == float(correct2) and float(correct) > 0
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g2, np.float32),
                               atol=tol, rtol=tol)
    # masked tokens get no gradient
    assert not np.any(np.asarray(g, np.float32)[~np.asarray(mask)])


def test_fused_backward_has_no_scatter():
    logits = jnp.zeros((2, 8, 16))
    targets, mask = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8))

    def n_scatters(fn):
        grad = jax.grad(lambda x: fn(x, targets, mask)[0])
        return str(jax.make_jaxpr(grad)(logits)).count("scatter")

    assert n_scatters(token_losses_plain) > 0 and n_scatters(token_losses) == 0


def head_value_and_grads(fn, x, w, targets, mask):
    def loss(x, w):
        nll, correct = fn(x, w, targets, mask)
        return 0.37 * nll, correct
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)


@pytest.mark.parametrize("dtype,chunks,tol", [(jnp.float32, 1, 1e-6), (jnp.float32, 5, 1e-6),
                                              (jnp.bfloat16, 4, 2e-2)])
def test_chunked_head_equals_its_twin(dtype, chunks, tol):
    """linear_token_losses (chunks of tokens, gradients made in the forward) against
    token_losses of the whole x @ w: sums and both gradients; 5 chunks pads 96 rows."""
    k = jax.random.split(jax.random.key(1), 4)
    N, D, V = 96, 24, 97
    x = jax.random.normal(k[0], (N, D)).astype(dtype)
    w = 0.5 * jax.random.normal(k[1], (D, V))  # fp32, as the parameters are
    targets = jax.random.randint(k[2], (N,), 0, V)
    mask = jax.random.uniform(k[3], (N,)) > 0.3
    twin = lambda x, w, t, m: token_losses(jnp.dot(x, w.astype(dtype))[None], t[None], m[None])
    chunked = lambda x, w, t, m: linear_token_losses(x, w, t, m, chunks)
    (nll, correct), (gx, gw) = head_value_and_grads(chunked, x, w, targets, mask)
    (nll2, correct2), (gx2, gw2) = head_value_and_grads(twin, x, w, targets, mask)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    np.testing.assert_allclose(nll, nll2, rtol=1e-6 if dtype == jnp.float32 else 1e-3)
    assert float(correct) == float(correct2) and float(correct) > 0
    for g, g2 in ((gx, gx2), (gw, gw2)):
        scale = float(jnp.max(jnp.abs(g2.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale,
                                   np.asarray(g2, np.float32) / scale, atol=tol)
    assert not np.any(np.asarray(gx, np.float32)[~np.asarray(mask)])
    # without differentiation: the same sums, no gradient work
    got = jax.jit(chunked)(x, w, targets, mask)
    np.testing.assert_allclose(got[0], nll / 0.37, rtol=1e-5)


def test_chunked_head_makes_no_whole_logits():
    """The gradient's program holds no [N, V]-sized array (one chunk's at most); the
    twin's does."""
    N, D, V, chunks = 64, 8, 50, 4
    x, w = jnp.ones((N, D)), jnp.ones((D, V))
    targets, mask = jnp.zeros((N,), jnp.int32), jnp.ones((N,))

    def biggest(fn):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: fn(x, w, targets, mask)[0],
                                        argnums=(0, 1)))(x, w)
        sizes = []

        def walk(jx):
            for eqn in jx.eqns:
                sizes.extend(v.aval.size for v in eqn.outvars if hasattr(v.aval, "size"))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr.jaxpr)
        return max(sizes)

    twin = lambda x, w, t, m: token_losses(jnp.dot(x, w)[None], t[None], m[None])
    chunked = lambda x, w, t, m: linear_token_losses(x, w, t, m, chunks)
    assert biggest(twin) >= N * V
    assert biggest(chunked) <= N * V // chunks


@pytest.mark.parametrize("tied", [True, False])
def test_one_device_loss_with_chunked_head_equals_the_plain_head(tied):
    """model.loss_fn with --loss_chunks 3 (the lm_head tied to the embedding, or its own):
    the plain head's loss, metrics and every gradient."""
    import dataclasses

    from jmamba import model
    from jmamba.config import ModelConfig
    from jmamba.data import recall_batch
    m = ModelConfig(d_model=16, n_layer=1, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    n_experts=4, d_expert=16, tie_embeddings=tied)
    params = model.init_params(m, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in recall_batch(0, 0, 4, 24, 40, 4).items()}
    got = {}
    for chunks in (1, 3):
        cfg = dataclasses.replace(m, loss_chunks=chunks)
        got[chunks] = jax.jit(jax.value_and_grad(
            lambda p: model.loss_fn(p, batch, cfg), has_aux=True))(params)
    (loss, metrics), grads = got[3]
    (loss_ref, metrics_ref), grads_ref = got[1]
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], metrics_ref["accuracy"], rtol=1e-6)
    assert ("lm_head" in grads) == (not tied)
    for (path, g_ref), g in zip(jax.tree_util.tree_flatten_with_path(grads_ref)[0],
                                jax.tree.leaves(grads)):
        scale = float(jnp.max(jnp.abs(g_ref))) + 1e-12
        np.testing.assert_allclose(g / scale, g_ref / scale, atol=1e-5,  # summation order
                                   err_msg=jax.tree_util.keystr(path))


def test_default_loss_chunks_split_by_token_count(monkeypatch):
    """model.loss_chunks = 0 (the default): the plain head up to LOSS_CHUNK_TOKENS tokens,
    above it chunks of about that many (here 3 for 9000 tokens), with the plain head's
    values; an explicit count is taken as given."""
    import dataclasses

    from jmamba import model
    from jmamba.config import ModelConfig
    m = ModelConfig(d_model=16, n_layer=1, vocab_size=40, headdim=8, d_state=8, chunk_size=8)
    assert m.loss_chunks == 0
    assert model.loss_chunk_count(m, model.LOSS_CHUNK_TOKENS) == 1
    assert model.loss_chunk_count(m, 2 * model.LOSS_CHUNK_TOKENS + 1) == 3
    assert model.loss_chunk_count(dataclasses.replace(m, loss_chunks=1), 10 ** 6) == 1
    assert model.loss_chunk_count(dataclasses.replace(m, loss_chunks=5), 100) == 5
    params = model.init_params(m, jax.random.key(0))
    k = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(k[0], (3, 3000, 16))
    residual = jax.random.normal(k[1], (3, 3000, 16))
    targets = jax.random.randint(k[2], (3, 3000), 0, 40)
    mask = jnp.ones((3, 3000), bool).at[:, -7:].set(False)
    seen, real = [], model.linear_token_losses
    monkeypatch.setattr(model, "linear_token_losses", lambda *a: seen.append(a[4]) or real(*a))
    got = model.head_losses(params, hidden, residual, targets, mask, m)
    assert seen == [3]
    want = model.head_losses(params, hidden, residual, targets, mask,
                             dataclasses.replace(m, loss_chunks=1))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
