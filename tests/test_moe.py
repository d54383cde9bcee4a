"""Router, top-k, balancing losses and the dropless MoE against per-token and dense twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.moe import (balance_losses, moe_dense_reference, moe_dropless, route)


def experts(key, E, D, F):
    k = jax.random.split(key, 3)
    return (jax.random.normal(k[0], (E, D, F)) / np.sqrt(D),
            jax.random.normal(k[1], (E, D, F)) / np.sqrt(D),
            jax.random.normal(k[2], (E, F, D)) / np.sqrt(F))


def test_route_picks_top_k_and_renormalizes():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    w, e, probs = route(logits, 2, renormalize=True)
    np.testing.assert_array_equal(e, [[1, 3], [0, 3]])
    np.testing.assert_allclose(jnp.sum(w, -1), [1.0, 1.0], rtol=1e-6)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(w[0], p[0, [1, 3]] / p[0, [1, 3]].sum(), rtol=1e-6)
    w_raw, _, _ = route(logits, 2, renormalize=False)
    np.testing.assert_allclose(w_raw, [p[0, [1, 3]], p[1, [0, 3]]], rtol=1e-6)


def test_balance_losses_hand_computed():
    # One sequence of 2 tokens, 2 experts, top-1.
    logits = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]])  # probs (.5,.5), (.75,.25)
    chosen = jnp.array([[[0], [0]]])  # both tokens to expert 0: f = (1, 0)
    aux, z = balance_losses(logits, chosen)
    # aux = E * sum_e f_e P_e = 2 * (1 * 0.625 + 0 * 0.375) = 1.25
    np.testing.assert_allclose(aux, [1.25], rtol=1e-6)
    # z = mean of logsumexp^2 = (log 2)^2 and (log 4)^2
    np.testing.assert_allclose(z, [(np.log(2) ** 2 + np.log(4) ** 2) / 2], rtol=1e-6)


def test_balanced_routing_gives_aux_one():
    E, L = 4, 8
    logits = jnp.zeros((1, L, E))
    chosen = jnp.arange(L).reshape(1, L, 1) % E
    aux, _ = balance_losses(logits, chosen)
    np.testing.assert_allclose(aux, [1.0], rtol=1e-6)


def per_token_loop(x, w, e, wg, wu, wd):
    """The plainest MoE: for each token, for each chosen expert, run that expert."""
    x, w, e = np.asarray(x), np.asarray(w), np.asarray(e)
    wg, wu, wd = map(np.asarray, (wg, wu, wd))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(e.shape[1]):
            ex = e[t, k]
            g, u = x[t] @ wg[ex], x[t] @ wu[ex]
            out[t] += w[t, k] * ((g / (1 + np.exp(-g)) * u) @ wd[ex])
    return out


@pytest.mark.parametrize("E,K,skew", [(4, 2, False), (8, 2, True), (4, 1, True), (3, 3, False)])
def test_dropless_equals_per_token_loop_and_dense(E, K, skew):
    T, D, F = 24, 8, 16
    wg, wu, wd = experts(jax.random.key(E * 10 + K), E, D, F)
    x = jax.random.normal(jax.random.key(1), (T, D))
    logits = jax.random.normal(jax.random.key(2), (T, E))
    if skew:  # most tokens prefer expert 0, some experts get nothing
        logits = logits.at[:, 0].add(4.0)
    w, e, _ = route(logits, K, renormalize=True)
    y, dropped = moe_dropless(x, w, e, wg, wu, wd, jnp.float32)
    y_dense, _ = moe_dense_reference(x, w, e, wg, wu, wd, jnp.float32)
    assert int(dropped) == 0
    y_loop = per_token_loop(x, w, e, wg, wu, wd)
    np.testing.assert_allclose(y, y_loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_dense, y_loop, rtol=1e-5, atol=1e-5)


def test_dropless_gradients_equal_dense():
    E, K, T, D, F = 4, 2, 16, 8, 12
    params = experts(jax.random.key(0), E, D, F)
    x = jax.random.normal(jax.random.key(1), (T, D))
    w, e, _ = route(jax.random.normal(jax.random.key(2), (T, E)), K, True)
    f = lambda fn: jax.grad(lambda x, w, p: jnp.sum(fn(x, w, e, *p, jnp.float32)[0] ** 2),
                            argnums=(0, 1, 2))(x, w, params)
    for a, b in zip(jax.tree.leaves(f(moe_dropless)), jax.tree.leaves(f(moe_dense_reference))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_ep_rank_load_hand_computed():
    from jmamba.step import ep_rank_load, expert_load
    counts_YxE = jnp.asarray([[4, 0, 0, 0], [1, 1, 1, 1]])
    # per expert: layer 0 max 4 / mean 1, layer 1 even -> (4 + 1) / 2
    assert float(expert_load(counts_YxE)) == pytest.approx(2.5)
    # ep=2 ranks hold experts {0, 1} and {2, 3}: layer 0 4 vs 0 (max/mean 2), layer 1 even
    assert float(ep_rank_load(counts_YxE, 2)) == pytest.approx(1.5)


def test_gather_row_moves_equal_plain_twins():
    """sorted_copies / combine (gathers both ways) against the plain gather and scatter:
    same values, same gradients."""
    from jmamba.moe import (combine, combine_plain, sort_by_expert, sorted_copies,
                            sorted_copies_plain)
    T, K, E, D = 12, 3, 5, 4
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    experts_TxK = jax.random.randint(k1, (T, K), 0, E)
    weights_TxK = jax.random.uniform(k2, (T, K))
    x_TxD = jax.random.normal(k3, (T, D))
    order_S, _, _ = sort_by_expert(experts_TxK, E)

    def f(x, w, copies, comb):
        y = copies(x, order_S, K)
        return jnp.sum(comb(jnp.sin(y) * jnp.arange(T * K)[:, None], order_S, w) ** 2)

    fast = jax.value_and_grad(f, argnums=(0, 1))(x_TxD, weights_TxK, sorted_copies, combine)
    plain = jax.value_and_grad(f, argnums=(0, 1))(x_TxD, weights_TxK, sorted_copies_plain,
                                                  combine_plain)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
