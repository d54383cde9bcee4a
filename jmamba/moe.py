"""Mixture of SwiGLU experts: router, top-k, dropless dispatch, and the balancing losses.

Glossary: B batch, L sequence, T tokens (B * L), D d_model, E experts, K top-k,
F expert hidden, S token copies sorted by expert (T * K).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jmamba.config import ModelConfig
from jmamba.kernels.grouped_matmul import grouped_matmul
from jmamba.kernels.vma import to_varying, varying_axes
from jmamba.layers import GatedMLP, uniform_init

# The name of values an experts_fn brought over the network (the expert-parallel exchange's
# receive buffers, plan and returned results). `--remat full` keeps them, so the backward
# recomputes the layer's math but never repeats its all-to-alls (see jmamba/model.py).
EXCHANGED = "moe_exchanged"


def route(logits_TxE, top_k: int, renormalize: bool, bias_E=None):
    """Softmax over experts in fp32, then top-k. Returns (weights_TxK, experts_TxK, probs_TxE).

    bias_E (aux-loss-free balancing): top-k picks by probs + bias, the weights stay the
    picked experts' unbiased probabilities, and no gradient reaches the bias."""
    probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
    if bias_E is None:
        weights_TxK, experts_TxK = jax.lax.top_k(probs_TxE, top_k)
    else:
        _, experts_TxK = jax.lax.top_k(probs_TxE + jax.lax.stop_gradient(bias_E), top_k)
        weights_TxK = jnp.take_along_axis(probs_TxE, experts_TxK, axis=-1)
    if renormalize:
        weights_TxK = weights_TxK / jnp.sum(weights_TxK, axis=-1, keepdims=True)
    return weights_TxK, experts_TxK, probs_TxE


def balance_losses(logits_BxLxE, experts_BxLxK):
    """Per-sequence load-balancing loss (Switch/GShard form, one sequence = one GShard group)
    and router z-loss. Returns (aux_B, z_B).

    aux = E * sum_e f_e * P_e, with f_e the share of the sequence's token copies sent to e
    and P_e the mean router probability of e. Being per sequence, the batch mean splits
    exactly over microbatches and data-parallel shards (pipelined loss == unpipelined).
    z = mean_t logsumexp(logits_t)^2 (ST-MoE).
    """
    E = logits_BxLxE.shape[-1]
    logits = logits_BxLxE.astype(jnp.float32)
    probs_BxLxE = jax.nn.softmax(logits, axis=-1)
    onehot_BxLxE = jnp.sum(jax.nn.one_hot(experts_BxLxK, E, dtype=jnp.float32), axis=2)
    f_BxE = jnp.mean(onehot_BxLxE, axis=1) / experts_BxLxK.shape[-1]
    P_BxE = jnp.mean(probs_BxLxE, axis=1)
    aux_B = E * jnp.sum(jax.lax.stop_gradient(f_BxE) * P_BxE, axis=-1)
    z_B = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2, axis=-1)
    return aux_B, z_B


def swiglu_ragged(x_SxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, dtype,
                  matmul=grouped_matmul):
    """Expert MLPs on token copies sorted by expert: rows [sum(g[:e]), sum(g[:e+1])) go to e.

    Rows past sum(group_sizes) come out as zeros. `matmul(x_SxD, w_ExDxF, group_sizes_E)`
    is the grouped matmul: by default jmamba.kernels.grouped_matmul, which is the Hopper
    kernel where it applies and `jax.lax.ragged_dot` (the reference) everywhere else.
    """
    c = lambda a: a.astype(dtype)
    x = c(x_SxD)
    h_gate = matmul(x, c(w_gate_ExDxF), group_sizes_E)
    h_up = matmul(x, c(w_up_ExDxF), group_sizes_E)
    return matmul(jax.nn.silu(h_gate) * h_up, c(w_down_ExFxD), group_sizes_E)


def sort_by_expert(experts_TxK, n_experts: int):
    """Orders the T*K token copies by expert. Returns (order_S, token_S, group_sizes_E)."""
    K = experts_TxK.shape[-1]
    flat_S = experts_TxK.reshape(-1)
    # (Inside shard_map jax 0.11.2 types argsort's result as the same on every device
    # whatever its input: it is typed like its input here, as its values are.)
    order_S = to_varying(jnp.argsort(flat_S, stable=True), varying_axes(flat_S))
    group_sizes_E = jnp.bincount(flat_S, length=n_experts).astype(jnp.int32)
    return order_S, order_S // K, group_sizes_E


# Row moves whose backward is a gather too. Autodiff transposes a gather into a scatter-add
# and .at[].set is a scatter; XLA runs both as scatter loops, slow on GPUs (a trace of the
# ep=2 step: ~120 ms a step per GPU in scatter fusions). With the inverse of the sort
# order (an int32 scatter of S entries, no D) each direction is a plain gather.

def inverse_permutation(order_S):
    return jnp.zeros_like(order_S).at[order_S].set(jnp.arange(order_S.shape[0],
                                                              dtype=order_S.dtype))


@jax.custom_vjp
def _gather_rows(a_NxD, idx_M, pos_NxK):
    """a[idx], where pos[n] lists the K rows of the result that came from row n (K = 1 for
    a permutation): the backward sums those rows, a gather too."""
    return a_NxD[idx_M]


def _gather_rows_fwd(a_NxD, idx_M, pos_NxK):
    return a_NxD[idx_M], pos_NxK


