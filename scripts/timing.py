"""Shared by the benchmark scripts: time a built train step, blocking on every step."""

import time

import jax
import numpy as np


def time_steps(run, batch, steps: int, warmup: int = 2):
    """Runs `warmup` steps (compile included), then `steps` timed ones.

    Returns (metrics of the last step, median step seconds, warm-up seconds)."""
    state = run.state
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = run.step_fn(state, batch)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = run.step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    run.state = state
    return metrics, float(np.median(times)), warmup_s
