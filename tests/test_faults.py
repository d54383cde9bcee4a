"""Failing resources and bad input: one line, the documented exit code, no lost data, and
the check before anything heavy runs (jmamba/preflight.py, guard.py, checkpoint.py)."""

import dataclasses
import os
import shutil
import threading

import orbax.checkpoint as ocp
import pytest

from jmamba import preflight as preflight_mod
from jmamba.config import Config, ModelConfig, TrainConfig, validate
from jmamba.driver import RateMeter, train
from jmamba.guard import EXIT_BAD_INPUT, EXIT_DISK, NonFiniteLoss, RunError, SkipLimit

TINY = ModelConfig(d_model=16, n_layer=2, headdim=8, d_state=8, chunk_size=16, d_expert=16)


def tiny(tmp_path, **train_fields):
    fields = dict(steps=4, warmup_steps=1, batch_size=4, seq_len=40, log_every=1,
                  log_dir=str(tmp_path / "logs"), progress="lines", eval_every=0)
    return validate(Config(model=TINY, train=dataclasses.replace(
        TrainConfig(), **{**fields, **train_fields})))


def test_paths_that_cannot_work_fail_before_the_model_is_built(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    built = []
    monkeypatch.setattr("jmamba.driver.build", lambda cfg: built.append(cfg))
    for fields, flag in [({"ckpt_dir": str(a_file)}, "--ckpt_dir"),
                         ({"log_dir": str(a_file / "logs")}, "--log_dir"),
                         ({"data": str(tmp_path / "missing")}, "--data")]:
        with pytest.raises(RunError) as e:
            train(tiny(tmp_path, **fields))
        assert e.value.exit_code == EXIT_BAD_INPUT and flag in str(e.value)
        assert "\n" not in str(e.value)
    Usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(preflight_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    with pytest.raises(RunError, match="only 0.00 GB are free"):
        train(tiny(tmp_path, ckpt_dir=str(tmp_path / "ckpt")))
    assert not built


def test_steps_below_the_checkpoint_are_refused_and_equal_steps_do_nothing(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    train(tiny(tmp_path, steps=4, ckpt_dir=ckpt, ckpt_every=2))
    with pytest.raises(RunError, match="--steps 3, but .* resumes from step 4") as e:
        train(tiny(tmp_path, steps=3, ckpt_dir=ckpt))
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert train(tiny(tmp_path, steps=4, ckpt_dir=ckpt)) == []


@pytest.mark.parametrize("how", ["save raises", "async save fails"])
def test_a_failing_save_stops_the_run_and_names_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          how):
    """The first save (step 2) lands; the next fails as a full disk does. The run stops at
    once with exit code 1 (EXIT_DISK), step 2 stays on disk, and no checkpoint thread is
    left behind (a failed save used to hang the interpreter at exit)."""
    ckpt = tmp_path / "ckpt"
    real_save, real_check = ocp.CheckpointManager.save, ocp.CheckpointManager.check_for_errors
    calls = []

    def save(self, step, *a, **kw):
        calls.append(step)
        if len(calls) > 1:
            if how == "save raises":
                raise OSError(28, "No space left on device")
            return True  # "started", but its background write fails: nothing lands
        return real_save(self, step, *a, **kw)

    def check(self):
        if len(calls) > 1 and how == "async save fails":
            raise OSError(28, "No space left on device")
        return real_check(self)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", check)
    threads = set(threading.enumerate())
    with pytest.raises(RunError, match="last complete checkpoint is step 2") as e:
        train(tiny(tmp_path, steps=8, ckpt_every=2, ckpt_dir=str(ckpt)))
    assert e.value.exit_code == EXIT_DISK and "No space left" in str(e.value)
    assert calls[:2] == [2, 4] and len(calls) == 2  # stopped at the failure
    assert "2" in os.listdir(ckpt)
    # (asyncio's default executor starts its idle "asyncio_N" workers once a process, in
    # whichever test first needs them; Python joins them at exit without waiting on work)
    left = [t for t in set(threading.enumerate()) - threads
            if not t.daemon and t.is_alive() and not t.name.startswith("asyncio_")]
    assert not left, left


def test_skipping_non_finite_steps_has_a_limit():
    limit = SkipLimit(2)
    metrics = {"loss": float("nan"), "grad_norm": float("nan")}
    for step, bad in enumerate([True, True, False, True, True], 1):
        limit.see(step, bad, metrics)
    with pytest.raises(NonFiniteLoss, match="3 steps in a row"):
        limit.see(6, True, metrics)


def test_rate_meter_does_not_time_the_steps_after_a_wait():
    """Dispatch times: steps 1 and 2 return at once after the compile, then one step a
    second; a save waits after step 4, then 5 and 6 return at once again."""
    meter = RateMeter(tokens_per_step=1000, flops_per_token=1.0, peak_tflops=None,
                      n_devices=1)
    times = {1: 0.0, 2: 0.001, 3: 1.0, 4: 2.0, 5: 10.0, 6: 10.001, 7: 11.0, 8: 12.0}
    laps = {}
    for step, t in times.items():
        meter.see(step, t)
        laps[step] = meter.lap(step, t)
        if step == 4:
            meter.restart(4)
    assert laps[1] == laps[2] == laps[5] == laps[6] == {}
    for step in (3, 4, 7, 8):
        assert laps[step]["tokens_per_s"] == pytest.approx(1000.0, rel=1e-2), step


def test_a_bad_token_id_stops_the_run_with_one_line_and_keeps_the_checkpoints(tmp_path):
    """An id outside the vocabulary deep in a token file: exit 2, one line naming the file,
    the position and the step; every checkpoint before that step is kept."""
    import json
    import re

    import numpy as np
    from jmamba.tokens import TokenData
    tokens = np.random.default_rng(0).integers(0, 64, 40 * 16 + 1)
    tokens.astype(np.uint16).tofile(tmp_path / "d.bin")
    json.dump({"dtype": "uint16", "vocab_size": 64, "n_tokens": len(tokens)},
              open(tmp_path / "d.json", "w"))
    # The bad id goes into the first window that step 3 reads (global sample 8).
    window = int(TokenData(str(tmp_path / "d"), 4, 40, 64, seed=0)._epoch_order(0, 0)[8])
    bad_at = window * 40 + 5
    tokens[bad_at] = 99
    tokens.astype(np.uint16).tofile(tmp_path / "d.bin")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RunError) as e:
        train(tiny(tmp_path, data=str(tmp_path / "d"), loader="numpy", ckpt_dir=str(ckpt),
                   ckpt_every=1))
    msg = str(e.value)
    assert e.value.exit_code == EXIT_BAD_INPUT and "\n" not in msg
    assert re.search(rf"--data: token id 99 at token {bad_at} of .*d\.bin", msg), msg
    assert "in the batch of step 3" in msg
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [1, 2]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "logs" / "metrics.jsonl")]
    assert logged == [1, 2]  # the step before the bad batch is logged too


