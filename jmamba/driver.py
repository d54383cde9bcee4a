"""The training loop around the pure step: data, jit with donation, logging to JSONL."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from jmamba.checkpoint import Checkpoints
from jmamba.config import Config
from jmamba.data import RecallData
from jmamba.parallel.setup import build


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
    m, t, p = cfg.model, cfg.train, cfg.parallel
    run = build(cfg)
    state = run.state
    # Checkpoints (jmamba/checkpoint.py): resume if ckpt_dir holds any, save every N steps.
    ckpt = Checkpoints(cfg, run) if t.ckpt_dir else None
    start = 0
    if ckpt is not None:
        state, start = ckpt.resume(state)
    data = RecallData(t.seed, t.batch_size, t.seq_len, m.vocab_size, t.n_pairs, step=start)
    n_params = count_params(run.canonical(state.params))
    print(f"jmamba: {n_params / 1e6:.2f}M params, mesh pp={p.pp} x ep={p.ep} on "
          f"{jax.default_backend()}, {p.microbatches} microbatch(es), {t.steps} steps of "
          f"{t.batch_size}x{t.seq_len} tokens, logging to {t.log_dir}/metrics.jsonl", flush=True)
    step_fn = run.step_fn
    log = MetricsLog(t.log_dir)
    records, pending = [], None
    tokens_per_step = t.batch_size * t.seq_len
    last_time, last_step = time.perf_counter(), start
    for step in range(start + 1, t.steps + 1):
        batch = jax.tree.map(jnp.asarray, next(data))
        state, metrics = step_fn(state, batch)
        if ckpt is not None:
            ckpt.maybe_save(step, state, last=step == t.steps)
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
    if ckpt is not None:
        ckpt.close()  # waits for the asynchronous saves
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
