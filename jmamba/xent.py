"""Cross-entropy over the vocabulary with a backward that makes one logits-sized array.

Glossary: B batch, L sequence, V vocabulary.

Why by hand: autodiff of log_softmax + take_along_axis builds the logits gradient from an
fp32 scatter-add of the target term into a zeros array plus the softmax term, each
[B, L, V] in fp32. At moe_1b (16 x 2048 tokens, V = 50288) those are 6.3 GB apiece and
sit at the step's memory peak on the GPU (scripts/memory_peak.py). Here the backward is
one elementwise pass, (softmax - one_hot(target)) * mask * g, written in the logits'
dtype; the forward keeps only the per-token logsumexp. `token_losses_plain` is the twin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses_plain(logits_BxLxV, targets_BxL, mask_BxL):
    """Masked sums (not means): nll_sum, correct_sum, by log_softmax and autodiff."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    correct_BxL = (jnp.argmax(logp, axis=-1) == targets_BxL).astype(jnp.float32)
    mask = mask_BxL.astype(jnp.float32)
    return jnp.sum(nll_BxL * mask), jnp.sum(correct_BxL * mask)


def _sums(logits_BxLxV, targets_BxL, mask_BxL):
    logits = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    correct_BxL = (jnp.argmax(logits, axis=-1) == targets_BxL).astype(jnp.float32)
    mask = mask_BxL.astype(jnp.float32)
    return (jnp.sum((lse_BxL - target_BxL) * mask), jnp.sum(correct_BxL * mask)), lse_BxL


@jax.custom_vjp
def token_losses(logits_BxLxV, targets_BxL, mask_BxL):
    """Masked sums (not means): nll_sum, correct_sum. Callers divide by global token counts.
    The gradient flows through nll_sum only (correct_sum is a count)."""
    return _sums(logits_BxLxV, targets_BxL, mask_BxL)[0]


def _fwd(logits_BxLxV, targets_BxL, mask_BxL):
    sums, lse_BxL = _sums(logits_BxLxV, targets_BxL, mask_BxL)
    return sums, (logits_BxLxV, targets_BxL, mask_BxL, lse_BxL)


def _bwd(res, cts):
    logits_BxLxV, targets_BxL, mask_BxL, lse_BxL = res
    g_nll = cts[0]
    p_BxLxV = jnp.exp(logits_BxLxV.astype(jnp.float32) - lse_BxL[..., None])
    hit_BxLxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, 2) == \
        targets_BxL[..., None]
    scale_BxL = mask_BxL.astype(jnp.float32) * g_nll
    d_BxLxV = (p_BxLxV - hit_BxLxV.astype(jnp.float32)) * scale_BxL[..., None]
    return d_BxLxV.astype(logits_BxLxV.dtype), None, None


token_losses.defvjp(_fwd, _bwd)
