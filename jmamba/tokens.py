"""Pre-tokenized token files: a deterministic, data-parallel, weighted mixture of datasets.

A dataset is `<name>.bin` (a flat numpy array of uint16 or uint32 token ids: documents
concatenated, each ended by an EOS token, as scripts/prepare_data.py writes them) plus
`<name>.json` ({"dtype", "vocab_size", "n_tokens", ...}).

Sequences are packed GPT-style: sample j of a dataset is the window of seq_len + 1 tokens
starting at window_j * seq_len, so windows cross document boundaries (a document longer or
shorter than seq_len needs no special case; a file shorter than one window is an error).
Windows are visited in a fresh random order each epoch. Mixing is exact and stateless:
weights become integer slot counts in a cycle of MIX_SLOTS samples, spread evenly, so the
k-th sample of dataset d is known in O(1). Global sample g = step * batch_size + row; a
process reads only the rows its devices hold (the driver passes them; by default process p
of P reads rows [p B/P, (p+1) B/P)). A batch is therefore a pure function of
(seed, step): the iterator's whole position is the step (state()/restore()).

This module defines the data and reads it with numpy; jmamba/grain_data.py loads the same
batches through grain (`--loader grain`, the default when grain is installed), with this
reader as its twin and the fallback where grain cannot be installed.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

MIX_SLOTS = 1000  # mixture weights are rounded to 1/1000
DTYPES = ("uint16", "uint32")


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """'a.bin:0.7,b.bin:0.3' -> [('a.bin', 0.7), ('b.bin', 0.3)]; a missing weight is 1."""
    out = []
    for item in spec.split(","):
        path, sep, weight = item.strip().rpartition(":")
        if not sep:
            path, weight = weight, "1"
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not path or not w > 0:
            raise ValueError(f"config field 'train.data' = {spec!r}: expected "
                             "'path[:weight],path[:weight]' with weights > 0; bad item "
                             f"{item!r}")
        out.append((path, w))
    return out


def sidecar(path: str) -> dict:
    """The JSON object next to a token file (`<stem>.json`); ValueError naming the file
    when it is missing or is not one."""
    stem = path[:-4] if path.endswith(".bin") else path
    meta_path = stem + ".json"
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"token file {meta_path} not found (make one with "
                                "scripts/prepare_data.py)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path} cannot be read as a token-file sidecar ({e}); "
                         "re-make it with scripts/prepare_data.py") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} is not a token-file sidecar (expected a JSON "
                         "object); re-make it with scripts/prepare_data.py")
    return meta


class TokenFile:
    """One memory-mapped token file, checked against its sidecar."""

    def __init__(self, path: str, vocab_size: int, seq_len: int):
        stem = path[:-4] if path.endswith(".bin") else path
        self.path = stem + ".bin"
        meta_path = stem + ".json"
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"token file {self.path} not found (make one with "
                                    "scripts/prepare_data.py)")
        meta = sidecar(path)
        for key in ("vocab_size", "n_tokens"):
            if key in meta and (not isinstance(meta[key], int) or isinstance(meta[key], bool)
                                or meta[key] < 0):
                raise ValueError(f"{meta_path}: {key} must be a non-negative integer, got "
                                 f"{meta[key]!r}; re-make it with scripts/prepare_data.py")
        if meta.get("dtype") not in DTYPES:
            raise ValueError(f"{meta_path}: dtype must be one of {DTYPES}, got "
                             f"{meta.get('dtype')!r}")
        dtype = np.dtype(meta["dtype"])
        size = os.path.getsize(self.path)
        if size == 0:
            raise ValueError(f"{self.path} is empty")
        n = size // dtype.itemsize
        if size % dtype.itemsize or n != meta.get("n_tokens", n):
            raise ValueError(f"{self.path} is truncated: {size} bytes holds {n} {dtype} "
                             f"tokens, {meta_path} says {meta.get('n_tokens')}")
        if meta.get("vocab_size", 0) > vocab_size:
            raise ValueError(f"{self.path} was tokenized with vocab_size "
                             f"{meta['vocab_size']} > model.vocab_size {vocab_size}; raise "
                             "--model.vocab_size")
        if n < seq_len + 1:
            raise ValueError(f"{self.path} holds {n} tokens, fewer than one sequence of "
                             f"seq_len + 1 = {seq_len + 1}; lower --seq_len or add data")
        eos = meta.get("eos_id")
        if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool)
                                or not 0 <= eos < vocab_size):
            raise ValueError(f"{meta_path}: eos_id must be a token id below model.vocab_size "
                             f"{vocab_size}, got {eos!r}; re-make it with "
                             "scripts/prepare_data.py")
        self.eos_id = eos  # None: the sidecar names no document boundaries
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.n_windows = (n - 1) // seq_len
        self.vocab_size = vocab_size

    def window(self, j: int, seq_len: int) -> np.ndarray:
        """Window j; an id outside the model's vocabulary raises, naming where it is."""
        w = np.asarray(self.tokens[j * seq_len: j * seq_len + seq_len + 1], np.int64)
        if w.max() >= self.vocab_size:
            at = int(np.argmax(w >= self.vocab_size))
            raise ValueError(f"token id {int(w[at])} at token {j * seq_len + at} of "
                             f"{self.path} is outside the model's vocabulary "
                             f"({self.vocab_size}); the data and --model.vocab_size disagree")
        return w


