"""Token files through grain's own dataset operations (`--loader grain`, the default when
grain is installed).

The pipeline, all grain `MapDataset` operations (random access, so a batch is a pure
function of (seed, step) and resuming is a slice):
  per file: range(windows) -> seed(seed + d).shuffle() -> repeat()   a fresh order per epoch
  mix(files, weights)                                                exact weighted mixture
  this process's rows of each step -> read the windows              (jmamba-specific)
  batch(rows) -> to_iter_dataset(ReadOptions)                        threads read ahead
Only the row selection and the window read are ours: grain knows neither the token-file
format (jmamba/tokens.py) nor which rows of a global batch this process's devices hold.

tokens.TokenData is the plain twin and the fallback without grain. It defines the same
data (every window once per epoch per file in a seeded order, weights exact over each
cycle, rows split the same way, a batch a pure function of (seed, step)) with numpy's
permutation and its own slot cycle, so the two loaders visit windows in different orders:
tests/test_tokens.py checks the properties they share. A checkpoint records which order it
was trained in (Checkpoints, data "order"), and resuming refuses the other loader.
"""

from __future__ import annotations

import numpy as np

from jmamba.tokens import TokenData, as_batch


class GrainTokenData:
    """Same interface as TokenData (next(), state(), restore(), eos_id)."""

    ORDER = "grain"  # the data order it gives, as checkpoints record it

    def __init__(self, spec: str, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 n_steps: int, process_index: int = 0, process_count: int = 1,
                 step: int = 0, threads: int = 8, prefetch: int = 64, rows=None):
        import grain  # optional: train.loader=auto falls back to TokenData without it

        # TokenData opens and checks the files, the mixture weights and this process's rows
        # (its own reading order is not used here).
        checked = TokenData(spec, batch_size, seq_len, vocab_size, seed, process_index,
                            process_count, rows=rows)
        self.files, self.rows, self.eos_id = checked.files, checked.rows, checked.eos_id
        self.batch_size, self.seq_len = batch_size, seq_len
        weights = [w for _, w in checked.items]
        per_file = [grain.MapDataset.range(f.n_windows).seed(seed + d).shuffle().repeat()
                    .map(lambda j, d=d: (d, j)) for d, f in enumerate(self.files)]
        # One file: mix() of one dataset would be the identity; skip it.
        self.mixed = (grain.MapDataset.mix(per_file, weights) if len(per_file) > 1
                      else per_file[0])
        R = len(self.rows)
        self.dataset = grain.MapDataset.range((n_steps + 1) * R).map(self._read).batch(
            R, drop_remainder=True, batch_fn=as_batch)
        self.options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self.restore({"step": step})  # opened lazily: restore() may move it before any read

    def _read(self, j: int) -> np.ndarray:
        """Local sample j: row rows[j % R] of step j // R of the global mixture. A bad id
        raises ValueError naming its file, position and training step (data step s feeds
        training step s + 1)."""
        step, r = divmod(int(j), len(self.rows))
        d, w = self.mixed[step * self.batch_size + self.rows[r]]
        try:
            return self.files[d].window(int(w), self.seq_len)
        except ValueError as e:
            raise ValueError(f"{e} (in the batch of step {step + 1})") from None

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:  # grain's threads start reading ahead from here
            self._it = iter(self.dataset.slice(slice(self.step, None)).to_iter_dataset(
                self.options))
        batch = next(self._it)
        self.step += 1
        return batch
