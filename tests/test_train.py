"""The embedded task and a short training run that must lower the loss."""

import dataclasses
import json

import numpy as np

from jmamba.config import Config, TrainConfig, validate
from jmamba.data import recall_batch
from jmamba.driver import train


def test_recall_batch_answers_are_the_queried_values():
    b = recall_batch(seed=1, step=3, batch_size=4, seq_len=40, vocab_size=64, n_pairs=5)
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (4, 40)
    for row in range(4):
        seq = np.concatenate([b["inputs"][row], b["targets"][row, -1:]])
        table = dict(zip(seq[1:11:2], seq[2:12:2]))  # the 5 (key, value) pairs
        answers = np.nonzero(b["mask"][row])[0]
        assert len(answers) == (40 - 10) // 2
        for t in answers:  # input t is a queried key, target t is its value
            assert b["targets"][row, t] == table[b["inputs"][row, t]]
    again = recall_batch(seed=1, step=3, batch_size=4, seq_len=40, vocab_size=64, n_pairs=5)
    np.testing.assert_array_equal(again["inputs"], b["inputs"])
    other = recall_batch(seed=1, step=4, batch_size=4, seq_len=40, vocab_size=64, n_pairs=5)
    assert not np.array_equal(other["inputs"], b["inputs"])


def test_short_run_lowers_loss(tmp_path):
    cfg = validate(Config(train=dataclasses.replace(
        TrainConfig(), steps=40, warmup_steps=10, log_every=5, log_dir=str(tmp_path))))
    records = train(cfg)
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.5, (first, last)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(5, 41, 5))
    for key in ("step", "loss", "tokens_per_s", "accuracy", "grad_norm", "lr", "aux_loss",
                "z_loss", "expert_load_max_over_mean"):
        assert key in lines[-1]
    assert all(np.isfinite(r["loss"]) for r in lines)
    # The default run validates on the embedded task's held-out split, at the last step.
    assert np.isfinite(lines[-1]["eval_loss"]) and "eval_loss" not in lines[0]


def test_validation_leaves_training_as_it_was(tmp_path):
    """Eval reads its own held-out batches and no training state: a run that validates at
    every step logs the same training losses, bit for bit, as one that never does."""
    from jmamba.config import ModelConfig

    def run(eval_every, name):
        return train(validate(Config(
            model=ModelConfig(d_model=16, n_layer=1, headdim=8, d_state=8, chunk_size=16,
                              d_expert=16),
            train=dataclasses.replace(TrainConfig(), steps=3, warmup_steps=1, batch_size=4,
                                      seq_len=40, log_every=1, eval_every=eval_every,
                                      progress="lines", log_dir=str(tmp_path / name)))))

    with_eval, without = run(1, "with"), run(0, "without")
    assert all(np.isfinite(r["eval_loss"]) for r in with_eval)
    assert not any("eval_loss" in r for r in without)
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    assert [r["grad_norm"] for r in with_eval] == [r["grad_norm"] for r in without]
