"""Token files read through grain: the same batches as jmamba/tokens.py, loaded by grain.

tokens.TokenData defines the data (exact weighted mixing, per-epoch window order, this
process's rows, a batch as a pure function of (seed, step)); this module hands its samples
to grain as a random-access source, batches them with grain and iterates with grain's
thread prefetch, so batch assembly overlaps the train step. TokenData stays the twin:
tests/test_tokens.py checks that both give the same batches, split and resumed alike.

The position saved in checkpoints is the step, for both loaders: restore() re-opens grain's
dataset at that step (a MapDataset slice), so a run may resume with either loader.
"""

from __future__ import annotations

import numpy as np

from jmamba.tokens import TokenData


class _ProcessSamples:
    """grain's RandomAccessDataSource protocol over this process's samples: local index j is
    row rows[j % R] of step j // R (R rows per process per step)."""

    def __init__(self, reader: TokenData, n_steps: int):
        self.reader, self.n_steps = reader, n_steps
        self.R = len(reader.rows)

    def __len__(self) -> int:
        return self.n_steps * self.R

    def __getitem__(self, j: int) -> np.ndarray:
        step, r = divmod(int(j), self.R)
        return self.reader.sample(step * self.reader.batch_size + self.reader.rows[r])

    def __repr__(self) -> str:  # grain names the source in its logs
        return f"jmamba token files ({len(self.reader.files)} datasets)"


class GrainTokenData:
    """Same interface and batches as TokenData (next(), state(), restore())."""

    def __init__(self, spec: str, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 n_steps: int, process_index: int = 0, process_count: int = 1,
                 step: int = 0, threads: int = 8, prefetch: int = 64, rows=None):
        import grain  # optional: train.loader=auto falls back to TokenData without it

        self.reader = TokenData(spec, batch_size, seq_len, vocab_size, seed, process_index,
                                process_count, rows=rows)
        rows = len(self.reader.rows)
        self.dataset = grain.MapDataset.source(_ProcessSamples(self.reader, n_steps + 1)).batch(
            rows, drop_remainder=True, batch_fn=self._collate)
        self.options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self.restore({"step": step})  # opened lazily: restore() may move it before any read

    def _collate(self, seqs) -> dict[str, np.ndarray]:
        seqs = np.stack(seqs).astype(np.int32)  # ids were checked by TokenData.sample
        return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:],
                "mask": np.ones((len(seqs), self.reader.seq_len), np.float32)}

    @property
    def eos_id(self):
        return self.reader.eos_id

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
