"""The pure training step: (state, batch) -> (state, metrics), for any loss function."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params, optimizer) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def expert_load(counts_YxE):
    """Per-layer max/mean tokens per expert, averaged over layers (1.0 = perfectly even)."""
    counts = counts_YxE.astype(jnp.float32)
    ratio_Y = jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)
    return jnp.mean(ratio_Y)


def ep_rank_load(counts_YxE, ep: int):
    """Per-layer max/mean expert copies per ep rank (rank r holds experts r E/ep ...
    (r+1) E/ep - 1), averaged over layers: how much more expert work the busiest GPU of an
    expert-parallel group does than the average (1.0 = even)."""
    Y, E = counts_YxE.shape
    per_rank = counts_YxE.astype(jnp.float32).reshape(Y, ep, E // ep).sum(-1)
    return expert_load(per_rank)


def sq_norm(tree):
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def bias_step(counts_YxE, rate: float):
    """Aux-loss-free balancing's move of the router bias after a step (DeepSeek-V3):
    +rate for each layer's experts that got fewer token copies than the layer's mean, -rate
    for those that got more, 0 at the mean."""
    c_YxE = counts_YxE.astype(jnp.float32)
    return rate * jnp.sign(jnp.mean(c_YxE, axis=-1, keepdims=True) - c_YxE)


def with_router_bias(params, new_bias):
    mlp = {**params["layers"]["mlp"], "router_bias": new_bias}
    return {**params, "layers": {**params["layers"], "mlp": mlp}}


def make_train_step(loss_fn: Callable, optimizer, schedule, grad_clip: float,
                    fix_grads: Callable = lambda g: g, grad_sq_norm: Callable = sq_norm,
                    skip_nonfinite: bool = False, ep: int = 1, bias_rate: float = 0.0,
                    layer_rows: Callable = lambda x: x,
                    redo_loss_fn: Callable | None = None) -> Callable:
    """loss_fn(params, batch) -> (loss, metrics with 'expert_counts' [Y, E] and
    'dropped_tokens'); every other metric passes through.

    fix_grads and grad_sq_norm let a parallel layout make its gradients and their norm equal
    the single-device model's (e.g. a tied embedding held by two pipeline stages).
    Clipping is optax.clip_by_global_norm's rule on that norm. With skip_nonfinite, a step
    whose loss or gradient norm is NaN/Inf keeps the old parameters and optimizer state
    (the step counter still advances) and reports skipped = 1. With ep > 1 the metrics add
    ep_load_max_over_mean (ep_rank_load).

    bias_rate > 0: params['layers']['mlp']['router_bias'] is set to its old value plus
    bias_step of the step's global expert counts (the optimizer's update of it, weight decay
    included, is discarded; its gradient is zero). layer_rows maps a canonical [n_layer, ...]
    array to the params' layer layout (a pipeline's stage stacking; identity on one device).

    redo_loss_fn (--ep_overflow redo): where loss_fn reports dropped_tokens > 0, the loss,
    metrics and gradients are redo_loss_fn's instead (a loss that never drops), computed in
    a lax.cond, so only such steps pay for it; metrics add ep_redone (1.0 for those steps).
    """

    def value_and_grads(state: TrainState, batch):
        out = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        if redo_loss_fn is None:
            return out

        def keep(out):
            (loss, parts), grads = out
            return (loss, {**parts, "ep_redone": jnp.zeros((), jnp.float32)}), grads

        def redo(out):
            del out
            (loss, parts), grads = jax.value_and_grad(redo_loss_fn, has_aux=True)(
                state.params, batch)
            return (loss, {**parts, "ep_redone": jnp.ones((), jnp.float32)}), grads
        return jax.lax.cond(out[0][1]["dropped_tokens"] > 0, redo, keep, out)

    def train_step(state: TrainState, batch):
        (loss, parts), grads = value_and_grads(state, batch)
        grads = fix_grads(grads)
        g_norm = jnp.sqrt(grad_sq_norm(grads))
        scale = jnp.where(g_norm < grad_clip, 1.0, grad_clip / g_norm)
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        counts = parts.pop("expert_counts")
        if bias_rate:
            old = state.params["layers"]["mlp"]["router_bias"]
            params = with_router_bias(params, old + layer_rows(bias_step(counts, bias_rate)))
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(g_norm)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            parts["skipped"] = 1.0 - ok.astype(jnp.float32)
        metrics = {"loss": loss, **parts, "grad_norm": g_norm,
                   "lr": schedule(state.step), "expert_load_max_over_mean": expert_load(counts)}
        if ep > 1 and counts.shape[-1] % ep == 0:
            metrics["ep_load_max_over_mean"] = ep_rank_load(counts, ep)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step
