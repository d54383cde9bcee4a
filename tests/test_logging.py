"""Watching a run: metrics.jsonl keys, TensorBoard events, a profiler trace, the progress
bar, NaN handling and clean stops on signals. One tiny model, few steps."""

import dataclasses
import glob
import io
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba import driver
from jmamba.driver import make_data, train
from jmamba.guard import Hooks, StopSignals
from jmamba.metrics import FIT_SHARE, MEMORY_KEYS, RunLog, fit_warning, parse_profile_steps
from jmamba.parallel.setup import (build, remat_choices, scans_layers, with_layer_stack,
                                   with_remat)
from jmamba.step import init_state, make_train_step

TINY = ModelConfig(d_model=16, n_layer=2, headdim=8, d_state=8, chunk_size=16, d_expert=16)


def tiny(tmp_path, **train_fields):
    fields = dict(steps=6, warmup_steps=1, batch_size=4, seq_len=40, log_every=2,
                  log_dir=str(tmp_path), progress="lines")
    return validate(Config(model=TINY, train=dataclasses.replace(
        TrainConfig(), **{**fields, **train_fields})))


def test_run_writes_metrics_tensorboard_and_trace(tmp_path):
    # A CPU has no known peak, so MFU shows only with --peak_tflops (given here).
    # Validation every 3 steps: its steps are logged too, with the held-out loss.
    records = train(tiny(tmp_path, profile_steps="3:5", peak_tflops=0.05, eval_every=3))
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [2, 3, 4, 6] == [r["step"] for r in records]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s",
                "expert_load_max_over_mean", "dropped_tokens", "eval_loss", "eval_accuracy"):
        assert key in lines[-1] and math.isfinite(lines[-1][key]), key
    assert "eval_loss" in lines[1] and "eval_loss" not in {**lines[0], **lines[2]}
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))
    memory = json.load(open(tmp_path / "memory.json"))  # XLA's estimate, before step 1
    assert set(memory) == set(MEMORY_KEYS) | {"remat", "scan_layers"}
    assert memory["total_bytes"] >= memory["temp_bytes"] > 0 and memory["argument_bytes"] > 0
    assert memory["remat"] == "none"  # --remat auto where the pool is unknown (the CPU)
    assert memory["scan_layers"] is True  # --scan_layers auto on the CPU


def test_remat_auto_compiles_full_remat_when_none_does_not_fit(tmp_path, monkeypatch):
    """--remat auto (the default) keeps the step without remat where XLA's estimate fits
    the device pool (the CPU reports none: test_run_writes_metrics_tensorboard_and_trace),
    and falls back to full remat, which needs less, where it does not."""
    cfg = tiny(tmp_path, seq_len=128)
    run = build(cfg)
    batch = jax.tree.map(jnp.asarray, next(make_data(cfg)))
    notes = []
    _, none = driver.compile_step(run, cfg, run.state, batch, notes.append)
    assert none["remat"] == "none"
    monkeypatch.setattr(driver, "device_pool_bytes",
                        lambda: int((none["total_bytes"] - 1) / FIT_SHARE))
    _, chosen = driver.compile_step(run, cfg, run.state, batch, notes.append)
    assert chosen["remat"] == "full" and chosen["total_bytes"] < none["total_bytes"]
    assert any("compiling with --remat full" in n for n in notes), notes


def test_remat_auto_rules():
    """What --remat auto tries, by layout, layer stack and backend (setup.remat_choices)."""
    cfg = tiny("unused")
    scanned, unrolled = (dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, scan_layers=s)) for s in (True, False))
    assert remat_choices(scanned, "gpu") == ("full",)  # the scan: full measured faster
    assert remat_choices(unrolled, "gpu") == ("none", "full")  # none where it fits
    assert remat_choices(scanned, "cpu") == ("none", "full")
    piped = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=2,
                                                                   microbatches=4))
    assert remat_choices(piped, "gpu") == ("none",)  # 1F1B recomputes whatever --remat says
    assert remat_choices(with_remat(unrolled, "dots"), "gpu") == ("dots",)


def test_scan_layers_auto_rules():
    """--scan_layers auto (None): unrolled on one GPU only; the scan on the CPU, on every
    multi-device or microbatched layout, and wherever the flag is given (setup.scans_layers).
    remat auto follows the settled stack."""
    cfg = tiny("unused")
    assert cfg.model.scan_layers is None  # the default is auto

    def at(**parallel):
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel,
                                                                     **parallel))
    assert not scans_layers(cfg, "gpu") and scans_layers(cfg, "cpu")
    assert remat_choices(cfg, "gpu") == ("none", "full")
    for layout in (dict(ep=2), dict(pp=2, microbatches=4), dict(microbatches=4)):
        assert scans_layers(at(**layout), "gpu"), layout
    assert remat_choices(at(ep=2), "gpu") == ("full",)
    for given in (True, False):
        fixed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                   scan_layers=given))
        assert scans_layers(fixed, "gpu") is given and scans_layers(fixed, "cpu") is given
        assert with_layer_stack(fixed).model.scan_layers is given
    assert with_layer_stack(cfg, "gpu").model.scan_layers is False
    assert with_layer_stack(cfg, "cpu").model.scan_layers is True


