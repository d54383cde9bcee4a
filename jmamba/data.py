"""The embedded default dataset: multi-query associative recall (Zoology / Mamba paper).

Each sequence lists n_pairs (key, value) pairs, then asks for keys again; the model must
answer each query with that key's value. The loss and accuracy count only those answers.
Batches are a pure function of (seed, step), so the iterator position is just the step.
"""

from __future__ import annotations

import numpy as np

PAD, BOS = 0, 1


SPLITS = {"train": (), "eval": (1,)}  # the held-out split draws from its own streams


def recall_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab_size: int,
                 n_pairs: int, split: str = "train") -> dict[str, np.ndarray]:
    """Returns {'inputs', 'targets': int32 [B, L], 'mask': float32 [B, L]}. The 'eval'
    split's batches come from random streams the training batches never use."""
    rng = np.random.default_rng([seed, step, *SPLITS[split]])
    n_sym = (vocab_size - 2) // 2  # keys are [2, 2 + n_sym), values [2 + n_sym, 2 + 2 n_sym)
    keys_BxN = np.argsort(rng.random((batch_size, n_sym)), axis=1)[:, :n_pairs] + 2
    values_BxN = rng.integers(0, n_sym, (batch_size, n_pairs)) + 2 + n_sym
    n_queries = (seq_len + 1 - 1 - 2 * n_pairs) // 2
    pick_BxQ = rng.integers(0, n_pairs, (batch_size, n_queries))
    rows = np.arange(batch_size)[:, None]
    context = np.stack([keys_BxN, values_BxN], axis=-1).reshape(batch_size, -1)
    queries = np.stack([keys_BxN[rows, pick_BxQ], values_BxN[rows, pick_BxQ]],
                       axis=-1).reshape(batch_size, -1)
    seq = np.full((batch_size, seq_len + 1), PAD, np.int32)
    seq[:, 0] = BOS
    seq[:, 1:1 + 2 * n_pairs] = context
    q0 = 1 + 2 * n_pairs
    seq[:, q0:q0 + 2 * n_queries] = queries
    mask = np.zeros((batch_size, seq_len), np.float32)
    # Target t is seq[t + 1]; answers sit at seq positions q0 + 1, q0 + 3, ...
    mask[:, q0:q0 + 2 * n_queries:2] = 1.0
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}


class RecallData:
    """Deterministic iterator over recall batches; `step` is its whole position."""

    def __init__(self, seed, batch_size, seq_len, vocab_size, n_pairs, step=0, rows=None,
                 split="train"):
        """rows: the global rows to return (a process's share); all by default."""
        self.args = (batch_size, seq_len, vocab_size, n_pairs, split)
        self.seed, self.step = seed, step
        self.rows = None if rows is None or len(rows) == batch_size else np.asarray(rows)

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self):
        batch = recall_batch(self.seed, self.step, *self.args)  # cheap: made whole, then cut
        self.step += 1
        if self.rows is not None:
            batch = {k: v[self.rows] for k, v in batch.items()}
        return batch
