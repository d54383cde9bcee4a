"""Token files: preparation, exact deterministic mixing, data-parallel rows, resumable
position, and clear errors on bad files."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from jmamba.config import Config, ModelConfig, TrainConfig, validate
from jmamba.tokens import MIX_SLOTS, TokenData, mix_slots, parse_data_spec

REPO = __file__.rsplit("/tests/", 1)[0]


def write_tokens(stem, tokens, vocab=64, dtype="uint16", **meta):
    np.asarray(tokens, dtype).tofile(f"{stem}.bin")
    json.dump({"dtype": dtype, "vocab_size": vocab, "n_tokens": len(tokens), **meta},
              open(f"{stem}.json", "w"))
    return str(stem)


def test_prepare_data_byte_fallback(tmp_path):
    (tmp_path / "a.txt").write_text("hi\nthere\n\n")
    (tmp_path / "b.txt").write_text("é")
    out = tmp_path / "new" / "folder" / "d"  # prepare_data makes the folder
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--out", str(out),
                    "--docs", "lines", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                   cwd=REPO, check=True, capture_output=True)
    meta = json.load(open(f"{out}.json"))
    assert meta["vocab_size"] == 258 and meta["eos_id"] == 256 and meta["n_documents"] == 3
    ids = np.fromfile(f"{out}.bin", np.uint16)
    expected = [*b"hi", 256, *b"there", 256, *"é".encode(), 256]
    assert ids.tolist() == expected and meta["n_tokens"] == len(expected)


def test_prepare_data_failures_keep_the_old_dataset(tmp_path):
    """A re-run that fails (a missing input, inputs with no document) exits 2 with one line
    and leaves the previous <out>.bin/.json as they were, with no temporary files."""
    def prepare(*inputs):
        return subprocess.run([sys.executable, "scripts/prepare_data.py", "--out",
                               str(tmp_path / "d"), *map(str, inputs)],
                              cwd=REPO, capture_output=True, text=True)

    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "empty.txt").write_text("  \n")
    assert prepare(tmp_path / "a.txt").returncode == 0
    before = {f: (tmp_path / f).read_bytes() for f in ("d.bin", "d.json")}
    for inputs in ([tmp_path / "a.txt", tmp_path / "missing.txt"], [tmp_path / "empty.txt"],
                   ["--tokenizer", tmp_path / "no_tokenizer.json", tmp_path / "a.txt"]):
        proc = prepare(*inputs)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "nothing was" in proc.stderr
        assert {f: (tmp_path / f).read_bytes() for f in before} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "a.txt", "d.bin", "d.json", "empty.txt"]


def test_mixing_is_exact_and_even():
    slots = mix_slots([0.7, 0.3])
    assert len(slots) == MIX_SLOTS and np.sum(slots == 1) == 300
    assert np.sum(slots[:100] == 1) == 30  # spread over the cycle, not in runs
    assert parse_data_spec("a.bin:0.7, b") == [("a.bin", 0.7), ("b", 1.0)]
    with pytest.raises(ValueError, match="train.data"):
        parse_data_spec("a.bin:-1")


def test_batches_deterministic_sharded_resumable_and_cover_an_epoch(tmp_path):
    a = write_tokens(tmp_path / "a", np.arange(1 + 8 * 10) % 50)  # 10 windows of 8
    b = write_tokens(tmp_path / "b", np.full(100, 60))
    spec = f"{a}:0.75,{b}:0.25"
    data = TokenData(spec, batch_size=4, seq_len=8, vocab_size=64, seed=3)
    batches = [next(data) for _ in range(5)]
    assert data.state() == {"step": 5}
    # targets are inputs shifted by one; every fourth row comes from b
    np.testing.assert_array_equal(batches[0]["targets"][:, :-1], batches[0]["inputs"][:, 1:])
    rows = np.concatenate([x["inputs"] for x in batches])
    from_b = rows[:, 0] == 60
    assert from_b.sum() == 5
    # dataset a's first 10 samples are its 10 windows, each once (one epoch)
    starts = sorted(rows[~from_b][:10, 0])
    assert starts == sorted((np.arange(10) * 8) % 50)
    # a restored iterator and the two halves of a data-parallel pair give the same rows
    again = TokenData(spec, 4, 8, 64, seed=3)
    again.restore({"step": 2})
    np.testing.assert_array_equal(next(again)["inputs"], batches[2]["inputs"])
    halves = [TokenData(spec, 4, 8, 64, 3, process_index=p, process_count=2, step=2)
              for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]),
                                  batches[2]["inputs"])


def test_bad_files_raise_clear_errors(tmp_path):
    good = write_tokens(tmp_path / "good", np.arange(40))
    with pytest.raises(ValueError, match="empty"):
        TokenData(write_tokens(tmp_path / "e", []), 2, 8, 64, 0)
    trunc = write_tokens(tmp_path / "t", np.arange(40))
    with open(trunc + ".bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="truncated"):
        TokenData(trunc, 2, 8, 64, 0)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        TokenData(good, 2, 64, 64, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenData(write_tokens(tmp_path / "v", np.arange(40), vocab=1000), 2, 8, 64, 0)
    liar = write_tokens(tmp_path / "l", np.arange(40) + 40)  # ids to 79; sidecar says 64
    liar_data = TokenData(liar, 2, 8, 64, 0)
    # The first id >= 64 is token 24 of the file (id 64); the message names the file, the
    # position and the training step whose batch holds it.
    with pytest.raises(ValueError, match=r"token id 64 at token 24 of .*l\.bin is outside "
                       r"the model's vocabulary \(64\).*\(in the batch of step [12]\)"):
        for _ in range(2):  # two batches of two cover all four windows
            next(liar_data)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        TokenData(str(tmp_path / "missing"), 2, 8, 64, 0)
    garbage = write_tokens(tmp_path / "g", np.arange(40))
    for text in ("not json", "[1, 2]", '{"dtype": "uint16", "vocab_size": "64"}',
                 '{"dtype": "uint16", "eos_id": 64}'):
        (tmp_path / "g.json").write_text(text)
        with pytest.raises(ValueError, match=r"g\.json.*prepare_data"):
            TokenData(garbage, 2, 8, 64, 0)


def test_training_on_token_files(tmp_path):
    from jmamba.driver import train
    # Documents end in id 63 (the sidecar's eos_id): the run resets the state at them.
    stem = write_tokens(tmp_path / "d", np.random.default_rng(0).integers(0, 64, 2000),
                        eos_id=63)
    cfg = validate(Config(
        model=ModelConfig(d_model=16, n_layer=1, headdim=8, d_state=8, chunk_size=16),
        train=dataclasses.replace(TrainConfig(), data=f"{stem}:1", steps=2, warmup_steps=0,
                                  batch_size=2, seq_len=16, log_every=1,
                                  log_dir=str(tmp_path / "run"), progress="lines",
                                  eval_data=stem, eval_every=2, loader="numpy",
                                  ckpt_dir=str(tmp_path / "ckpt"))))
    records = train(cfg)
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["loss"])
    assert "eval_loss" not in records[0] and np.isfinite(records[-1]["eval_loss"])
    # The checkpoint records the numpy loader's order: resuming through grain (another
    # order) is refused, naming the flag.
    if importlib.util.find_spec("grain"):
        from jmamba.checkpoint import CheckpointError
        other = dataclasses.replace(cfg.train, loader="grain", steps=3)
        with pytest.raises(CheckpointError, match="pass --loader numpy"):
            train(dataclasses.replace(cfg, train=other))
    # Without the boundaries the state flows across documents: other losses.
    one_seq = dataclasses.replace(cfg.train, documents=False, log_dir=str(tmp_path / "run3"),
                                  ckpt_dir="")
    assert train(dataclasses.replace(cfg, train=one_seq))[0]["loss"] != records[0]["loss"]


def which_windows(loader, n_steps):
    """(file, window) of every row of the next n_steps batches, for files whose token at
    position i is 1000 * file + i (so a row's first token names its window)."""
    out = []
    for _ in range(n_steps):
        first = next(loader)["inputs"][:, 0]
        out += [(int(t) // 1000, int(t) % 1000 // 8) for t in first]
    return out


@pytest.mark.parametrize("loader", ["numpy", "grain"])
def test_loaders_share_the_data_definition(tmp_path, loader):
    """Both loaders (grain's own shuffle, mix and batch in jmamba/grain_data.py; the numpy
    twin) read every window once per epoch per file, mix by the weights exactly, split the
    rows over processes, resume at a step, and name a bad id's file, position and step."""
    if loader == "grain":
        pytest.importorskip("grain")
        from jmamba.grain_data import GrainTokenData

        def make(spec, B, seed, **kw):
            return GrainTokenData(spec, B, 8, 2000, seed, n_steps=40, threads=2, **kw)
    else:
        def make(spec, B, seed, **kw):
            return TokenData(spec, B, 8, 2000, seed, **kw)
    a = write_tokens(tmp_path / "a", np.arange(8 * 30 + 1), vocab=2000)  # 30 windows
    b = write_tokens(tmp_path / "b", 1000 + np.arange(8 * 20 + 1), vocab=2000)  # 20
    seen = which_windows(make(f"{a}:0.7,{b}:0.3", 4, seed=5), 25)
    assert sum(f == 0 for f, _ in seen) == 70  # exact over the first 100 samples
    for f, n in ((0, 30), (1, 20)):  # the first epoch of each file: each window once
        first_epoch = [w for g, w in seen if g == f][:n]
        assert sorted(first_epoch) == list(range(n))
    seen2 = [w for g, w in seen if g == 1][20:30]  # the second epoch: another order
    assert seen2 != [w for g, w in seen if g == 1][:10] and len(set(seen2)) == 10
    assert which_windows(make(a, 4, seed=6), 5) != which_windows(make(a, 4, seed=5), 5)
    # Two processes read the halves of the one-process batches; a resumed loader goes on
    # where the first left off.
    whole = [next(make(a, 4, seed=5))["inputs"]]
    halves = [next(make(a, 4, seed=5, process_index=p, process_count=2))["inputs"]
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole[0])
    straight = make(a, 4, seed=5)
    batches = [next(straight) for _ in range(8)]
    resumed = make(a, 4, seed=5)
    resumed.restore({"step": 6})
    again = next(resumed)
    for k in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(again[k], batches[6][k])
    assert straight.state() == {"step": 8} and resumed.state() == {"step": 7}
    liar = write_tokens(tmp_path / "l", np.arange(40) + 1990, vocab=2000)  # ids to 2029
    with pytest.raises(ValueError, match=r"outside the model's vocabulary.*\(in the batch "
                       r"of step [12]\)"):
        bad = make(liar, 2, 0)
        for _ in range(2):
            next(bad)


def test_mark_documents_indexes_and_masks_the_cross_document_targets():
    from jmamba.tokens import mark_documents
    E = 9  # EOS
    inputs = np.array([[4, 5, E, 6, E, E, 7]], np.int32)
    batch = {"inputs": inputs, "targets": np.roll(inputs, -1, 1),
             "mask": np.ones((1, 7), np.float32)}
    out = mark_documents(batch, E)
    np.testing.assert_array_equal(out["seq_idx"], [[0, 0, 0, 1, 1, 2, 3]])
    np.testing.assert_array_equal(out["mask"], [[1, 1, 0, 1, 0, 0, 1]])
    across = mark_documents(batch, E, loss_across=True)
    np.testing.assert_array_equal(across["mask"], batch["mask"])