def test_fit_warning_names_what_to_change():
    report = {"argument_bytes": 10, "output_bytes": 10, "temp_bytes": 60 * 2**30,
              "total_bytes": 64 * 2**30}
    one_device = driver.memory_fixes(validate(Config()))
    line = fit_warning(report, 59 * 2**30, one_device)
    assert "64.0 GB" in line and "59.0 GB" in line and "--batch_size" in line
    assert (fit_warning(report, 80 * 2**30, one_device) is None
            and fit_warning(report, None, one_device) is None)
    # the layout's own advice (driver.memory_fixes): a residual-stash pipeline
    cfg = validate(Config(model=ModelConfig(n_layer=4), parallel=ParallelConfig(
        pp=2, microbatches=4, pp_stash="residuals")))
    line = fit_warning(report, 59 * 2**30, driver.memory_fixes(cfg))
    assert "lower --batch_size, raise --microbatches, use --pp_stash inputs, or" in line
    assert "--remat" not in line


def test_progress_bar_on_a_terminal(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    log = RunLog(str(tmp_path), total_steps=10, stream=out)
    for step in range(1, 5):
        log.step_done(step)
    log.write({"step": 4, "loss": 1.5})
    log.close()
    text = out.getvalue()
    assert "\r[#########" in text and "4/10" in text and "ETA" in text and "loss 1.5" in text


def test_profile_steps_parse():
    assert parse_profile_steps("10:13") == (10, 13) and parse_profile_steps("") is None
    for bad in ("13:10", "a:b", "0:3", "5"):
        with pytest.raises(ValueError, match="train.profile_steps"):
            parse_profile_steps(bad)


def test_nan_loss_stops_naming_the_step(tmp_path):
    # lr = 1e30 blows the parameters up within a couple of steps.
    with pytest.raises(SystemExit, match="non-finite loss at step [0-9]+"):
        train(tiny(tmp_path, lr=1e30, grad_clip=1e30, steps=4))


def test_skip_nonfinite_keeps_the_old_state():
    def loss_fn(w, batch):
        loss = jnp.sum(w * batch)
        return loss, {"expert_counts": jnp.ones((1, 2)), "dropped_tokens": jnp.zeros(())}
    opt = optax.sgd(0.1)
    step = jax.jit(make_train_step(loss_fn, opt, lambda s: 0.1, 1.0, skip_nonfinite=True))
    state = init_state(jnp.ones(3), opt)
    state, m = step(state, jnp.ones(3))
    assert m["skipped"] == 0 and not np.allclose(state.params, 1.0)
    good = state.params
    state, m = step(state, jnp.array([1.0, jnp.nan, 1.0]))
    assert m["skipped"] == 1 and int(state.step) == 2
    np.testing.assert_array_equal(state.params, good)


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path):
    saved, before = [], signal.getsignal(signal.SIGTERM)
    hooks = Hooks(save=lambda step, state: saved.append(step),
                  after_log=lambda record: os.kill(os.getpid(), signal.SIGTERM))
    records = train(tiny(tmp_path), hooks)  # SIGTERM: a normal return, exit code 0
    assert records[-1]["step"] == 2
    assert saved == [3]  # the step after the logged one (its metrics are read one late)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back


def test_a_sigterm_before_the_loop_is_held_for_it():
    """Many processes: a SIGTERM while compiling is kept and stops the loop after its
    first step (jax.distributed's handler would otherwise take it and the run go on)."""
    from jmamba import guard
    before = signal.getsignal(signal.SIGTERM)
    try:
        guard.hold_early_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)  # the process goes on
        with StopSignals() as s:
            assert s.received == signal.SIGTERM and s.exit_code == 0
        # the loop gives back the handler from before the hold, not the hold
        assert signal.getsignal(signal.SIGTERM) is before
        with StopSignals() as s:  # taken once
            assert s.received is None
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigint_sets_exit_code_130_and_a_second_one_interrupts():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGINT)
        assert s.received == signal.SIGINT and s.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_resumed_run_replaces_the_records_after_its_checkpoint(tmp_path):
    """Records of steps after the resume step (logged by a run that died before its next
    checkpoint) are dropped when the resumed run opens the log; earlier ones stay."""
    from jmamba.metrics import RunLog
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 7):
            f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
    log = RunLog(str(tmp_path), 8, "lines", start_step=4, stream=io.StringIO())
    log.write({"step": 5, "loss": 0.5})
    log.file.close()
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                     (5, 0.5)]