def test_closed_event_loop_noise_goes_to_the_orbax_log(tmp_path, monkeypatch, capsys):
    """A full disk leaves TensorStore callbacks raising "Event loop is closed" where Python
    can only report them (unraisable): those go to <log_dir>/orbax.log, not stderr; other
    unraisable exceptions still reach the previous hook."""
    import gc
    import sys

    from jmamba.checkpoint import orbax_messages_to
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    path = orbax_messages_to(str(tmp_path))

    class Raises:
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    Raises("Event loop is closed")
    Raises("something else")
    gc.collect()
    assert seen == ["something else"]
    assert "Event loop is closed" in open(path).read()
    assert "Event loop is closed" not in capsys.readouterr().err


def test_running_out_of_device_memory_is_one_line_exit_3_and_keeps_the_checkpoints(
        tmp_path, monkeypatch):
    """A step whose allocation fails on the device (XLA's RESOURCE_EXHAUSTED, as a GPU
    reports it) stops the run with exit 3 and one line: the failed allocation, XLA's plan
    from memory.json, what to change. Checkpoints saved before it stay. Other runtime
    errors pass through unchanged."""
    import jax

    from jmamba import driver
    from jmamba.guard import EXIT_OUT_OF_MEMORY
    real = driver.compile_step

    def failing_at(n, message):
        def compile_step(*args, **kwargs):
            step_fn, memory = real(*args, **kwargs)
            calls = []

            def step(state, batch):
                calls.append(1)
                if len(calls) == n:
                    raise jax.errors.JaxRuntimeError(message)
                return step_fn(state, batch)
            return step, memory
        return compile_step

    oom = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 113.85GiB with "
           "allocator GPU_0_bfc on device 0. [tf-allocator-allocation-error='']")
    monkeypatch.setattr(driver, "compile_step", failing_at(3, oom))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RunError) as e:
        train(tiny(tmp_path, ckpt_dir=str(ckpt), ckpt_every=1))
    msg = str(e.value)
    assert e.value.exit_code == EXIT_OUT_OF_MEMORY == 3 and "\n" not in msg
    assert "ran out of memory by step 3" in msg and "allocate 113.85GiB" in msg
    assert "XLA planned" in msg and "memory.json" in msg and "--batch_size" in msg
    assert f"checkpoints already saved in {ckpt} stay" in msg
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [1, 2]
    monkeypatch.setattr(driver, "compile_step", failing_at(2, "INTERNAL: something else"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        train(tiny(tmp_path / "other"))
