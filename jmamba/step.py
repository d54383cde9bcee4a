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


def make_train_step(loss_fn: Callable, optimizer, schedule) -> Callable:
    """loss_fn(params, batch) -> (loss, metrics with 'expert_counts' [Y, E] and
    'dropped_tokens'); every other metric passes through."""

    def train_step(state: TrainState, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        counts = parts.pop("expert_counts")
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step), "expert_load_max_over_mean": expert_load(counts)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step
