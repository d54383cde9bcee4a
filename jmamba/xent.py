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

import functools

import jax
import jax.numpy as jnp

from jmamba.kernels import vma


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


def _logits_grad(logits_BxLxV, targets_BxL, lse_BxL, scale_BxL):
    """d nll_sum / d logits times scale: (softmax - one_hot(target)) * scale, in the
    logits' dtype."""
    p_BxLxV = jnp.exp(logits_BxLxV.astype(jnp.float32) - lse_BxL[..., None])
    hit_BxLxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape,
                                         logits_BxLxV.ndim - 1) == targets_BxL[..., None]
    d_BxLxV = (p_BxLxV - hit_BxLxV.astype(jnp.float32)) * scale_BxL[..., None]
    return d_BxLxV.astype(logits_BxLxV.dtype)


def _bwd(res, cts):
    logits_BxLxV, targets_BxL, mask_BxL, lse_BxL = res
    scale_BxL = mask_BxL.astype(jnp.float32) * cts[0]
    return _logits_grad(logits_BxLxV, targets_BxL, lse_BxL, scale_BxL), None, None


token_losses.defvjp(_fwd, _bwd)


# The head and the loss over token chunks (`model.loss_chunks` > 1). Why by hand: the
# plain path makes the [B, L, V] logits and then their gradient (3.3 GB apiece in bf16 at
# moe_1b's 16 x 2048 tokens), and both sit at the step's memory peak. Here a scan over
# chunks of tokens makes one chunk's logits at a time and, while they are live, that
# chunk's share of the gradient for a unit cotangent (nll_sum is linear in what the
# cotangent scales): dX for the chunk's rows, and dW summed over chunks in fp32. The
# backward only scales those by the cotangent, so no logits are made twice (the idea of
# Liger-Kernel's fused linear cross-entropy; this is a plain-JAX version). Twin:
# token_losses(x @ w, ...), tests/test_xent.py.

def _chunked(x_NxD, targets_N, mask_N, chunks: int):
    """Rows padded (mask 0) to a multiple of chunks and split: [chunks, N / chunks, ...]."""
    N = x_NxD.shape[0]
    pad = -N % chunks
    if pad:
        x_NxD = jnp.pad(x_NxD, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        mask_N = jnp.pad(mask_N, (0, pad))
    n = (N + pad) // chunks
    return x_NxD.reshape(chunks, n, -1), targets_N.reshape(chunks, n), mask_N.reshape(chunks, n)


def _linear_sums(x_NxD, w_DxV, targets_N, mask_N, chunks: int, with_grads: bool):
    """Sums (and, with_grads, their gradients for a unit cotangent: dx in x's dtype, dw in
    fp32) of token_losses(x @ w), chunk by chunk."""
    x_CxNxD, t_CxN, m_CxN = _chunked(x_NxD, targets_N, mask_N, chunks)

    def body(carry, xs):
        nll, correct, dw_DxV = carry
        x_nxD, t_n, m_n = xs
        logits_nxV = jnp.dot(x_nxD, w_DxV)
        (nll_c, correct_c), lse_n = _sums(logits_nxV[None], t_n[None], m_n[None])
        dx_nxD = None
        if with_grads:  # at a unit cotangent
            d_nxV = _logits_grad(logits_nxV, t_n, lse_n[0], m_n.astype(jnp.float32))
            dx_nxD = jnp.dot(d_nxV, w_DxV.T)
            dw_DxV = dw_DxV + jnp.dot(x_nxD.T, d_nxV, preferred_element_type=jnp.float32)
        return (nll + nll_c, correct + correct_c, dw_DxV), dx_nxD

    # inside shard_map the carries vary wherever the inputs do
    axes = vma.varying_axes(x_NxD, w_DxV, targets_N, mask_N)
    zero = vma.to_varying(jnp.zeros((), jnp.float32), axes)
    dw0 = vma.to_varying(jnp.zeros(w_DxV.shape if with_grads else (), jnp.float32), axes)
    (nll, correct, dw_DxV), dx_CxNxD = jax.lax.scan(body, (zero, zero, dw0),
                                                    (x_CxNxD, t_CxN, m_CxN))
    if not with_grads:
        return (nll, correct), None
    dx_NxD = dx_CxNxD.reshape(-1, x_NxD.shape[1])[:x_NxD.shape[0]]
    return (nll, correct), (dx_NxD, dw_DxV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_token_losses(x_NxD, w_DxV, targets_N, mask_N, chunks: int):
    """token_losses(x @ w.astype(x.dtype), targets, mask) for x [N, D] in the compute dtype
    and w [D, V] (any float dtype), `chunks` chunks of rows at a time: (nll_sum,
    correct_sum)."""
    return _linear_sums(x_NxD, w_DxV.astype(x_NxD.dtype), targets_N, mask_N, chunks,
                        False)[0]


def _linear_fwd(x_NxD, w_DxV, targets_N, mask_N, chunks):
    dtype = x_NxD.dtype
    sums, (dx_NxD, dw_DxV) = _linear_sums(x_NxD, w_DxV.astype(dtype), targets_N, mask_N,
                                          chunks, True)
    # dW kept in the compute dtype, as the plain head's dot returns it (under the GPipe and
    # circular loops, whose autodiff stacks what the head keeps once per tick, that halves
    # the [ticks, D, V] it costs in bf16). Empty slices carry x's and w's dtypes and
    # mesh-axis types to the backward.
    return sums, ((dx_NxD, dw_DxV.astype(dtype)), x_NxD[:0, :0], w_DxV[:0, :0])


def _linear_bwd(chunks, res, cts):
    (dx_NxD, dw_DxV), x_like, w_like = res
    g = cts[0]
    # Each gradient typed like its primal: summed over the mesh axes where only the tokens
    # (and the cotangent) vary, as autodiff of the dot would.
    return (vma.cotangent_like((dx_NxD.astype(jnp.float32) * g).astype(x_like.dtype), x_like),
            vma.cotangent_like((dw_DxV.astype(jnp.float32) * g).astype(w_like.dtype), w_like),
            None, None)


linear_token_losses.defvjp(_linear_fwd, _linear_bwd)
