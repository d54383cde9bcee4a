"""The training loop around the pure step: data, jit with donation, logging to JSONL."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from jmamba import model
from jmamba.config import Config
from jmamba.data import RecallData
from jmamba.optim import lr_schedule, make_optimizer
from jmamba.step import init_state, make_train_step


class MetricsLog:
    """Appends one JSON object per logged step to <log_dir>/metrics.jsonl."""

    def __init__(self, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def train(cfg: Config) -> list[dict]:
    """Runs cfg.train.steps steps; returns the logged records."""
    m, t = cfg.model, cfg.train
    data = RecallData(t.seed, t.batch_size, t.seq_len, m.vocab_size, t.n_pairs)
    optimizer = make_optimizer(t)
    params = model.init_params(m, jax.random.key(t.seed))
    state = init_state(params, optimizer)
    step_fn = make_train_step(lambda p, b: model.loss_fn(p, b, m), optimizer, lr_schedule(t))
    step_fn = jax.jit(step_fn, donate_argnums=0)
    print(f"jmamba: {count_params(params) / 1e6:.2f}M params, {jax.device_count()} "
          f"{jax.default_backend()} device(s), {t.steps} steps of {t.batch_size}x{t.seq_len}"
          f" tokens, logging to {t.log_dir}/metrics.jsonl", flush=True)
    log = MetricsLog(t.log_dir)
    records, pending = [], None
    tokens_per_step = t.batch_size * t.seq_len
    last_time, last_step = time.perf_counter(), 0
    for step in range(1, t.steps + 1):
        batch = jax.tree.map(jnp.asarray, next(data))
        state, metrics = step_fn(state, batch)
        # Read step t's metrics only after step t+1 is dispatched, so the host never stalls
        # the device (nanodo's pattern).
        if pending is not None:
            records.append(_log(log, *pending, last_time, last_step, tokens_per_step))
            last_time, last_step = time.perf_counter(), pending[0]
            pending = None
        if step % t.log_every == 0 or step == t.steps:
            pending = (step, metrics)
    if pending is not None:
        records.append(_log(log, *pending, last_time, last_step, tokens_per_step))
    return records


def _log(log, step, metrics, last_time, last_step, tokens_per_step) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    dt = time.perf_counter() - last_time
    record = {"step": step, **values, "step_time_s": dt / (step - last_step),
              "tokens_per_s": tokens_per_step * (step - last_step) / dt}
    log.write(record)
    print(f"step {step:5d}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f}  "
          f"grad_norm {record['grad_norm']:.3f}  lr {record['lr']:.2e}  "
          f"{record['tokens_per_s']:.0f} tok/s", flush=True)
    return record
