"""AdamW with linear warmup and cosine decay and mamba_ssm's no-weight-decay set (A_log, D,
dt_bias, norm scales, biases). Global-norm clipping lives in the train step (step.py), where
a parallel layout can supply the norm of its canonical parameters."""

from __future__ import annotations

import jax
import optax

from jmamba.config import TrainConfig

NO_DECAY = ("A_log", "D", "dt_bias", "scale", "bias", "conv1d_bias")


def decay_mask(params):
    """True for leaves that take weight decay: matrices, embeddings and conv kernels."""
    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in NO_DECAY
    return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(t: TrainConfig):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def make_optimizer(t: TrainConfig):
    return optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                       weight_decay=t.weight_decay, mask=decay_mask)
