"""Validation: the loss on held-out batches during training, at every layout.

The batches are fixed (the first eval_steps batches of --eval_data, or of the embedded
task's held-out split), so successive evaluations are comparable. The loss is the model's
forward on the run's own parameters: one device's loss_fn, or the pipeline's forward at
any other layout (parallel/setup.py, `Training.eval_fn`), equal to one device's.
"""

from __future__ import annotations

import jax

from jmamba.config import Config
from jmamba.data import RecallData


def eval_source(cfg: Config, rows=None):
    """The held-out batch iterator, or None when validation is off (eval_every 0, or token
    files without --eval_data: their held-out part is the user's to name)."""
    m, t = cfg.model, cfg.train
    if not t.eval_every:
        return None
    if t.eval_data:
        from jmamba.tokens import TokenData  # a few fixed batches: no need for grain
        return TokenData(t.eval_data, t.batch_size, t.seq_len, m.vocab_size, t.seed,
                         rows=rows)
    if t.data:
        return None
    return RecallData(t.seed, t.batch_size, t.seq_len, m.vocab_size, t.n_pairs, rows=rows,
                      split="eval")


def is_due(cfg: Config, step: int) -> bool:
    t = cfg.train
    return bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)


class Evaluator:
    """evaluator(params) -> {'eval_loss', 'eval_accuracy'}: the mean cross-entropy and
    accuracy over the fixed batches (each holds the same number of scored tokens)."""

    def __init__(self, eval_fn, batches):
        self.eval_fn, self.batches = eval_fn, batches

    def __call__(self, params) -> dict[str, float]:
        parts = [self.eval_fn(params, b)[1] for b in self.batches]  # all dispatched first
        parts = jax.device_get([(p["ce"], p["accuracy"]) for p in parts])
        n = len(parts)
        return {"eval_loss": float(sum(ce for ce, _ in parts)) / n,
                "eval_accuracy": float(sum(acc for _, acc in parts)) / n}