def _gather_rows_bwd(pos_NxK, ct_MxD):
    return jnp.sum(ct_MxD[pos_NxK], axis=1), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def permute_rows(a_NxD, idx_N, inverse_N=None):
    """a[idx] for a permutation idx of the rows, as gathers both ways (inverse_N: idx's
    inverse where the caller has it, else computed)."""
    if inverse_N is None:
        inverse_N = inverse_permutation(idx_N)
    return _gather_rows(a_NxD, idx_N, inverse_N[:, None])


def sorted_copies_plain(x_TxD, order_S, K: int):
    """sorted_copies' twin: a plain gather (autodiff makes its backward a scatter-add)."""
    return x_TxD[order_S // K]


def combine_plain(y_sorted_SxD, order_S, weights_TxK):
    """combine's twin: the unsort as a scatter."""
    T, K = weights_TxK.shape
    y_SxD = jnp.zeros_like(y_sorted_SxD).at[order_S].set(y_sorted_SxD)
    return jnp.einsum("tkd,tk->td", y_SxD.reshape(T, K, -1).astype(jnp.float32), weights_TxK)


def sorted_copies(x_TxD, order_S, K: int):
    """The token copies in expert order: x[order_S // K], as gathers both ways."""
    T = x_TxD.shape[0]
    return _gather_rows(x_TxD, order_S // K, inverse_permutation(order_S).reshape(T, K))


def combine(y_sorted_SxD, order_S, weights_TxK):
    """Puts expert outputs back in token order and sums them with the router weights."""
    T, K = weights_TxK.shape
    y_SxD = _gather_rows(y_sorted_SxD, inverse_permutation(order_S), order_S[:, None])
    y_TxKxD = y_SxD.reshape(T, K, -1).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", y_TxKxD, weights_TxK)


def moe_dropless(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down, dtype):
    """Single-device dropless MoE: sort copies by expert, grouped matmul, unsort, combine.

    Like every `experts_fn`, returns (y_TxD fp32, dropped token copies as an int32 scalar).
    """
    order_S, _, group_sizes_E = sort_by_expert(experts_TxK, w_gate.shape[0])
    x_sorted = sorted_copies(x_TxD, order_S, experts_TxK.shape[-1])
    y_sorted = swiglu_ragged(x_sorted, group_sizes_E, w_gate, w_up, w_down, dtype)
    return combine(y_sorted, order_S, weights_TxK), jnp.zeros((), jnp.int32)


def moe_dense_reference(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down, dtype):
    """Every expert on every token, then the router-weighted sum: slow and obviously right."""
    c = lambda a: a.astype(dtype)
    x = c(x_TxD)
    h_TxExF = jax.nn.silu(jnp.einsum("td,edf->tef", x, c(w_gate))) * jnp.einsum(
        "td,edf->tef", x, c(w_up))
    y_TxExD = jnp.einsum("tef,efd->ted", h_TxExF, c(w_down)).astype(jnp.float32)
    E = w_gate.shape[0]
    gate_TxE = jnp.sum(jax.nn.one_hot(experts_TxK, E) * weights_TxK[..., None], axis=1)
    return jnp.einsum("ted,te->td", y_TxExD, gate_TxE), jnp.zeros((), jnp.int32)


class MoE(nnx.Module):
    """Linear router + E SwiGLU experts stacked as [E, D, F] / [E, F, D]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_scale: float = 1.0):
        self.cfg = cfg
        E, D, F = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.router = nnx.Param(uniform_init(1 / math.sqrt(D))(rngs.params(), (D, E)))
        self.w_gate = nnx.Param(uniform_init(1 / math.sqrt(D))(rngs.params(), (E, D, F)))
        self.w_up = nnx.Param(uniform_init(1 / math.sqrt(D))(rngs.params(), (E, D, F)))
        self.w_down = nnx.Param(uniform_init(out_scale / math.sqrt(F))(rngs.params(),
                                                                         (E, F, D)))
        if cfg.router_bias_rate > 0:  # moved by the train step, never by gradients
            self.router_bias = nnx.Param(jnp.zeros((E,), jnp.float32))
        if cfg.n_shared_experts:  # N shared experts as one SwiGLU of hidden N * F
            self.shared = GatedMLP(cfg, rngs, out_scale, hidden=cfg.n_shared_experts * F)

    def __call__(self, x_BxLxD, experts_fn=moe_dropless):
        """Returns (y_BxLxD, aux_B, z_B, counts_E, dropped). `experts_fn` is the dispatch
        strategy: single-device dropless by default; expert parallelism passes its own, which
        sees this device's tokens and its slice of the [E, ...] expert weights."""
        cfg = self.cfg
        Bsz, L, D = x_BxLxD.shape
        dtype = jnp.dtype(cfg.dtype)
        # The router runs in fp32: top-k choices must not flip with the compute dtype.
        logits_BxLxE = jnp.dot(x_BxLxD.astype(jnp.float32), self.router[...])
        bias_E = self.router_bias[...] if cfg.router_bias_rate > 0 else None
        weights_TxK, experts_TxK, _ = route(logits_BxLxE.reshape(Bsz * L, -1), cfg.top_k,
                                            cfg.renormalize, bias_E)
        y_TxD, dropped = experts_fn(x_BxLxD.reshape(Bsz * L, D), weights_TxK, experts_TxK,
                           self.w_gate[...], self.w_up[...], self.w_down[...], dtype)
        if cfg.n_shared_experts:
            y_TxD = y_TxD + self.shared(x_BxLxD).reshape(Bsz * L, D).astype(jnp.float32)
        aux_B, z_B = balance_losses(logits_BxLxE, experts_TxK.reshape(Bsz, L, -1))
        counts_E = jnp.bincount(experts_TxK.reshape(-1), length=cfg.n_experts)
        return y_TxD.reshape(Bsz, L, D).astype(dtype), aux_B, z_B, counts_E, dropped
