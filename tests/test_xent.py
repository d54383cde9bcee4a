"""The cross-entropy's one-pass backward against log_softmax + autodiff (its twin)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.xent import token_losses, token_losses_plain


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