def mark_documents(batch: dict, eos_id: int, loss_across: bool = False) -> dict:
    """Adds 'seq_idx' (int32 [B, L], mamba_ssm's packed-documents index): the number of EOS
    inputs before each position, so the token after an EOS starts a new document and the
    EOS ends its own. Unless loss_across, the targets of EOS inputs (each the next
    document's first token, which nothing in its own document precedes) are not scored."""
    is_eos_BxL = batch["inputs"] == eos_id
    seq_idx = (np.cumsum(is_eos_BxL, axis=1) - is_eos_BxL).astype(np.int32)
    out = {**batch, "seq_idx": seq_idx}
    if not loss_across:
        out["mask"] = np.where(is_eos_BxL, 0.0, batch["mask"]).astype(batch["mask"].dtype)
    return out


def as_batch(windows) -> dict[str, np.ndarray]:
    """Windows of seq_len + 1 tokens -> {'inputs', 'targets': int32 [R, seq_len], 'mask'}
    (ids were checked against the vocabulary by TokenFile.window)."""
    seqs = np.stack(windows).astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:],
            "mask": np.ones(seqs[:, 1:].shape, np.float32)}


def mix_slots(weights: list[float]) -> np.ndarray:
    """A cycle of MIX_SLOTS dataset ids, counts proportional to the weights (largest
    remainder), each dataset's slots spread evenly over the cycle."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    counts = np.floor(w * MIX_SLOTS).astype(int)
    order = np.argsort(-(w * MIX_SLOTS - counts), kind="stable")
    counts[order[:MIX_SLOTS - counts.sum()]] += 1
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    ids = np.concatenate([np.full(c, d) for d, c in enumerate(counts) if c])
    return ids[np.argsort(keys, kind="stable")]


class TokenData:
    """Iterator over {'inputs', 'targets', 'mask'} batches of this process's rows."""

    ORDER = "numpy"  # the data order it gives, as checkpoints record it (grain_data.py)

    def __init__(self, spec: str, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, step: int = 0,
                 rows=None):
        """rows: the global batch rows to read (the driver passes those its devices hold);
        by default process p of P reads the p-th contiguous block of B/P rows."""
        if batch_size % process_count:
            raise ValueError(f"train.batch_size {batch_size} must split evenly over "
                             f"{process_count} processes")
        items = parse_data_spec(spec)
        self.items = items
        self.files = [TokenFile(path, vocab_size, seq_len) for path, _ in items]
        eos_ids = {f.eos_id for f in self.files}
        if len(eos_ids) > 1:
            raise ValueError("the token files name different eos_id values "
                             f"({', '.join(f'{f.path}: {f.eos_id}' for f in self.files)}); "
                             "mix only files tokenized alike")
        self.eos_id = eos_ids.pop()  # document boundaries (None: none recorded)
        self.slots = mix_slots([w for _, w in items])
        # before_D[s, d]: how many of the first s slots of the cycle belong to dataset d
        onehot = self.slots[:, None] == np.arange(len(self.files))[None, :]
        self.before = np.concatenate([np.zeros((1, len(self.files)), int),
                                      np.cumsum(onehot, axis=0)])
        self.batch_size, self.seq_len, self.vocab, self.seed = (batch_size, seq_len,
                                                               vocab_size, seed)
        if rows is None:
            n = batch_size // process_count
            rows = range(process_index * n, (process_index + 1) * n)
        if not rows or not all(0 <= r < batch_size for r in rows):
            raise ValueError(f"rows must be a non-empty subset of range({batch_size})")
        self.rows = tuple(rows)
        self.step = step

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])

    @functools.lru_cache(maxsize=8)
    def _epoch_order(self, d: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, d, epoch]).permutation(self.files[d].n_windows)

    def sample(self, g: int) -> np.ndarray:
        """Global sample g: its dataset's k-th window, in that epoch's order. A bad id
        raises ValueError naming its file, position and the training step whose batch
        holds it (data step s feeds training step s + 1), whichever loader reads it."""
        cycle, slot = divmod(g, MIX_SLOTS)
        d = int(self.slots[slot])
        k = cycle * int(self.before[-1, d]) + int(self.before[slot, d])
        epoch, i = divmod(k, self.files[d].n_windows)
        try:
            return self.files[d].window(int(self._epoch_order(d, epoch)[i]), self.seq_len)
        except ValueError as e:
            raise ValueError(f"{e} (in the batch of step {g // self.batch_size + 1})") from None

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return as_batch([self.sample(step * self.batch_size + r) for r in self.rows])

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch(self.step)
        self.step += 1
        return batch
